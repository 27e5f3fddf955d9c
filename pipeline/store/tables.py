"""The Delta tables under an output prefix, and their schemas (README.md, "What it writes").

<out>/embeddings  one live row per embedded object; changed and deleted objects' rows are
                  removed copy-on-write or by Delta deletion vectors (removal.py), so any
                  Delta reader sees the live rows (live.py is this project's reader)
<out>/errors      one row per object whose latest attempt failed
<out>/listing     the latest listing (uri, etag, size, mtime), overwritten each run
<out>/image_ids   uri -> image_id, append-only: ids stay stable for a URI across runs,
                  even after it is deleted and comes back, and are never reused
"""
from __future__ import annotations

import logging

from sparse_embed.pipeline.store import storage
from sparse_embed.pipeline.store.lock import check_before_commit

log = logging.getLogger(__name__)

EMBEDDINGS, ERRORS, IMAGE_IDS, LISTING = "embeddings", "errors", "image_ids", "listing"

# Rows per Parquet file the embed job writes (Ray Data bundles embed outputs up to this
# before a write task runs): 8192 x 512-d float32 is ~18 MiB. One file per 32-row block
# cost a write task (Parquet PUT, marker PUT, HEAD) per block: on the 2-core dev machine
# that was ~20 % of the run's CPU (BENCHMARKS.md, pipeline throughput). A killed run loses
# at most the rows not yet in a file.
ROWS_PER_FILE = 8192


def embeddings_schema(dim: int):
    """The embeddings table's schema. The embedding is a plain list<float32> of `dim`
    values in the files too: Delta has no fixed-size array, and polars refuses a file
    whose list type differs from the table's array<float> (a fixed_size_list did)."""
    import pyarrow as pa

    return pa.schema([
        ("image_id", pa.int64()),
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.timestamp("us", tz="UTC")),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("embedding", pa.list_(pa.float32())),  # dim values per row (the sink writes the encoder's width)
        ("model", pa.string()),
        ("model_version", pa.string()),
        ("run_id", pa.string()),
    ])


def errors_schema():
    import pyarrow as pa

    return pa.schema([
        ("image_id", pa.int64()),
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("attempts", pa.int32()),  # failed attempts at this etag; retries stop at the run's max_attempts
        ("run_id", pa.string()),
    ])


def image_ids_schema():
    import pyarrow as pa

    return pa.schema([("uri", pa.string()), ("image_id", pa.int64()), ("run_id", pa.string())])


def table_uri(out: str, name: str) -> str:
    return storage.join(out, name)


def open_table(uri: str, version: int | None = None, *, write: bool = False):
    """The DeltaTable at `uri`, or None if there is none yet. Only a table opened with
    `write` can commit through deltalake (storage.delta_storage_options); reading needs
    no write permission."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri, version=version, storage_options=storage.delta_storage_options(uri, write=write))
    except TableNotFoundError:
        return None


def ensure_table(uri: str, schema):
    """Open the table, creating it empty (version 0) with `schema` if missing."""
    from deltalake import DeltaTable

    dt = open_table(uri, write=True)
    if dt is None:
        dt = DeltaTable.create(uri, schema=schema, mode="ignore", storage_options=storage.delta_storage_options(uri, write=True))
    return dt


def read_columns(uri: str, columns: list[str], version: int | None = None):
    """Selected columns of a table's stored rows as Arrow, or None if there is no table yet.
    For the embeddings table read live.read_live: this reader refuses a deletion-vector table."""
    import pyarrow as pa

    dt = open_table(uri, version)
    if dt is None:
        return None
    return pa.table(dt.to_pyarrow_table(columns=columns))


def append(uri: str, table, schema) -> int:
    """One atomic append commit; returns the new table version."""
    from deltalake import write_deltalake

    check_before_commit(uri)
    ensure_table(uri, schema)
    write_deltalake(uri, table.cast(schema), mode="append", storage_options=storage.delta_storage_options(uri, write=True))
    return open_table(uri).version()


def delete_matching(uri: str, keys, on: tuple[str, ...], *, unless: str | None = None) -> int:
    """Delete rows whose `on` columns equal a row of `keys` (an Arrow table), in one commit;
    `unless`: a SQL condition on the target row `t` and key row `s` that keeps a matching
    row (its key columns travel with `keys`). Returns the number of rows deleted."""
    from deltalake import WriterProperties

    dt = open_table(uri, write=True)
    if dt is None or keys.num_rows == 0:
        return 0
    check_before_commit(uri)
    predicate = " AND ".join(f"t.{c} = s.{c}" for c in on) + (f" AND NOT ({unless})" if unless else "")
    metrics = (dt.merge(source=keys, predicate=predicate, source_alias="s", target_alias="t",
                        writer_properties=WriterProperties(compression="ZSTD"))  # as the sink writes: snappy was 1.4-2x
               .when_matched_delete().execute())
    return int(metrics.get("num_target_rows_deleted", 0))


def count_rows(uri: str, version: int | None = None) -> int:
    """Rows of the table from its add actions' numRecords (no data file is read)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dt = open_table(uri, version)
    if dt is None:
        return 0
    actions = pa.table(dt.get_add_actions(flatten=True))
    return int(pc.sum(actions.column("num_records")).as_py() or 0) if actions.num_rows else 0


def version_of(uri: str) -> int | None:
    dt = open_table(uri)
    return None if dt is None else dt.version()


