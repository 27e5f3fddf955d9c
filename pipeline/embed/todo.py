"""Stage 2 at scale: the diff, image_id assignment and the todo list, in Ray tasks over
hash(uri) buckets (buckets.py). The driver holds file paths, versions and counts.

1. partition: tasks read the listing, embeddings, errors and image_ids files (a table
   version's data files) in groups and write each row's (needed columns) into
   <work>/<table>/b=<bucket>/ (one file per group and bucket);
2. diff: one task per bucket joins its parts (buckets.diff_bucket; embedded rows are read
   live, through store/live.py, with their file and physical row position) and writes
   the bucket's todo rows, the positions of its stale embedding rows (grouped by a hash
   of their file) and the error keys to clear; it returns counts, the number of URIs
   without an id and the largest id it saw;
3. ids: the driver turns the per-bucket counts into a prefix sum after the largest id ever
   given; one task per bucket with new URIs fills in its block of ids and writes them as
   an uncommitted file of <out>/image_ids, committed by the driver in one append before
   any embedding is written (a crash after it leaves ids the next run reuses);
4. commits: the stale rows removed from the embeddings table in one commit, by the
   table's mechanism (store/removal.py: copy-on-write rewrites of the files that hold
   them, or deletion vectors), in Ray tasks per group of files; a deletion-vector table
   then compacts the files whose deleted share reaches removal.COMPACT_FRACTION; then the
   error keys' merge-delete (the rows of embedded, changed and deleted objects, and the
   older duplicates of a given-up object) and the new ids. A table written before 2026-12
   has its tombstones converted first (removal.convert_tombstones);
5. the embed stage reads the todo files in Ray Data read tasks (todo_source.py), in
   blocks of about one decode batch;
6. after the embed stage, clear_retried deletes the retried objects' earlier error rows.
<work> is <out>/_work/<run_id>/. A run removes all of <out>/_work before its diff and after
its embed stage: it holds the output lock, so any other work directory is a dead run's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sparse_embed.pipeline.embed import buckets, deletion_guard
from sparse_embed.pipeline.embed.deletion_guard import DeleteLimit
from sparse_embed.pipeline.embed.todo_source import TODO_ROW_GROUP
from sparse_embed.pipeline.store import live, removal, storage, tables
from sparse_embed.pipeline.store.lock import check_before_commit, owner_for_tasks

log = logging.getLogger(__name__)

FILES_PER_PARTITION_TASK = 8  # input files one partition task reads (Delta files of <= ~8k-1M rows each)
INPUTS = {  # work-directory name -> (table, columns)
    "listed": (tables.LISTING, ["uri", "etag", "size", "mtime"]),
    "embedded": (tables.EMBEDDINGS, ["uri", "etag", "model_version", "image_id", "run_id"]),  # + _file, _row
    "errors": (tables.ERRORS, ["uri", "etag", "attempts", "run_id"]),
    "ids": (tables.IMAGE_IDS, ["uri", "image_id"]),
}


@dataclass
class TodoParts:
    paths: list  # todo Parquet files (one per bucket with work), in row groups of TODO_ROW_GROUP rows
    rows: list  # rows of each file
    num_rows: int
    first_tries: int  # todo rows never tried before at their etag
    counts: dict = field(default_factory=dict)  # the diff's counts, summed over buckets
    removed: int = 0  # embedding rows of changed and deleted objects this diff removed
    removal: dict = field(default_factory=dict)  # mechanism, files touched and rewritten, bytes written
    compacted: int = 0  # deleted rows a compaction dropped from rewritten files; 0 when none ran
    converted: int = 0  # rows masked by tombstones of an older table, removed in its conversion
    guard: dict = field(default_factory=dict)  # deletion_guard.check's figures
    retried_buckets: list = field(default_factory=list)  # buckets with error rows to delete after the stage

    def schema(self):
        """The todo files' Arrow schema (image_id, uri, etag, size, mtime, attempts), from
        the first file's footer."""
        import pyarrow.parquet as pq

        fs, _ = storage.arrow_filesystem(self.paths[0])
        with fs.open_input_file(storage.strip_scheme(self.paths[0])) as src:
            return pq.read_schema(src)


