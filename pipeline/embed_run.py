"""The embed job: list -> diff -> fetch+decode -> embed -> write -> (index), with a run report.

Every listed object ends as exactly one row of `embeddings` or of `errors`:
1. rows whose (uri, etag) no longer matches the listing are deleted (one commit per
   table), and error rows of objects about to be retried;
2. objects not yet embedded at their current etag are processed and committed by the
   sink (one commit per table).
A crash between any two commits leaves a state the next run completes: an object is
either committed at its current etag (skipped) or not (processed again).
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import ids, listing, report, tables
from .timing import StageTimer

log = logging.getLogger(__name__)

MAX_BLOCKS = 10_000  # bounds scheduling overhead for very large runs


@dataclass
class EmbedConfig:
    source: str
    out: str
    spec: dict  # encoders.EncoderSpec.to_dict()
    extensions: tuple[str, ...] = listing.DEFAULT_EXTENSIONS
    glob: str | None = None
    decode_batch_size: int = 32  # objects fetched concurrently by one decode task
    embed_batch_size: int = 32  # images per forward pass
    actors: int | None = None  # None: one per GPU, else one
    actor_cpus: float | None = None  # None: 1 with GPUs; half the cluster's CPUs without
    max_pixels: int = 178_956_970
    max_error_rate: float = 1.0  # failed / processed above this makes the run fail (exit 1)
    build_index: bool = True
    index_shards: int | None = None
    run_id: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6])

    def __post_init__(self):
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"Expected --max-error-rate in [0, 1], got {self.max_error_rate!r}")
        for name in ("decode_batch_size", "embed_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected {name} >= 1, got {getattr(self, name)!r}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"Expected --actors >= 1, got {self.actors!r}")


def plan_actors(resources: dict, *, actors: int | None, actor_cpus: float | None) -> dict:
    """Actor pool sizing: one actor per GPU when the cluster has GPUs; otherwise one CPU
    actor that takes half the CPUs (the decode tasks take the rest)."""
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if gpus:
        return {"size": actors or gpus, "num_gpus": 1, "num_cpus": actor_cpus or 1}
    per_actor = actor_cpus or max(1.0, cpus // 2)
    return {"size": actors or 1, "num_gpus": 0, "num_cpus": per_actor}


def _todo(listed, out: str, model_version: str):
    """(rows to process, stale embedding keys, error keys to clear, counts)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    emb = tables.read_columns(tables.table_uri(out, tables.EMBEDDINGS), ["uri", "etag", "model_version"])
    err = tables.read_columns(tables.table_uri(out, tables.ERRORS), ["uri", "etag"])
    if emb is not None and emb.num_rows:
        other = set(pc.unique(emb.column("model_version")).to_pylist()) - {model_version}
        if other:
            raise ValueError(
                f"The embeddings table at {out!r} holds model_version {sorted(other)}, this run's is {model_version!r}; "
                "embed into a different --out (tables are never mixed across model versions)"
            )
    current = {(u, e) for u, e in zip(listed.column("uri").to_pylist(), listed.column("etag").to_pylist())}
    done_keys = set()
    stale = {"uri": [], "etag": []}
    if emb is not None:
        for u, e in zip(emb.column("uri").to_pylist(), emb.column("etag").to_pylist()):
            if (u, e) in current:
                done_keys.add(u)
            else:
                stale["uri"].append(u)
                stale["etag"].append(e)
    listed_uris = set(listed.column("uri").to_pylist())
    embedded_before = set(emb.column("uri").to_pylist()) if emb is not None else set()
    todo = listed.filter(pc.invert(pc.is_in(listed.column("uri"), pa.array(sorted(done_keys), pa.string()))))
    todo_uris = set(todo.column("uri").to_pylist())
    clear_errors = {"uri": [], "etag": []}
    if err is not None:
        for u, e in zip(err.column("uri").to_pylist(), err.column("etag").to_pylist()):
            if u in todo_uris or u not in listed_uris or u in done_keys:
                clear_errors["uri"].append(u)
                clear_errors["etag"].append(e)
    failed_before = set(err.column("uri").to_pylist()) if err is not None else set()
    counts = {
        "listed": listed.num_rows,
        "new": len(todo_uris - embedded_before - failed_before),
        "changed": len(todo_uris & embedded_before),
        "deleted": len(embedded_before - listed_uris),
        "unchanged": len(done_keys),
        "retried": len((todo_uris - embedded_before) & failed_before),
    }
    return todo, pa.table(stale, schema=pa.schema([("uri", pa.string()), ("etag", pa.string())])), \
        pa.table(clear_errors, schema=pa.schema([("uri", pa.string()), ("etag", pa.string())])), counts


