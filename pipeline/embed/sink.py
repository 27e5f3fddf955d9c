"""Stage 5: a Ray Datasink that writes embedding rows and error rows to their Delta tables.

Write tasks put Parquet files into each table's directory; nothing is visible until the
driver commits them in on_write_complete: atomic Delta commits of at most COMMIT_FILES
files per table, each add action carrying numRecords and min/max of image_id and uri.
Each finished file also gets a marker under <root>/_pending/<table>/; markers are deleted
(in bulk) once their file is committed. The run report's row counts are the write tasks'
returned counts. If the driver dies mid-run, the next run commits the files its
markers name (`recover_pending`) before diffing, so finished work is kept.

Nothing is committed twice:
- a file's name is a digest of its rows' (uri, etag) and the run id, so a write task that
  Ray retries or re-executes rewrites the same file and marker instead of adding a second;
- a marker whose file is already in the table is only deleted;
- recovery drops rows whose (uri, etag) the table already holds, and never commits a file
  of another model_version than the table's (a model change with files pending).

The sink also sums the embed actors' forward-pass seconds that ride on each row
(`embed_seconds`, `embed_actor`, from pipeline/embed/actor.py): how busy the encoder was.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import partial

from ray.data import Datasink

from sparse_embed.pipeline.embed import failures as failure_kinds
from sparse_embed.pipeline.embed.failures import attempts_after
from sparse_embed.pipeline.store import live, storage, tables
from sparse_embed.pipeline.store.retry import with_retries

log = logging.getLogger(__name__)


@dataclass
class WrittenFile:
    table: str  # tables.EMBEDDINGS or tables.ERRORS
    path: str  # relative to the table root
    size: int
    rows: int
    model_version: str | None = None  # of the rows (embeddings files); None for error files and old markers
    stats: dict | None = None  # tables.column_stats of image_id and uri; None in markers of older runs


def file_name(run_id: str, rows) -> str:
    """A data file's name from its rows: the same rows (a retried or re-executed write task)
    give the same name, so the retry overwrites the file instead of adding a second."""
    h = hashlib.sha256()
    for uri, etag in zip(rows.column("uri").to_pylist(), rows.column("etag").to_pylist()):
        h.update(f"{uri}\0{etag}\n".encode())
    return f"part-{run_id}-{h.hexdigest()[:24]}.parquet"


def empty_failures() -> dict:
    return {"by_reason": {}, "by_kind": {failure_kinds.OBJECT: {}, failure_kinds.INFRASTRUCTURE: {}}, "first": 0}


def tally_failures(errors, into: dict | None = None) -> dict:
    """Error rows (errors_schema) counted by "stage:error_type", by kind (failures.OBJECT /
    INFRASTRUCTURE -> {reason: n}) and as first object failures (attempts == 1), added to
    `into` (or a new tally)."""
    out = into if into is not None else empty_failures()
    cols = ("stage", "error_type", "message", "attempts")
    for stage, etype, message, attempts in zip(*(errors.column(c).to_pylist() for c in cols)):
        reason = f"{stage}:{etype}"
        kind = failure_kinds.kind_of(stage, etype, message)
        out["by_reason"][reason] = out["by_reason"].get(reason, 0) + 1
        out["by_kind"][kind][reason] = out["by_kind"][kind].get(reason, 0) + 1
        out["first"] += kind == failure_kinds.OBJECT and attempts == 1
    return out


def merge_failures(total: dict, part: dict) -> None:
    for reason, n in part["by_reason"].items():
        total["by_reason"][reason] = total["by_reason"].get(reason, 0) + n
    for kind, reasons in part["by_kind"].items():
        for reason, n in reasons.items():
            total["by_kind"][kind][reason] = total["by_kind"][kind].get(reason, 0) + n
    total["first"] += part["first"]


@dataclass
class TaskWrites:
    files: list  # WrittenFile per file the write task put
    embed_seconds: dict  # embed actor -> seconds of forward passes behind the task's rows
    failures: dict = field(default_factory=empty_failures)  # tally_failures of the task's error rows


@dataclass
class CommitResult:
    versions: dict = field(default_factory=dict)  # table -> version after commit (None: nothing committed)
    rows: dict = field(default_factory=dict)  # table -> rows committed
    embed_seconds: dict = field(default_factory=dict)  # embed actor -> seconds of forward passes
    failures: dict = field(default_factory=empty_failures)  # tally_failures of the run's error rows


def split_rows(batch, *, run_id: str, dim: int):
    """One embed-stage batch -> (embedding rows, error rows), cast to the table schemas."""
    import pyarrow as pa
    import pyarrow.compute as pc

    failed = pc.is_valid(batch.column("error_stage"))
    ok = batch.filter(pc.invert(failed))
    bad = batch.filter(failed)
    run = lambda t: pa.array([run_id] * t.num_rows, pa.string())  # noqa: E731
    emb = ok.append_column("run_id", run(ok)).select(tables.embeddings_schema(dim).names).cast(tables.embeddings_schema(dim))
    err = bad.rename_columns({"error_stage": "stage", "error_message": "message"} | {c: c for c in bad.column_names if c not in ("error_stage", "error_message")})
    before = err.column("attempts").to_pylist() if "attempts" in err.column_names else [0] * err.num_rows
    attempts = pa.array([attempts_after(s, t, m, b or 0) for s, t, m, b in zip(
        err.column("stage").to_pylist(), err.column("error_type").to_pylist(), err.column("message").to_pylist(), before)],
        pa.int32())
    err = (err.drop_columns([c for c in ("attempts",) if c in err.column_names]).append_column("attempts", attempts)
           .append_column("run_id", run(err)).select(tables.errors_schema().names).cast(tables.errors_schema()))
    return emb, err


class EmbeddingTableSink(Datasink):
    def __init__(self, out: str, *, run_id: str, dim: int, rows_per_file: int = tables.ROWS_PER_FILE):
        self.out = out
        self.run_id = run_id
        self.dim = dim
        self.rows_per_file = rows_per_file
        self.result = CommitResult()

    @property
    def supports_distributed_writes(self) -> bool:
        return True

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def on_write_start(self, schema=None) -> None:
        tables.ensure_table(tables.table_uri(self.out, tables.EMBEDDINGS), tables.embeddings_schema(self.dim))
        tables.ensure_table(tables.table_uri(self.out, tables.ERRORS), tables.errors_schema())

    def write(self, blocks, ctx) -> TaskWrites:
        import pyarrow as pa

        emb_parts, err_parts = [], []
        busy: dict[str, float] = {}
        for block in blocks:
            batch = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if "embed_seconds" in batch.column_names:
                sums = batch.group_by("embed_actor").aggregate([("embed_seconds", "sum")])
                for actor, seconds in zip(sums.column("embed_actor").to_pylist(), sums.column("embed_seconds_sum").to_pylist()):
                    busy[actor] = busy.get(actor, 0.0) + seconds
            emb, err = split_rows(batch, run_id=self.run_id, dim=self.dim)
            emb_parts.append(emb)
            err_parts.append(err)
        written = []
        for name, parts, schema in ((tables.EMBEDDINGS, emb_parts, tables.embeddings_schema(self.dim)),
                                    (tables.ERRORS, err_parts, tables.errors_schema())):
            table = pa.concat_tables(parts) if parts else schema.empty_table()
            if table.num_rows == 0:
                continue
            # by uri: a re-executed task that gets its rows in another order writes the same
            # file, and each file's uri range is as narrow as its rows allow
            table = table.sort_by("uri")
            rel = file_name(self.run_id, table)
            done = with_retries(partial(self._write_file, name, rel, table), what=f"write {name}/{rel}")
            written.append(done)
        err = pa.concat_tables(err_parts) if err_parts else tables.errors_schema().empty_table()
        return TaskWrites(written, busy, tally_failures(err))

    def _write_file(self, name: str, rel: str, table) -> WrittenFile:
        """Write one Parquet file and its marker; safe to repeat (same names, overwritten)."""
        mv = table.column("model_version")[0].as_py() if "model_version" in table.column_names and table.num_rows else None
        done = WrittenFile(name, rel, tables.write_parquet_file(tables.table_uri(self.out, name), rel, table), table.num_rows,
                           mv, tables.column_stats(table, STATS_COLUMNS))
        storage.write_bytes_atomic(marker_uri(self.out, done), json.dumps(done.__dict__).encode())
        return done

    def on_write_complete(self, write_result) -> None:
        files = [f for task in write_result.write_returns for f in task.files]
        for name in (tables.EMBEDDINGS, tables.ERRORS):
            self.result.rows[name] = sum(f.rows for f in files if f.table == name)
        for task in write_result.write_returns:
            merge_failures(self.result.failures, task.failures)
            for actor, seconds in task.embed_seconds.items():
                self.result.embed_seconds[actor] = self.result.embed_seconds.get(actor, 0.0) + seconds
        log.info("[commit] %d files, %d rows", len(files), sum(f.rows for f in files))
        # Repeating is safe: commit_files skips files a lost-response commit already added.
        self.result.versions, _ = with_retries(partial(commit_files, self.out, files, dim=self.dim), what="commit")


def marker_uri(root: str, f: WrittenFile) -> str:
    return storage.join(root, "_pending", f.table, f.path + ".json")


STATS_COLUMNS = ("image_id", "uri")  # min/max in every add action: a lookup by id or uri skips other files
COMMIT_FILES = 5000  # files per Delta commit: a long run is several bounded commits, each followed by its markers' delete


def commit_files(root: str, files: list[WrittenFile], *, dim: int) -> tuple[dict, int]:
    """Append commits of at most COMMIT_FILES files per table for `files` not yet in it; after
    each commit, its files' markers are deleted (in bulk). Returns (table -> version after,
    rows newly committed)."""
    versions, committed = {}, 0
    for name, schema in ((tables.EMBEDDINGS, tables.embeddings_schema(dim)), (tables.ERRORS, tables.errors_schema())):
        uri = tables.table_uri(root, name)
        dt = tables.ensure_table(uri, schema)
        active = {p.rsplit("/", 1)[-1] for p in dt.file_uris()}
        versions[name] = dt.version()
        ours = [f for f in files if f.table == name]
        for i in range(0, len(ours), COMMIT_FILES):
            chunk = ours[i: i + COMMIT_FILES]
            mine = [f for f in chunk if f.path not in active]
            if mine:
                versions[name] = tables.commit_files(uri, [(f.path, f.size, f.rows, f.stats) for f in mine], schema)
                committed += sum(f.rows for f in mine)
            remove_markers(root, chunk)
    return versions, committed


def remove_markers(root: str, files: list[WrittenFile]) -> None:
    """Delete the markers of `files` in bulk (S3: DeleteObjects, 1,000 keys a request);
    markers already gone are skipped."""
    if not files:
        return
    fs = storage.filesystem(root)
    paths = [storage.strip_scheme(marker_uri(root, f)) for f in files]
    if storage.is_s3(root):
        from fsspec.asyn import sync

        for i in range(0, len(paths), 1000):  # DeleteObjects takes 1,000 keys and reports no error for a missing one
            sync(fs.loop, fs._bulk_delete, paths[i: i + 1000])
        return
    for p in paths:
        try:
            fs.rm_file(p)
        except FileNotFoundError:  # a repeated commit already removed it
            pass


def recover_pending(root: str, *, dim: int, model_version: str) -> int:
    """Commit files that an earlier run wrote but never committed, keeping only rows whose
    (uri, etag) the table does not hold yet; files of another model_version are dropped
    (their objects are embedded again by the diff). Each pending file is handled once; a
    file partly in the table is trimmed into a new file whose marker is written before
    the old one goes, so a recovery killed at any step is finished by the next. Returns
    the rows committed."""
    fs = storage.filesystem(root)
    base = storage.strip_scheme(storage.join(root, "_pending"))
    try:
        paths = [p for p in fs.find(base) if p.endswith(".json")]
    except FileNotFoundError:
        return 0
    if not paths:
        return 0
    found = {}
    for body in fs.cat(paths, on_error="raise").values():  # concurrent GETs on S3
        f = WrittenFile(**json.loads(body))
        found[(f.table, f.path)] = f
    # Fewest rows first: a file trimmed by a recovery that was killed before it dropped the
    # old marker comes before the file it was cut from, which then has nothing left to add.
    files = sorted(found.values(), key=lambda f: (f.rows, f.path))
    keep = []
    for f in files:
        rows = _pending_rows(root, f)
        if rows is None:  # the file is gone: nothing to commit (the diff embeds its objects again)
            _drop(root, f, keep_data=True)
            continue
        if f.table == tables.EMBEDDINGS and _model_of(f, rows) != model_version:
            log.warning("dropping pending file %s of model_version %s (the table's is %s)", f.path, _model_of(f, rows),
                        model_version)
            _drop(root, f)
            continue
        keep.append((f, rows))
    committed = 0
    for name in (tables.EMBEDDINGS, tables.ERRORS):
        mine = [(f, rows) for f, rows in keep if f.table == name]
        if not mine:
            continue
        uris = sorted({u for _, rows in mine for u in rows.column("uri").to_pylist()})
        # only these URIs' live rows, from the files whose uri bounds can hold them
        have = live.read_live(tables.table_uri(root, name), ["uri", "etag"], where={"uri": uris})
        held = set(zip(have.column("uri").to_pylist(), have.column("etag").to_pylist())) if have is not None else set()
        ready = []
        for f, rows in mine:
            new = _rows_not_in(rows, held)
            if new is None:  # no row of it is in the table (commit_files skips a file it already holds)
                ready.append(f)
            elif new.num_rows == 0:  # never delete a file this recovery is about to commit
                _drop(root, f, keep_data=_committed(root, f) or any(r.path == f.path for r in ready))
            else:  # some rows are already in the table: commit only the others, from a new file
                import pyarrow as pa
                import pyarrow.parquet as pq

                afs, table_root = storage.arrow_filesystem(tables.table_uri(root, name))
                whole = pq.read_table(f"{table_root}/{f.path}", filesystem=afs)
                new = whole.filter(pa.array([(u, e) not in held for u, e in zip(whole.column("uri").to_pylist(),
                                                                              whole.column("etag").to_pylist())]))
                rel = file_name("recovered", new)
                size = tables.write_parquet_file(tables.table_uri(root, name), rel, new)
                rest = WrittenFile(name, rel, size, new.num_rows, f.model_version)
                storage.write_bytes_atomic(marker_uri(root, rest), json.dumps(rest.__dict__).encode())  # before the old marker goes
                _drop(root, f)
                ready.append(rest)
            held.update(zip(rows.column("uri").to_pylist(), rows.column("etag").to_pylist()))
        committed += with_retries(partial(commit_files, root, ready, dim=dim), what="commit recovered files")[1]
    return committed


def _pending_rows(root: str, f: WrittenFile):
    """(uri, etag, model_version when present) of a pending file; None when the file is gone."""
    import pyarrow.parquet as pq

    fs, table_root = storage.arrow_filesystem(tables.table_uri(root, f.table))
    try:
        with fs.open_input_file(f"{table_root}/{f.path}") as src:
            pf = pq.ParquetFile(src)
            cols = [c for c in ("uri", "etag", "model_version") if c in pf.schema_arrow.names]
            return pf.read(columns=cols)
    except FileNotFoundError:
        return None


def _model_of(f: WrittenFile, rows) -> str | None:
    if f.model_version is not None or rows is None or "model_version" not in rows.column_names or not rows.num_rows:
        return f.model_version
    return rows.column("model_version")[0].as_py()


def _rows_not_in(rows, held: set):
    """The rows of a pending file whose (uri, etag) is not in `held`: None when that is all
    of them (commit the file as it is), an empty table when it is none."""
    import pyarrow as pa

    mask = [(u, e) not in held for u, e in zip(rows.column("uri").to_pylist(), rows.column("etag").to_pylist())]
    if all(mask):
        return None
    return rows.filter(pa.array(mask)) if any(mask) else rows.slice(0, 0)


def _committed(root: str, f: WrittenFile) -> bool:
    dt = tables.open_table(tables.table_uri(root, f.table))
    return dt is not None and f.path in {p.rsplit("/", 1)[-1] for p in dt.file_uris()}


def _drop(root: str, f: WrittenFile, *, keep_data: bool = False) -> None:
    """Delete a pending file's marker, and the file itself unless a commit references it."""
    fs = storage.filesystem(root)
    if not keep_data:
        try:
            fs.rm_file(storage.strip_scheme(storage.join(tables.table_uri(root, f.table), f.path)))
        except FileNotFoundError:
            pass
    remove_markers(root, [f])
