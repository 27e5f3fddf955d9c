"""`sparse-embed bench SUITE`: benchmarks that print a table (method and results in BENCHMARKS.md).

The benchmarks live in the repository's top-level `benchmarks/` folder, which is not
installed: this command runs them from a checkout (the editable install's, or the current
directory's), and says so when there is none.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# suite -> module under benchmarks/ exposing add_arguments(parser) and run(args)
SUITES = {
    "encoders": ("encoders", "images/s and peak memory of the encoders at several input sizes"),
    "sparse": ("sparse_encoders", "LookupViT and top-k against dense ViTs: MACs, paired speedup, embedding cosine"),
    "index": ("index", "index build on Ray (and/or single-process): build time, driver peak RSS, recall@10 of new queries read with plain faiss"),
    "index-serving": ("index_serving", "searcher RSS after opening vs index bytes, cold/warm latency, a 1%% update vs a rebuild"),
    "pipeline": ("pipeline", "pipeline throughput against its encoder, decode and a DataLoader loop; memory; listing"),
    "incremental": ("incremental", "a nightly run with one percent changed against a full run, in one run"),
    "fidelity": ("fidelity", "bf16 against fp32 per encoder family: embedding cosine, routing/top-k agreement"),
    "scale": ("scale", "metadata stages (inventory listing, diff, ids, commits) of a first run and a one percent nightly at 1e6/1e7 objects"),
    "storage": ("storage", "bytes stored over simulated nights with and without vacuum; table open time at 1,000 versions with and without a checkpoint"),
    "serve": ("serve", "p50/p99 latency of the search server's POST /api/search by image_id and by upload"),
}


def checkout_root() -> Path | None:
    """The checkout whose `benchmarks/` to run: the one this package was installed from in
    editable mode, else the current directory; None when neither has the folder."""
    import sparse_embed

    for root in (Path(sparse_embed.__file__).resolve().parent, Path.cwd()):
        if (root / "benchmarks" / "cases.py").is_file():
            return root
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    root = checkout_root()
    for name, (module, help_text) in SUITES.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        if root is None:
            s.set_defaults(_bench=_no_checkout)
            continue
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        mod = importlib.import_module(f"benchmarks.{module}")
        mod.add_arguments(s)
        s.set_defaults(_bench=mod.run)


def _no_checkout(args) -> int:
    raise ValueError("benchmarks run from a checkout of sparse-embed: cd into the repository "
                     "(its benchmarks/ folder is not installed) and run `sparse-embed bench` there")


def run(args) -> int:
    return args._bench(args)