def run_embed(cfg: EmbedConfig) -> dict:
    """Run the job; returns the run report (also written to <out>/runs/)."""
    import ray

    from encoders import EncoderSpec, create_encoder
    from infra.ray_launcher import ensure_ray

    from .decode import fetch_decode_batch
    from .embed_actor import EmbedActor
    from .table_sink import EmbeddingTableSink

    timer = StageTimer()
    started = time.time()
    versions_before = {t: tables.version_of(tables.table_uri(cfg.out, t)) for t in (tables.EMBEDDINGS, tables.ERRORS)}
    with timer.stage("load encoder"):
        enc = create_encoder(EncoderSpec.from_dict(cfg.spec))
    with timer.stage("list"):
        listed = listing.list_objects(cfg.source, extensions=cfg.extensions, glob=cfg.glob)
    with timer.stage("diff"):
        todo, stale, clear_errors, counts = _todo(listed, cfg.out, enc.model_version)
        tables.delete_matching(tables.table_uri(cfg.out, tables.EMBEDDINGS), stale, on=("uri", "etag"))
        tables.delete_matching(tables.table_uri(cfg.out, tables.ERRORS), clear_errors, on=("uri", "etag"))
        todo = ids.attach_image_ids(todo, cfg.out, run_id=cfg.run_id)
    log.info("run %s: %s", cfg.run_id, counts)
    sink = EmbeddingTableSink(cfg.out, run_id=cfg.run_id, dim=enc.dim)
    pool = {}
    if todo.num_rows:
        with timer.stage("ray"):
            resources = ensure_ray()
        pool = plan_actors(resources, actors=cfg.actors, actor_cpus=cfg.actor_cpus)
        with timer.stage("fetch+decode+embed+write"):
            # One decode batch per block, and at least two blocks per actor so none idles.
            n_blocks = min(MAX_BLOCKS, max(-(-todo.num_rows // cfg.decode_batch_size), min(todo.num_rows, 2 * pool["size"])))
            ds = ray.data.from_arrow(todo).repartition(n_blocks)
            ds = ds.map_batches(fetch_decode_batch, batch_format="pyarrow", batch_size=cfg.decode_batch_size,
                                fn_kwargs={"data_config": enc.data_config, "max_pixels": cfg.max_pixels})
            ds = ds.map_batches(
                EmbedActor, batch_format="pyarrow", batch_size=cfg.embed_batch_size,
                fn_constructor_kwargs={"spec": cfg.spec, "expected_version": enc.model_version,
                                       "cpu_threads": None if pool["num_gpus"] else max(1, int(pool["num_cpus"]))},
                compute=ray.data.ActorPoolStrategy(size=pool["size"]),
                num_gpus=pool["num_gpus"], num_cpus=pool["num_cpus"],
            )
            ds.write_datasink(sink)
    embedded = sink.result.rows.get(tables.EMBEDDINGS, 0)
    failed_rows = tables.read_columns(tables.table_uri(cfg.out, tables.ERRORS), ["stage", "error_type", "run_id"])
    failed_by_reason: dict[str, int] = {}
    if failed_rows is not None:
        for stage, etype, rid in zip(*(failed_rows.column(c).to_pylist() for c in ("stage", "error_type", "run_id"))):
            if rid == cfg.run_id:
                failed_by_reason[f"{stage}:{etype}"] = failed_by_reason.get(f"{stage}:{etype}", 0) + 1
    failed = sum(failed_by_reason.values())
    report.write_encoder_spec(cfg.out, enc)
    index_id = None
    if cfg.build_index:
        from .index_build import build_index

        with timer.stage("index"):
            manifest = build_index(tables.table_uri(cfg.out, tables.EMBEDDINGS), report.index_root(cfg.out),
                                   shards=cfg.index_shards)
            index_id = manifest["index_id"] if manifest else None
    wall = time.time() - started
    processed = todo.num_rows
    result = {
        "run_id": cfg.run_id,
        "config": report.redact(cfg.__dict__ | {"spec": cfg.spec}),
        "model": enc.spec.model,
        "model_version": enc.model_version,
        "dim": enc.dim,
        "counts": counts | {"processed": processed, "embedded": embedded, "failed": failed,
                            "failed_by_reason": failed_by_reason},
        "error_rate": (failed / processed) if processed else 0.0,
        "actor_pool": pool,
        "timings_s": timer.as_dict(),
        "wall_s": wall,
        "throughput_images_per_s": (processed / timer.seconds("fetch+decode+embed+write")) if processed else 0.0,
        "table_versions": {"before": versions_before, "after": {t: tables.version_of(tables.table_uri(cfg.out, t))
                                                                for t in (tables.EMBEDDINGS, tables.ERRORS)}},
        "index_id": index_id,
    }
    report.write_run_report(cfg.out, result)
    return result
