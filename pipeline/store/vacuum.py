"""Bounded storage: `vacuum_output` removes what no reader of an output needs once a
retention has passed, under the output lock.

- Each Delta table (embeddings, errors, image_ids, listing), by `vacuum_table`: every data
  file and deletion-vector file under the table's folder that no version readable within
  the retention names (the versions committed after the cutoff, and the last one before
  it), that is older than the cutoff and that no pending marker names (a crashed run's
  uncommitted file the next run commits). That covers a compaction's replaced files, a
  replaced deletion vector and the files of crashed writers. Then a checkpoint, and the
  log entries older than the table's log retention (`delta.logRetentionDuration`, 30 days
  by default) are cleaned up, so opening the table reads the checkpoint and a few
  commits. Time travel to a version older than the retention fails afterwards.
- Model changes (<out>/embeddings/_staged/<model_version>): the files of a promoted
  staging root are files of the embeddings table (vacuumed with it); an unpromoted one is
  a run in progress whose tables are vacuumed like the others, or, when nothing was
  written to it within the retention and another model was staged or promoted after its
  last write, an abandoned one, removed but for files the embeddings table still names.
- Leftovers of killed processes: <out>/_work (under the lock every work folder is a dead
  run's) and `_probe-*` objects of the conditional-PUT probe older than PROBE_MAX_AGE_S.
- Index versions under <out>/index: every version that CURRENT's index does not use
  (its own and the earlier versions holding its base shards and id maps) and that is
  older than the retention.
Run reports (<out>/runs) are the output's history and are kept.
Nothing here is needed by serving or index updates: search by id and by URI reads the
current table (pipeline/index/searcher.py), and an update whose parent version's files
are gone diffs the whole table (pipeline/index/update.py).
"""
from __future__ import annotations

import json
import logging
import time

from sparse_embed.pipeline.store import delta_log, deletion_vectors, storage, tables
from sparse_embed.pipeline.store.live import relative_to_table
from sparse_embed.pipeline.store.lock import check_before_commit

log = logging.getLogger(__name__)

DEFAULT_RETAIN_HOURS = 168  # a week: a reader that opened a table version has that long to finish
PROBE_MAX_AGE_S = 3600  # a conditional-PUT probe object lives for three requests; an hour-old one is a killed process's
TABLES = (tables.EMBEDDINGS, tables.ERRORS, tables.IMAGE_IDS, tables.LISTING)
STAGED_TABLES = (tables.EMBEDDINGS, tables.ERRORS)  # a staging root's own tables
STAGED_DIR = "_staged"  # <out>/embeddings/_staged/<model_version> (pipeline/embed/run.py)
ENCODER_SPEC = "encoder.json"  # an unpromoted staging root has one; promotion drops it


def vacuum_output(out: str, *, retain_hours: float = DEFAULT_RETAIN_HOURS, now: float | None = None) -> dict:
    """Vacuum every table, staging root and index version of `out` (the module docstring).
    The caller holds the output lock. Returns {"retain_hours", "tables": {name: {"files",
    "bytes", "kept_all"?}}, "staged": {"removed", "files", "bytes"}, "leftovers": {"files",
    "bytes"}, "index": {"removed", "bytes", "kept"}}."""
    if retain_hours < 0:
        raise ValueError(f"Expected --retain-hours >= 0, got {retain_hours!r}")
    now = time.time() if now is None else now
    cutoff = now - retain_hours * 3600
    report = {"retain_hours": retain_hours, "tables": {}}
    staged = _staging_roots(out)
    promoted = [v for v, info in staged.items() if not info["unpromoted"]]
    for name in TABLES:
        report["tables"][name] = vacuum_table(tables.table_uri(out, name), cutoff=cutoff,
                                              keep=_pending_paths(out, name),
                                              staged=promoted if name == tables.EMBEDDINGS else ())
    report["staged"] = _vacuum_staging_roots(out, staged, cutoff)
    report["leftovers"] = _remove_leftovers(out, now)
    report["index"] = _vacuum_index_versions(storage.join(out, "index"), cutoff)
    return report