@dataclass(frozen=True)
class Guard:
    """What the deletion guard needs (deletion_guard.py)."""
    limit: DeleteLimit
    allow: bool
    listing_from: str
    source: str


def work_dir(out: str, run_id: str) -> str:
    return storage.join(out, "_work", run_id)


def remove_work(out: str, run_id: str | None = None) -> None:
    """Remove <out>/_work/<run_id> (all of <out>/_work when run_id is None), if this process
    still holds `out`'s lock (or holds none): a run that lost it must not remove the work of
    the run that took it."""
    check_before_commit(out)
    fs = storage.filesystem(out)
    path = storage.strip_scheme(work_dir(out, run_id) if run_id else storage.join(out, "_work"))
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _table_files(uri: str, version: int | None = None) -> list[str]:
    dt = tables.open_table(uri, version)
    return [] if dt is None else list(dt.file_uris())


def partition_files(files: list, columns: list[str], n: int, dest: str, tag: str, table_uri: str | None = None) -> dict:
    """Partition task: rows of `files` (their `columns`) into dest/b=<bucket>/<tag>.parquet.
    `files` are paths, or live.DataFile of `table_uri`, whose live rows are read with
    their file (`_file`) and physical position (`_row`).
    Returns {"rows": rows read, "model_versions": the distinct model_version values, if read}."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = []
    for f in files:
        if isinstance(f, live.DataFile):
            t = live.read_file(table_uri, f, columns, positions=True)
            parts.append(t.append_column("_file", pa.array([f.path] * t.num_rows, pa.string())))
            continue
        fs, _ = storage.arrow_filesystem(f)
        with fs.open_input_file(storage.strip_scheme(f)) as src:
            parts.append(tables.plain_strings(pq.read_table(src, columns=columns)))
    table = pa.concat_tables(parts, promote_options="permissive")
    versions = (pc.unique(table.column("model_version")).to_pylist() if "model_version" in columns else [])
    if "model_version" in columns:
        table = table.drop_columns(["model_version"])
    b = buckets.bucket_of(table.column("uri"), n)
    order = np.argsort(b, kind="stable")
    table, b = table.take(pa.array(order)), b[order]
    edges = np.flatnonzero(np.diff(b)) + 1
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(b)]):
        if hi > lo:
            tables.write_parquet_file(dest, f"b={int(b[lo]):05d}/{tag}.parquet", table.slice(int(lo), int(hi - lo)))
    return {"rows": table.num_rows, "model_versions": versions}


def _read_bucket(work: str, name: str, k: int, prefix: str = "b"):
    """All rows of bucket k of one input, or None when it has none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = storage.filesystem(work)
    base = storage.strip_scheme(storage.join(work, name, f"{prefix}={k:05d}"))
    try:
        paths = sorted(p for p in fs.ls(base, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return None
    afs, _ = storage.arrow_filesystem(work)
    parts = []
    for p in paths:
        with afs.open_input_file(p) as src:
            parts.append(pq.read_table(src))
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def diff_task(work: str, k: int, max_attempts: int, file_buckets: int) -> dict:
    """Diff task of bucket k: writes todo (image_id null for URIs without one) and clear
    files under <work>, and the (_file, _row) of its stale embedding rows under
    <work>/stale/f=<hash of _file mod file_buckets>/; returns counts and sizes. Safe to
    repeat (same names)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    listed = _read_bucket(work, "listed", k)
    embedded, errors, ids = (_read_bucket(work, name, k) for name in ("embedded", "errors", "ids"))
    if listed is None:
        listed = _empty_listing()
    d = buckets.diff_bucket(listed, embedded, errors, ids, max_attempts=max_attempts)
    out = {"k": k, "counts": d.counts, "new_uris": d.new_uris, "todo_rows": d.todo.num_rows,
           "first_tries": int(pc.sum(pc.equal(d.todo.column("attempts"), 0)).as_py() or 0) if d.todo.num_rows else 0,
           "max_id": int(pc.max(ids.column("image_id")).as_py()) if ids is not None and ids.num_rows else -1,
           "stale": d.stale_embeddings.num_rows, "clear": d.clear_errors.num_rows,
           "retried": d.retried_errors.num_rows, "stale_buckets": []}
    for name, table in (("todo", d.todo), ("clear", d.clear_errors), ("retried", d.retried_errors)):
        if table.num_rows:
            tables.write_parquet_file(work, f"{name}/part-b{k:05d}.parquet", table, row_group_size=TODO_ROW_GROUP)
    if d.stale_embeddings.num_rows:
        stale = d.stale_embeddings.select(["_file", "_row"])
        fb = buckets.bucket_of(stale.column("_file"), file_buckets)
        for m in np.unique(fb):
            part = stale.filter(pa.array(fb == m))
            tables.write_parquet_file(work, f"stale/f={int(m):05d}/part-b{k:05d}.parquet", part)
            out["stale_buckets"].append(int(m))
    return out


def stale_removal_task(work: str, m: int, files: dict, table_uri: str, tag: str, mechanism: str, out: str,
                       owner: str | None) -> dict:
    """Removal task of file bucket m: reads the stale positions the diff tasks wrote under
    <work>/stale/f=<m>/, groups them by file and removes them (removal.removal_task:
    a copy-on-write rewrite or a new deletion vector per file). `files`: path -> DataFile
    of the bucket's files. Returns the actions and figures for the commit."""
    import numpy as np
    import pyarrow.compute as pc

    stale = _read_bucket(work, "stale", m, prefix="f")
    paths = pc.unique(stale.column("_file")).to_pylist()
    positions = [np.sort(stale.filter(pc.equal(stale.column("_file"), p)).column("_row").to_numpy()).astype(np.int64)
                 for p in paths]
    return removal.removal_task(table_uri, [files[p] for p in paths], positions, tag, mechanism, out, owner)


def _empty_listing():
    from sparse_embed.pipeline.embed.listing_rows import listing_schema

    return listing_schema().empty_table()


def ids_task(work: str, k: int, start: int, ids_uri: str, run_id: str) -> tuple:
    """Id task of bucket k: fills the todo's missing ids from `start` on, rewrites the todo
    file and writes the new (uri, image_id, run_id) rows as an uncommitted file of the
    image_ids table. Returns that file's (path, bytes, rows). Safe to repeat (same names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    afs, base = storage.arrow_filesystem(work)
    with afs.open_input_file(f"{base}/todo/part-b{k:05d}.parquet") as src:
        todo = pq.read_table(src)
    todo, fresh = buckets.assign_ids(todo, start)
    tables.write_parquet_file(work, f"todo/part-b{k:05d}.parquet", todo, row_group_size=TODO_ROW_GROUP)
    fresh = fresh.append_column("run_id", pa.array([run_id] * fresh.num_rows, pa.string())).cast(tables.image_ids_schema())
    rel = f"part-{run_id}-b{k:05d}.parquet"
    return rel, tables.write_parquet_file(ids_uri, rel, fresh), fresh.num_rows


def build_todo(*, out: str, root: str, listed, run_id: str, model_version: str, max_attempts: int, dim: int,
               guard: Guard | None = None) -> TodoParts:
    """Steps 1-4 (module docstring) for `listed` (a listing.Listed) against root's tables and
    <out>/image_ids: checks the deletion guard before any commit (MassDelete: nothing is
    changed; None: no guard), removes the stale embedding rows (one commit, by the table's
    mechanism; `dim` is the table's), compacts a deletion-vector table when due, deletes
    the error rows about to be retried, and commits the new ids (one append)."""
    import ray

    remove_work(out)
    work = work_dir(out, run_id)
    emb_uri = tables.table_uri(root, tables.EMBEDDINGS)
    owner = owner_for_tasks(out)
    converted = removal.convert_tombstones(emb_uri, tag=f"{run_id}-convert", out=out, owner=owner) \
        if tables.open_table(emb_uri) is not None else None
    emb = live.table_files(emb_uri)
    emb_files = emb.files if emb is not None else []
    files = {"listed": _table_files(listed.table_uri, listed.version), "embedded": emb_files,
             "errors": _table_files(tables.table_uri(root, tables.ERRORS)),
             "ids": _table_files(tables.table_uri(out, tables.IMAGE_IDS))}
    emb_rows = emb.live_rows if emb is not None else 0
    n = buckets.n_buckets(max(listed.num_rows, emb_rows))
    file_buckets = max(1, min(REMOVAL_TASKS_MAX, -(-len(emb_files) // FILES_PER_PARTITION_TASK)))
    part = ray.remote(num_cpus=0.5)(partition_files)
    jobs = []
    for name, fs_ in files.items():
        for i in range(0, len(fs_), FILES_PER_PARTITION_TASK):
            jobs.append((name, part.remote(fs_[i: i + FILES_PER_PARTITION_TASK], INPUTS[name][1], n,
                                           storage.join(work, name), f"{i // FILES_PER_PARTITION_TASK:06d}", emb_uri)))
    versions = set()
    for name, ref in jobs:
        versions.update(v for v in ray.get(ref)["model_versions"] if v is not None)
    if versions and versions != {model_version}:
        raise RuntimeError(f"{emb_uri} mixes model versions: refusing to add to it")
    diffs = ray.get([ray.remote(num_cpus=0.5)(diff_task).remote(work, k, max_attempts, file_buckets) for k in range(n)])
    counts = {key: sum(d["counts"][key] for d in diffs) for key in diffs[0]["counts"]}
    try:
        figures = deletion_guard.check(deleted=counts["deleted"], live_rows=emb_rows, limit=guard.limit, allow=guard.allow,
                                       listing_from=guard.listing_from, source=guard.source) if guard else {}
    except deletion_guard.MassDelete:
        remove_work(out)
        raise

    ids_uri = tables.table_uri(out, tables.IMAGE_IDS)
    tables.ensure_table(ids_uri, tables.image_ids_schema())
    starts = buckets.id_starts(max(d["max_id"] for d in diffs) + 1, [d["new_uris"] for d in diffs])
    id_files = ray.get([ray.remote(num_cpus=0.5)(ids_task).remote(work, d["k"], s, ids_uri, run_id)
                        for d, s in zip(diffs, starts) if d["new_uris"]])

    removed = _remove_stale(work, emb, sorted({m for d in diffs for m in d["stale_buckets"]}), file_buckets, run_id,
                            out, owner) if any(d["stale"] for d in diffs) else None
    compacted = _compact_if_due(emb_uri, owner, out, run_id)
    _delete_keys(work, "clear", tables.table_uri(root, tables.ERRORS), [d["k"] for d in diffs if d["clear"]], owner, out)
    if id_files:
        tables.commit_files(ids_uri, id_files, tables.image_ids_schema())
    with_todo = [d for d in diffs if d["todo_rows"]]
    paths = [storage.join(work, "todo", f"part-b{d['k']:05d}.parquet") for d in with_todo]
    return TodoParts(paths, [d["todo_rows"] for d in with_todo], sum(d["todo_rows"] for d in diffs),
                     sum(d["first_tries"] for d in diffs), counts, removed=removed.rows if removed else 0,
                     removal=_removal_figures(removed), compacted=compacted, converted=converted.rows if converted else 0,
                     guard=figures, retried_buckets=[d["k"] for d in diffs if d["retried"]])


REMOVAL_TASKS_MAX = 256  # file buckets of the stale positions: at most this many removal tasks


def _removal_figures(rem) -> dict:
    if rem is None:
        return {}
    return {"mechanism": rem.mechanism, "files_touched": rem.files_touched, "files_rewritten": rem.files_rewritten,
            "bytes_written": rem.bytes_written, "version": rem.version}


def _remove_stale(work: str, emb, stale_buckets: list[int], file_buckets: int, run_id: str, out: str, owner):
    """Remove the stale rows the diff tasks wrote, one Ray task per file bucket, in one commit."""
    import pyarrow as pa
    import ray

    by_bucket: dict = {}
    fb = buckets.bucket_of(pa.array([f.path for f in emb.files], pa.string()), file_buckets) if emb.files else []
    for f, m in zip(emb.files, fb):
        by_bucket.setdefault(int(m), {})[f.path] = f
    mech = removal.DELETION_VECTORS if emb.deletion_vectors else removal.COPY_ON_WRITE
    log.info("[remove] start: stale rows in %d file buckets (%s)", len(stale_buckets), mech)
    task = ray.remote(num_cpus=0.5)(stale_removal_task)
    results = ray.get([task.remote(work, m, by_bucket.get(m, {}), emb.uri, run_id, mech, out, owner)
                       for m in stale_buckets])
    return removal.commit_removal(emb.uri, emb.version, results, mech, operation="DELETE")


def _compact_if_due(emb_uri: str, owner: str | None, out: str, run_id: str) -> int:
    """Compact a deletion-vector embeddings table: rewrite the files whose deleted share
    reaches removal.COMPACT_FRACTION (from the log), in Ray tasks. Returns the deleted
    rows the rewrites dropped."""
    from sparse_embed.pipeline.store import tables

    dt = tables.open_table(emb_uri)
    if dt is None or removal.mechanism_of(dt) != removal.DELETION_VECTORS:
        return 0
    return removal.compact(emb_uri, tag=f"{run_id}-compact", out=out, owner=owner).rows


# An error key row (uri, etag, keep_run) deletes every error row of its key except those
# written by run keep_run (a null keep_run keeps none; a row without run_id is never kept).
_KEEP_RUN = "s.keep_run IS NOT NULL AND t.run_id IS NOT NULL AND t.run_id = s.keep_run"


def _delete_keys(work: str, name: str, uri: str, ks: list[int], owner: str | None, out: str,
                 keep_run: str | None = None) -> None:
    """Delete the error rows of `uri` named by buckets `ks`' <name> files (error key rows;
    `keep_run` fills in their keep_run), in one commit made by a Ray task
    (delete_keys_task): the merge reads and rewrites table files, which must not grow the
    driver."""
    import ray

    if not ks:
        return
    ray.get(ray.remote(num_cpus=0.5)(delete_keys_task).remote(work, name, uri, ks, out, owner, keep_run))


def delete_keys_task(work: str, name: str, uri: str, ks: list[int], out: str, owner: str | None,
                     keep_run: str | None = None) -> int:
    """Task body of _delete_keys: reads the keys of buckets `ks`, checks that the run
    `owner` still holds `out`'s lock, and runs the merge-delete. Returns the rows deleted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparse_embed.pipeline.store.lock import verify_owner

    afs, base = storage.arrow_filesystem(work)
    parts = []
    for k in ks:
        with afs.open_input_file(f"{base}/{name}/part-b{k:05d}.parquet") as src:
            parts.append(pq.read_table(src))
    keys = pa.concat_tables(parts)
    if "keep_run" not in keys.column_names:
        keys = keys.append_column("keep_run", pa.array([keep_run] * keys.num_rows, pa.string()))
    verify_owner(out, owner)
    return tables.delete_matching(uri, keys, on=("uri", "etag"), unless=_KEEP_RUN)


def clear_retried(out: str, root: str, run_id: str, parts: TodoParts) -> None:
    """After the embed stage: delete the earlier error rows of the objects this run retried,
    keeping the rows it wrote. Until then an object's attempt count is in its old row, so a
    run killed before it wrote the new row loses no attempt; killed after, the next diff
    counts the higher of the two."""
    log.info("[clear retried] start: error rows of %d buckets", len(parts.retried_buckets))
    _delete_keys(work_dir(out, run_id), "retried", tables.table_uri(root, tables.ERRORS), parts.retried_buckets,
                 owner_for_tasks(out), out, keep_run=run_id)
