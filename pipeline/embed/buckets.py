"""The incremental diff and id assignment of one hash(uri) bucket, with Arrow joins (pure).

Every row of the listing, embeddings, errors and image_ids tables falls in bucket
`bucket_of(uri) % n`, so a bucket's diff needs only that bucket's rows of each table; the
buckets are diffed by Ray tasks (todo.py). `diff_bucket` gives the same rows as
diff.diff (the reference, tested side by side), without a Python object per row.

Ids: each bucket's new URIs (sorted) get a contiguous block of ids starting at its entry
of `id_starts`: a prefix sum of the buckets' counts after the largest id ever given, so
ids stay unique across buckets and are never reused.
"""
from __future__ import annotations

from dataclasses import dataclass

BUCKET_ROWS = 2_000_000  # listing rows per bucket: a task joins ~2M rows of each table (~0.5 GiB of Arrow)
_PRIME = 0x100000001B3  # FNV-1a 64's prime, used here as a polynomial base
_CHUNK_BYTES = 1 << 24  # uris hashed per numpy pass: bounds the uint64 temporaries to ~256 MiB


def n_buckets(rows: int) -> int:
    return max(1, -(-rows // BUCKET_ROWS))


def uri_hash(uris):
    """A 64-bit hash of each string of `uris` (an Arrow string array), the same in every
    process: sum(byte_i * P^i) mod 2^64, then splitmix64's finaliser. Vectorised over the
    array's data buffer (numpy), no Python object per row."""
    import numpy as np
    import pyarrow as pa

    arr = pa.chunked_array([uris]) if isinstance(uris, pa.Array) else uris
    out = []
    for chunk in arr.cast(pa.large_string()).chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int64)[chunk.offset: chunk.offset + len(chunk) + 1]
        start = 0
        while start < len(chunk):  # rows whose bytes fit one pass (at least one row)
            fits = int(np.searchsorted(offsets, offsets[start] + _CHUNK_BYTES, "right")) - 1
            stop = max(start + 1, min(len(chunk), fits))
            out.append(_hash_rows(chunk.buffers()[2], offsets[start: stop + 1]))
            start = stop
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def _hash_rows(data, offsets):
    import numpy as np

    lo, hi = int(offsets[0]), int(offsets[-1])
    lengths = np.diff(offsets)
    raw = np.frombuffer(data, np.uint8, count=hi - lo, offset=lo).astype(np.uint64) if hi > lo else np.zeros(0, np.uint64)
    longest = int(lengths.max()) if len(lengths) else 0
    with np.errstate(over="ignore"):
        powers = np.ones(max(longest, 1), np.uint64)  # P^0, P^1, ... (mod 2^64)
        powers[1:] = np.cumprod(np.full(len(powers) - 1, _PRIME, np.uint64))
        pos = np.arange(hi - lo, dtype=np.int64) - np.repeat(offsets[:-1] - lo, lengths)
        terms = raw * powers[pos]
        h = np.zeros(len(lengths), np.uint64)
        nonempty = lengths > 0
        if nonempty.any():
            h[nonempty] = np.add.reduceat(terms, (offsets[:-1] - lo)[nonempty])
        h += lengths.astype(np.uint64)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def bucket_of(uris, n: int):
    """Bucket (0 .. n-1) of each uri, as int32 numpy."""
    import numpy as np

    return (uri_hash(uris) % np.uint64(n)).astype(np.int32)


@dataclass
class BucketDiff:
    todo: object  # listing rows to embed + attempts + image_id (null for URIs without one yet)
    stale_embeddings: object  # (uri, etag) and the embedded rows' other columns (image_id, run_id where given)
    clear_errors: object  # (uri, etag, keep_run): error rows to delete now (diff.Diff)
    retried_errors: object  # (uri, etag): error rows of retried objects, deleted after the embed stage
    new_uris: int  # todo rows without an image_id
    counts: dict


def diff_bucket(listed, embedded, errors, ids, *, max_attempts: int) -> BucketDiff:
    """listed: (uri, etag, size, mtime); embedded: (uri, etag, and any other columns, which
    the stale rows keep); errors: (uri, etag, attempts, run_id if known); ids: (uri,
    image_id); any but `listed` may be None. The rules of diff.diff."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = pa.schema([("uri", pa.string()), ("etag", pa.string())])
    embedded_rows = embedded if embedded is not None else keys.empty_table()
    embedded = embedded_rows.select(["uri", "etag"])
    errors = _error_rows(errors)
    cur = listed.select(["uri", "etag"])
    done = cur.join(embedded, ["uri", "etag"], join_type="inner")
    stale = embedded_rows.join(cur, ["uri", "etag"], join_type="left anti")
    at_rows = errors.join(cur, ["uri", "etag"], join_type="inner")  # failures at the current etag
    at_etag = at_rows.group_by(["uri", "etag"]).aggregate([("attempts", "max"), ("attempts", "count")])
    at_etag = at_etag.rename_columns([{"attempts_max": "attempts", "attempts_count": "rows"}.get(c, c)
                                      for c in at_etag.column_names]).select(["uri", "etag", "attempts", "rows"])
    over = at_etag.filter(pc.greater_equal(at_etag.column("attempts"), max_attempts))
    gave_up = over.join(done, ["uri", "etag"], join_type="left anti")
    todo = (listed.join(done.select(["uri"]), "uri", join_type="left anti")
            .join(gave_up.select(["uri"]), "uri", join_type="left anti"))
    todo = todo.join(at_etag.select(["uri", "attempts"]), "uri", join_type="left outer")
    todo = todo.set_column(todo.column_names.index("attempts"), "attempts",
                           pc.fill_null(todo.column("attempts"), 0).cast(pa.int32()))
    id_rows = ids.select(["uri", "image_id"]) if ids is not None else pa.table(
        {"uri": pa.array([], pa.string()), "image_id": pa.array([], pa.int64())})
    todo = todo.join(id_rows, "uri", join_type="left outer").sort_by("uri")
    todo = todo.select(["image_id", "uri", "etag", "size", "mtime", "attempts"])
    retried = at_etag.select(["uri", "etag"]).join(todo.select(["uri"]), "uri", join_type="left semi")
    clear = (errors.select(["uri", "etag"]).group_by(["uri", "etag"]).aggregate([])
             .join(gave_up.select(["uri", "etag"]), ["uri", "etag"], join_type="left anti")
             .join(retried, ["uri", "etag"], join_type="left anti"))
    clear = clear.append_column("keep_run", pa.nulls(clear.num_rows, pa.string()))
    clear = pa.concat_tables([clear.cast(_clear_schema()), _duplicates_of(gave_up, at_rows).cast(_clear_schema())])

    emb_uris = embedded.select(["uri"])
    failed_uris = errors.select(["uri"]).group_by("uri").aggregate([])
    todo_uris = todo.select(["uri"])
    was_embedded = todo_uris.join(emb_uris.group_by("uri").aggregate([]), "uri", join_type="left semi")
    fresh = todo_uris.join(emb_uris, "uri", join_type="left anti")
    counts = {
        "listed": listed.num_rows,
        "new": fresh.join(failed_uris, "uri", join_type="left anti").num_rows,
        "changed": was_embedded.num_rows,
        "deleted": emb_uris.join(cur.select(["uri"]), "uri", join_type="left anti").num_rows,
        "unchanged": done.num_rows,
        "retried": fresh.join(failed_uris, "uri", join_type="left semi").num_rows,
        "gave_up": gave_up.num_rows,
    }
    return BucketDiff(todo, stale, clear.sort_by([("uri", "ascending"), ("etag", "ascending")]),
                      retried.cast(keys).sort_by("uri"),
                      int(pc.sum(pc.is_null(todo.column("image_id"))).as_py() or 0), counts)


def _clear_schema():
    import pyarrow as pa

    return pa.schema([("uri", pa.string()), ("etag", pa.string()), ("keep_run", pa.string())])


def _error_rows(errors):
    """(uri, etag, attempts, run_id) of the error rows, attempts null -> 0; an empty table for None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if errors is None:
        return pa.table({"uri": pa.array([], pa.string()), "etag": pa.array([], pa.string()),
                         "attempts": pa.array([], pa.int32()), "run_id": pa.array([], pa.string())})
    run = errors.column("run_id") if "run_id" in errors.column_names else pa.nulls(errors.num_rows, pa.string())
    return pa.table({"uri": errors.column("uri"), "etag": errors.column("etag"),
                     "attempts": pc.fill_null(errors.column("attempts"), 0).cast(pa.int32()), "run_id": run})


def _duplicates_of(gave_up, at_rows):
    """(uri, etag, keep_run) for each given-up key with several error rows: keep_run is the
    run of a row with the highest attempts (none when that row has no run_id)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dup = gave_up.filter(pc.greater(gave_up.column("rows"), 1)).select(["uri", "etag", "attempts"])
    best = at_rows.join(dup, ["uri", "etag", "attempts"], join_type="inner")
    best = best.filter(pc.is_valid(best.column("run_id"))).group_by(["uri", "etag"]).aggregate([("run_id", "max")])
    return pa.table({"uri": best.column("uri"), "etag": best.column("etag"), "keep_run": best.column("run_id_max")})


def id_starts(next_id: int, new_per_bucket: list[int]) -> list[int]:
    """The first id of each bucket's block: a prefix sum starting at `next_id`."""
    starts, at = [], next_id
    for n in new_per_bucket:
        starts.append(at)
        at += n
    return starts


def assign_ids(todo, start: int):
    """`todo` with its null image_ids filled with start, start+1, ... in uri order; returns
    (todo, the new (uri, image_id) rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    todo = todo.sort_by("uri")
    missing = pc.is_null(todo.column("image_id"))
    n = int(pc.sum(missing).as_py() or 0)
    fresh = pa.array(np.arange(start, start + n, dtype=np.int64))
    new_rows = pa.table({"uri": todo.column("uri").filter(missing), "image_id": fresh})
    filled = pc.fill_null(todo.column("image_id"), 0).to_numpy().astype(np.int64)
    filled[missing.to_numpy(zero_copy_only=False)] = np.arange(start, start + n, dtype=np.int64)
    return todo.set_column(0, "image_id", pa.array(filled, pa.int64())), new_rows
