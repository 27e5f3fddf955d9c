"""`sparse-embed search --index OUT/index (--image PATH_OR_URI | --image-id N) -k 10`."""
from __future__ import annotations

import argparse
import json

from .options import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="index root URI (holds CURRENT), e.g. s3://bucket/emb/index")
    p.add_argument("--index-id", default=None, help="search this index instead of the one CURRENT points to")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", action="append", metavar="PATH_OR_URI",
                   help="query image (local path or s3:// URI); repeat for a batch of queries")
    q.add_argument("--image-id", action="append", type=int, metavar="N",
                   help="query by an indexed image's id (its vector from the table version the index was built from); repeatable")
    p.add_argument("-k", type=positive_int, default=10, help="results per query (default 10)")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    p.add_argument("--contact-sheet", default=None, metavar="PATH_OR_URI",
                   help="also write the query and its results as one image (.jpg/.png); with several queries, "
                        "one sheet per query with its index before the extension")


def run(args) -> int:
    from sparse_embed.pipeline.view.contact_sheet import contact_sheet
    from sparse_embed.pipeline.index.searcher import ShardedIndex, embed_queries
    from sparse_embed.pipeline.store.storage import check_readable

    check_readable(args.index, role="--index")  # credentials and bucket, named before the index is read
    index = ShardedIndex.open(args.index, index_id=args.index_id)
    if args.image_id:
        vectors, uris = index.vectors_for_ids(args.image_id)
        queries = [u or f"image_id {i}" for u, i in zip(uris, args.image_id)]  # a table without uris: by id
    else:
        queries = args.image
        vectors = embed_queries(queries, index.manifest)
    for qi, (query, hits) in enumerate(zip(queries, index.hits(vectors, args.k))):
        if args.json:
            print(json.dumps({"query": query, "results": [h.__dict__ for h in hits]}))
        else:
            print(f"query {query}")
            for h in hits:
                print(f"  {h.rank:3d}  {h.score:.4f}  {h.uri if h.uri is not None else f'image_id {h.image_id}'}")
        if args.contact_sheet:
            if any(h.uri is None for h in hits):
                raise ValueError(f"Expected an index whose table has a uri column for --contact-sheet, got table "
                                 f"{index.manifest['table']!r} without one")
            out = args.contact_sheet
            if len(queries) > 1:
                stem, dot, ext = out.rpartition(".")
                out = f"{stem}_{qi}.{ext}" if dot else f"{out}_{qi}"
            contact_sheet(query, hits, out)
            print(f"  contact sheet: {out}")
    return 0
