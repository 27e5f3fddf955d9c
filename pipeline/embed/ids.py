"""image_id assignment: stable per URI within an output prefix, never reused, never a hash.

New URIs get max(existing id) + 1, ... in URI order, committed to <out>/image_ids in
one append before any embedding is written, so a crash after it only leaves ids that
the next run reuses.
"""
from __future__ import annotations

from sparse_embed.pipeline.store import tables


def next_ids(known: dict[str, int], uris: list[str]) -> dict[str, int]:
    """Ids for `uris` not in `known`, continuing after the largest known id (pure)."""
    start = max(known.values(), default=-1) + 1
    fresh = sorted(u for u in set(uris) if u not in known)
    return {u: start + i for i, u in enumerate(fresh)}


def attach_image_ids(todo, out: str, *, run_id: str):
    """`todo` (listing rows) with an image_id column, allocating ids for unseen URIs."""
    import pyarrow as pa

    uri = tables.table_uri(out, tables.IMAGE_IDS)
    existing = tables.read_columns(uri, ["uri", "image_id"])
    known = dict(zip(existing.column("uri").to_pylist(), existing.column("image_id").to_pylist())) if existing is not None else {}
    uris = todo.column("uri").to_pylist()
    fresh = next_ids(known, uris)
    if fresh:
        rows = pa.table({"uri": list(fresh), "image_id": list(fresh.values()), "run_id": [run_id] * len(fresh)})
        tables.append(uri, rows, tables.image_ids_schema())
        known.update(fresh)
    return todo.add_column(0, "image_id", pa.array([known[u] for u in uris], pa.int64()))
