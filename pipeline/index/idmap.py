"""image_id -> (uri, etag) through Arrow IPC files sorted by image_id, read memory-mapped.

One file per run of ids: a build slice's vectors, or an update's delta shard. Each file is
a sequence of record batches of at most BATCH_ROWS rows, ids ascending and unique across
the whole file; uri and etag are `large_string` (64-bit offsets), so no column hits
Arrow's 2 GiB string limit. A reader maps the file and binary-searches the int64 id
column of the batch whose id range holds the key: a lookup touches a few pages, and
opening a run costs one small array of batch boundaries, whatever the file's size.
"""
from __future__ import annotations

import os

from sparse_embed.pipeline.store import storage

BATCH_ROWS = 1 << 20  # rows per record batch: 8 MiB of ids; a run of 1e9 ids has ~1000 batches


def id_map_schema():
    import pyarrow as pa

    return pa.schema([("image_id", pa.int64()), ("uri", pa.large_string()), ("etag", pa.large_string())])


def _as_batch(ids, uris, etags):
    import pyarrow as pa

    n = len(ids)
    cols = [pa.array(ids, pa.int64()) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids.cast(pa.int64())]
    for col in (uris, etags):
        if col is None:
            cols.append(pa.nulls(n, pa.large_string()))
        elif isinstance(col, (pa.Array, pa.ChunkedArray)):
            cols.append(col.cast(pa.large_string()))
        else:
            cols.append(pa.array(col, pa.large_string()))
    cols = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols]
    return pa.RecordBatch.from_arrays(cols, schema=id_map_schema())


def write_id_map(uri: str, ids, uris=None, etags=None, *, batch_rows: int = BATCH_ROWS) -> int:
    """Write one run: `ids` with their `uris` and `etags` (Arrow arrays, chunked arrays or
    sequences of one length; None for nulls), sorted here by id. Holds the run once plus
    one sorted batch, so a run is what one task already holds (a build slice). Returns rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = pa.Table.from_batches([_as_batch(ids, uris, etags)]) if len(ids) else id_map_schema().empty_table()
    order = pc.sort_indices(t.column("image_id"))

    def batches():
        for start in range(0, len(order), batch_rows):
            yield t.take(order[start:start + batch_rows]).combine_chunks().to_batches()[0]

    return write_sorted_id_map(uri, batches())


def write_sorted_id_map(uri: str, batches) -> int:
    """Stream record batches (image_id, uri, etag; ids ascending and unique across batches)
    into the run file at `uri`; a local file appears by rename, an S3 object when its
    upload completes. Raises ValueError at the first id out of order. Returns rows."""
    import numpy as np
    import pyarrow as pa

    schema = id_map_schema()
    fs, path = storage.arrow_filesystem(uri)
    local = not storage.is_s3(uri)
    target = f"{path}.tmp-{os.getpid()}" if local else path
    if local:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rows, last = 0, None
    try:
        with fs.open_output_stream(target) as out, pa.ipc.new_file(out, schema) as writer:
            for b in batches:
                if isinstance(b, pa.Table):
                    b = b.combine_chunks().to_batches()[0] if b.num_rows else None
                if b is None or not b.num_rows:
                    continue
                b = b.select(schema.names).cast(schema) if b.schema != schema else b
                ids = b.column(0).to_numpy()
                if (last is not None and ids[0] <= last) or (len(ids) > 1 and not np.all(ids[1:] > ids[:-1])):
                    raise ValueError(f"Expected image_ids ascending and unique in id map {uri}, got a batch out of "
                                     f"order after {rows} rows (sort each run by image_id; an id may appear once)")
                writer.write_batch(b)
                rows += b.num_rows
                last = int(ids[-1])
    except BaseException:
        if local and os.path.exists(target):
            os.remove(target)
        raise
    if local:
        os.replace(target, path)
    return rows


class IdMap:
    """One run file, memory-mapped: `lookup` binary-searches its ids."""

    def __init__(self, path: str):
        import numpy as np
        import pyarrow as pa

        self.path = path
        self._source = pa.memory_map(path, "r")
        reader = pa.ipc.open_file(self._source)
        self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]  # zero-copy views of the map
        self._batches = [b for b in self._batches if b.num_rows]
        self._ids = [b.column(0).to_numpy() for b in self._batches]  # int64 views into the mapped file
        self._first = np.array([ids[0] for ids in self._ids], dtype="int64")
        self.num_rows = int(sum(b.num_rows for b in self._batches))

    def positions(self, ids):
        """(batch, row) of each id in `ids`, -1 where absent (vectorised per batch)."""
        import numpy as np

        q = np.asarray(ids, dtype="int64").reshape(-1)
        batch = np.full(len(q), -1, dtype="int64")
        row = np.full(len(q), -1, dtype="int64")
        if not self._batches or not len(q):
            return batch, row
        cand = np.searchsorted(self._first, q, side="right") - 1
        for b in np.unique(cand[cand >= 0]):
            sel = np.nonzero(cand == b)[0]
            arr = self._ids[b]
            pos = np.searchsorted(arr, q[sel])
            ok = pos < len(arr)
            ok[ok] = arr[pos[ok]] == q[sel][ok]
            batch[sel[ok]], row[sel[ok]] = b, pos[ok]
        return batch, row

    def lookup(self, ids, column: str = "uri") -> list:
        """`column` (uri or etag) for each id; None where the run lacks the id."""
        batch, row = self.positions(ids)
        out = [None] * len(batch)
        for i, (b, r) in enumerate(zip(batch.tolist(), row.tolist())):
            if b >= 0:
                out[i] = self._batches[b].column(column)[r].as_py()
        return out

    def contains(self, ids):
        return self.positions(ids)[0] >= 0

    def batches(self):
        """The run's record batches in id order (views of the mapped file)."""
        return iter(self._batches)


