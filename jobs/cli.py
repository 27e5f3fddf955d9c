"""`sparse-embed`: one subcommand per flow, each in its own module under jobs/.

Heavy imports (torch, ray, faiss) happen inside the commands, so `--help` is instant.
Bad input or configuration (ValueError, FileNotFoundError, PermissionError: a missing
SOURCE, rejected credentials, an unknown bucket, an OUT that cannot be written, no index)
prints one line naming the cause and the fix and exits 2; a failed run prints one line and
exits 1. Storage errors are explained by pipeline.store.storage.explain; -v adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

# subcommand -> (module under jobs/, one-line help)
COMMANDS = {
    "embed": ("embed", "embed every image under SOURCE into OUT/embeddings (Delta) and build an index"),
    "index": ("index", "index build (memory-budgeted sharded FAISS index from a table version) and index update (add/remove on the current one)"),
    "search": ("search", "search an index with query images; prints top-k URIs and scores"),
    "serve": ("serve", "the search page and its JSON API over an index (loopback by default)"),
    "nightly": ("nightly", "scheduled run: lock OUT, embed what changed, update the index, report; safe to kill and rerun"),
    "runs": ("runs", "run history: `runs list --out OUT`"),
    "compact": ("compact", "rewrite the embeddings table's files without the rows their deletion vectors mark (runs do it per file at 20 percent deleted)"),
    "vacuum": ("vacuum", "remove the table files and index versions no reader needs after --retain-hours (default a week)"),
    "enable-deletion-vectors": ("enable_deletion_vectors", "switch OUT's embeddings table from copy-on-write to Delta deletion vectors (cannot be undone)"),
    "demo": ("demo", "start a local object store, fill it with generated images, run every flow"),
    "bench": ("bench", "benchmarks: bench encoders | pipeline | index | incremental | serve (results in BENCHMARKS.md)"),
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


# Libraries that log routine work at INFO (botocore's "Found credentials", Ray's start-up):
# at default verbosity only their warnings show; -v shows everything. Ray resets its own
# loggers when it starts: infra.ray_launcher.ensure_ray quiets them again.
QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3", "deltalake", "ray", "filelock", "asyncio")
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError)  # exit 2: the input or the configuration is wrong


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every failed SIMD variant
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)


def check_inputs(args) -> None:
    """Before index build/update and nightly do any work: the URIs they read are readable and
    the prefix they write takes a write (embed and search check theirs in their modules)."""
    from sparse_embed.pipeline.store import storage

    if args.command == "index":
        storage.check_readable(args.table, role="--table")
        storage.check_writable(args.out, role="--out")
    elif args.command == "nightly" and not args.check:
        from sparse_embed.pipeline.embed.listing import check_source

        from .nightly_config import load

        cfg = load(args.config)
        check_source(cfg.source, tuple(cfg.extensions), cfg.glob, role="source", flags=("extensions", "glob"),
                     allow_empty=cfg.allow_empty_source)
        storage.check_writable(cfg.out, role="out")


def _remote_cause(e: BaseException) -> BaseException:
    """Ray re-raises a task's exception as RayTaskError(<its type>), whose text is the whole
    remote traceback: report the exception itself."""
    while type(e).__module__.startswith("ray.") and isinstance(getattr(e, "cause", None), BaseException):
        e = e.cause
    return e


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from sparse_embed.pipeline.embed.report import redact_text
    from sparse_embed.pipeline.store.lock import LockHeld, LockLost
    from sparse_embed.pipeline.store.storage import explain

    try:
        check_inputs(args)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"sparse-embed {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose:
            print(redact_text("".join(traceback.format_exception(e))), file=sys.stderr, end="")
        clear = explain(e) or _remote_cause(e)
        if isinstance(clear, (LockHeld, LockLost)):  # another writer holds the output, or took it over
            print(f"sparse-embed {args.command}: {redact_text(str(clear))}", file=sys.stderr)
            return 3
        if isinstance(clear, USER_ERRORS):
            print(f"sparse-embed {args.command}: error: {redact_text(str(clear))}", file=sys.stderr)
            return 2
        print(f"sparse-embed {args.command}: failed: {type(clear).__name__}: {redact_text(str(clear))[:2000]}\n"
              f"(rerun the same command to resume; -v shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
