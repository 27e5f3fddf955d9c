"""Bounded storage: `vacuum_output` removes what no reader of an output needs once a
retention has passed, under the output lock.

- Each Delta table (embeddings, errors, image_ids, listing): the data files that a commit
  older than the retention removed (a compaction's or a copy-on-write rewrite's old
  files), by deltalake's vacuum, and the deletion-vector files no version within the
  retention names (deltalake's vacuum leaves those); then a checkpoint and the
  log entries older than the table's log retention (`delta.logRetentionDuration`, 30 days
  by default) are cleaned up, so opening the table reads the checkpoint and a few
  commits. Time travel to a version older than the retention fails afterwards.
- Index versions under <out>/index: every version that CURRENT's index does not use
  (its own and the earlier versions holding its base shards and id maps) and that is
  older than the retention.
Nothing here is needed by serving or index updates: search by id and by URI reads the
current table (pipeline/index/searcher.py), and an update whose parent version's files
are gone diffs the whole table (pipeline/index/update.py).
"""
from __future__ import annotations

import logging
import math
import time

from sparse_embed.pipeline.store import storage, tables
from sparse_embed.pipeline.store.lock import check_before_commit

log = logging.getLogger(__name__)

DEFAULT_RETAIN_HOURS = 168  # a week: a reader that opened a table version has that long to finish
TABLES = (tables.EMBEDDINGS, tables.ERRORS, tables.IMAGE_IDS, tables.LISTING)


def vacuum_output(out: str, *, retain_hours: float = DEFAULT_RETAIN_HOURS, now: float | None = None) -> dict:
    """Vacuum every table and index version of `out` (the module docstring). The caller holds
    the output lock. Returns {"tables": {name: {"files", "bytes"}}, "index": {"removed",
    "bytes", "kept"}, "retain_hours"}."""
    if retain_hours < 0:
        raise ValueError(f"Expected --retain-hours >= 0, got {retain_hours!r}")
    report = {"retain_hours": retain_hours, "tables": {}, "index": {"removed": [], "bytes": 0, "kept": []}}
    now = time.time() if now is None else now
    for name in TABLES:
        report["tables"][name] = _vacuum_table(tables.table_uri(out, name), retain_hours, now)
    report["index"] = _vacuum_index_versions(storage.join(out, "index"), retain_hours, now)
    return report


def _vacuum_table(uri: str, retain_hours: float, now: float) -> dict:
    dt = tables.open_table(uri)
    if dt is None:
        return {"files": 0, "bytes": 0}
    # deltalake takes whole hours: rounded up, so a fractional retention never keeps less
    kw = {"retention_hours": math.ceil(retain_hours), "enforce_retention_duration": False, "full": False}
    doomed = dt.vacuum(dry_run=True, **kw)
    fs = storage.filesystem(uri)
    size = 0
    for p in doomed:
        path = p if "://" in p or p.startswith("/") else storage.join(uri, p)  # relative to the table, or absolute
        try:
            size += fs.size(storage.strip_scheme(path))
        except FileNotFoundError:
            pass
    check_before_commit(uri)
    removed = dt.vacuum(dry_run=False, **kw)
    dv_files, dv_bytes = _vacuum_deletion_vectors(uri, dt, retain_hours, now)
    removed, size = removed + dv_files, size + dv_bytes
    dt = tables.open_table(uri)
    dt.create_checkpoint()
    dt.cleanup_metadata()
    log.info("vacuum %s: %d files, %d bytes", uri, len(removed), size)
    return {"files": len(removed), "bytes": size}


def _vacuum_deletion_vectors(uri: str, dt, retain_hours: float, now: float) -> tuple[list, int]:
    """Delete the deletion-vector files no version within the retention names (deltalake's
    vacuum leaves a vector that a later vector of the same data file replaced): the
    versions committed within the window, and the last one before it, are kept readable.
    Returns (files removed, bytes)."""
    from sparse_embed.pipeline.store import deletion_vectors, live

    fs = storage.filesystem(uri)
    root = storage.strip_scheme(uri)
    found = {e["name"]: e for e in fs.ls(root, detail=True, refresh=True)  # vectors sit at the table's root
             if e["name"].rsplit("/", 1)[-1].startswith("deletion_vector_")}
    if not found:
        return [], 0
    cutoff_ms = (now - retain_hours * 3600) * 1000
    history = dt.history()
    versions = {dt.version()} | {h["version"] for h in history if h.get("timestamp", 0) >= cutoff_ms}
    before = [h["version"] for h in history if h.get("timestamp", 0) < cutoff_ms]
    if before:
        versions.add(max(before))
    needed = set()
    for v in versions:
        try:
            tf = live.table_files(uri, v)
        except Exception:  # noqa: BLE001 - a version whose log entries are gone names nothing readable
            continue
        needed |= {f"{root}/{deletion_vectors.relative_path(f.dv['pathOrInlineDv'])}" for f in tf.files
                   if f.dv and f.dv.get("storageType") == "u"}
    removed, size = [], 0
    for path, info in found.items():
        if path in needed or now - _mtime(fs, info) < retain_hours * 3600:
            continue
        fs.rm_file(path)
        removed.append(path)
        size += int(info.get("size") or 0)
    return removed, size


def _vacuum_index_versions(index_root: str, retain_hours: float, now: float) -> dict:
    from sparse_embed.pipeline.index.publish import current_manifest
    from sparse_embed.pipeline.index.searcher import referenced_ids

    fs = storage.filesystem(index_root)
    base = storage.strip_scheme(index_root)
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return {"removed": [], "bytes": 0, "kept": []}
    manifest = current_manifest(index_root)
    keep = referenced_ids(manifest) if manifest else set()
    removed, size, kept = [], 0, sorted(keep)
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") != "directory" or name in keep:
            continue
        files = [f for f in fs.find(e["name"], detail=True).values() if f.get("type") == "file"]
        newest = max((_mtime(fs, f) for f in files), default=0.0)
        if now - newest < retain_hours * 3600:
            kept.append(name)
            continue
        check_before_commit(index_root)
        fs.rm(e["name"], recursive=True)
        removed.append(name)
        size += sum(int(f.get("size") or 0) for f in files)
    fs.invalidate_cache(base)  # later listings in this process see the removal
    log.info("vacuum %s: %d index versions removed, %d kept", index_root, len(removed), len(kept))
    return {"removed": sorted(removed), "bytes": size, "kept": sorted(kept)}


def _mtime(fs, info: dict) -> float:
    """A file's modification time in seconds since the epoch (local files and S3 objects)."""
    t = info.get("mtime") or info.get("LastModified") or info.get("created")
    if t is None:
        return fs.modified(info["name"]).timestamp()
    return t.timestamp() if hasattr(t, "timestamp") else float(t)