class IdMapSet:
    """The runs of one index: later runs override earlier ones (an update's delta run
    holds the current rows of changed ids), and ids in `deleted` resolve only in the runs
    listed at or after `first_live_run` (the delta runs)."""

    def __init__(self, runs: list[IdMap], deleted=None, first_live_run: int | None = None):
        import numpy as np

        self.runs = runs
        self.deleted = np.zeros(0, dtype="int64") if deleted is None else np.asarray(deleted, dtype="int64")
        self.first_live_run = len(runs) if first_live_run is None else first_live_run

    def lookup(self, ids, column: str = "uri") -> list:
        import numpy as np

        q = np.asarray(ids, dtype="int64").reshape(-1)
        out: list = [None] * len(q)
        todo = np.ones(len(q), dtype=bool)
        gone = np.isin(q, self.deleted) if len(self.deleted) else np.zeros(len(q), dtype=bool)
        for r in range(len(self.runs) - 1, -1, -1):
            want = todo & (~gone if r < self.first_live_run else True)
            idx = np.nonzero(want)[0]
            if not len(idx):
                continue
            found = self.runs[r].positions(q[idx])
            for i, b, row in zip(idx.tolist(), found[0].tolist(), found[1].tolist()):
                if b >= 0:
                    out[i] = self.runs[r]._batches[b].column(column)[row].as_py()
                    todo[i] = False
        return out

    def id_of_uri(self, uri: str) -> int | None:
        """The live id whose uri is `uri`, or None: a scan of the runs' uri columns (memory-
        mapped, O(rows)), newest run first; a hit counts only if lookup (later runs, the
        deleted ids) still gives it that uri."""
        import numpy as np
        import pyarrow.compute as pc

        for run in reversed(self.runs):
            for batch in run.batches():
                hits = np.flatnonzero(pc.equal(batch.column("uri"), uri).to_numpy(zero_copy_only=False))
                for image_id in batch.column("image_id").to_numpy()[hits].tolist():
                    if self.lookup([image_id])[0] == uri:
                        return int(image_id)
        return None

    def contains_live(self, ids):
        """A bool array: whether each id of `ids` is a live row of the index (in a delta run,
        or in a base run and not deleted). Binary searches, O(len(ids) log n)."""
        import numpy as np

        q = np.asarray(ids, dtype="int64").reshape(-1)
        found = np.zeros(len(q), dtype=bool)
        gone = np.isin(q, self.deleted) if len(self.deleted) else np.zeros(len(q), dtype=bool)
        for r, run in enumerate(self.runs):
            hit = run.contains(q)
            found |= hit if r >= self.first_live_run else (hit & ~gone)
        return found

    def live_table(self, columns=("image_id", "uri", "etag")):
        """`columns` of every live row, sorted by id, as one Arrow table (for updates' diffs,
        which read image_id and etag, and small indexes: it holds all rows)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        columns = ["image_id"] + [c for c in columns if c != "image_id"]
        parts = []
        later = pa.array([], pa.int64())
        dead = pa.array(self.deleted, pa.int64())
        for r in range(len(self.runs) - 1, -1, -1):
            t = pa.Table.from_batches(list(self.runs[r].batches()), schema=id_map_schema()).select(columns)
            drop = pc.is_in(t.column("image_id"), value_set=later)
            if r < self.first_live_run and len(dead):
                drop = pc.or_(drop, pc.is_in(t.column("image_id"), value_set=dead))
            t = t.filter(pc.invert(drop))
            parts.append(t)
            later = pa.concat_arrays([later, t.column("image_id").combine_chunks()]) if t.num_rows else later
        t = pa.concat_tables(parts) if parts else id_map_schema().empty_table().select(columns)
        return t.take(pc.sort_indices(t.column("image_id")))
