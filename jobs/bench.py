"""`sparse-embed bench SUITE`: benchmarks that print a table (method and results in BENCHMARKS.md)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util

# suite -> module under jobs/ exposing add_arguments(parser) and run(args)
SUITES = {
    "encoders": ("bench_encoders", "images/s and peak memory of the encoders at several input sizes"),
    "index": ("bench_index", "index build single-process vs sharded on Ray, peak memory, recall@10, queries/s"),
    "pipeline": ("bench_pipeline", "pipeline throughput against its encoder, decode and a DataLoader loop; memory; listing"),
    "incremental": ("bench_incremental", "a nightly run with one percent changed against a full run, in one run"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, (module, help_text) in SUITES.items():
        if importlib.util.find_spec(f"jobs.{module}") is None:  # a suite still being written
            continue
        s = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"jobs.{module}")
        mod.add_arguments(s)
        s.set_defaults(_bench=mod.run)


def run(args) -> int:
    return args._bench(args)
