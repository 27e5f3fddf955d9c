"""`sparse-embed bench serve`: latency of POST /api/search, by image_id and by upload, over an
index of N seeded vectors on the local S3 server (weed mini on loopback).

Setup: the encoder (default resnet10t, random init, seeded) records its spec beside a Delta
table of N L2-normalised vectors of its dimension (benchmarks.index.generate); the index is
built in this process (`executor="local"`) and served by the real aiohttp app on 127.0.0.1.
Requests go one at a time from a client thread in this process (requests library, one
keep-alive session), after warm-up requests that load the encoder and warm the caches.
By image_id: the query's vector is read from the table version the index was built from
(Delta scan filtered on image_id), then searched. By upload: seeded synthetic JPEGs
(infra.synthetic_images, 192-384 px) are decoded, embedded on CPU and searched.
Latency is the client's wall time per request; p50/p99 by the nearest-rank method.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time

from sparse_embed.jobs.options import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vectors", type=positive_int, default=100_000, help="indexed vectors (default 1e5)")
    p.add_argument("--model", default="resnet10t", help="encoder of the table and of the uploads (default resnet10t)")
    p.add_argument("--requests", type=positive_int, default=200, help="timed requests per mode (default 200)")
    p.add_argument("--warmup", type=positive_int, default=10, help="untimed requests per mode first (default 10)")
    p.add_argument("-k", type=positive_int, default=24, help="results per search (default 24, the page's default)")
    p.add_argument("--files", type=positive_int, default=8, help="Parquet files the table is written in (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the vectors, query ids and images (default 0)")


def nearest_rank(samples: list[float], q: float) -> float:
    """The q-th percentile (0 < q <= 100) by the nearest-rank method: the smallest sample with
    at least q % of the samples at or below it."""
    if not samples or not 0 < q <= 100:
        raise ValueError(f"Expected samples and 0 < q <= 100, got {len(samples)} samples, q={q!r}")
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def latency_summary(seconds: list[float]) -> dict:
    """Wall times in seconds -> p50, p99, mean and max in milliseconds."""
    return {"n": len(seconds), "p50_ms": 1e3 * nearest_rank(seconds, 50), "p99_ms": 1e3 * nearest_rank(seconds, 99),
            "mean_ms": 1e3 * sum(seconds) / len(seconds), "max_ms": 1e3 * max(seconds)}


def _write_table(uri: str, n: int, dim: int, files: int, seed: int, model: str, model_version: str) -> None:
    import numpy as np
    import pyarrow as pa

    from sparse_embed.pipeline.store import tables

    from .index import generate

    schema = tables.embeddings_schema(dim)
    bounds = [n * i // files for i in range(files + 1)]
    for f, (a, b) in enumerate(zip(bounds, bounds[1:])):
        m = b - a
        x = generate(m, dim, seed * 100003 + f)
        tables.append(uri, pa.table({
            "image_id": pa.array(np.arange(a, b, dtype="int64")), "uri": [f"s3://bench/img_{i:07d}.jpg" for i in range(a, b)],
            "etag": ["e"] * m, "size": pa.array(np.zeros(m, dtype="int64")),
            "mtime": pa.array([None] * m, pa.timestamp("us", tz="UTC")),
            "width": pa.array(np.zeros(m, dtype="int32")), "height": pa.array(np.zeros(m, dtype="int32")),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
            "model": [model] * m, "model_version": [model_version] * m, "run_id": ["bench"] * m,
        }), schema)


def _timed(session, url: str, calls, warmup: int) -> list[float]:
    out = []
    for i, call in enumerate(calls):
        t0 = time.perf_counter()
        r = call(session, url)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"POST /api/search answered {r.status_code}: {r.text[:300]}")
        if i >= warmup:
            out.append(dt)
    return out


def run(args) -> int:
    import os

    import numpy as np
    import requests

    from sparse_embed.encoders import EncoderSpec, create_encoder
    from sparse_embed.infra.object_store import LocalObjectStore
    from sparse_embed.infra.synthetic_images import generate as generate_images
    from sparse_embed.jobs.serve import start_background
    from sparse_embed.pipeline.embed.report import write_encoder_spec
    from sparse_embed.pipeline.index.build import BuildConfig, build_index

    spec = {"model": args.model, "checkpoint": None, "model_args": {}, "pool": "token", "fuse_last_two": False, "proj_dim": None}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, LocalObjectStore(data_dir=f"{tmp}/s3") as store:
        os.environ.update(store.aws_env())
        out = store.create_bucket("bench") + "/emb"
        t0 = time.perf_counter()
        enc = create_encoder(EncoderSpec.from_dict(spec))
        write_encoder_spec(out, enc)
        _write_table(f"{out}/embeddings", args.vectors, enc.dim, args.files, args.seed, args.model, enc.model_version)
        manifest = build_index(BuildConfig(f"{out}/embeddings", f"{out}/index", executor="local", shards=1))
        print(f"[bench serve] {manifest['ntotal']} x {manifest['dim']} index ({manifest['factory']}, "
              f"{manifest['search_params'] or 'exact search'}) on {store.endpoint_url} in {time.perf_counter() - t0:.1f} s",
              flush=True)
        del enc
        server, _ = start_background(f"{out}/index", check_every=2.0)
        try:
            rng = np.random.default_rng(args.seed)
            n = args.warmup + args.requests
            ids = rng.integers(0, args.vectors, size=n).tolist()
            by_id = [lambda s, u, i=i: s.post(u + "api/search", json={"image_id": i, "k": args.k}, timeout=300) for i in ids]
            images = [im.data for im in generate_images(max(1, n // 5), seed=args.seed)]  # bases and 4 variants each
            by_upload = [lambda s, u, d=images[j % len(images)]: s.post(u + "api/search", data={"k": str(args.k)},
                                                                      files={"image": ("q.jpg", d, "image/jpeg")}, timeout=300)
                         for j in range(n)]
            rows = []
            with requests.Session() as session:
                for name, calls in (("image_id", by_id), ("upload", by_upload)):
                    rows.append({"query": name, **latency_summary(_timed(session, server.url, calls, args.warmup))})
                    print(f"[bench serve] {name}: done", flush=True)
        finally:
            server.stop()
    print(f"\nPOST /api/search, {args.vectors} vectors x {manifest['dim']} ({manifest['factory']}), k={args.k}, "
          f"model {args.model}, {args.requests} requests after {args.warmup} warm-up, one at a time\n")
    print("| query | requests | p50 ms | p99 ms | mean ms | max ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['query']} | {r['n']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} | {r['max_ms']:.1f} |")
    return 0
