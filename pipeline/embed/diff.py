"""The incremental diff of a listing against the tables, on (uri, etag): the reference.

The job diffs per hash(uri) bucket in Ray tasks (buckets.diff_bucket, todo.py); this
whole-table version, with a Python object per row, states the rules and is what the
bucketed diff is tested against (tests/unit/test_buckets.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Diff:
    todo: object  # listing rows to fetch and embed, with `attempts` (earlier failures at this etag)
    stale_embeddings: object  # (uri, etag) rows to delete: changed or deleted objects
    clear_errors: object  # (uri, etag) error rows to delete: retried, embedded, changed or deleted
    counts: dict


def diff(listed, embedded, errors, *, max_attempts: int) -> Diff:
    """listed: (uri, etag, size, mtime); embedded: (uri, etag) or None; errors:
    (uri, etag, attempts) or None. An object failed `max_attempts` times at its current
    etag is not retried (its error row stays) until its etag changes."""
    import pyarrow as pa

    keys = pa.schema([("uri", pa.string()), ("etag", pa.string())])
    current = dict(zip(listed.column("uri").to_pylist(), listed.column("etag").to_pylist()))
    emb = dict(zip(embedded.column("uri").to_pylist(), embedded.column("etag").to_pylist())) if embedded is not None else {}
    err_rows = list(zip(*(errors.column(c).to_pylist() for c in ("uri", "etag", "attempts")))) if errors is not None else []
    done = {u for u, e in emb.items() if current.get(u) == e}
    stale = [(u, e) for u, e in emb.items() if current.get(u) != e]
    attempts = {u: (a or 0) for u, e, a in err_rows if current.get(u) == e}
    gave_up = {u for u, a in attempts.items() if a >= max_attempts and u not in done}
    todo_uris = [u for u in current if u not in done and u not in gave_up]
    todo_set = set(todo_uris)
    clear = [(u, e) for u, e, _ in err_rows if u in todo_set or u in done or current.get(u) != e]
    failed_before = {u for u, _, _ in err_rows}
    mask = pa.array([u in todo_set for u in listed.column("uri").to_pylist()], pa.bool_())
    todo = listed.filter(mask)
    todo = todo.append_column("attempts", pa.array([attempts.get(u, 0) for u in todo.column("uri").to_pylist()], pa.int32()))
    counts = {
        "listed": listed.num_rows,
        "new": len(todo_set - set(emb) - failed_before),
        "changed": len(todo_set & set(emb)),
        "deleted": len(set(emb) - set(current)),
        "unchanged": len(done),
        "retried": len((todo_set - set(emb)) & failed_before),
        "gave_up": len(gave_up),
    }
    as_table = lambda rows: pa.table({"uri": [r[0] for r in rows], "etag": [r[1] for r in rows]}, schema=keys)  # noqa: E731
    return Diff(todo, as_table(stale), as_table(clear), counts)
