"""Stage 2 at scale: the diff, image_id assignment and the todo list, in Ray tasks over
hash(uri) buckets (buckets.py). The driver holds file paths, versions and counts.

1. partition: tasks read the listing, embeddings, errors and image_ids files (a table
   version's data files) in groups and write each row's (needed columns) into
   <work>/<table>/b=<bucket>/ (one file per group and bucket);
2. diff: one task per bucket drops the embedded rows its tombstones mask (live.py), joins
   its parts (buckets.diff_bucket) and writes the bucket's todo rows, a tombstone file
   (uncommitted, in the embeddings table's directory) for its stale embedding rows, and
   the error keys to clear; it returns counts, the number of URIs without an id and the
   largest id it saw;
3. ids: the driver turns the per-bucket counts into a prefix sum after the largest id ever
   given; one task per bucket with new URIs fills in its block of ids and writes them as
   an uncommitted file of <out>/image_ids, committed by the driver in one append before
   any embedding is written (a crash after it leaves ids the next run reuses);
4. commits: the tombstones in one append to the embeddings table (no data file is read or
   rewritten: O(changed)), then a compaction when tombstones reach
   live.COMPACT_FRACTION of the rows (a merge-delete in a Ray task), the error keys'
   merge-delete, and the new ids;
5. the embed stage reads the todo files in Ray Data read tasks (todo_source.py), in
   blocks of about one decode batch.
<work> is <out>/_work/<run_id>/. A run removes all of <out>/_work before its diff and after
its embed stage: it holds the output lock, so any other work directory is a dead run's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sparse_embed.pipeline.embed import buckets
from sparse_embed.pipeline.embed.todo_source import TODO_ROW_GROUP
from sparse_embed.pipeline.store import live, storage, tables
from sparse_embed.pipeline.store.lock import owner_for_tasks

log = logging.getLogger(__name__)

FILES_PER_PARTITION_TASK = 8  # input files one partition task reads (Delta files of <= ~8k-1M rows each)
INPUTS = {  # work-directory name -> (table, columns)
    "listed": (tables.LISTING, ["uri", "etag", "size", "mtime"]),
    "embedded": (tables.EMBEDDINGS, ["uri", "etag", "model_version", "image_id", "run_id"]),  # data files
    "masked": (tables.EMBEDDINGS, ["uri", "image_id", "run_id"]),  # tombstone files
    "errors": (tables.ERRORS, ["uri", "etag", "attempts"]),
    "ids": (tables.IMAGE_IDS, ["uri", "image_id"]),
}


@dataclass
class TodoParts:
    paths: list  # todo Parquet files (one per bucket with work), in row groups of TODO_ROW_GROUP rows
    rows: list  # rows of each file
    num_rows: int
    first_tries: int  # todo rows never tried before at their etag
    counts: dict = field(default_factory=dict)  # the diff's counts, summed over buckets
    tombstones: int = 0  # embedding rows masked by this diff
    compacted: int = 0  # rows (masked rows and tombstones) a compaction deleted; 0 when none ran

    def schema(self):
        """The todo files' Arrow schema (image_id, uri, etag, size, mtime, attempts), from
        the first file's footer."""
        import pyarrow.parquet as pq

        fs, _ = storage.arrow_filesystem(self.paths[0])
        with fs.open_input_file(storage.strip_scheme(self.paths[0])) as src:
            return pq.read_schema(src)


def work_dir(out: str, run_id: str) -> str:
    return storage.join(out, "_work", run_id)


def remove_work(out: str, run_id: str | None = None) -> None:
    """Remove <out>/_work/<run_id> (all of <out>/_work when run_id is None)."""
    fs = storage.filesystem(out)
    path = storage.strip_scheme(work_dir(out, run_id) if run_id else storage.join(out, "_work"))
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _table_files(uri: str, version: int | None = None) -> list[str]:
    dt = tables.open_table(uri, version)
    return [] if dt is None else list(dt.file_uris())


