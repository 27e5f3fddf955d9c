"""The live rows of an embeddings table: tombstones, the mask readers apply, compaction.

A run does not rewrite table files to drop the rows of changed and deleted objects (with
1% random changes a night, that touched every file). Its diff appends tombstone rows
instead, in files named tombstone-*.parquet: one per masked row, holding that row's
image_id, uri, etag and run_id, with a null embedding and a null model_version.

A row is live unless a tombstone holds its (image_id, run_id). A run writes at most one
row per image_id, so that pair names one row: an object deleted and restored at the same
etag is not masked by its old tombstone.

Every reader of the table here applies the mask: `read_live` for filtered or whole reads
through Delta, `load_mask` + `live_rows` for readers of single files (Ray tasks). Readers
outside this tool must do the same (README, "What it writes"), or read the table after
`sparse-embed compact`.

Compaction (`compact`) deletes the masked rows and their tombstones in one merge-delete
commit; a run compacts when tombstones reach COMPACT_FRACTION of the data rows, so at 1%
of objects changed a night (0.75% of rows masked) the table is rewritten about every 27
nights, not every night (BENCHMARKS.md, "Scale").
"""
from __future__ import annotations

import functools

from sparse_embed.pipeline.store import storage

TOMBSTONE_PREFIX = "tombstone-"  # file-name prefix of tombstone files (in any folder of the table)
MASK_KEY = ("image_id", "run_id")
COMPACT_FRACTION = 0.2  # tombstones / data rows at which a run compacts


