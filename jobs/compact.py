"""`sparse-embed compact --out OUT`: rewrite the files of OUT's embeddings table whose rows
a deletion vector marks, without those rows and without vectors (store/removal.py), under
the output lock. Runs do it on their own for files whose deleted share reaches
removal.COMPACT_FRACTION; this rewrites every file with a vector (`--fraction` to choose).
A copy-on-write table has nothing to compact. A table written before 2026-12 has its
tombstones converted first."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output prefix of the embed runs (s3:// or local)")
    p.add_argument("--fraction", type=float, default=0.0,
                   help="rewrite files whose deleted share is at least this (default 0: every file with a deletion vector)")
    p.add_argument("--lock-wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for a running writer's lock (default 0: fail at once, exit 3)")


def run(args) -> int:
    from datetime import datetime, timezone

    from sparse_embed.pipeline.store import live, removal, tables
    from sparse_embed.pipeline.store.lock import output_lock

    uri = tables.table_uri(args.out, tables.EMBEDDINGS)
    if tables.open_table(uri) is None:
        raise FileNotFoundError(f"No embeddings table at {uri}: pass the --out of an embed run")
    if not 0.0 <= args.fraction <= 1.0:
        raise ValueError(f"Expected --fraction in [0, 1], got {args.fraction!r}")
    owner = "compact-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with output_lock(args.out, owner=owner, wait_s=args.lock_wait):
        converted = removal.convert_tombstones(uri, tag=f"{owner}-convert")
        rem = removal.compact(uri, fraction=args.fraction, tag=owner)
    physical, deleted = live.row_counts(uri)
    if converted is not None:
        print(f"{uri}: {converted.rows} rows masked by tombstones removed ({converted.mechanism})")
    print(f"{uri}: {rem.files_rewritten} files rewritten, {rem.rows} deleted rows dropped; {physical - deleted} live rows "
          f"(table v{tables.version_of(uri)}, {rem.mechanism})")
    return 0
