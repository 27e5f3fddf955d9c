"""`sparse-embed nightly --config nightly.yaml`: lock, incremental embed, index update, report.

Exit codes: 0 done (also when nothing changed), 1 error rate above max_error_rate or
objects failed for infrastructure reasons, 2 bad configuration, an empty listing or more
vanished objects than max_delete (nothing changed), 3 another run holds the output lock
(or took it over). Safe to kill and rerun: the next run
takes over the stale lock and resumes the interrupted work.
"""
from __future__ import annotations

import argparse

from .options import add_lock_arguments

EXIT_OK = 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .nightly_config import EXAMPLE

    p.add_argument("--config", required=True, help="YAML config (local path or URI); fields:\n" + EXAMPLE)
    p.add_argument("--check", action="store_true", help="only validate the config and print it, then exit")
    add_lock_arguments(p)
    p.formatter_class = argparse.RawTextHelpFormatter


def run(args) -> int:
    import dataclasses

    from sparse_embed.pipeline.embed.report import summary
    from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed

    from .embed import outcome

    from .nightly_config import load

    cfg = load(args.config)
    if args.check:
        print(dataclasses.asdict(cfg))
        return EXIT_OK
    spec = {"model": cfg.model, "checkpoint": cfg.checkpoint, "model_args": cfg.model_args, "pool": cfg.pool,
            "fuse_last_two": cfg.fuse_last_two, "proj_dim": cfg.proj_dim, "precision": cfg.precision}
    embed_cfg = EmbedConfig(
        source=cfg.source, out=cfg.out, spec=spec, extensions=tuple(cfg.extensions), glob=cfg.glob,
        decode_batch_size=cfg.decode_batch_size, embed_batch_size=cfg.batch_size, actors=cfg.actors,
        decode=cfg.decode, actor_wait_s=cfg.actor_wait_s, max_object_mb=cfg.max_object_mb,
        max_error_rate=cfg.max_error_rate, max_attempts=cfg.max_attempts, build_index=cfg.index,
        index_shards=cfg.index_shards, compile=cfg.compile, rows_per_file=cfg.rows_per_file, formats=tuple(cfg.formats),
        lock_ttl_s=cfg.lock_ttl_s, lock_wait_s=args.wait, inventory=cfg.inventory, deletion_vectors=cfg.deletion_vectors,
        max_delete=cfg.max_delete, allow_mass_delete=cfg.allow_mass_delete, allow_empty_source=cfg.allow_empty_source,
    )
    # run_embed holds the output lock: LockHeld / LockLost become exit 3 in the CLI.
    result = run_embed(embed_cfg)
    print(summary(result), end="")
    if cfg.retain_hours is not None:
        _vacuum(cfg, embed_cfg.run_id, wait_s=args.wait)
    return outcome(result, cfg.max_error_rate, prog="sparse-embed nightly", option="max_error_rate")


def _vacuum(cfg, run_id: str, *, wait_s: float) -> None:
    """The nightly's last step: `vacuum --retain-hours cfg.retain_hours`, under the lock."""
    from sparse_embed.pipeline.store.lock import output_lock
    from sparse_embed.pipeline.store.vacuum import vacuum_output

    with output_lock(cfg.out, owner=f"{run_id}-vacuum", ttl_s=cfg.lock_ttl_s, wait_s=wait_s):
        report = vacuum_output(cfg.out, retain_hours=cfg.retain_hours)
    parts = list(report["tables"].values()) + [report["staged"], report["leftovers"]]
    files = sum(t["files"] for t in parts)
    size = sum(t["bytes"] for t in parts) + report["index"]["bytes"]
    print(f"vacuum (retain {cfg.retain_hours:g} h): {files} table files and {len(report['index']['removed'])} index "
          f"versions removed, {size:,} bytes")
