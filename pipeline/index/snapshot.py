"""One version of an embeddings table as the index sees it: its data files, row counts,
dimension, a seeded sample, and the embedding column as (n, D) float32.

Any Delta table with `image_id` (int64) and `embedding` (a list of floats) can be indexed;
`uri` and `etag` are used when present (`ID_COLUMNS`).
"""
from __future__ import annotations

from sparse_embed.pipeline.store import storage, tables


def ids_schema():
    import pyarrow as pa

    return pa.schema([("image_id", pa.int64()), ("uri", pa.string()), ("etag", pa.string())])


def vectors_of(column):
    """An embedding column -> (n, D) float32. Files this job writes hold fixed_size_list;
    files deltalake rewrites (deletes, merges) hold list, since Delta has no fixed-size
    array type. Both read the same."""
    import numpy as np

    emb = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if len(emb) == 0:
        return np.zeros((0, 0), dtype="float32")
    flat = emb.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(len(emb), -1), dtype="float32")


def read_file(path: str, table_uri: str, columns=("image_id", "uri", "etag", "embedding")):
    import pyarrow.parquet as pq

    import pyarrow as pa

    fs, _ = storage.arrow_filesystem(table_uri)
    t = pq.read_table(path, columns=list(columns), filesystem=fs)
    if "embedding" in t.column_names and pa.types.is_fixed_size_list(t.schema.field("embedding").type):
        # Files deltalake rewrote hold list<float>: one type, so slices concatenate.
        i = t.schema.get_field_index("embedding")
        t = t.set_column(i, "embedding", t.column("embedding").cast(pa.list_(pa.float32())))
    return t


class TableSnapshot:
    """One version of the embeddings table: its data files, row counts and dimension."""

    def __init__(self, table_uri: str, version: int | None = None):
        dt = tables.open_table(table_uri, version)
        if dt is None:
            raise FileNotFoundError(f"No embeddings table at {table_uri!r}")
        self.uri, self.dt, self.version = table_uri, dt, dt.version()
        adds = dt.get_add_actions(flatten=True)
        by_name = {}
        if adds.num_rows:
            for p, size, rows in zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist(),
                                     adds.column("num_records").to_pylist()):
                by_name[p.rsplit("/", 1)[-1]] = (int(size or 0), int(rows or 0))
        self.paths = [storage.strip_scheme(f) for f in dt.file_uris()]
        self.sizes = [by_name.get(p.rsplit("/", 1)[-1], (0, 0))[0] for p in self.paths]
        self.rows = [by_name.get(p.rsplit("/", 1)[-1], (0, 0))[1] for p in self.paths]
        self.n = sum(self.rows)

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
        return vectors_of(read_file(self.paths[first], self.uri, ["embedding"]).column("embedding")).shape[1]

    def sample(self, count: int, seed: int, *, columns=("image_id", "embedding")):
        """`count` rows drawn uniformly from a seeded random subset of files holding at
        least 4x `count` rows (all files for small tables): (ids, vectors)."""
        import numpy as np
        import pyarrow as pa

        rng = np.random.default_rng(seed)
        order = [i for i in rng.permutation(len(self.paths)) if self.rows[i]]
        chosen, have = [], 0
        for i in order:
            chosen.append(i)
            have += self.rows[i]
            if have >= 4 * count:
                break
        t = pa.concat_tables([read_file(self.paths[i], self.uri, list(columns)) for i in sorted(chosen)])
        take = np.sort(rng.choice(t.num_rows, size=min(count, t.num_rows), replace=False))
        t = t.take(take)
        return t.column("image_id").to_numpy().astype("int64"), vectors_of(t.column("embedding"))


def model_version_of(snap: TableSnapshot) -> str | None:
    import pyarrow.compute as pc

    first = next((i for i, r in enumerate(snap.rows) if r), None)
    if first is None:
        return None
    col = read_file(snap.paths[first], snap.uri, ["model_version"]).column("model_version")
    return pc.min(col).as_py() if len(col) else None
