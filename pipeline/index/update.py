"""Incremental index update for the nightly job: add new vectors, remove deleted ids,
replace changed ones, relative to the index CURRENT points to; or rebuild when the plan
says so. Always publishes a new index_id (index directories are immutable, so search
caches keyed by index_id stay valid) and moves CURRENT only when it is complete.

An update writes a delta shard and a deletion set (delta.py) and leaves the build's base
shards untouched where they are: it opens the current index memory-mapped, reads only the
table files written since the indexed version for the added rows, and brings the recall
ground truth up to date from the changes.

Diff: from the Delta log when it can (O(changed files)): the files removed, added or given
a larger deletion vector since the indexed version (store/live.py, store/removal.py).
Otherwise the table version's (image_id, etag) pairs against the index's
id maps. A URI keeps its image_id when its object changes, so a change means remove + add.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from sparse_embed.pipeline.index.build import DEFAULT_TARGET_RECALL, BuildConfig, build_index, plan_shards
from sparse_embed.pipeline.index.plan import parse_bytes, plan_index, rebuild_reason
from sparse_embed.pipeline.index.delta import (DELTA_MAX_FRACTION, delta_rebuild_reason, empty_delta, split_removed,
                                               union_sorted, update_truth)
from sparse_embed.pipeline.index.publish import (TRUTH_DEPTH, current_manifest, new_index_id, publish, read_truth,
                                                 verify_and_tune, write_manifest, write_truth)
from sparse_embed.pipeline.index.snapshot import TableSnapshot, model_version_of, read_file, vectors_of
from sparse_embed.pipeline.index.tune import RECALL_K, RECALL_QUERIES, TIE_MARGIN, drop_self, exact_topk, merge_topk
from sparse_embed.pipeline.store import storage

log = logging.getLogger(__name__)

DEFAULT_REBUILD_GROWTH = 0.5  # rebuild (retrain) once the table holds 1.5x the vectors the index was trained for


def diff_ids(index_ids, index_etags, table_ids, table_etags):
    """(ids to remove from the index, ids to add from the table), sorted int64, by one Arrow
    hash join: removed = gone from the table or etag changed; added = new to the index or
    etag changed. Null etags on both sides compare equal (a table without etags: ids only)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def side(ids, etags, name):
        ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(ids, dtype="int64"))
        etags = etags if isinstance(etags, (pa.Array, pa.ChunkedArray)) else pa.array(list(etags), pa.large_string())
        return pa.table({"image_id": ids.cast(pa.int64()), f"{name}_etag": etags.cast(pa.large_string()),
                         f"in_{name}": pa.array(np.ones(len(ids), dtype=bool))})

    j = side(index_ids, index_etags, "old").join(side(table_ids, table_etags, "new"), "image_id", join_type="full outer")
    in_old, in_new = pc.fill_null(j["in_old"], False), pc.fill_null(j["in_new"], False)
    a, b = j["old_etag"], j["new_etag"]
    differs = pc.fill_null(pc.not_equal(a, b), pc.xor(pc.is_null(a), pc.is_null(b)))
    changed = pc.and_(pc.and_(in_old, in_new), differs)
    ids = j["image_id"]
    removed = ids.filter(pc.and_(in_old, pc.or_(pc.invert(in_new), changed))).to_numpy()
    added = ids.filter(pc.and_(in_new, pc.or_(pc.invert(in_old), changed))).to_numpy()
    return np.sort(removed).astype("int64"), np.sort(added).astype("int64")


def exact_slice(paths: list[str], table_uri: str, queries, k: int, dvs=None):
    """Ray task body: brute-force top-k of `queries` over the live rows of the given table
    files (rows a file's deletion vector, `dvs`: path -> descriptor, marks are left out)."""
    import numpy as np

    ids_out = np.full((len(queries), 0), -1, dtype="int64")
    sc_out = np.zeros((len(queries), 0), dtype="float32")
    for p in paths:
        t = read_file(p, table_uri, ["image_id", "embedding"], (dvs or {}).get(p))
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
    delta_max_fraction: float = DELTA_MAX_FRACTION  # rebuild once delta + deleted exceed this fraction of the base

    def __post_init__(self):
        if self.rebuild_growth < 0:
            raise ValueError(f"Expected --rebuild-growth >= 0, got {self.rebuild_growth!r}")
        if self.delta_max_fraction < 0:
            raise ValueError(f"Expected delta_max_fraction >= 0, got {self.delta_max_fraction!r}")