def partition_files(files: list[str], columns: list[str], n: int, dest: str, tag: str) -> dict:
    """Partition task: rows of `files` (their `columns`) into dest/b=<bucket>/<tag>.parquet.
    Returns {"rows": rows read, "model_versions": the distinct model_version values, if read}."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, _ = storage.arrow_filesystem(files[0])
    parts = []
    for f in files:
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


def _read_bucket(work: str, name: str, k: int):
    """All rows of bucket k of one input, or None when it has none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = storage.filesystem(work)
    base = storage.strip_scheme(storage.join(work, name, f"b={k:05d}"))
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


def diff_task(work: str, k: int, max_attempts: int, emb_uri: str, emb_schema, run_id: str) -> dict:
    """Diff task of bucket k: writes todo (image_id null for URIs without one) and clear
    files under <work>, and the tombstones of its stale embedding rows as an uncommitted
    file of `emb_uri` (returned as "tombstone_file": (path, bytes, rows, stats), or None);
    returns counts and sizes. Safe to repeat (same names)."""
    import pyarrow.compute as pc

    listed = _read_bucket(work, "listed", k)
    embedded, masked, errors, ids = (_read_bucket(work, name, k) for name in ("embedded", "masked", "errors", "ids"))
    if listed is None:
        listed = _empty_listing()
    if embedded is not None:
        embedded = live.live_rows(embedded, masked)
    d = buckets.diff_bucket(listed, embedded, errors, ids, max_attempts=max_attempts)
    out = {"k": k, "counts": d.counts, "new_uris": d.new_uris, "todo_rows": d.todo.num_rows,
           "first_tries": int(pc.sum(pc.equal(d.todo.column("attempts"), 0)).as_py() or 0) if d.todo.num_rows else 0,
           "max_id": int(pc.max(ids.column("image_id")).as_py()) if ids is not None and ids.num_rows else -1,
           "stale": d.stale_embeddings.num_rows, "clear": d.clear_errors.num_rows, "tombstone_file": None}
    for name, table in (("todo", d.todo), ("clear", d.clear_errors)):
        if table.num_rows:
            tables.write_parquet_file(work, f"{name}/part-b{k:05d}.parquet", table, row_group_size=TODO_ROW_GROUP)
    if d.stale_embeddings.num_rows:
        out["tombstone_file"] = live.write_tombstones(emb_uri, d.stale_embeddings, emb_schema, run_id, k)
    return out


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


