"""`sparse-embed convert-checkpoint --trust-pickle SRC DST.safetensors`: the one place that
unpickles, and only when asked to."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="torch checkpoint (any fsspec URI) that needs full unpickling")
    p.add_argument("dst", help="where to write the tensors as .safetensors (any fsspec URI)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="required: confirms SRC comes from a source you trust; unpickling can run arbitrary code")


def run(args) -> int:
    from sparse_embed.encoders._checkpoint import convert_to_safetensors

    if not args.trust_pickle:
        raise ValueError("Expected --trust-pickle: unpickling SRC can run arbitrary code, so conversion is opt-in")
    if not args.dst.endswith(".safetensors"):
        raise ValueError(f"Expected DST ending in .safetensors, got {args.dst!r}")
    n = convert_to_safetensors(args.src, args.dst)
    print(f"wrote {n} tensors to {args.dst}")
    return 0
