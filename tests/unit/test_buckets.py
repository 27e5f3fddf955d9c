"""buckets.py: the per-bucket diff equals diff.diff (the reference) on a mixed day; ids
from the per-bucket prefix sum are unique, contiguous and stable across runs."""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from sparse_embed.pipeline.embed import buckets, diff
from sparse_embed.pipeline.embed.listing import listing_schema

MAX_ATTEMPTS = 3


def _listing(rows: dict[str, str]):
    n = len(rows)
    return pa.table({"uri": list(rows), "etag": list(rows.values()), "size": list(range(n)),
                     "mtime": pa.array(list(range(n)), pa.timestamp("us", tz="UTC"))}, schema=listing_schema())


def _mixed_day(seed: int):
    """(listing, embeddings, errors, image_ids) with every kind of row: unchanged, new,
    modified, deleted, failed once (retried), failed MAX_ATTEMPTS times (given up), given up
    but modified since, failed before and now embedded, and the two rows a run killed
    between writing a retried object's new error row and deleting its old one leaves
    (retried again, or given up with the new row)."""
    rng = random.Random(seed)
    uris = [f"s3://b/img_{i:05d}.jpg" for i in range(3000)]
    listed, emb, err = {}, {}, []
    for u in uris:
        kind = rng.choice(["same", "new", "modified", "deleted", "retry", "gave_up", "gave_up_modified", "stale_error",
                           "killed_retry", "killed_gave_up"])
        if kind == "same":
            listed[u] = emb[u] = "e1"
        elif kind == "new":
            listed[u] = "e1"
        elif kind == "modified":
            listed[u], emb[u] = "e2", "e1"
        elif kind == "deleted":
            emb[u] = "e1"
        elif kind == "retry":
            listed[u] = "e1"
            err.append((u, "e1", 1, "r1"))
        elif kind == "gave_up":
            listed[u] = "e1"
            err.append((u, "e1", MAX_ATTEMPTS, "r1"))
        elif kind == "killed_retry":
            listed[u] = "e1"
            err += [(u, "e1", 1, "r1"), (u, "e1", MAX_ATTEMPTS - 1, "r2")]
        elif kind == "killed_gave_up":
            listed[u] = "e1"
            err += [(u, "e1", MAX_ATTEMPTS - 1, None), (u, "e1", MAX_ATTEMPTS, "r3")]
        elif kind == "gave_up_modified":
            listed[u] = "e2"
            err.append((u, "e1", MAX_ATTEMPTS, "r1"))
        else:
            listed[u] = emb[u] = "e1"
            err.append((u, "e0", 2, None))
    embedded = pa.table({"uri": list(emb), "etag": list(emb.values())})
    errors = pa.table({"uri": [e[0] for e in err], "etag": [e[1] for e in err],
                       "attempts": pa.array([e[2] for e in err], pa.int32()), "run_id": [e[3] for e in err]})
    known = [u for u in uris if rng.random() < 0.5]
    ids = pa.table({"uri": known, "image_id": pa.array(range(len(known)), pa.int64())})
    return _listing(listed), embedded, errors, ids


def _split(table, n: int):
    b = buckets.bucket_of(table.column("uri"), n)
    return [table.filter(pa.array(b == k)) for k in range(n)]


def _keys(table) -> set:
    return set(zip(table.column("uri").to_pylist(), table.column("etag").to_pylist()))


def _triples(table) -> set:
    return set(zip(*(table.column(c).to_pylist() for c in ("uri", "etag", "keep_run"))))


@pytest.mark.parametrize("n", [1, 7])
def test_bucket_diffs_equal_the_reference_diff(n):
    listing, embedded, errors, ids = _mixed_day(seed=n)
    ref = diff.diff(listing, embedded, errors, max_attempts=MAX_ATTEMPTS)
    parts = [buckets.diff_bucket(l, e, r, i, max_attempts=MAX_ATTEMPTS)
             for l, e, r, i in zip(*(_split(t, n) for t in (listing, embedded, errors, ids)))]
    todo = pa.concat_tables([p.todo for p in parts])
    assert sorted(zip(*(todo.column(c).to_pylist() for c in ("uri", "etag", "size", "attempts")))) == \
        sorted(zip(*(ref.todo.column(c).to_pylist() for c in ("uri", "etag", "size", "attempts"))))
    assert set().union(*(_keys(p.stale_embeddings) for p in parts)) == _keys(ref.stale_embeddings)
    assert set().union(*(_triples(p.clear_errors) for p in parts)) == _triples(ref.clear_errors)
    assert set().union(*(_keys(p.retried_errors) for p in parts)) == _keys(ref.retried_errors)
    summed = {k: sum(p.counts[k] for p in parts) for k in ref.counts}
    assert summed == ref.counts
    assert all(summed[k] > 0 for k in ("new", "changed", "deleted", "unchanged", "retried", "gave_up")), summed


