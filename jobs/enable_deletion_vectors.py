"""`sparse-embed enable-deletion-vectors --out OUT`: upgrade OUT's embeddings table to
Delta deletion vectors (reader 3 / writer 7, `deletionVectors`; store/delta_log.py). From
then on runs mark removed rows in a vector per file instead of rewriting the file. This
cannot be undone: readers without deletion-vector support (deltalake's pyarrow scanner,
Ray's read_delta) refuse the table from this version on."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output prefix of the embed runs (s3:// or local)")
    p.add_argument("--yes", action="store_true", help="confirm: the upgrade cannot be undone")
    p.add_argument("--lock-wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for a running writer's lock (default 0: fail at once, exit 3)")


def run(args) -> int:
    from datetime import datetime, timezone

    from sparse_embed.pipeline.store import delta_log, tables
    from sparse_embed.pipeline.store.lock import output_lock

    uri = tables.table_uri(args.out, tables.EMBEDDINGS)
    if tables.open_table(uri) is None:
        raise FileNotFoundError(f"No embeddings table at {uri}: pass the --out of an embed run")
    if not args.yes:
        raise ValueError("enable-deletion-vectors cannot be undone (readers without deletion-vector support will refuse "
                         "the table): run it again with --yes")
    owner = "enable-dv-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with output_lock(args.out, owner=owner, wait_s=args.lock_wait):
        version = delta_log.enable_deletion_vectors(uri)
    print(f"{uri}: already uses deletion vectors" if version is None else
          f"{uri}: deletion vectors enabled at v{version} (reader 3 / writer 7); this cannot be undone")
    return 0
