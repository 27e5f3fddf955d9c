"""`sparse-embed nightly --config nightly.yaml`: lock, incremental embed, index update, report.

Exit codes: 0 done (also when nothing changed), 1 error rate above max_error_rate,
2 bad configuration, 3 another run holds the lock. Safe to kill and rerun: the next run
takes over the stale lock and resumes the interrupted work.
"""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_ERROR_RATE, EXIT_LOCKED = 0, 1, 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .nightly_config import EXAMPLE

    p.add_argument("--config", required=True, help="YAML config (local path or URI); fields:\n" + EXAMPLE)
    p.add_argument("--check", action="store_true", help="only validate the config and print it, then exit")
    p.formatter_class = argparse.RawTextHelpFormatter


def run(args) -> int:
    import dataclasses

    from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
    from sparse_embed.pipeline.store.lock import LockHeld, OutputLock
    from sparse_embed.pipeline.embed.report import summary

    from .nightly_config import load

    cfg = load(args.config)
    if args.check:
        print(dataclasses.asdict(cfg))
        return EXIT_OK
    spec = {"model": cfg.model, "checkpoint": cfg.checkpoint, "model_args": cfg.model_args, "pool": cfg.pool,
            "fuse_last_two": cfg.fuse_last_two, "proj_dim": cfg.proj_dim}
    embed_cfg = EmbedConfig(
        source=cfg.source, out=cfg.out, spec=spec, extensions=tuple(cfg.extensions), glob=cfg.glob,
        decode_batch_size=cfg.decode_batch_size, embed_batch_size=cfg.batch_size, actors=cfg.actors,
        max_error_rate=cfg.max_error_rate, max_attempts=cfg.max_attempts, build_index=cfg.index,
        index_shards=cfg.index_shards, compile=cfg.compile, rows_per_file=cfg.rows_per_file, formats=tuple(cfg.formats),
    )
    try:
        lock = OutputLock(cfg.out, owner=embed_cfg.run_id, ttl_s=cfg.lock_ttl_s).acquire()
    except LockHeld as e:
        print(f"sparse-embed nightly: {e}", file=sys.stderr)
        return EXIT_LOCKED
    try:
        result = run_embed(embed_cfg)
    finally:
        lock.release()
    print(summary(result), end="")
    if lock.lost:
        print("sparse-embed nightly: the lock was taken over during the run; check for a concurrent run", file=sys.stderr)
        return EXIT_LOCKED
    if result["error_rate"] > cfg.max_error_rate:
        print(f"sparse-embed nightly: error rate {result['error_rate']:.2%} exceeds max_error_rate {cfg.max_error_rate:.2%}",
              file=sys.stderr)
        return EXIT_ERROR_RATE
    return EXIT_OK
