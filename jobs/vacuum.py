"""`sparse-embed vacuum --out OUT [--retain-hours H]`: remove the table files and index
versions no reader of OUT needs once H hours have passed (pipeline/store/vacuum.py), under
the output lock, and say what was removed and what was kept."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sparse_embed.pipeline.store.vacuum import DEFAULT_RETAIN_HOURS

    p.add_argument("--out", required=True, help="output prefix of the embed runs (s3:// or local)")
    p.add_argument("--retain-hours", type=float, default=DEFAULT_RETAIN_HOURS, metavar="H",
                   help=f"keep what a reader of a table version or an index of the last H hours needs "
                        f"(default {DEFAULT_RETAIN_HOURS}); older table versions can no longer be read")
    p.add_argument("--lock-wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for a running writer's lock (default 0: fail at once, exit 3)")


def run(args) -> int:
    from datetime import datetime, timezone

    from sparse_embed.pipeline.store import tables
    from sparse_embed.pipeline.store.lock import output_lock
    from sparse_embed.pipeline.store.vacuum import vacuum_output

    if tables.open_table(tables.table_uri(args.out, tables.EMBEDDINGS)) is None:
        raise FileNotFoundError(f"No embeddings table under {args.out}: pass the --out of an embed run")
    owner = "vacuum-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with output_lock(args.out, owner=owner, wait_s=args.lock_wait):
        report = vacuum_output(args.out, retain_hours=args.retain_hours)
    for name, t in report["tables"].items():
        kept = (f"; kept every file: {t['kept_all']}" if t.get("kept_all") else
                f"; kept {t['kept_files']} older files ({t['kept_bytes']:,} bytes) that a version of the last "
                f"{args.retain_hours:g} h or a pending commit needs" if t["kept_files"] else "")
        print(f"{name}: {t['files']} files removed ({t['bytes']:,} bytes){kept}")
    st, left = report["staged"], report["leftovers"]
    print(f"model changes: {st['files']} files removed ({st['bytes']:,} bytes)"
          + (f", abandoned staging of {', '.join(st['removed'])} removed" if st["removed"] else ""))
    print(f"work folders of dead runs and stale probes: {left['files']} files removed ({left['bytes']:,} bytes)")
    ix = report["index"]
    print(f"index: {len(ix['removed'])} versions removed ({ix['bytes']:,} bytes); kept {', '.join(ix['kept']) or 'none'} "
          f"(CURRENT's and those younger than {args.retain_hours:g} h)")
    return 0
