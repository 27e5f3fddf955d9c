"""The one reader of a Delta table's live rows: every read of the embeddings table in this
project (diff, index sample, slices, exact scans and update, search by id and uri,
recovery, demo, serve) goes through `read_file` / `file_batches` for one data file or
`read_live` for a version.

A table's rows are removed in one of two ways (removal.py), and both are the Delta
protocol's own, so every Delta reader sees the same live rows as this one:
- copy-on-write (the default): a file holding removed rows is replaced by a rewrite
  without them (remove + add in one commit);
- deletion vectors (tables created or upgraded with them): a file keeps its rows and
  its add action names a vector of the removed rows' positions (deletion_vectors.py).
A data file is read on its own: the cost of reading it depends only on its own deletion
vector, never on deletions in other files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sparse_embed.pipeline.store import storage

TOMBSTONE_PREFIX = "tombstone-"  # files of tables written before 2026-12 (removal.convert_tombstones drops them)


def is_tombstone_file(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith(TOMBSTONE_PREFIX)


@dataclass(frozen=True)
class DataFile:
    """One live data file of a table version, as its add action describes it."""

    path: str  # relative to the table root, decoded
    size: int
    rows: int  # physical rows (numRecords), deleted ones included
    dv: dict | None = None  # its deletion vector's descriptor, None when no row of it is deleted
    stats: dict = field(default_factory=dict)  # {"min": {col: v}, "max": {col: v}} from the add action

    @property
    def deleted(self) -> int:
        return int(self.dv["cardinality"]) if self.dv else 0

    @property
    def live_rows(self) -> int:
        return self.rows - self.deleted


@dataclass
class TableFiles:
    """The data files of one table version (the log only; no data file is read)."""

    uri: str
    version: int
    files: list
    deletion_vectors: bool  # the protocol names deletion vectors

    def abs_path(self, f: DataFile) -> str:
        """The file's path without scheme, as pyarrow filesystems take it."""
        return f"{storage.strip_scheme(self.uri).rstrip('/')}/{f.path}"

    @property
    def live_rows(self) -> int:
        return sum(f.live_rows for f in self.files)


def table_files(uri: str, version: int | None = None, *, dt=None) -> TableFiles | None:
    """The live data files of the table at `uri` (latest or `version`), with row counts,
    deletion vectors and image_id/uri bounds; None when there is no table. Tombstone files
    of tables from before 2026-12 are left out (removal.convert_tombstones removes them)."""
    import pyarrow as pa

    from sparse_embed.pipeline.store import delta_log, tables

    dt = dt if dt is not None else tables.open_table(uri, version)
    if dt is None:
        return None
    actions = pa.table(dt.get_add_actions(flatten=True))
    names = set(actions.column_names)
    root = storage.strip_scheme(uri).rstrip("/")
    rows = actions.to_pylist()
    uses_dvs = delta_log.uses_deletion_vectors(dt)
    rel = [relative_to_table(r["path"], root) for r in rows]
    dvs = delta_log.deletion_vectors(uri, dt.version(), rel) if uses_dvs else {}
    files = []
    for r, p in zip(rows, rel):
        if is_tombstone_file(p):
            continue
        stats = {"min": {}, "max": {}}
        for c in ("image_id", "uri"):
            for key in ("min", "max"):
                if f"{key}.{c}" in names and r[f"{key}.{c}"] is not None:
                    stats[key][c] = r[f"{key}.{c}"]
        files.append(DataFile(p, int(r["size_bytes"] or 0), int(r["num_records"] or 0), dvs.get(p), stats))
    return TableFiles(uri, dt.version(), files, uses_dvs)


def relative_to_table(path: str, root: str) -> str:
    """An add action's path (URL-encoded, relative or absolute) relative to the table
    folder `root` (without scheme), decoded."""
    from urllib.parse import unquote

    path = unquote(path)
    if "://" in path:
        path = storage.strip_scheme(path)
    return path[len(root) + 1:] if path.startswith(root + "/") else path


def deleted_positions(table_uri: str, dv: dict | None):
    """The sorted physical row positions a deletion vector marks (int64 numpy); empty for None."""
    import numpy as np

    from sparse_embed.pipeline.store import deletion_vectors as dvf

    if not dv:
        return np.zeros(0, np.int64)
    kind = dv["storageType"]
    if kind == "i":
        return dvf.deserialize(dvf.z85_decode(dv["pathOrInlineDv"])[: int(dv["sizeInBytes"])])
    path = dv["pathOrInlineDv"] if kind == "p" else storage.join(table_uri, dvf.relative_path(dv["pathOrInlineDv"]))
    offset, size = int(dv.get("offset") or 0), int(dv["sizeInBytes"])
    fs = storage.filesystem(path if "://" in path else table_uri)
    blob = fs.cat_file(storage.strip_scheme(path), start=offset, end=offset + 8 + size)
    return dvf.deserialize(dvf.read_framed(blob, 0, size))


def _keep_mask(n: int, deleted):
    import numpy as np

    keep = np.ones(n, dtype=bool)
    if len(deleted):
        keep[deleted[deleted < n]] = False
    return keep