def build_todo(*, out: str, root: str, listed, run_id: str, model_version: str, max_attempts: int, dim: int) -> TodoParts:
    """Steps 1-4 (module docstring) for `listed` (a listing.Listed) against root's tables and
    <out>/image_ids: masks the stale embedding rows (one append of tombstones; `dim` is the
    table's), compacts when due, deletes the error rows about to be retried, and commits
    the new ids (one append)."""
    import ray

    remove_work(out)
    work = work_dir(out, run_id)
    emb_uri = tables.table_uri(root, tables.EMBEDDINGS)
    emb_files, tomb_files = live.split_files(_table_files(emb_uri))
    files = {"listed": _table_files(listed.table_uri, listed.version), "embedded": emb_files, "masked": tomb_files,
             "errors": _table_files(tables.table_uri(root, tables.ERRORS)),
             "ids": _table_files(tables.table_uri(out, tables.IMAGE_IDS))}
    emb_rows = tables.count_rows(emb_uri)
    n = buckets.n_buckets(max(listed.num_rows, emb_rows))
    part = ray.remote(num_cpus=0.5)(partition_files)
    jobs = []
    for name, fs_ in files.items():
        for i in range(0, len(fs_), FILES_PER_PARTITION_TASK):
            jobs.append((name, part.remote(fs_[i: i + FILES_PER_PARTITION_TASK], INPUTS[name][1], n,
                                           storage.join(work, name), f"{i // FILES_PER_PARTITION_TASK:06d}")))
    versions = set()
    for name, ref in jobs:
        versions.update(v for v in ray.get(ref)["model_versions"] if v is not None)
    if versions and versions != {model_version}:
        raise RuntimeError(f"{emb_uri} mixes model versions: refusing to add to it")
    emb_schema = tables.embeddings_schema(dim)
    diffs = ray.get([ray.remote(num_cpus=0.5)(diff_task).remote(work, k, max_attempts, emb_uri, emb_schema, run_id)
                     for k in range(n)])
    counts = {key: sum(d["counts"][key] for d in diffs) for key in diffs[0]["counts"]}

    ids_uri = tables.table_uri(out, tables.IMAGE_IDS)
    tables.ensure_table(ids_uri, tables.image_ids_schema())
    starts = buckets.id_starts(max(d["max_id"] for d in diffs) + 1, [d["new_uris"] for d in diffs])
    id_files = ray.get([ray.remote(num_cpus=0.5)(ids_task).remote(work, d["k"], s, ids_uri, run_id)
                        for d, s in zip(diffs, starts) if d["new_uris"]])

    owner = owner_for_tasks(out)
    tomb_commit = [d["tombstone_file"] for d in diffs if d["tombstone_file"]]
    if tomb_commit:
        tables.commit_files(emb_uri, tomb_commit, emb_schema)
    compacted = _compact_if_due(emb_uri, owner, out)
    _delete_keys(work, "clear", tables.table_uri(root, tables.ERRORS), [d for d in diffs if d["clear"]], owner, out)
    if id_files:
        tables.commit_files(ids_uri, id_files, tables.image_ids_schema())
    with_todo = [d for d in diffs if d["todo_rows"]]
    paths = [storage.join(work, "todo", f"part-b{d['k']:05d}.parquet") for d in with_todo]
    return TodoParts(paths, [d["todo_rows"] for d in with_todo], sum(d["todo_rows"] for d in diffs),
                     sum(d["first_tries"] for d in diffs), counts, tombstones=sum(f[2] for f in tomb_commit),
                     compacted=compacted)


def _compact_if_due(emb_uri: str, owner: str | None, out: str) -> int:
    """Compact the embeddings table in a Ray task when its tombstones reach
    live.COMPACT_FRACTION of its data rows (counts from the log). Returns the rows deleted."""
    import ray

    data_rows, tomb_rows = live.row_counts(emb_uri)
    if not live.needs_compaction(data_rows, tomb_rows):
        return 0
    log.info("compacting %s: %d tombstones over %d data rows", emb_uri, tomb_rows, data_rows)
    return ray.get(ray.remote(num_cpus=0.5)(compact_task).remote(emb_uri, out, owner))


def compact_task(uri: str, out: str, owner: str | None) -> int:
    """Task body of _compact_if_due: checks that the run `owner` still holds `out`'s lock,
    then compacts (live.compact). Returns the rows deleted."""
    from sparse_embed.pipeline.store.lock import verify_owner

    verify_owner(out, owner)
    return live.compact(uri)


def _delete_keys(work: str, name: str, uri: str, with_rows: list, owner: str | None, out: str) -> None:
    """Delete the rows of `uri` whose (uri, etag) is in the buckets' <name> files, in one
    commit made by a Ray task (delete_keys_task): the merge reads and rewrites table files,
    which must not grow the driver."""
    import ray

    if not with_rows:
        return
    ray.get(ray.remote(num_cpus=0.5)(delete_keys_task).remote(work, name, uri, [d["k"] for d in with_rows], out, owner))


def delete_keys_task(work: str, name: str, uri: str, ks: list[int], out: str, owner: str | None) -> int:
    """Task body of _delete_keys: reads the keys of buckets `ks`, checks that the run
    `owner` still holds `out`'s lock, and runs the merge-delete. Returns the rows deleted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparse_embed.pipeline.store.lock import verify_owner

    afs, base = storage.arrow_filesystem(work)
    keys = []
    for k in ks:
        with afs.open_input_file(f"{base}/{name}/part-b{k:05d}.parquet") as src:
            keys.append(pq.read_table(src))
    verify_owner(out, owner)
    return tables.delete_matching(uri, pa.concat_tables(keys), on=("uri", "etag"))