def overwrite(uri: str, data, schema) -> int:
    """Replace the table's rows in one commit (earlier versions stay readable by time
    travel); `data` is an Arrow table or a RecordBatchReader. Returns the new version."""
    from deltalake import write_deltalake

    check_before_commit(uri)
    ensure_table(uri, schema)
    write_deltalake(uri, data, mode="overwrite", schema_mode="overwrite", storage_options=storage.delta_storage_options(uri, write=True))
    return open_table(uri).version()


def write_parquet_file(uri: str, rel: str, table, *, row_group_size: int | None = None) -> int:
    """Write `table` as the Parquet file `rel` inside the table directory `uri`, not yet
    committed (row groups of `row_group_size` rows; pyarrow's default when None); returns
    its size in bytes. Safe to repeat (same name, overwritten)."""
    import pyarrow.parquet as pq

    fs, root = storage.arrow_filesystem(uri)
    path = f"{root}/{rel}"
    folder, name = path.rsplit("/", 1)
    tmp = path if storage.is_s3(uri) else f"{folder}/.{name}.tmp"  # an S3 PUT is atomic; a local write is not
    if tmp != path:
        fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(tmp) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=row_group_size)
    if tmp != path:
        fs.move(tmp, path)
    return fs.get_file_info(path).size


def plain_strings(table):
    """`table` with string_view columns as string: files deltalake rewrites (merges,
    deletes) hold string_view, which Arrow will not concatenate with the string of others."""
    import pyarrow as pa

    for i, f in enumerate(table.schema):
        if pa.types.is_string_view(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(pa.string()))
    return table


def column_stats(table, columns: tuple[str, ...]) -> dict:
    """Delta file statistics (minValues, maxValues, nullCount) of `columns` of `table`, for
    an add action: readers skip the file when a lookup's value is outside [min, max]."""
    import pyarrow.compute as pc

    stats = {"minValues": {}, "maxValues": {}, "nullCount": {}}
    for c in columns:
        if c not in table.column_names or not table.num_rows:
            continue
        mm = pc.min_max(table.column(c))
        if mm["min"].is_valid:
            stats["minValues"][c], stats["maxValues"][c] = mm["min"].as_py(), mm["max"].as_py()
        stats["nullCount"][c] = table.column(c).null_count
    return stats


def file_actions(uri: str, *, prefix: str, columns: tuple[str, ...]) -> list[tuple]:
    """The files of the table at `uri` (its latest version) as commit_files entries for
    another table whose directory holds `uri`'s at `prefix` ("_staged/v2/embeddings/"):
    (prefix + path, bytes, rows, min/max/null counts of `columns` from the add actions).
    Reads the log only, no data file."""
    import pyarrow as pa

    dt = open_table(uri)
    if dt is None:
        return []
    actions = pa.table(dt.get_add_actions(flatten=True))
    names = set(actions.column_names)
    out = []
    for row in actions.to_pylist():
        stats = {"minValues": {}, "maxValues": {}, "nullCount": {}}
        for c in columns:
            for key, field in (("minValues", f"min.{c}"), ("maxValues", f"max.{c}"), ("nullCount", f"null_count.{c}")):
                if field in names and row[field] is not None:
                    stats[key][c] = row[field]
        out.append((prefix + row["path"], int(row["size_bytes"]), int(row["num_records"] or 0), stats))
    return out


CHECKPOINT_AFTER_FILES = 1000  # a commit adding at least this many files is followed by a checkpoint


def commit_files(uri: str, files: list[tuple], schema, *, mode: str = "append") -> int:
    """One commit adding Parquet files already in the table directory, as (path relative
    to the table, bytes, rows) or (path, bytes, rows, column_stats(...)); mode="overwrite"
    also removes every file the table had. A commit of CHECKPOINT_AFTER_FILES files or more
    is followed by a Delta checkpoint, so readers do not replay a long log. Returns the new
    version."""
    import json
    import time

    from deltalake.transaction import AddAction

    check_before_commit(uri)
    dt = ensure_table(uri, schema)
    now_ms = int(time.time() * 1000)
    actions = [AddAction(path=f[0], size=f[1], partition_values={}, modification_time=now_ms, data_change=True,
                         stats=json.dumps({"numRecords": f[2]} | (f[3] if len(f) > 3 and f[3] else {}), default=str))
               for f in files]
    dt.create_write_transaction(actions, mode=mode, schema=schema)
    dt = open_table(uri, write=True)
    if len(files) >= CHECKPOINT_AFTER_FILES:
        dt.create_checkpoint()
    return dt.version()


REWRITE_ONLY_OPERATIONS = ("MERGE", "DELETE")  # delete_matching and removal.py commits: they add no new row


def appended_files(uri: str, since: int, until: int) -> list[str] | None:
    """The data files (paths without scheme) that append commits added after version
    `since` up to `until`, read from those commits' log entries (O(files added)). MERGE and
    DELETE commits only remove rows here (delete_matching), so the files they write hold
    rows the table had before and are left out. None when a commit is of another kind (an
    overwrite, an optimize) or its log entry is gone: the caller then reads more widely."""
    import json
    from urllib.parse import unquote

    root = storage.strip_scheme(uri).rstrip("/")
    paths = []
    for v in range(since + 1, until + 1):
        try:
            body = storage.read_bytes(storage.join(uri, "_delta_log", f"{v:020d}.json"))
        except FileNotFoundError:
            return None
        actions = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
        op, mode = info.get("operation"), (info.get("operationParameters") or {}).get("mode")
        if op in REWRITE_ONLY_OPERATIONS:
            continue
        if op != "WRITE" or mode != "Append":
            return None
        paths += [f"{root}/{unquote(a['add']['path'])}" for a in actions if "add" in a]
    return paths