def is_tombstone_file(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith(TOMBSTONE_PREFIX)


def tombstone_file_name(run_id: str, bucket: int) -> str:
    return f"{TOMBSTONE_PREFIX}{run_id}-b{bucket:05d}.parquet"


def split_files(paths: list[str]) -> tuple[list[str], list[str]]:
    """(data files, tombstone files) of a version's file list, each in the given order."""
    tombs = [p for p in paths if is_tombstone_file(p)]
    return [p for p in paths if not is_tombstone_file(p)], tombs


def needs_compaction(data_rows: int, tombstone_rows: int, fraction: float | None = None) -> bool:
    """True when tombstones reach `fraction` (default COMPACT_FRACTION) of the data rows (pure)."""
    fraction = COMPACT_FRACTION if fraction is None else fraction
    return tombstone_rows > 0 and tombstone_rows >= fraction * max(data_rows, 1)


def tombstone_rows(stale, schema):
    """Tombstones for `stale` rows (image_id, uri, etag, run_id of the rows they mask), in the
    embeddings table's `schema`, sorted by (run_id, image_id) so that a reader filtering on
    them skips row groups."""
    import pyarrow as pa

    stale = stale.sort_by([("run_id", "ascending"), ("image_id", "ascending")])
    cols = {}
    for f in schema:
        cols[f.name] = stale.column(f.name).cast(f.type) if f.name in stale.column_names else pa.nulls(stale.num_rows, f.type)
    return pa.table(cols, schema=schema)


def write_tombstones(uri: str, stale, schema, run_id: str, part: int) -> tuple:
    """Write tombstones for the `stale` rows (image_id, uri, etag, run_id of the rows they
    mask) as an uncommitted file of the table at `uri`; returns its tables.commit_files
    entry (path, bytes, rows, stats). Safe to repeat (same name, same rows)."""
    from sparse_embed.pipeline.store import tables

    rows = tombstone_rows(stale, schema)
    rel = tombstone_file_name(run_id, part)
    return rel, tables.write_parquet_file(uri, rel, rows), rows.num_rows, tables.column_stats(rows, ("image_id", "uri"))  # as sink.STATS_COLUMNS


def _as_keys(table):
    import pyarrow as pa

    return pa.table({"image_id": table.column("image_id").cast(pa.int64()),
                     "run_id": table.column("run_id").cast(pa.string())})


def live_rows(table, mask):
    """The rows of `table` (which has image_id and run_id) that `mask` (image_id, run_id)
    does not name, in their order."""
    import numpy as np
    import pyarrow as pa

    if mask is None or mask.num_rows == 0 or table.num_rows == 0:
        return table
    keys = _as_keys(table).append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    hit = keys.join(_as_keys(mask), list(MASK_KEY), join_type="left semi").column("_row").to_numpy()
    if not len(hit):
        return table
    keep = np.ones(table.num_rows, dtype=bool)
    keep[hit] = False
    return table.filter(pa.array(keep))


def live_batches(parquet_file, columns: list[str], mask, *, batch_size: int):
    """Tables of `columns` of an open pyarrow ParquetFile, `batch_size` rows read at a time,
    without the rows `mask` names (fewer rows where it names some)."""
    import pyarrow as pa

    extra = [c for c in MASK_KEY if mask is not None and c not in columns]
    for batch in parquet_file.iter_batches(batch_size=batch_size, columns=list(columns) + extra):
        t = pa.Table.from_batches([batch])
        yield live_rows(t, mask).select(list(columns)) if mask is not None else t


def load_mask(tomb_paths: list[str] | tuple, table_uri: str):
    """(image_id, run_id) of every tombstone in `tomb_paths` (paths without scheme), distinct;
    None when there are none. Cached per process: a task reading many files loads it once."""
    return _load_mask(tuple(tomb_paths), table_uri)


@functools.lru_cache(maxsize=4)
def _load_mask(tomb_paths: tuple, table_uri: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not tomb_paths:
        return None
    fs, _ = storage.arrow_filesystem(table_uri)
    parts = []
    for p in tomb_paths:
        with fs.open_input_file(p) as f:
            parts.append(_as_keys(pq.read_table(f, columns=list(MASK_KEY))))
    keys = pa.concat_tables(parts)
    return keys.group_by(list(MASK_KEY)).aggregate([]) if keys.num_rows else None


def read_live(uri: str, columns: list[str] | None = None, *, version: int | None = None, filter=None):
    """`columns` (all when None) of the live rows of the table at `uri` (None when there is
    no table). `filter` (a pyarrow.dataset expression) may only name columns tombstones
    share with the rows they mask (image_id, uri, etag): it then selects both."""
    import pyarrow.compute as pc

    from sparse_embed.pipeline.store import tables

    dt = tables.open_table(uri, version)
    if dt is None:
        return None
    if columns is None:
        columns = [f.name for f in dt.schema().fields]
    dataset = dt.to_pyarrow_dataset()
    if not any(is_tombstone_file(p) for p in dt.file_uris()):
        return dataset.to_table(columns=list(columns), filter=filter)
    extra = [c for c in (*MASK_KEY, "model_version") if c not in columns]
    t = dataset.to_table(columns=list(columns) + extra, filter=filter)
    is_tomb = pc.is_null(t.column("model_version"))
    return live_rows(t.filter(pc.invert(is_tomb)), t.filter(is_tomb)).select(list(columns))


def row_counts(uri: str, version: int | None = None) -> tuple[int, int]:
    """(data rows, tombstone rows) of the table from its add actions (no data file is read).
    Each tombstone masks one data row, so the live rows are their difference."""
    import pyarrow as pa

    from sparse_embed.pipeline.store import tables

    dt = tables.open_table(uri, version)
    if dt is None:
        return 0, 0
    actions = pa.table(dt.get_add_actions(flatten=True))
    data = tombs = 0
    for path, rows in zip(actions.column("path").to_pylist(), actions.column("num_records").to_pylist()):
        if is_tombstone_file(path):
            tombs += int(rows or 0)
        else:
            data += int(rows or 0)
    return data, tombs


def compact(uri: str) -> int:
    """Delete every masked row and every tombstone of the table at `uri` in one merge-delete
    commit (a tombstone has its masked row's key, so one match deletes both). Rewrites the
    files that hold either. Returns the rows deleted (0 when there are no tombstones)."""
    from sparse_embed.pipeline.store import tables

    dt = tables.open_table(uri)
    if dt is None:
        return 0
    _, tombs = split_files([storage.strip_scheme(p) for p in dt.file_uris()])
    mask = _load_mask(tuple(tombs), uri) if tombs else None
    if mask is None:
        return 0
    return tables.delete_matching(uri, mask, on=MASK_KEY)
