"""One version of an embeddings table as the index sees it: its data files, row counts,
dimension, a seeded sample, and the embedding column as (n, D) float32.

Any Delta table with `image_id` (int64) and `embedding` (a list of floats) can be indexed
(`REQUIRED_COLUMNS`); `uri` and `etag` are used when present (`OPTIONAL_COLUMNS`) and read
as nulls when not: search then prints ids, and updates compare ids only.
"""
from __future__ import annotations

from sparse_embed.pipeline.index.vectors import vectors_of  # noqa: F401  (re-exported)
from sparse_embed.pipeline.store import live, storage, tables


REQUIRED_COLUMNS = ("image_id", "embedding")
OPTIONAL_COLUMNS = ("uri", "etag")


def ids_schema():
    import pyarrow as pa

    return pa.schema([("image_id", pa.int64()), ("uri", pa.string()), ("etag", pa.string())])


def read_file(path: str, table_uri: str, columns=("image_id", "uri", "etag", "embedding"), dv=None):
    """`columns` of one data file's live rows (`dv`: its deletion vector descriptor, or
    None; store/live.py); an optional column the file lacks comes back as nulls."""
    import pyarrow as pa

    t = live.read_file(table_uri, live.file_at(table_uri, path, dv), list(columns))
    for c in columns:
        if c not in t.column_names and c in OPTIONAL_COLUMNS:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
    return t.select(list(columns))  # embedding as the file stores it: vectors_of reads either list type


class TableSnapshot:
    """One version of the embeddings table: its data files (`paths`, with their live
    `rows`), their deletion vectors (`dvs`: path -> descriptor, for files that have one),
    the live row count `n` and dimension. Readers of `paths` drop the rows a file's
    vector marks (store/live.py)."""

    def __init__(self, table_uri: str, version: int | None = None):
        dt = tables.open_table(table_uri, version)
        if dt is None:
            raise FileNotFoundError(f"No embeddings table at {table_uri!r}")
        self.uri, self.dt, self.version = table_uri, dt, dt.version()
        self.columns = [f.name for f in dt.schema().fields]
        for c in REQUIRED_COLUMNS:
            if c not in self.columns:
                raise ValueError(f"Table {table_uri!r} has no {c!r} column: an index needs image_id (int64) and "
                                 f"embedding (list of float32); it has {', '.join(self.columns)}")
        tf = live.table_files(table_uri, dt=dt)
        self.files = tf.files
        self.paths = [tf.abs_path(f) for f in tf.files]
        self.sizes = [f.size for f in tf.files]
        self.rows = [f.live_rows for f in tf.files]
        self.dvs = {p: f.dv for p, f in zip(self.paths, tf.files) if f.dv}
        self.n = sum(self.rows)

    def dv_of(self, path: str):
        return self.dvs.get(path)

    def abs_path(self, f) -> str:
        """The path (without scheme) of one of `files`, as `paths` holds it."""
        return f"{storage.strip_scheme(self.uri).rstrip('/')}/{f.path}"

    def read_columns(self, columns):
        """`columns` of the version's live rows (optional ones as nulls when the table lacks them)."""
        import pyarrow as pa

        t = live.read_live(self.uri, [c for c in columns if c in self.columns], version=self.version)
        for c in columns:
            if c not in self.columns:
                t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
        return t.select(list(columns))

    def dim(self) -> int:
        """From the first non-empty file's Parquet schema (fixed_size_list) or first row."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        first = next(i for i, r in enumerate(self.rows) if r)
        fs, _ = storage.arrow_filesystem(self.uri)
        with fs.open_input_file(self.paths[first]) as f:
            typ = pq.ParquetFile(f).schema_arrow.field("embedding").type
        if pa.types.is_fixed_size_list(typ):
            return typ.list_size
        return vectors_of(read_file(self.paths[first], self.uri, ["embedding"], self.dv_of(self.paths[first]))
                          .column("embedding")).shape[1]

    def sample(self, count: int, seed: int, *, exclude=None):
        """`count` rows drawn uniformly without replacement (a per-file quota, then a
        reservoir per file, in this process): (ids, vectors). `exclude`: image_ids never drawn.
        For training samples, sample.sample_in_tasks draws the same way in Ray tasks."""
        from sparse_embed.pipeline.index.sample import sample_local

        return sample_local(self, count, seed, exclude=exclude)


def model_version_of(snap: TableSnapshot) -> str | None:
    import pyarrow.compute as pc

    first = next((i for i, r in enumerate(snap.rows) if r), None)
    if first is None or "model_version" not in snap.columns:
        return None
    import pyarrow as pa

    # files deltalake rewrites (deletes) hold string_view, which pc.min does not take
    col = read_file(snap.paths[first], snap.uri, ["model_version"], snap.dv_of(snap.paths[first])).column(
        "model_version").cast(pa.string())
    return pc.min(col).as_py() if len(col) else None