def update_index(cfg: UpdateConfig) -> dict | None:
    """Rebuilds (build_index) when there is no current index, when forced, when the model
    version or dimension changed, when the planner would now pick another kind of index,
    when the table grew past (1 + rebuild_growth) x the vectors the index was trained
    for, when the delta shard and deletion set outgrow DELTA_MAX_FRACTION of the base, or
    when the updated index's tuned recall@10 falls below `target_recall` while its parent's
    reached it. Otherwise writes a new delta shard (the parent's delta minus removed ids,
    plus the new rows) and deletion set, keeps the base shards where they are, retunes
    nprobe, writes a new index_id and moves CURRENT last. Returns the published manifest
    (the current one unchanged when the table version is the one indexed; an empty
    index's for an empty table version)."""
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
    current = ShardedIndex.open(cfg.index_root, index_id=cm["index_id"])  # memory-mapped: no vector is read here

    from_log = _diff_from_log(snap, cm.get("table_version"), current)
    if from_log is not None:
        removed, added, add_t, added_read = from_log
    else:
        old = current.id_maps.live_table(columns=("image_id", "etag"))
        removed, added = _diff_against_index(old, snap)
        add_t, added_read = _added_rows(snap, cm.get("table_version"), added)
    log.info("index update %s -> table v%d: %d removed, %d added (%s)", cm["index_id"], snap.version, len(removed),
             len(added), added_read["read_from"])
    index_id = new_index_id(snap.version)
    index_dir = storage.join(cfg.index_root, index_id)
    manifest = dict(_write_delta(cfg.index_root, index_id, cm, current, removed, add_t), table_version=snap.version)
    if manifest["ntotal"] != snap.n:
        raise RuntimeError(f"Updated index holds {manifest['ntotal']} vectors, table v{snap.version} has {snap.n} rows")
    manifest["update"] = {"parent": cm["index_id"], "parent_table_version": cm["table_version"],
                          "removed": int(len(removed)), "added": int(len(added)), "added_rows": added_read}
    write_manifest(index_dir, manifest)

    queries, self_ids, exact_ids, exact_scores, manifest["update"]["truth"] = _updated_truth(cfg, cm, snap, removed, add_t)
    manifest["truth"] = dict(write_truth(index_dir, queries, self_ids, exact_ids, exact_scores), index_id=index_id)
    manifest = verify_and_tune(cfg.index_root, index_id, manifest, queries, exact_ids, self_ids, cfg.target_recall,
                               exact_scores, start_nprobe=(cm.get("search_params") or {}).get("nprobe"),
                               latency_repeats=1)  # the parent's figures were best of 3; an update changes little
    parent_ok = cm.get("tuning", {}).get("reached_target", True)
    if not manifest["tuning"]["reached_target"] and parent_ok:
        return _rebuild(cfg, cm, f"recall@10 {manifest['recall_at_10']:.4f} after the update is below the target "
                                 f"{cfg.target_recall}")
    manifest["update"]["seconds"] = round(time.perf_counter() - t_all, 3)
    write_manifest(index_dir, manifest)
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
                                   # a rebuild keeps the choice the first build was made with
                                   accept_lower_recall=bool((cm or {}).get("build", {}).get("accepted_lower_recall", False)),
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
    reason = rebuild_reason(index_n_trained=cm["build"].get("trained_ntotal", cm["ntotal"]), table_n=snap.n,
                            growth=cfg.rebuild_growth, same_model=model_version_of(snap) == cm.get("model_version"),
                            same_dim=snap.dim() == cm["dim"], same_plan_kind=plan.kind == cm["plan"]["kind"])
    if reason:
        return reason
    if cm.get("trained_file") is None and cm["plan"]["kind"] != "flat":
        return "the current index records no trained index to start a delta shard from"
    return delta_rebuild_reason(base_ntotal=sum(e["ntotal"] for e in cm["shards"] if not e.get("delta")),
                                delta_ntotal=sum(e["ntotal"] for e in cm["shards"] if e.get("delta")),
                                deleted=(cm.get("deleted") or {}).get("count", 0), max_fraction=cfg.delta_max_fraction)


def _diff_against_index(old, snap: TableSnapshot):
    """(removed, added) image_ids between the index's live ids (id maps) and the table
    version, by (image_id, etag); by image_id alone for a table without etags (nulls)."""
    new = snap.read_columns(["image_id", "etag"])
    return diff_ids(old.column("image_id"), old.column("etag"), new.column("image_id"), new.column("etag"))


