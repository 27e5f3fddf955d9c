"""`sparse-embed index build --table OUT/embeddings --out OUT/index`."""
from __future__ import annotations

import argparse

from .options import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build an exact sharded inner-product index from a version of the embeddings table",
                       description="Build an exact inner-product FAISS index, one shard per Ray task, verify it against "
                                   "brute force, and move the CURRENT pointer to it.")
    b.add_argument("--table", required=True, help="embeddings table URI, e.g. s3://bucket/emb/embeddings")
    b.add_argument("--out", required=True, help="index root URI, e.g. s3://bucket/emb/index")
    b.add_argument("--version", type=int, default=None, help="table version to index (default: latest)")
    b.add_argument("--shards", type=positive_int, default=None, help="number of shards (default: one per CPU, at most one per table file)")


def run(args) -> int:
    from pipeline.index_build import build_index

    manifest = build_index(args.table, args.out, shards=args.shards, version=args.version)
    if manifest is None:
        print("table is empty: no index built")
        return 0
    print(f"index {manifest['index_id']}: {manifest['ntotal']} vectors, dim {manifest['dim']}, "
          f"{len(manifest['shards'])} shards, table v{manifest['table_version']}, recall@10 {manifest['recall_at_10']:.4f}")
    return 0