def read_file(table_uri: str, f: DataFile, columns, *, positions: bool = False, filter=None):
    """`columns` of the live rows of data file `f` (the rows its deletion vector marks
    dropped); with `positions`, a `_row` column of each row's physical position too.
    `filter`: a pyarrow expression over `columns`, applied after the deletion vector."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparse_embed.pipeline.store import tables

    fs, root = storage.arrow_filesystem(table_uri)
    with fs.open_input_file(f"{root.rstrip('/')}/{f.path}") as src:
        pf = pq.ParquetFile(src)
        present = set(pf.schema_arrow.names)
        t = pf.read(columns=[c for c in columns if c in present])
    t = tables.plain_strings(t)
    if positions:
        t = t.append_column("_row", pa.array(np.arange(t.num_rows, dtype=np.int64)))
    if f.dv:
        t = t.filter(pa.array(_keep_mask(t.num_rows, deleted_positions(table_uri, f.dv))))
    if filter is not None and t.num_rows:
        t = t.filter(filter)
    return t


def file_batches(table_uri: str, f: DataFile, columns, *, batch_size: int):
    """Tables of `columns` of data file `f`'s live rows, read `batch_size` rows at a time
    (fewer where its deletion vector marks some)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    deleted = deleted_positions(table_uri, f.dv) if f.dv else None
    fs, root = storage.arrow_filesystem(table_uri)
    at = 0
    with fs.open_input_file(f"{root.rstrip('/')}/{f.path}") as src:
        pf = pq.ParquetFile(src)
        cols = [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            t = pa.Table.from_batches([batch])
            if deleted is not None and len(deleted):
                local = deleted[(deleted >= at) & (deleted < at + t.num_rows)] - at
                t = t.filter(pa.array(_keep_mask(t.num_rows, local))) if len(local) else t
            at += batch.num_rows
            yield t


def file_at(table_uri: str, path: str, dv: dict | None = None) -> DataFile:
    """A DataFile for `path` (without scheme, absolute or relative to the table)."""
    return DataFile(relative_to_table(path, storage.strip_scheme(table_uri).rstrip("/")), 0, 0, dv)


def _may_hold(f: DataFile, where: dict | None) -> bool:
    """False when `f`'s bounds show it holds none of `where`'s values ({column: sorted values})."""
    import bisect

    if not where:
        return True
    for col, values in where.items():
        lo, hi = f.stats.get("min", {}).get(col), f.stats.get("max", {}).get(col)
        if lo is None or hi is None:
            continue
        i = bisect.bisect_left(values, lo)
        if i >= len(values) or values[i] > hi:
            return False
    return True


def read_live(uri: str, columns: list[str] | None = None, *, version: int | None = None, where: dict | None = None):
    """`columns` (all when None) of the live rows of the table at `uri` (None when there is
    no table); `where` ({column: values}) keeps rows whose column is one of the values and
    skips the files whose bounds rule them out."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from sparse_embed.pipeline.store import tables

    dt = tables.open_table(uri, version)
    if dt is None:
        return None
    schema = arrow_schema(dt)
    columns = list(columns) if columns is not None else schema.names
    tf = table_files(uri, dt=dt)
    where = {col: sorted(set(values)) for col, values in where.items()} if where else None
    expr = None
    for col, values in (where or {}).items():
        e = pc.field(col).isin(list(values))
        expr = e if expr is None else expr & e
    wanted = columns + [c for c in (where or {}) if c not in columns]
    parts = [read_file(uri, f, wanted, filter=expr).select(columns) for f in tf.files if _may_hold(f, where)]
    target = pa.schema([schema.field(c) for c in columns])
    parts = [_conform(p, target) for p in parts if p.num_rows]
    return pa.concat_tables(parts) if parts else target.empty_table()


def arrow_schema(dt):
    """The table's schema as pyarrow types this project's files hold: string for any
    string type, list<float32> for the embedding."""
    import pyarrow as pa

    fields = []
    for f in pa.schema(dt.schema().to_arrow()):
        typ = f.type
        if pa.types.is_string_view(typ) or pa.types.is_large_string(typ):
            typ = pa.string()
        elif pa.types.is_list_view(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
            typ = pa.list_(typ.value_type)
        fields.append(pa.field(f.name, typ))
    return pa.schema(fields)


def _conform(t, schema):
    """`t` cast to `schema` (files of older runs hold fixed-size lists or string_view)."""
    import pyarrow as pa

    cols = []
    for f in schema:
        c = t.column(f.name) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
        cols.append(c if c.type == f.type else c.cast(f.type))
    return pa.table(cols, schema=schema)


def row_counts(uri: str, version: int | None = None) -> tuple[int, int]:
    """(physical rows, rows deleted by deletion vectors) of the table's data files, from
    the log only."""
    tf = table_files(uri, version)
    if tf is None:
        return 0, 0
    return sum(f.rows for f in tf.files), sum(f.deleted for f in tf.files)


def live_dataset(uri: str, columns: list[str] | None = None, *, version: int | None = None):
    """The live rows of the table at `uri` (latest or `version`) as a Ray Dataset: one
    read per data file, deletion vectors applied. Ray's own `read_delta` reads through
    pyarrow's dataset, which refuses a table with deletion vectors."""
    import pyarrow as pa
    import ray

    from sparse_embed.pipeline.store import tables

    dt = tables.open_table(uri, version)
    if dt is None:
        raise FileNotFoundError(f"No Delta table at {uri!r}")
    tf = table_files(uri, dt=dt)
    cols = list(columns) if columns is not None else [f.name for f in dt.schema().fields]

    def read_files(batch):
        return pa.concat_tables([read_file(uri, f, cols) for f in batch["item"]], promote_options="permissive")

    return ray.data.from_items([{"item": f} for f in tf.files]).map_batches(read_files, batch_size=1,
                                                                            batch_format="numpy")