def _diff_from_log(snap: TableSnapshot, parent_version: int | None, current):
    """(removed, added, the added rows, how they were read) from the indexed version's and
    `snap`'s file lists (the log only) and the files that differ, O(changed files):
    - a file the parent had and `snap` lacks, or whose deletion vector grew, lost rows;
    - a file `snap` has and the parent lacked holds new rows: a nightly's data files, and
      a copy-on-write rewrite's kept rows, which cancel out by (image_id, etag).
    A URI keeps its image_id when its object changes, so a change is remove + add.
    None when the parent version cannot be opened (its log entries are gone) or the
    result does not account for the table's live row count: the caller then diffs the
    whole table against the index."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from sparse_embed.pipeline.store import live

    if parent_version is None or parent_version >= snap.version:
        return None
    try:
        old = live.table_files(snap.uri, parent_version)
    except Exception:  # noqa: BLE001 - a version the log no longer holds: diff the whole table
        return None
    if old is None:
        return None
    keys = ["image_id", "etag"]
    old_by, new_by = {f.path: f for f in old.files}, {f.path: f for f in snap.files}
    try:
        gone, came, came_files = _changed_files(snap, old_by, new_by, keys)
    except OSError as e:  # FileNotFoundError included: a vacuum removed files the parent version named
        log.info("index update: files of table v%d are gone (%s: %s): diffing the whole table", parent_version,
                 type(e).__name__, str(e)[:200])
        return None
    if any("etag" not in t.column_names for t in gone + came):
        return None  # no etags: a change cannot be told from a copy-on-write rewrite's kept row
    empty = pa.table({"image_id": pa.array([], pa.int64()), "etag": pa.array([], pa.string())})
    gone_t = pa.concat_tables([_keys(t) for t in gone]) if gone else empty
    came_t = pa.concat_tables([_keys(t) for t in came]) if came else empty
    lost = gone_t.join(came_t, keys, join_type="left anti")
    new = came_t.join(gone_t, keys, join_type="left anti")
    added = np.sort(new.column("image_id").to_numpy()).astype("int64")
    candidates = np.unique(lost.column("image_id").to_numpy()).astype("int64")
    removed = candidates[current.id_maps.contains_live(candidates)].astype("int64") if len(candidates) else candidates
    readded = added[current.id_maps.contains_live(added)] if len(added) else added
    if len(np.unique(added)) != len(added) or not np.isin(readded, removed).all():
        return None  # an added id the index holds live must have been removed: anything else is another history
    if current.ntotal - len(removed) + len(added) != snap.n:
        return None
    wanted = pa.array(added, pa.int64())
    parts = []
    for g in came_files:  # the new rows' vectors, from the files that hold them
        t = read_file(snap.abs_path(g), snap.uri, dv=g.dv)
        t = t.filter(pc.is_in(t.column("image_id"), value_set=wanted))
        if t.num_rows:
            parts.append(t)
    add_t = pa.concat_tables(parts) if parts else None
    return removed, added, add_t, {"read_from": "log", "files_read": len(gone) + len(came_files)}


def _changed_files(snap, old_by: dict, new_by: dict, keys: list[str]):
    """_diff_from_log's reads: the rows the parent's files lost, and the rows of the files
    it lacked (with those files). Raises OSError when a file is gone."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from sparse_embed.pipeline.store import live

    gone, came, came_files = [], [], []
    for path, f in old_by.items():
        g = new_by.get(path)
        if g is None:
            gone.append(live.read_file(snap.uri, f, keys))
        elif (g.dv or {}) != (f.dv or {}):
            newly = np.setdiff1d(live.deleted_positions(snap.uri, g.dv), live.deleted_positions(snap.uri, f.dv))
            t = live.read_file(snap.uri, live.DataFile(path, f.size, f.rows), keys, positions=True)
            gone.append(t.filter(pc.is_in(t.column("_row"), value_set=pa.array(newly, pa.int64()))).select(keys))
    for path, g in new_by.items():
        if path not in old_by:
            t = live.read_file(snap.uri, g, keys)
            if t.num_rows:
                came.append(t)
                came_files.append(g)
    return gone, came, came_files


def _keys(t):
    import pyarrow as pa

    return pa.table({"image_id": t.column("image_id").cast(pa.int64()), "etag": t.column("etag").cast(pa.string())})


