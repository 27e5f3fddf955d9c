"""`sparse-embed store`: the local S3 server, for trying s3:// by hand."""
from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="where objects live (default: a temporary directory, removed on exit)")
    p.add_argument("--bucket", action="append", default=[], help="bucket to create, repeatable")
    p.add_argument("--port", type=int, default=None, help="S3 port on 127.0.0.1 (default: a free port)")


def run(args) -> int:
    from sparse_embed.infra.object_store import LocalObjectStore

    store = LocalObjectStore(data_dir=args.data_dir, s3_port=args.port).start()
    try:
        for b in args.bucket:
            store.create_bucket(b)
        print("local object store running; in another shell:")
        for k, v in store.aws_env().items():
            print(f"  export {k}={v}")
        print("Ctrl-C stops it.", flush=True)
        while store.running:
            time.sleep(1)
    finally:
        store.stop()
    return 0
