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
    clear_errors: object  # (uri, etag, keep_run): error rows to delete now (keep_run null: all rows of
    # the key: embedded, changed or deleted objects; else: a given-up key's rows other than keep_run's)
    retried_errors: object  # (uri, etag): error rows of the objects retried now, deleted after the embed stage
    counts: dict


def diff(listed, embedded, errors, *, max_attempts: int) -> Diff:
    """listed: (uri, etag, size, mtime); embedded: (uri, etag) or None; errors:
    (uri, etag, attempts, and run_id if known) or None. An object failed `max_attempts`
    times at its current etag is not retried (its error row stays) until its etag changes.

    A key may have several error rows: a run killed after its embed stage wrote a retried
    object's new row and before it deleted the old one. The highest attempts count, and
    the given-up keys keep only the row that holds it."""
    import pyarrow as pa

    keys = pa.schema([("uri", pa.string()), ("etag", pa.string())])
    current = dict(zip(listed.column("uri").to_pylist(), listed.column("etag").to_pylist()))
    emb = dict(zip(embedded.column("uri").to_pylist(), embedded.column("etag").to_pylist())) if embedded is not None else {}
    err_rows = list(zip(*(errors.column(c).to_pylist() for c in ("uri", "etag", "attempts")),
                        errors.column("run_id").to_pylist() if "run_id" in errors.column_names else [None] * errors.num_rows)
                    ) if errors is not None else []
    done = {u for u, e in emb.items() if current.get(u) == e}
    stale = [(u, e) for u, e in emb.items() if current.get(u) != e]
    attempts, best_run, rows_of = {}, {}, {}
    for u, e, a, r in err_rows:
        if current.get(u) == e:
            rows_of[u] = rows_of.get(u, 0) + 1
            if u not in attempts or (a or 0) > attempts[u]:
                attempts[u], best_run[u] = a or 0, r
    gave_up = {u for u, a in attempts.items() if a >= max_attempts and u not in done}
    todo_uris = [u for u in current if u not in done and u not in gave_up]
    todo_set = set(todo_uris)
    retried = sorted({(u, e) for u, e, _, _ in err_rows if u in todo_set and current.get(u) == e})
    clear = sorted({(u, e, None) for u, e, _, _ in err_rows if u in done or current.get(u) != e}
                   | {(u, current[u], best_run[u]) for u in gave_up if rows_of[u] > 1 and best_run[u] is not None})
    failed_before = {u for u, _, _, _ in err_rows}
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
    clear_t = pa.table({"uri": [r[0] for r in clear], "etag": [r[1] for r in clear],
                        "keep_run": [r[2] for r in clear]}, schema=keys.append(pa.field("keep_run", pa.string())))
    return Diff(todo, as_table(stale), clear_t, as_table(retried), counts)