def _files_since(snap: TableSnapshot, version: int | None) -> list[str]:
    """The snapshot's data files that table `version` lacks (every new or changed row is in
    one of them: Delta rewrites a file to change it); all files when that version is gone."""
    from sparse_embed.pipeline.store import tables

    try:
        before = tables.open_table(snap.uri, version) if version is not None else None
    except Exception:  # noqa: BLE001 - a vacuumed or checkpointed-away version: read every file
        before = None
    if before is None:
        return list(snap.paths)
    old = {storage.strip_scheme(f) for f in before.file_uris()}
    return [p for p in snap.paths if p not in old]


def _appended_since(snap: TableSnapshot, version: int | None) -> list[str] | None:
    """The snapshot's data files that append commits added since `version` (where a
    nightly's new and changed rows are; removal commits, DELETE, rewrite files with old
    rows only: tables.appended_files). None when the log between the versions is not all
    appends and deletes, or there is no span."""
    from sparse_embed.pipeline.store import tables

    if version is None or version >= snap.version:
        return None
    appended = tables.appended_files(snap.uri, version, snap.version)
    if appended is None:
        return None
    data_files = set(snap.paths)
    return [p for p in appended if p in data_files]


def _added_rows(snap: TableSnapshot, parent_version: int | None, added):
    """(the table rows of `added` (image_id, uri, etag, embedding), where they were read
    from and how many files were read), one file at a time:
    first from the files appended since the parent's table version (the nightly's own
    files: O(changed)), then, if rows are missing, from every file written since, then
    from every file; None rows when nothing is added. Masked rows are dropped as files are
    read and an image_id has one live row, so finding len(added) rows means all were found."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(added):
        return None, {"read_from": None, "files_read": 0}
    wanted = pa.array(added, pa.int64())

    def read(paths):
        parts = []
        for p in paths:
            t = read_file(p, snap.uri, dv=snap.dv_of(p))
            t = t.filter(pc.is_in(t.column("image_id"), value_set=wanted))
            if t.num_rows:
                parts.append(t)
        return pa.concat_tables(parts) if parts else None

    add_t = None
    for source, find in (("appended", lambda: _appended_since(snap, parent_version)),
                         ("written since", lambda: _files_since(snap, parent_version)),
                         ("all files", lambda: snap.paths)):  # a rewritten history
        paths = find() or []
        add_t = read(paths) if paths else None
        if add_t is not None and add_t.num_rows == len(added):
            return add_t, {"read_from": source, "files_read": len(paths)}
    raise RuntimeError(f"Expected {len(added)} added rows in table v{snap.version}, found "
                       f"{0 if add_t is None else add_t.num_rows}")


def _write_delta(index_root: str, index_id: str, cm: dict, current, removed, add_t) -> dict:
    """Write the new delta shard, its id map and the deletion set under `index_id`; return
    the new manifest (base shards and id maps still in the directories that hold them)."""
    import io

    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from sparse_embed.pipeline.index.idmap import id_map_schema, write_id_map
    from sparse_embed.pipeline.index.searcher import _cached, file_uri, id_map_entries

    index_dir = storage.join(index_root, index_id)
    owned = lambda e: dict(e, index_id=e.get("index_id") or cm["index_id"])  # noqa: E731
    base = [owned(e) for e in cm["shards"] if not e.get("delta")]
    base_maps = [owned(e) for e in id_map_entries(cm) if not e.get("delta")]
    maps = current.id_maps
    delta_rows = (pa.concat_tables([pa.Table.from_batches(list(r.batches()), schema=id_map_schema())
                                    for r in maps.runs[maps.first_live_run:]])
                  if maps.first_live_run < len(maps.runs) else None)
    delta_ids = delta_rows.column("image_id").to_numpy() if delta_rows is not None else np.zeros(0, dtype="int64")
    drop_delta, drop_base = split_removed(removed, delta_ids)
    deleted = union_sorted(current.deleted, drop_base)

    parent_delta = [e for e in cm["shards"] if e.get("delta")]
    if parent_delta:
        delta = faiss.read_index(_cached(file_uri(index_root, cm, parent_delta[0]), index_root,
                                         owned(parent_delta[0])["index_id"]))
        if len(drop_delta):
            delta.remove_ids(faiss.IDSelectorBatch(drop_delta))
        delta_rows = delta_rows.filter(pc.invert(pc.is_in(delta_rows.column("image_id"), value_set=pa.array(drop_delta))))
    else:
        trained = None
        if cm.get("trained_file"):
            trained = storage.read_bytes(storage.join(index_root, cm.get("trained_index_id") or cm["index_id"],
                                                      cm["trained_file"]))
        delta = empty_delta(trained, cm["factory"], cm["dim"])
    if add_t is not None:
        delta.add_with_ids(vectors_of(add_t.column("embedding")), add_t.column("image_id").to_numpy().astype("int64"))
        new_rows = add_t.select(["image_id", "uri", "etag"])
        new_rows = pa.table({c: new_rows.column(c).cast(pa.large_string() if c != "image_id" else pa.int64())
                             for c in new_rows.column_names})
        delta_rows = new_rows if delta_rows is None else pa.concat_tables([delta_rows, new_rows])

    shards, id_maps = list(base), list(base_maps)
    if delta.ntotal:
        storage.write_bytes_atomic(storage.join(index_dir, "delta.faiss"), faiss.serialize_index(delta).tobytes())
        write_id_map(storage.join(index_dir, "idmap_delta.arrow"), delta_rows.column("image_id"),
                     delta_rows.column("uri"), delta_rows.column("etag"))
        shards.append({"file": "delta.faiss", "ntotal": int(delta.ntotal), "index_id": index_id, "delta": True})
        id_maps.append({"file": "idmap_delta.arrow", "index_id": index_id, "delta": True})
    buf = io.BytesIO()
    np.save(buf, deleted.astype("int64"))
    storage.write_bytes_atomic(storage.join(index_dir, "deleted.npy"), buf.getvalue())
    ntotal = int(sum(e["ntotal"] for e in base) - len(deleted) + delta.ntotal)
    manifest = dict(cm, index_id=index_id, ntotal=ntotal, shards=shards, id_maps=id_maps, ids_files=[],
                    deleted={"file": "deleted.npy", "count": int(len(deleted)), "index_id": index_id},
                    trained_index_id=cm.get("trained_index_id") or cm["index_id"],
                    base_index_id=cm.get("base_index_id") or cm["index_id"], search_params={})
    manifest["build"] = dict(cm["build"], updated_at=datetime.now(timezone.utc).isoformat())
    manifest.pop("tuning", None)
    return manifest


def _updated_truth(cfg: UpdateConfig, cm: dict, snap: TableSnapshot, removed, add_t):
    """(queries, self_ids, exact_ids, exact_scores, how) for the updated index: the parent's
    ground truth brought up to date from the removed and added rows alone when enough of
    each list survives ("from the changes"), else exact search over the whole table version
    in Ray tasks ("table scan": an index that records no truth, e.g. one built before builds
    recorded theirs)."""
    import numpy as np

    need = RECALL_K + TIE_MARGIN
    truth = read_truth(cfg.index_root, cm)
    if truth is not None:
        queries, self_ids, ids, scores = truth
        added_ids = add_t.column("image_id").to_numpy() if add_t is not None else np.zeros(0, dtype="int64")
        added_vectors = vectors_of(add_t.column("embedding")) if add_t is not None else None
        ids, scores, valid = update_truth(ids, scores, removed, added_ids, added_vectors, queries, self_ids,
                                          depth=ids.shape[1])
        if valid >= need:
            return queries, self_ids, ids[:, :valid], scores[:, :valid], "from the changes"
        log.info("index update: the recall ground truth kept %d exact neighbours (< %d): searching the table", valid, need)
    else:
        self_ids, queries = snap.sample(RECALL_QUERIES, seed=snap.version)
    extra = 0 if self_ids is None else 1
    exact_ids, exact_scores = _exact_over_table(snap, queries, TRUTH_DEPTH + extra)
    exact_ids, exact_scores = drop_self(exact_ids, exact_scores, self_ids, TRUTH_DEPTH)
    return queries, self_ids, exact_ids, exact_scores, "table scan"


def _exact_over_table(snap: TableSnapshot, queries, k: int):
    import ray

    from sparse_embed.infra.ray_launcher import ensure_ray

    resources = ensure_ray()
    groups = plan_shards(snap.sizes, max(1, min(len(snap.paths), int(resources.get("CPU", 1)))))
    task = ray.remote(num_cpus=1)(exact_slice)
    q_ref = ray.put(queries)
    parts = ray.get([task.remote([snap.paths[j] for j in g], snap.uri, q_ref, k, snap.dvs) for g in groups])
    return merge_topk([p[0] for p in parts], [p[1] for p in parts], k)

