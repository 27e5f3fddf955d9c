"""`sparse-embed compact --out OUT`: drop the masked rows and tombstones of OUT's
embeddings table now (pipeline/store/live.py), under the output lock. Runs compact on
their own once tombstones reach live.COMPACT_FRACTION of the rows; this is for a reader
outside this tool that wants a table of live rows only."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output prefix of the embed runs (s3:// or local)")
    p.add_argument("--lock-wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for a running writer's lock (default 0: fail at once, exit 3)")


def run(args) -> int:
    from datetime import datetime, timezone

    from sparse_embed.pipeline.store import live, tables
    from sparse_embed.pipeline.store.lock import output_lock

    uri = tables.table_uri(args.out, tables.EMBEDDINGS)
    if tables.open_table(uri) is None:
        raise FileNotFoundError(f"No embeddings table at {uri}: pass the --out of an embed run")
    owner = "compact-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with output_lock(args.out, owner=owner, wait_s=args.lock_wait):
        data_rows, tomb_rows = live.row_counts(uri)
        deleted = live.compact(uri)
    print(f"{uri}: {tomb_rows} tombstones and the {deleted - tomb_rows if deleted else 0} rows they masked deleted; "
          f"{data_rows - tomb_rows} live rows (table v{tables.version_of(uri)})")
    return 0