def vacuum_table(uri: str, *, cutoff: float, keep=(), staged=()) -> dict:
    """Delete the files under the table at `uri` that no version readable after `cutoff`
    (seconds since the epoch) names, older than the cutoff and not in `keep` (paths relative
    to the table); files under `_staged/<v>/` count for the model versions in `staged` only.
    Then checkpoint and clean up the log. Returns {"files", "bytes"} removed, {"kept_files",
    "kept_bytes"} of files outside the latest version that were kept (the window or a
    pending commit needs them, or they are younger than the cutoff), and "kept_all" with the
    reason when the log no longer shows which files the window needs."""
    dt = tables.open_table(uri)
    if dt is None:
        return {"files": 0, "bytes": 0, "kept_files": 0, "kept_bytes": 0}
    fs = storage.filesystem(uri)
    root = storage.strip_scheme(uri).rstrip("/")
    needed = _files_needed(uri, dt, cutoff)
    if needed is None:
        log.warning("vacuum %s: kept every file: the log of the versions the retention needs is gone", uri)
        return {"files": 0, "bytes": 0, "kept_files": 0, "kept_bytes": 0,
                "kept_all": "the log of a version within the retention is gone"}
    current = _files_of(uri, dt)  # the latest version's files alone
    keep = set(keep) | needed
    staged_prefixes = tuple(f"{STAGED_DIR}/{v}/{tables.EMBEDDINGS}/" for v in staged)
    doomed, kept = {}, {}
    fs.invalidate_cache(root)
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root) + 1:]
        if info.get("type") != "file" or not _table_file(rel, staged_prefixes) or rel in current:
            continue
        size = int(info.get("size") or 0)
        if rel in keep or _mtime(fs, info) >= cutoff:
            kept[path] = size  # an older version within the retention, a pending commit, or too young
        else:
            doomed[path] = size
    if doomed:
        check_before_commit(uri)
        fs.rm(sorted(doomed))
        fs.invalidate_cache(root)
    check_before_commit(uri)
    dt = tables.open_table(uri, write=True)
    dt.create_checkpoint()
    dt.cleanup_metadata()
    log.info("vacuum %s: %d files, %d bytes removed; %d not in the latest version kept", uri, len(doomed),
             sum(doomed.values()), len(kept))
    return {"files": len(doomed), "bytes": sum(doomed.values()), "kept_files": len(kept), "kept_bytes": sum(kept.values())}


def _table_file(rel: str, staged_prefixes: tuple) -> bool:
    """Whether `rel` (relative to a table's folder) is a data or deletion-vector file that
    vacuum may judge: not under the log or another folder starting with "_" or "." (a
    staging root's tables, markers, probes), except a promoted staging root's data files."""
    name = rel.rsplit("/", 1)[-1]
    if not (name.endswith(".parquet") or name.startswith("deletion_vector_")):
        return False
    if rel.startswith(staged_prefixes):
        return "/_delta_log/" not in rel
    return not any(part.startswith(("_", ".")) for part in rel.split("/"))


def _files_needed(uri: str, dt, cutoff: float) -> set | None:
    """Paths (relative to the table, decoded) of the data files and deletion-vector files
    that a version readable after `cutoff` names: the files of the last version committed
    before the cutoff (or the oldest version the log holds) and every file added since.
    A version's time is its commit file's modification time (the store's clock, the one
    the data files' ages are read with). None when that version or a later commit can no
    longer be read from the log."""
    times = _commit_times(uri)
    times.setdefault(dt.version(), 0.0)
    before = [v for v, t in times.items() if t < cutoff]
    first = max(before) if before else min(times)
    try:
        old = tables.open_table(uri, first)
    except Exception:  # noqa: BLE001 - the log before a checkpoint was cleaned up: it names nothing readable
        return None
    needed = _files_of(uri, old)
    root = storage.strip_scheme(uri).rstrip("/")
    for v in range(first + 1, dt.version() + 1):
        try:
            body = storage.read_bytes(delta_log.log_uri(uri, delta_log.commit_name(v)))
        except FileNotFoundError:
            return None
        for line in body.decode().splitlines():
            add = json.loads(line).get("add") if line.strip() else None
            if add:
                needed.add(relative_to_table(add["path"], root))
                if add.get("deletionVector"):
                    needed.add(_vector_path(add["deletionVector"]))
    needed.discard(None)
    return needed


def _files_of(uri: str, dt) -> set:
    """Paths (relative to the table, decoded) of the data files and deletion-vector files of
    the version `dt` is loaded at."""
    import pyarrow as pa

    root = storage.strip_scheme(uri).rstrip("/")
    paths = [relative_to_table(p, root) for p in pa.table(dt.get_add_actions(flatten=True)).column("path").to_pylist()]
    files = set(paths)
    if delta_log.uses_deletion_vectors(dt):
        files |= {_vector_path(d) for d in delta_log.deletion_vectors(uri, dt.version(), paths).values()}
    files.discard(None)
    return files


def _commit_times(uri: str) -> dict[int, float]:
    """{version: modification time of its commit file} of the commits the log holds."""
    fs = storage.filesystem(uri)
    base = storage.strip_scheme(delta_log.log_uri(uri)).rstrip("/")
    times = {}
    for e in fs.ls(base, detail=True, refresh=True):
        name = e["name"].rsplit("/", 1)[-1]
        if len(name) == 25 and name.endswith(".json") and name[:20].isdigit():
            times[int(name[:20])] = _mtime(fs, e)
    return times


