"""Run reports (<out>/runs/<run_id>.json and .txt) and the encoder spec (<out>/encoder.json).

Secrets never reach a report: values of the AWS secret variables and the userinfo part
of any URI are replaced by "***".
"""
from __future__ import annotations

import json
import os
import re

from sparse_embed.pipeline.store import storage

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
    lines.append("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in result["timings_s"].items()))
    busy = result.get("embed_busy") or {}
    lines.append(f"throughput {result['throughput_images_per_s']:.1f} images/s; wall {result['wall_s']:.1f} s"
                 + (f"; embed actors busy {busy['fraction']:.0%} of the stage" if busy.get("by_actor") else ""))
    lines.append(f"tables {result['table_versions']['before']} -> {result['table_versions']['after']}; index {result['index_id']}")
    return "\n".join(lines) + "\n"


def write_encoder_spec(out: str, enc) -> None:
    """What the search job needs to embed queries with the same encoder."""
    doc = {"spec": enc.spec.to_dict(), "model_version": enc.model_version, "dim": enc.dim,
           "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in enc.data_config.items()}}
    storage.write_bytes_atomic(storage.join(out, "encoder.json"), json.dumps(redact(doc), indent=2).encode())


def read_encoder_spec(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "encoder.json")))
