"""Incremental index update for the nightly job: add new vectors, remove deleted ids,
replace changed ones, relative to the index CURRENT points to; or rebuild when the plan
says so. Always publishes a new index_id (index directories are immutable, so search
caches keyed by index_id stay valid) and moves CURRENT only when it is complete.

Diff: the table version's (image_id, etag) pairs against the index's ids files. A URI
keeps its image_id when its object changes, so a changed etag means remove + add.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from sparse_embed.pipeline.index.build import DEFAULT_TARGET_RECALL, BuildConfig, build_index, plan_shards
from sparse_embed.pipeline.index.plan import parse_bytes, plan_index, rebuild_reason
from sparse_embed.pipeline.index.publish import current_manifest, new_index_id, publish, verify_and_tune, write_manifest
from sparse_embed.pipeline.index.snapshot import TableSnapshot, model_version_of, read_file, vectors_of
from sparse_embed.pipeline.index.tune import RECALL_K, RECALL_QUERIES, TIE_MARGIN, drop_self, exact_topk, merge_topk
from sparse_embed.pipeline.store import storage

log = logging.getLogger(__name__)

DEFAULT_REBUILD_GROWTH = 0.5  # rebuild (retrain) once the table holds 1.5x the vectors the index was trained for


def _read_index_ids(index_root: str, manifest: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparse_embed.pipeline.index.searcher import _cached

    index_dir = storage.join(index_root, manifest["index_id"])
    files = manifest.get("ids_files") or [s["ids_file"] for s in manifest["shards"]]
    return pa.concat_tables([pq.read_table(_cached(storage.join(index_dir, f), manifest["index_id"])) for f in files])


def diff_ids(index_ids, index_etags, table_ids, table_etags):
    """(ids to remove from the index, ids to add from the table) (pure numpy/python):
    removed = gone from the table or etag changed; added = new to the index or etag changed."""
    import numpy as np

    old = dict(zip(index_ids.tolist(), index_etags))
    new = dict(zip(table_ids.tolist(), table_etags))
    changed = [i for i, e in new.items() if i in old and old[i] != e]
    removed = sorted(set(old) - set(new)) + changed
    added = sorted(set(new) - set(old)) + changed
    return np.asarray(sorted(removed), dtype="int64"), np.asarray(sorted(added), dtype="int64")


def exact_slice(paths: list[str], table_uri: str, queries, k: int):
    """Ray task body: brute-force top-k of `queries` over the given table files."""
    import numpy as np

    ids_out = np.full((len(queries), 0), -1, dtype="int64")
    sc_out = np.zeros((len(queries), 0), dtype="float32")
    for p in paths:
        t = read_file(p, table_uri, ["image_id", "embedding"])
        if t.num_rows:
            i, s = exact_topk(queries, vectors_of(t.column("embedding")), t.column("image_id").to_numpy().astype("int64"), k)
            ids_out, sc_out = merge_topk([ids_out, i], [sc_out, s], k)
    return ids_out, sc_out


@dataclass
class UpdateConfig:
    """Bring the index at `index_root` up to `version` (default: latest) of the table."""

    table: str
    index_root: str
    version: int | None = None
    memory_budget: int | str | None = None  # default: the current index's budget
    target_recall: float = DEFAULT_TARGET_RECALL
    rebuild_growth: float = DEFAULT_REBUILD_GROWTH
    force_rebuild: bool = False
    shards: int | None = None  # slices of a rebuild

    def __post_init__(self):
        if self.rebuild_growth < 0:
            raise ValueError(f"Expected --rebuild-growth >= 0, got {self.rebuild_growth!r}")


def update_index(cfg: UpdateConfig) -> dict | None:
    """Rebuilds (build_index) when there is no current index, when forced, when the model
    version or dimension changed, when the planner would now pick another kind of index,
    when the table grew past (1 + rebuild_growth) x the vectors the index was trained
    for, or when the updated index's tuned recall@10 falls below `target_recall` while
    its parent's reached it. Otherwise removes/adds only the difference, retunes nprobe,
    writes a new index_id and moves CURRENT last. Returns the published manifest (the
    current one unchanged when the table version is the one indexed; an empty index's for
    an empty table version)."""
    from sparse_embed.pipeline.index.searcher import ShardedIndex

    t_all = time.perf_counter()
    cm = current_manifest(cfg.index_root)
    if cm is None:
        return _rebuild(cfg, None, "no current index")
    snap = TableSnapshot(cfg.table, cfg.version)
    if cm.get("table") == cfg.table and cm.get("table_version") == snap.version and not cfg.force_rebuild:
        log.info("index %s already indexes table v%d", cm["index_id"], snap.version)
        return cm
    if snap.n == 0:
        return _rebuild(cfg, cm, "the table is empty")
    reason = _rebuild_reason(cfg, cm, snap)
    if reason:
        return _rebuild(cfg, cm, reason)
    current = ShardedIndex.open(cfg.index_root, index_id=cm["index_id"])  # only an in-place update reads the shards

    old = _read_index_ids(cfg.index_root, cm)
    removed, added = _diff_against_index(old, snap)
    log.info("index update %s -> table v%d: %d removed, %d added", cm["index_id"], snap.version, len(removed), len(added))
    add_t = _apply_diff(current.shards, snap, removed, added)
    ntotal = int(sum(s.ntotal for s in current.shards))
    if ntotal != snap.n:
        raise RuntimeError(f"Updated index holds {ntotal} vectors, table v{snap.version} has {snap.n} rows")

    index_id = new_index_id(snap.version)
    _write_updated(cfg.index_root, index_id, cm, current.shards, old, removed, add_t)
    manifest = dict(cm, index_id=index_id, ntotal=ntotal, table_version=snap.version,
                    shards=[{"file": e["file"], "ntotal": int(s.ntotal)} for e, s in zip(cm["shards"], current.shards)],
                    ids_files=["ids_00000.parquet"], search_params={})
    manifest["build"] = dict(cm["build"], updated_at=datetime.now(timezone.utc).isoformat())
    manifest["update"] = {"parent": cm["index_id"], "parent_table_version": cm["table_version"],
                          "removed": int(len(removed)), "added": int(len(added))}
    manifest.pop("tuning", None)
    write_manifest(storage.join(cfg.index_root, index_id), manifest)

    # Recall against exact search over the new table version, in parallel over file groups.
    self_ids, queries = snap.sample(RECALL_QUERIES, seed=snap.version)
    exact_ids, exact_scores = _exact_over_table(snap, queries, RECALL_K + TIE_MARGIN + 1)
    exact_ids, exact_scores = drop_self(exact_ids, exact_scores, self_ids, RECALL_K + TIE_MARGIN)
    manifest = verify_and_tune(cfg.index_root, index_id, manifest, queries, exact_ids, self_ids, cfg.target_recall,
                               exact_scores)
    parent_ok = cm.get("tuning", {}).get("reached_target", True)
    if not manifest["tuning"]["reached_target"] and parent_ok:
        return _rebuild(cfg, cm, f"recall@10 {manifest['recall_at_10']:.4f} after the update is below the target "
                                 f"{cfg.target_recall}")
    manifest["update"]["seconds"] = round(time.perf_counter() - t_all, 3)
    write_manifest(storage.join(cfg.index_root, index_id), manifest)
    publish(cfg.index_root, index_id)
    log.info("index %s: updated from %s (+%d -%d), recall@10 %.4f", index_id, cm["index_id"], len(added), len(removed),
             manifest["recall_at_10"])
    return manifest


def _rebuild(cfg: UpdateConfig, cm: dict | None, reason: str) -> dict | None:
    log.info("index update: rebuilding (%s)", reason)
    budget = cfg.memory_budget
    if budget is None and cm is not None and cm.get("plan"):
        budget = cm["plan"]["memory_budget"]
    return build_index(BuildConfig(cfg.table, cfg.index_root, version=cfg.version, memory_budget=budget,
                                   shards=cfg.shards, target_recall=cfg.target_recall,
                                   extra={"rebuild_reason": reason}))


def _rebuild_reason(cfg: UpdateConfig, cm: dict, snap: TableSnapshot) -> str | None:
    """Why the current index cannot be updated in place to `snap` (None: it can)."""
    if cfg.force_rebuild:
        return "forced"
    if not cm.get("ntotal"):
        return "the current index is empty"
    if "plan" not in cm or cm["plan"] is None:
        return "the current index predates index plans"
    budget = cfg.memory_budget if cfg.memory_budget is not None else cm["plan"]["memory_budget"]
    try:
        plan = plan_index(snap.n, snap.dim(), parse_bytes(budget), nlist=cm["plan"]["nlist"] or None,
                          layout=cm["plan"]["layout"])
    except ValueError as e:  # e.g. the table shrank below the index's list count
        return f"the current index's parameters no longer fit the table ({e})"
    return rebuild_reason(index_n_trained=cm["build"].get("trained_ntotal", cm["ntotal"]), table_n=snap.n,
                          growth=cfg.rebuild_growth, same_model=model_version_of(snap) == cm.get("model_version"),
                          same_dim=snap.dim() == cm["dim"], same_plan_kind=plan.kind == cm["plan"]["kind"])


def _diff_against_index(old, snap: TableSnapshot):
    """(removed, added) image_ids between the index's ids files and the table version, by
    (image_id, etag); by image_id alone for a table without etags (its etags read as nulls)."""
    new = snap.read_columns(["image_id", "etag"])
    return diff_ids(old.column("image_id").to_numpy(), old.column("etag").to_pylist(),
                    new.column("image_id").to_numpy(), new.column("etag").to_pylist())


def _apply_diff(shards_idx: list, snap: TableSnapshot, removed, added):
    """Remove `removed` from every shard and add `added` (read from the table) to the
    smallest one, in place; returns the added rows (image_id, uri, etag, embedding) or None."""
    import faiss
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(removed):
        sel = faiss.IDSelectorBatch(removed)
        for s in shards_idx:
            s.remove_ids(sel)
    if not len(added):
        return None
    present = [c for c in ("image_id", "uri", "etag", "embedding") if c in snap.columns]
    add_t = snap.dt.to_pyarrow_dataset().to_table(columns=present, filter=pc.field("image_id").isin(added.tolist()))
    for c in ("uri", "etag"):
        if c not in present:
            add_t = add_t.append_column(c, pa.nulls(add_t.num_rows, pa.string()))
    smallest = min(range(len(shards_idx)), key=lambda i: shards_idx[i].ntotal)
    shards_idx[smallest].add_with_ids(vectors_of(add_t.column("embedding")),
                                      add_t.column("image_id").to_numpy().astype("int64"))
    return add_t


def _write_updated(index_root: str, index_id: str, cm: dict, shards_idx: list, old, removed, add_t) -> None:
    """The updated shards, the parent's trained file and one ids file, under a new index_id."""
    import faiss
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    index_dir = storage.join(index_root, index_id)
    for entry, s in zip(cm["shards"], shards_idx):
        storage.write_bytes_atomic(storage.join(index_dir, entry["file"]), faiss.serialize_index(s).tobytes())
    if cm.get("trained_file"):
        src = storage.join(index_root, cm["index_id"], cm["trained_file"])
        storage.write_bytes_atomic(storage.join(index_dir, cm["trained_file"]), storage.read_bytes(src))
    kept = old.filter(pc.invert(pc.is_in(old.column("image_id"), value_set=pa.array(removed, pa.int64()))))
    ids_table = kept.select(["image_id", "uri", "etag"])
    if add_t is not None:
        ids_table = pa.concat_tables([ids_table, add_t.select(["image_id", "uri", "etag"]).cast(ids_table.schema)])
    sink = pa.BufferOutputStream()
    pq.write_table(ids_table, sink)
    storage.write_bytes_atomic(storage.join(index_dir, "ids_00000.parquet"), sink.getvalue().to_pybytes())


def _exact_over_table(snap: TableSnapshot, queries, k: int):
    import ray

    from sparse_embed.infra.ray_launcher import ensure_ray

    resources = ensure_ray()
    groups = plan_shards(snap.sizes, max(1, min(len(snap.paths), int(resources.get("CPU", 1)))))
    task = ray.remote(num_cpus=1)(exact_slice)
    q_ref = ray.put(queries)
    parts = ray.get([task.remote([snap.paths[j] for j in g], snap.uri, q_ref, k) for g in groups])
    return merge_topk([p[0] for p in parts], [p[1] for p in parts], k)

