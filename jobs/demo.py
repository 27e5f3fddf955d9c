"""`sparse-embed demo`: every flow end to end on a local object store and generated images.

Near-duplicate recall@k: for each variant (crop, resize, JPEG, brightness), the fraction
whose base image is among the top k results, the query itself excluded. The base's other
variants compete for rank 1, so the demo also prints group@1: the fraction whose top hit
is the base or another variant of it.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

from .options import positive_int

log = logging.getLogger(__name__)

BUCKET_IMAGES, BUCKET_OUT = "images", "embeddings"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=positive_int, default=200, help="base images to generate; each gets 4 variants (default 200)")
    p.add_argument("--model", default="biformer_tiny",
                   help="encoder (random init, seeded: nothing is downloaded; default biformer_tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated images (default 0)")
    p.add_argument("--corrupt", type=int, default=3, help="corrupt objects to add, each must end as an error row (default 3)")
    p.add_argument("--keep", action="store_true", help="leave the object store running at the end and print how to reach it")
    p.add_argument("--serve", action="store_true",
                   help="at the end, leave the search page running over the demo's index (and the object store) "
                        "and print its address; Ctrl-C stops both")
    p.add_argument("--serve-port", type=int, default=8080, help="port of the search page on 127.0.0.1 with --serve "
                                                                "(default 8080; 0 picks a free one)")
    p.add_argument("--contact-sheet", default=os.path.join(tempfile.gettempdir(), "sparse-embed-demo-sheet.png"),
                   help="where to write an example contact sheet (default in the temp dir)")


def corrupt_objects(n: int) -> dict[str, bytes]:
    """Objects that must become error rows: truncated JPEG, text under an image name, empty."""
    from sparse_embed.infra.synthetic_images import base_image, encode
    import numpy as np

    jpeg = encode(base_image(np.random.default_rng(1), width=64, height=64), "JPEG")
    kinds = [("broken/truncated.jpg", jpeg[: len(jpeg) // 3]), ("broken/not_an_image.jpg", b"<html>503 Slow Down</html>"),
             ("broken/empty.png", b"")]
    return dict(kinds[:n])


def near_duplicate_recall(index, images, source: str, out: str, ks=(1, 10)) -> dict[str, float]:
    from sparse_embed.pipeline.store import live, tables
    from sparse_embed.pipeline.index.snapshot import vectors_of

    t = live.read_live(tables.table_uri(out, tables.EMBEDDINGS), ["uri", "embedding"])
    row = {u: i for i, u in enumerate(t.column("uri").to_pylist())}
    vectors = vectors_of(t.column("embedding"))
    prefix = source.rstrip("/") + "/"
    queries = [im for im in images if im.kind != "base" and prefix + im.key in row]
    hits = index.hits(vectors[[row[prefix + q.key] for q in queries]], max(ks) + 1)
    others = [[h.uri for h in hs if h.uri != prefix + q.key] for q, hs in zip(queries, hits)]  # the query itself excluded
    n = max(1, len(queries))
    out_r = {f"recall@{k}": sum(prefix + q.base_key in o[:k] for q, o in zip(queries, others)) / n for k in ks}
    group = {prefix + im.key: im.base_key for im in images}
    out_r["group@1"] = sum(bool(o) and group.get(o[0]) == q.base_key for q, o in zip(queries, others)) / n
    out_r["queries"] = len(queries)
    return out_r


def serve_until_interrupted(index_root: str, port: int) -> None:
    """The search page over `index_root` on 127.0.0.1:port until Ctrl-C."""
    from .serve import start_background

    server, live = start_background(index_root, port=port)
    print(f"[demo] search page: {server.url}  (index {live.loaded.index_id}, {live.loaded.index.ntotal} vectors; "
          f"Ctrl-C stops it and the object store)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[demo] search page stopped")
    finally:
        server.stop()


def run(args) -> int:
    from sparse_embed.infra.object_store import LocalObjectStore
    from sparse_embed.infra.synthetic_images import generate
    from sparse_embed.pipeline.store import storage
    from sparse_embed.pipeline.view.contact_sheet import contact_sheet
    from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
    from sparse_embed.pipeline.index.build import BuildConfig, build_index
    from sparse_embed.pipeline.embed.report import summary
    from sparse_embed.pipeline.index.searcher import ShardedIndex, embed_queries

    t0 = time.time()
    store = LocalObjectStore().start()
    os.environ.update(store.aws_env())
    try:
        source = store.create_bucket(BUCKET_IMAGES) + "/demo/"
        out = store.create_bucket(BUCKET_OUT) + "/demo"
        images = generate(args.images, seed=args.seed)
        objects = {im.key: im.data for im in images} | corrupt_objects(args.corrupt)
        storage.put_many(source, objects)
        print(f"[demo] {len(objects)} objects ({args.images} bases, {len(images) - args.images} variants, "
              f"{args.corrupt} corrupt) in {source} at {store.endpoint_url}")
        spec = {"model": args.model, "checkpoint": None, "model_args": {}, "pool": "token", "fuse_last_two": False, "proj_dim": None}
        result = run_embed(EmbedConfig(source=source, out=out, spec=spec))
        print("[demo] embed:\n" + summary(result), end="")
        again = run_embed(EmbedConfig(source=source, out=out, spec=spec, build_index=False))
        print(f"[demo] embed again (incremental): processed {again['counts']['processed']}, "
              f"unchanged {again['counts']['unchanged']}")
        manifest = build_index(BuildConfig(f"{out}/embeddings", f"{out}/index", shards=2))
        print(f"[demo] index build: {manifest['index_id']}, {manifest['ntotal']} vectors in {len(manifest['shards'])} shards, "
              f"recall@10 vs brute force {manifest['recall_at_10']:.4f}")
        index = ShardedIndex.open(f"{out}/index")
        query = source + next(im.key for im in images if im.kind == "crop")
        hits = index.hits(embed_queries([query], index.manifest), 5)[0]
        print(f"[demo] search {query}:")
        for h in hits:
            print(f"    {h.rank}  {h.score:.4f}  {h.uri}")
        contact_sheet(query, hits, args.contact_sheet)
        print(f"[demo] contact sheet: {args.contact_sheet}")
        recall = near_duplicate_recall(index, images, source, out)
        print(f"[demo] near-duplicate recall over {recall['queries']} variant queries: "
              f"recall@1 {recall['recall@1']:.3f}  recall@10 {recall['recall@10']:.3f}  "
              f"(top hit from the same base image or its other variants: {recall['group@1']:.3f}; {time.time() - t0:.0f} s in all)")
        if args.serve:
            serve_until_interrupted(f"{out}/index", args.serve_port)
    finally:
        if args.keep:
            print("[demo] --keep: the object store stays up; reach it with:")
            for k, v in store.aws_env().items():
                print(f"  export {k}={v}")
            print(f"  (stop it with: kill {store.pid})")
        else:
            store.stop()
    return 0
