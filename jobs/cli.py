"""`sparse-embed`: one subcommand per flow, each in its own module under jobs/.

Heavy imports (torch, ray, faiss) happen inside the commands, so `--help` is instant.
User errors (ValueError, FileNotFoundError) print one clear line and exit 2; a failed
run exits 1.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module under jobs/, one-line help)
COMMANDS = {
    "embed": ("embed", "embed every image under SOURCE into OUT/embeddings (Delta) and build an index"),
    "index": ("index", "index build (memory-budgeted sharded FAISS index from a table version) and index update (add/remove on the current one)"),
    "search": ("search", "search an index with query images; prints top-k URIs and scores"),
    "nightly": ("nightly", "scheduled run: lock OUT, embed what changed, update the index, report; safe to kill and rerun"),
    "runs": ("runs", "run history: `runs list --out OUT`"),
    "demo": ("demo", "start a local object store, fill it with generated images, run every flow"),
    "bench": ("bench", "benchmarks: bench encoders | pipeline | index | incremental (results in BENCHMARKS.md)"),
    "store": ("store", "run the local S3 object store (SeaweedFS) until Ctrl-C, printing its AWS_* settings"),
    "convert-checkpoint": ("convert_checkpoint", "opt-in: turn a pickled torch checkpoint you trust into safetensors"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-embed",
        description="Turn a bucket of images into sparse-attention embeddings (Delta Lake) and a sharded FAISS index, on Ray.",
        epilog="Object-store endpoint and credentials come from the standard AWS_* environment variables.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"sparse_embed.jobs.{module}")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every failed SIMD variant
    from sparse_embed.pipeline.embed.report import redact_text

    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"sparse-embed {args.command}: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:  # the store, the cluster or a stage failed: one line, details at -v
        logging.getLogger("sparse_embed").debug("failure", exc_info=True)
        print(f"sparse-embed {args.command}: failed: {type(e).__name__}: {redact_text(str(e))[:2000]}\n"
              f"(rerun the same command to resume; -v shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sparse-embed {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