def _vector_path(dv: dict) -> str | None:
    """The file of a deletion vector stored beside the table ("u"); None for inline ones."""
    return deletion_vectors.relative_path(dv["pathOrInlineDv"]) if dv.get("storageType") == "u" else None


def _pending_paths(root: str, name: str) -> set:
    """Data files of table `name` under `root` that a pending marker names
    (<root>/_pending/<name>/<path>.json, pipeline/embed/sink.py): the next run commits them."""
    fs = storage.filesystem(root)
    base = storage.strip_scheme(storage.join(root, "_pending", name)).rstrip("/")
    try:
        return {p[len(base) + 1: -len(".json")] for p in fs.find(base) if p.endswith(".json")}
    except FileNotFoundError:
        return set()


def _staging_roots(out: str) -> dict:
    """{model_version: {"path", "unpromoted", "newest"}} of <out>/embeddings/_staged/*."""
    fs = storage.filesystem(out)
    base = storage.strip_scheme(storage.join(tables.table_uri(out, tables.EMBEDDINGS), STAGED_DIR)).rstrip("/")
    fs.invalidate_cache(base)
    try:
        files = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    roots: dict = {}
    for path, info in files.items():
        if info.get("type") != "file":
            continue
        version, _, rest = path[len(base) + 1:].partition("/")
        r = roots.setdefault(version, {"path": f"{base}/{version}", "unpromoted": False, "newest": 0.0})
        r["unpromoted"] |= rest == ENCODER_SPEC
        r["newest"] = max(r["newest"], _mtime(fs, info))
    return roots


def _vacuum_staging_roots(out: str, roots: dict, cutoff: float) -> dict:
    """Vacuum the tables of unpromoted staging roots, or remove an abandoned one (the module
    docstring) but for the files the embeddings table still names."""
    fs = storage.filesystem(out)
    report = {"removed": [], "files": 0, "bytes": 0}
    spec_times = [r["newest"] for r in roots.values() if r["unpromoted"]]
    try:
        spec_times.append(_mtime(fs, fs.info(storage.strip_scheme(storage.join(out, ENCODER_SPEC)))))
    except FileNotFoundError:
        pass
    active = tables.table_uri(out, tables.EMBEDDINGS)
    for version, r in sorted(roots.items()):
        if not r["unpromoted"]:
            continue  # its data files are the embeddings table's (vacuum_table above)
        root = storage.with_scheme(r["path"], out)
        if r["newest"] < cutoff and any(t > r["newest"] for t in spec_times):
            dt = tables.open_table(active)
            needed = set() if dt is None else _files_needed(active, dt, cutoff)
            if needed is None:
                continue
            files = fs.find(r["path"], detail=True)
            named = {f"{storage.strip_scheme(active).rstrip('/')}/{p}" for p in needed}
            doomed = {p: int(i.get("size") or 0) for p, i in files.items() if i.get("type") == "file" and p not in named}
            check_before_commit(out)
            fs.rm(sorted(doomed))
            report["removed"].append(version)
            report["files"] += len(doomed)
            report["bytes"] += sum(doomed.values())
            log.info("vacuum: removed the abandoned staging root of model_version %s (%d files)", version, len(doomed))
            continue
        for name in STAGED_TABLES:
            done = vacuum_table(tables.table_uri(root, name), cutoff=cutoff, keep=_pending_paths(root, name))
            report["files"] += done["files"]
            report["bytes"] += done["bytes"]
    return report


def _remove_leftovers(out: str, now: float) -> dict:
    """<out>/_work (every work folder is a dead run's while the lock is held) and probe
    objects older than PROBE_MAX_AGE_S in <out> and its tables' folders."""
    fs = storage.filesystem(out)
    base = storage.strip_scheme(out).rstrip("/")
    doomed = {}
    try:
        doomed |= {p: int(i.get("size") or 0) for p, i in fs.find(f"{base}/_work", detail=True).items()
                   if i.get("type") == "file"}
    except FileNotFoundError:
        pass
    for folder in [base] + [storage.strip_scheme(tables.table_uri(out, n)) for n in TABLES]:
        try:
            entries = fs.ls(folder, detail=True, refresh=True)
        except FileNotFoundError:
            continue
        doomed |= {e["name"]: int(e.get("size") or 0) for e in entries
                   if e.get("type") == "file" and e["name"].rsplit("/", 1)[-1].startswith("_probe-")
                   and now - _mtime(fs, e) >= PROBE_MAX_AGE_S}
    if doomed:
        check_before_commit(out)
        fs.rm(sorted(doomed))
        try:
            fs.rm(f"{base}/_work", recursive=True)  # the emptied folders of a local output
        except FileNotFoundError:
            pass
    return {"files": len(doomed), "bytes": sum(doomed.values())}


def _vacuum_index_versions(index_root: str, cutoff: float) -> dict:
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
        if newest >= cutoff:
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
