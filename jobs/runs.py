"""`sparse-embed runs list --out OUT`: the run history from <out>/runs/."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="one line per run, oldest first", description="List the runs recorded under OUT/runs.")
    ls.add_argument("--out", required=True, help="output prefix the runs wrote to (s3:// or local)")
    ls.add_argument("--json", action="store_true", help="print the full reports as JSON lines")


def run(args) -> int:
    from sparse_embed.pipeline.embed.run import load_run_reports

    reports = load_run_reports(args.out)
    if args.json:
        for r in reports:
            print(json.dumps(r))
        return 0
    print(f"{'run_id':28} {'model_version':16} {'listed':>7} {'new':>6} {'chg':>5} {'del':>5} {'embedded':>8} {'failed':>6} {'wall_s':>7}  index")
    for r in reports:
        c = r["counts"]
        print(f"{r['run_id']:28} {r['model_version']:16} {c['listed']:7d} {c['new']:6d} {c['changed']:5d} {c['deleted']:5d} "
              f"{c['embedded']:8d} {c['failed']:6d} {r['wall_s']:7.1f}  {r.get('index_id') or '-'}")
    if not reports:
        print("(no runs yet)")
    return 0
