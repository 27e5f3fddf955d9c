"""Run reports (<out>/runs/<run_id>.json and .txt) and the encoder spec (<out>/encoder.json).

Secrets never reach a report: values of the AWS secret variables and the userinfo part
of any URI are replaced by "***".
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from sparse_embed.pipeline.store import storage
from sparse_embed.pipeline.store.lock import check_before_commit

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_USERINFO = re.compile(r"(?P<scheme>[a-z0-9+.-]+://)[^/@\s]+@", re.IGNORECASE)


def redact_text(text: str) -> str:
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def redact(obj):
    if isinstance(obj, dict):
        return {k: ("***" if any(s in k.lower() for s in ("secret", "password", "token")) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def index_root(out: str) -> str:
    return storage.join(out, "index")


@dataclass
class RunFacts:
    """What run_embed counted and measured; build_report turns it into the run report."""

    counts: dict  # diff.Diff.counts: listed, new, changed, deleted, unchanged, retried, gave_up
    processed: int  # objects tried this run (rows of the diff's todo)
    first_tries: int  # of those, tried for the first time at their etag
    embedded: int  # embedding rows this run committed
    failed_by_reason: dict  # "stage:error_type" -> error rows of this run
    failed_by_kind: dict  # failures.OBJECT / INFRASTRUCTURE -> {"stage:error_type": error rows of this run}
    failed_first: int  # error rows of this run at their first attempt
    recovered: int  # rows of an interrupted run committed by the recover stage
    pool: dict  # the embed actor pool (run.plan_actors); {} when nothing was tried
    embed_seconds: dict  # embed actor -> seconds of forward passes
    embed_stage_s: float  # wall seconds of the fetch+decode+embed+write stage (0 when it did not run)
    timings_s: dict  # stage -> seconds (StageTimer.as_dict)
    wall_s: float
    versions_before: dict  # table -> Delta version before the run (of the tables the run wrote)
    versions_after: dict  # table -> Delta version of <out>'s tables after the run
    promoted: bool  # staged tables of a new model_version replaced <out>'s
    index_id: str | None  # the index published by this run; None when none was due or the table is empty
    removed: int = 0  # embedding rows of changed and deleted objects this run's diff removed
    removal: dict = field(default_factory=dict)  # how: mechanism, files touched / rewritten, bytes written
    compacted: int = 0  # deleted rows a compaction dropped from rewritten files; 0 when none was due
    converted: int = 0  # rows a table from before 2026-12 masked with tombstones, removed by this run
    deletion_guard: dict = field(default_factory=dict)  # deletion_guard.check's figures (deleted rows, share, limit)


def busy_report(embed_seconds: dict, pool: dict, stage_s: float) -> dict:
    """How busy the encoder kept the actors: forward-pass seconds (copies to and from the
    device included) over the stage's wall time, per actor and averaged over the pool
    (an actor that never got a batch counts as idle). With one actor per GPU, `fraction`
    is the share of the stage the GPUs spent embedding."""
    size = pool.get("size") or 0
    if not size or stage_s <= 0:
        return {"fraction": 0.0, "by_actor": {}}
    return {"fraction": round(sum(embed_seconds.values()) / (size * stage_s), 4),
            "by_actor": {a: round(s / stage_s, 4) for a, s in sorted(embed_seconds.items())}}


BUSY_EXPECTED = 0.6  # busy share of the stage below which a long enough run says the actors starved
STARVED_MIN_BATCHES = 20  # embed batches per actor before the share means anything (actor start-up is ~7 s)


def starved(result: dict) -> bool:
    """Whether the embed actors waited for input for much of a run long enough to tell
    (BUSY_EXPECTED; runs under STARVED_MIN_BATCHES batches per actor are mostly start-up)."""
    busy, pool = result.get("embed_busy") or {}, result.get("actor_pool") or {}
    batch = (result.get("config") or {}).get("embed_batch_size") or 32
    if not busy.get("by_actor") or not pool.get("size"):
        return False
    long_enough = result["counts"].get("processed", 0) >= STARVED_MIN_BATCHES * batch * pool["size"]
    return long_enough and busy["fraction"] < BUSY_EXPECTED


def build_report(cfg, enc, facts: RunFacts) -> dict:
    """The run report: cfg is the run's EmbedConfig, enc its encoder (spec, model_version, dim).
    The error rate counts objects tried for the first time at their etag: a known-bad
    object failing its retry again must not fail every night until max_attempts."""
    f = facts
    return {
        "run_id": cfg.run_id,
        "config": redact(cfg.__dict__ | {"spec": cfg.spec}),
        "model": enc.spec.model,
        "model_version": enc.model_version,
        "dim": enc.dim,
        "counts": f.counts | {"processed": f.processed, "embedded": f.embedded, "failed": sum(f.failed_by_reason.values()),
                              "failed_by_reason": f.failed_by_reason, "failed_first_try": f.failed_first,
                              "failed_object": sum(f.failed_by_kind.get("object", {}).values()),
                              "failed_infrastructure": sum(f.failed_by_kind.get("infrastructure", {}).values()),
                              "failed_infrastructure_by_reason": f.failed_by_kind.get("infrastructure", {}),
                              "recovered_rows": f.recovered, "removed_rows": f.removed, "compacted_rows": f.compacted,
                              "converted_rows": f.converted},
        "removal": f.removal,
        "deletion_guard": f.deletion_guard,
        "error_rate": (f.failed_first / f.first_tries) if f.first_tries else 0.0,
        "actor_pool": f.pool,
        "embed_busy": busy_report(f.embed_seconds, f.pool, f.embed_stage_s),
        "timings_s": f.timings_s,
        "wall_s": f.wall_s,
        "throughput_images_per_s": (f.processed / f.embed_stage_s) if f.processed else 0.0,
        "table_versions": {"before": f.versions_before, "after": f.versions_after},
        "promoted_model_version": enc.model_version if f.promoted else None,
        "index_id": f.index_id,
    }


def write_run_report(out: str, result: dict) -> str:
    uri = storage.join(out, "runs", f"{result['run_id']}.json")
    storage.write_bytes_atomic(uri, json.dumps(redact(result), indent=2, default=str).encode())
    storage.write_bytes_atomic(storage.join(out, "runs", f"{result['run_id']}.txt"), summary(result).encode())
    return uri


def summary(result: dict) -> str:
    c = result["counts"]
    lines = [
        f"run {result['run_id']}  model {result['model']} ({result['model_version']}, dim {result['dim']})",
        f"listed {c['listed']}: new {c['new']}, changed {c['changed']}, deleted {c['deleted']}, unchanged {c['unchanged']}",
        f"processed {c['processed']}: embedded {c['embedded']}, failed {c['failed']} "
        f"(error rate {result['error_rate']:.2%} of first tries; {c.get('retried', 0)} retried)",
    ]
    lines += [f"  failed {reason}: {n}" for reason, n in sorted(c["failed_by_reason"].items())]
    if c.get("failed_infrastructure"):
        lines.append(f"  {c['failed_infrastructure']} of the failures are the infrastructure's (credentials, throttling, "
                     f"network, memory, device): not counted toward --max-attempts, retried by the next run")
    rem = result.get("removal") or {}
    if rem:
        lines.append(f"removed {c.get('removed_rows', 0)} rows of changed and deleted objects ({rem['mechanism']}: "
                     f"{rem['files_touched']} files touched, {rem['files_rewritten']} rewritten, "
                     f"{rem['bytes_written'] / 2**20:.1f} MiB written)"
                     + (f"; compaction dropped {c['compacted_rows']} deleted rows" if c.get("compacted_rows") else ""))
    lines.append("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in result["timings_s"].items()))
    busy = result.get("embed_busy") or {}
    lines.append(f"throughput {result['throughput_images_per_s']:.1f} images/s; wall {result['wall_s']:.1f} s"
                 + (f"; embed actors busy {busy['fraction']:.0%} of the stage" if busy.get("by_actor") else ""))
    if starved(result):
        lines.append(f"  the embed actors waited for input {1 - busy['fraction']:.0%} of the stage (expected busy >= "
                     f"{BUSY_EXPECTED:.0%} on a run of {STARVED_MIN_BATCHES} batches per actor or more): decode or "
                     f"fetch is the bottleneck, see README 'How busy the model is'")
    lines.append(f"tables {result['table_versions']['before']} -> {result['table_versions']['after']}; index {result['index_id']}")
    return "\n".join(lines) + "\n"


def write_encoder_spec(out: str, enc) -> None:
    """What the search job needs to embed queries with the same encoder: <out>/encoder.json
    (the active one) and <out>/encoders/<model_version>.json (every one that was active, so
    an index of an older table version records the encoder of that version)."""
    doc = {"spec": enc.spec.to_dict(), "model_version": enc.model_version, "dim": enc.dim,
           "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in enc.data_config.items()}}
    body = json.dumps(redact(doc), indent=2).encode()
    check_before_commit(out)
    storage.write_bytes_atomic(storage.join(out, "encoders", f"{enc.model_version}.json"), body)
    storage.write_bytes_atomic(storage.join(out, "encoder.json"), body)


def read_encoder_spec_of(out: str, model_version: str) -> dict:
    """The encoder that wrote rows of `model_version` under <out> (FileNotFoundError if none is recorded)."""
    try:
        return json.loads(storage.read_bytes(storage.join(out, "encoders", f"{model_version}.json")))
    except FileNotFoundError:
        active = read_encoder_spec(out)  # outputs written before encoders/ existed
        if active.get("model_version") != model_version:
            raise
        return active


def read_encoder_spec(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "encoder.json")))
