"""Writing an index out: its id, its manifest, the recall check that opens it the way search
does, and the CURRENT pointer, moved last."""
from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timezone

from sparse_embed.pipeline.index.searcher import ShardedIndex
from sparse_embed.pipeline.index.tune import RECALL_K, tune
from sparse_embed.pipeline.store import storage
from sparse_embed.pipeline.store.lock import check_before_commit

log = logging.getLogger(__name__)


def new_index_id(table_version: int) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-v{table_version}-{uuid.uuid4().hex[:6]}"


def write_manifest(index_dir: str, manifest: dict) -> None:
    storage.write_bytes_atomic(storage.join(index_dir, "manifest.json"), json.dumps(manifest, indent=2).encode())


def publish(index_root: str, index_id: str) -> None:
    """Move CURRENT to a complete index (the last write of a build or update)."""
    check_before_commit(index_root)
    storage.write_bytes_atomic(storage.join(index_root, "CURRENT"), index_id.encode())


def verify_and_tune(index_root: str, index_id: str, manifest: dict, queries, exact_ids, self_ids, target: float,
                    exact_scores=None) -> dict:
    """Open the written index the way search does, tune it, record the result."""
    index = ShardedIndex.open(index_root, index_id=index_id)
    result = tune(index, queries, exact_ids, nlist=manifest["plan"]["nlist"],
                  hnsw_quantizer=manifest["plan"]["hnsw_quantizer"], target=target, k=RECALL_K, self_ids=self_ids,
                  exact_scores=exact_scores)
    manifest.update({k: result[k] for k in ("search_params", "recall_at_10")})
    manifest["tuning"] = result
    if not result["reached_target"]:
        log.warning("index %s: recall@10 %.4f is below the target %.2f even at nprobe=nlist: the plan's codes "
                    "are too lossy (raise --memory-budget)", index_id, result["recall_at_10"], target)
    return manifest
