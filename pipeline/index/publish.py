"""Writing an index out: its id, its manifest, the recall check that opens it the way search
does, and the CURRENT pointer, moved last."""
from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timezone

from sparse_embed.pipeline.index.searcher import ShardedIndex
from sparse_embed.pipeline.index.tune import RECALL_K, TIE_MARGIN, tune
from sparse_embed.pipeline.store import storage
from sparse_embed.pipeline.store.lock import check_before_commit

log = logging.getLogger(__name__)

TRUTH_FILE = "truth.npz"
TRUTH_DEPTH = 64  # exact neighbours kept per recall query: updates drop removed ids from them (delta.update_truth)


def new_index_id(table_version: int) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-v{table_version}-{uuid.uuid4().hex[:6]}"


def write_manifest(index_dir: str, manifest: dict) -> None:
    storage.write_bytes_atomic(storage.join(index_dir, "manifest.json"), json.dumps(manifest, indent=2).encode())


def current_manifest(index_root: str) -> dict | None:
    """The manifest CURRENT points to (two small reads); None when there is no index."""
    from sparse_embed.pipeline.index.searcher import current_index_id

    try:
        index_id = current_index_id(index_root)
        return json.loads(storage.read_bytes(storage.join(index_root, index_id, "manifest.json")))
    except FileNotFoundError:
        return None


def index_is_current(index_root: str, table_uri: str) -> bool:
    """Whether CURRENT's manifest describes the table's latest version (and so its rows and
    its model: a promotion or any delete is a new version). False without an index."""
    from sparse_embed.pipeline.store import tables

    version = tables.version_of(table_uri)
    if version is None:
        return True  # no table yet: nothing to index
    manifest = current_manifest(index_root)
    return manifest is not None and manifest.get("table") == table_uri and manifest.get("table_version") == version


def publish_empty(index_root: str, table_uri: str, table_version: int, *, dim: int | None, model_version: str | None,
                  encoder: dict | None, extra: dict | None = None) -> dict:
    """Publish an index of no vectors for an empty table version, so that search serves
    nothing rather than the rows the table no longer has."""
    index_id = new_index_id(table_version)
    manifest = {
        "index_id": index_id, "factory": None, "metric": "inner_product", "dim": dim, "ntotal": 0,
        "shards": [], "ids_files": [], "trained_file": None,
        "model": (encoder or {}).get("spec", {}).get("model"), "model_version": model_version, "encoder": encoder,
        "table": table_uri, "table_version": table_version, "plan": None,
        "build": {"created_at": datetime.now(timezone.utc).isoformat(), "empty": True, **(extra or {})},
        "search_params": {}, "recall_at_10": None,
    }
    write_manifest(storage.join(index_root, index_id), manifest)
    publish(index_root, index_id)
    log.info("index %s: table %s v%d is empty: published an empty index", index_id, table_uri, table_version)
    return manifest


def publish(index_root: str, index_id: str) -> None:
    """Move CURRENT to a complete index (the last write of a build or update)."""
    check_before_commit(index_root)
    storage.write_bytes_atomic(storage.join(index_root, "CURRENT"), index_id.encode())


def write_truth(index_dir: str, queries, self_ids, exact_ids, exact_scores) -> dict:
    """Save recall queries and their exact neighbours in the index as written (own ids
    dropped) beside it, so the next update can bring them up to date from its changes alone
    (delta.update_truth); returns the manifest's "truth" entry. An update writes one, and a
    build writes its self queries' (rows of the final index, exact over the whole table;
    its held-out queries were tuned on before those rows joined the index, so their lists
    do not fit it)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, queries=np.asarray(queries, dtype="float32"), exact_ids=np.asarray(exact_ids, dtype="int64"),
             exact_scores=np.asarray(exact_scores, dtype="float32"),
             self_ids=np.asarray([] if self_ids is None else self_ids, dtype="int64"), has_self=self_ids is not None)
    storage.write_bytes_atomic(storage.join(index_dir, TRUTH_FILE), buf.getvalue())
    return {"file": TRUTH_FILE, "depth": int(np.asarray(exact_ids).shape[1]) if np.asarray(exact_ids).ndim == 2 else 0}


def read_truth(index_root: str, manifest: dict):
    """(queries, self_ids or None, exact_ids, exact_scores) an index recorded, or None."""
    import io

    import numpy as np

    entry = manifest.get("truth")
    if not entry:
        return None
    try:
        data = np.load(io.BytesIO(storage.read_bytes(storage.join(index_root, entry.get("index_id") or manifest["index_id"],
                                                                   entry["file"]))))
    except FileNotFoundError:
        return None
    return data["queries"], (data["self_ids"] if bool(data["has_self"]) else None), data["exact_ids"], data["exact_scores"]


def verify_and_tune(index_root: str, index_id: str, manifest: dict, queries, exact_ids, self_ids, target: float,
                    exact_scores=None, start_nprobe: int | None = None, latency_repeats: int = 3) -> dict:
    """Open the written index the way search does, tune it (from start_nprobe up when
    given: tune.tune), record the result. `exact_ids` may hold more than
    RECALL_K + TIE_MARGIN neighbours per query (own ids dropped): the first
    RECALL_K + TIE_MARGIN tune."""
    exact_ids = exact_ids[:, :RECALL_K + TIE_MARGIN]
    if exact_scores is not None:
        exact_scores = exact_scores[:, :RECALL_K + TIE_MARGIN]
    index = ShardedIndex.open(index_root, index_id=index_id)
    result = tune(index, queries, exact_ids, nlist=manifest["plan"]["nlist"],
                  hnsw_quantizer=manifest["plan"]["hnsw_quantizer"], target=target, k=RECALL_K, self_ids=self_ids,
                  exact_scores=exact_scores, start_nprobe=start_nprobe, latency_repeats=latency_repeats)
    manifest.update({k: result[k] for k in ("search_params", "recall_at_10")})
    manifest["tuning"] = result
    if not result["reached_target"]:
        log.warning("index %s: recall@10 %.4f is below the target %.2f even at nprobe=nlist: the plan's codes "
                    "are too lossy (raise --memory-budget)", index_id, result["recall_at_10"], target)
    return manifest