def test_ids_are_unique_contiguous_and_stable_across_buckets_and_runs():
    listing, embedded, errors, ids = _mixed_day(seed=3)
    n = 5
    next_id = int(max(ids.column("image_id").to_pylist())) + 1

    def run(listing, ids, next_id):
        parts = [buckets.diff_bucket(l, None, None, i, max_attempts=MAX_ATTEMPTS)
                 for l, i in zip(_split(listing, n), _split(ids, n))]
        starts = buckets.id_starts(next_id, [p.new_uris for p in parts])
        done = [buckets.assign_ids(p.todo, s) for p, s in zip(parts, starts)]
        return pa.concat_tables([t for t, _ in done]), pa.concat_tables([r for _, r in done])

    todo, fresh = run(listing, ids, next_id)
    got = dict(zip(todo.column("uri").to_pylist(), todo.column("image_id").to_pylist()))
    known = dict(zip(ids.column("uri").to_pylist(), ids.column("image_id").to_pylist()))
    assert len(set(got.values())) == len(got), "ids are unique"
    assert all(got[u] == i for u, i in known.items() if u in got), "known URIs keep their id"
    assert sorted(fresh.column("image_id").to_pylist()) == list(range(next_id, next_id + fresh.num_rows))

    # next run: one more object; every earlier id stays, the new one continues after the last
    ids2 = pa.concat_tables([ids, fresh])
    more = pa.concat_tables([listing, _listing({"s3://b/zzz_new.jpg": "e1"})])
    todo2, fresh2 = run(more, ids2, next_id + fresh.num_rows)
    got2 = dict(zip(todo2.column("uri").to_pylist(), todo2.column("image_id").to_pylist()))
    assert all(got2[u] == i for u, i in got.items())
    assert fresh2.column("image_id").to_pylist() == [next_id + fresh.num_rows]


def test_uri_hash_is_the_same_however_the_array_is_cut(monkeypatch):
    uris = pa.array([f"s3://b/ü/{i}.jpg" * (1 + i % 5) for i in range(5000)] + [""])
    whole = buckets.uri_hash(uris)
    cut = pa.chunked_array([uris.slice(0, 1234), uris.slice(1234)])
    assert (buckets.uri_hash(cut) == whole).all()
    assert (buckets.uri_hash(uris.slice(100, 50)) == whole[100:150]).all()
    monkeypatch.setattr(buckets, "_CHUNK_BYTES", 100)  # many numpy passes
    assert (buckets.uri_hash(uris) == whole).all()
    assert len(set(whole.tolist())) == len(uris)
    counts = [int((buckets.bucket_of(uris, 8) == k).sum()) for k in range(8)]
    assert min(counts) > len(uris) / 8 * 0.8, counts


def test_a_killed_retry_counts_its_highest_attempts_and_keeps_one_row_when_given_up():
    """The rows a run killed after its embed stage wrote new error rows and before it deleted
    the old ones: the highest attempts decide; a retried key's rows are deleted after the
    next embed stage, a given-up key keeps only its newest row."""
    listing = _listing({"s3://b/a.jpg": "e1", "s3://b/b.jpg": "e1"})
    errors = pa.table({"uri": ["s3://b/a.jpg", "s3://b/a.jpg", "s3://b/b.jpg", "s3://b/b.jpg"],
                       "etag": ["e1"] * 4, "attempts": pa.array([1, 2, 2, 3], pa.int32()),
                       "run_id": ["r1", "r2", "r1", "r2"]})
    for d in (diff.diff(listing, None, errors, max_attempts=3),
              buckets.diff_bucket(listing, None, errors, None, max_attempts=3)):
        assert list(zip(d.todo.column("uri").to_pylist(), d.todo.column("attempts").to_pylist())) == [("s3://b/a.jpg", 2)]
        assert _keys(d.retried_errors) == {("s3://b/a.jpg", "e1")}
        assert _triples(d.clear_errors) == {("s3://b/b.jpg", "e1", "r2")}
        assert d.counts["gave_up"] == 1 and d.counts["retried"] == 1
