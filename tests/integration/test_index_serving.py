"""Serving: shards streamed into the cache and opened memory-mapped give the results a loaded
index gives; updates write only a delta shard and a deletion set, and still equal a rebuild;
a long-lived searcher picks up a new CURRENT."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pyarrow as pa
import pytest

from sparse_embed.pipeline.index import searcher
from sparse_embed.pipeline.index.build import BuildConfig, build_index
from sparse_embed.pipeline.index.searcher import ShardedIndex, current_index_id
from sparse_embed.pipeline.serve.live_index import LiveIndex
from sparse_embed.pipeline.index.update import UpdateConfig, update_index
from sparse_embed.pipeline.store import live, storage, tables
from sparse_embed.pipeline.store.vacuum import vacuum_table

from helpers import remove_ids, unit_vectors, write_table


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(searcher, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


@pytest.mark.integration
def test_memory_mapped_search_equals_loaded_search(ray_local, bucket, cache):
    d, n = 32, 3000
    table, root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index"
    write_table(table, unit_vectors(n, d, seed=21), np.arange(n, dtype="int64") * 7, files=3)
    m = build_index(BuildConfig(table, root, shards=2, memory_budget="150KB", target_recall=0.5))
    assert m["factory"] == "IVF64,SQ8" and m["id_maps"]

    mapped, loaded = ShardedIndex.open(root), ShardedIndex.open(root, mmap=False)
    cached = sorted(p.name for p in (searcher.cache_root(root) / m["index_id"]).iterdir())
    assert [s["file"] for s in m["shards"]][0] in cached and all(e["file"] in cached for e in m["id_maps"])
    for nprobe in (1, 8, 64):
        mapped.set_search_params({"nprobe": nprobe})
        loaded.set_search_params({"nprobe": nprobe})
        queries = unit_vectors(40, d, seed=22)
        got, want = mapped.search_vectors(queries, 10), loaded.search_vectors(queries, 10)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert mapped.uri_of(7 * 1234) == "s3://b/img_8638.jpg" and mapped.uri_of(5) is None
    hits = mapped.hits(unit_vectors(1, d, seed=23), 3)[0]
    assert [h.uri for h in hits] == [f"s3://b/img_{h.image_id}.jpg" for h in hits]


@pytest.mark.integration
def test_updates_write_a_delta_and_a_deletion_set_and_equal_a_rebuild(ray_local, bucket, cache):
    d = 16
    table, root, ref_root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index", f"{bucket}/emb/ref"
    write_table(table, unit_vectors(2000, d, seed=31), np.arange(2000, dtype="int64"), files=3)
    first = build_index(BuildConfig(table, root, shards=2))
    write_table(table, unit_vectors(100, d, seed=32), np.arange(5000, 5100, dtype="int64"), files=1)
    tables.delete_matching(table, pa.table({"image_id": pa.array(np.arange(0, 100, 2), pa.int64())}), on=("image_id",))
    one = update_index(UpdateConfig(table, root))
    assert one["update"]["truth"] == "from the changes"  # the build recorded its self queries' ground truth
    # what changed comes from the files that differ between the versions (the log): the file the
    # merge-delete replaced, its rewrite (whose kept rows cancel out) and the one appended
    assert one["update"]["added_rows"] == {"read_from": "log", "files_read": 3}

    # Second update: remove ids from the delta (5000..) and from the base, change a base row, add rows.
    tables.delete_matching(table, pa.table({"image_id": pa.array([5001, 5003, 7, 9, 11], pa.int64())}), on=("image_id",))
    tables.delete_matching(table, pa.table({"image_id": pa.array([13], pa.int64())}), on=("image_id",))
    write_table(table, unit_vectors(1, d, seed=33), np.array([13], dtype="int64"), files=1, etag="e2")
    write_table(table, unit_vectors(30, d, seed=34), np.arange(6000, 6030, dtype="int64"), files=1)
    two = update_index(UpdateConfig(table, root))
    assert two["update"] == dict(two["update"], parent=one["index_id"], removed=6, added=31, truth="from the changes")
    assert two["update"]["added_rows"]["read_from"] == "log"
    assert two["deleted"]["count"] == 50 + 4 and [s["file"] for s in two["shards"] if s.get("delta")] == ["delta.faiss"]
    assert {s["index_id"] for s in two["shards"] if not s.get("delta")} == {first["index_id"]}
    written = sorted(p.rsplit("/", 1)[-1] for p in storage.filesystem(root).ls(storage.strip_scheme(f"{root}/{two['index_id']}")))
    assert written == ["deleted.npy", "delta.faiss", "idmap_delta.arrow", "manifest.json", "truth.npz"]  # no base shard

    updated = ShardedIndex.open(root)
    table_ids = np.sort(live.read_live(table, ["image_id"]).column("image_id").to_numpy())
    assert updated.ntotal == two["ntotal"] == len(table_ids) and two["recall_at_10"] == 1.0
    np.testing.assert_array_equal(updated.live_ids(), table_ids)
    rebuilt = ShardedIndex.open(ref_root, index_id=build_index(BuildConfig(table, ref_root, shards=2))["index_id"])
    queries = np.concatenate([unit_vectors(40, d, seed=35), unit_vectors(1, d, seed=33)])  # the last: changed row 13
    got, want = updated.search_vectors(queries, 10), rebuilt.search_vectors(queries, 10)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)
    assert got[0][-1][0] == 13 and got[1][-1][0] > 0.999
    assert updated.uri_of(5001) is None and updated.uri_of(7) is None and updated.uri_of(6001) == "s3://b/img_6001.jpg"

    churned = update_index(UpdateConfig(table, root, force_rebuild=False, delta_max_fraction=0.01, version=None))
    assert churned["index_id"] == two["index_id"]  # the table did not change: nothing to do
    write_table(table, unit_vectors(5, d, seed=36), np.arange(7000, 7005, dtype="int64"), files=1)
    rebuilt_by_churn = update_index(UpdateConfig(table, root, delta_max_fraction=0.01))
    assert "delta shard" in rebuilt_by_churn["build"]["rebuild_reason"] and "delta" not in str(rebuilt_by_churn["shards"])


@pytest.mark.integration
def test_a_long_lived_searcher_picks_up_a_new_current(ray_local, bucket, cache, monkeypatch):
    d = 16
    table, root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index"
    write_table(table, unit_vectors(500, d, seed=41), np.arange(500, dtype="int64"), files=2)
    first = build_index(BuildConfig(table, root, shards=1))
    now = [0.0]
    holder = LiveIndex(root, check_every_s=60, clock=lambda: now[0])  # the server's reloader (serve)
    current = lambda: asyncio.run(holder.current()).index  # noqa: E731
    held = holder.load().index
    assert held.manifest["index_id"] == first["index_id"]

    new_row = unit_vectors(1, d, seed=42)
    write_table(table, new_row, np.array([900], dtype="int64"), files=1)
    second = update_index(UpdateConfig(table, root))
    assert current_index_id(root) == second["index_id"] != first["index_id"]
    now[0] = 59.0
    assert current() is held  # not checked yet: at most one read of CURRENT a minute
    now[0] = 61.0
    fresh = current()
    assert fresh.manifest["index_id"] == second["index_id"]
    assert fresh.search_vectors(new_row, 1)[0][0][0] == 900 and held.search_vectors(new_row, 1)[0][0][0] != 900
    assert current() is fresh

    storage.write_bytes_atomic(f"{root}/CURRENT", b"no-such-index")  # a broken pointer: keep serving
    now[0] = 200.0
    assert current() is fresh and "no-such-index" in holder.reload_error

    # Each swap removes the cached index ids that neither the new nor the old index uses.
    # The update's base shard lives in the first build's folder, so that one stays too.
    monkeypatch.setattr(searcher, "CACHE_KEEP_S", 0.0)
    cached = lambda: {d.name for d in searcher.cache_root(root).iterdir()}  # noqa: E731
    assert cached() == {first["index_id"], second["index_id"]}
    rebuilds = []
    for t in (300.0, 400.0):
        rebuilds.append(build_index(BuildConfig(table, root, shards=1)))
        now[0] = t
        assert current().manifest["index_id"] == rebuilds[-1]["index_id"]
    assert cached() == {r["index_id"] for r in rebuilds}, "the first build and the update are no longer served"
    assert held.search_vectors(new_row, 1)[0][0][0] != 900, "an index still held keeps reading its mapped files"


@pytest.mark.integration
def test_search_by_id_and_uri_survive_a_vacuum_of_the_indexed_table_version(ray_local, bucket, cache):
    """An index of table v1; then rows changed and deleted (copy-on-write rewrites) and the
    table vacuumed with no retention, so v1 can no longer be read. The index still finds an
    unchanged row's vector (it is read from the current table, where its etag is the one
    the index holds) and any indexed URI's id; a row changed since is refused in words. The
    index update, which reads the files that differ between the versions, falls back to
    diffing the whole table, and the manifest says so."""
    d = 16
    table, root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index"
    vectors = unit_vectors(300, d, seed=41)
    write_table(table, vectors, np.arange(300, dtype="int64"), files=3)
    build_index(BuildConfig(table, root, shards=1))
    index = ShardedIndex.open(root)
    remove_ids(table, [5, 150, 299], tag="night-1")  # one row from each file: all three rewritten
    write_table(table, unit_vectors(1, d, seed=42), np.array([150], dtype="int64"), files=1, etag="e2")  # changed
    assert vacuum_table(table, cutoff=time.time())["files"] >= 3
    with pytest.raises(OSError, match=r"(?i)not exist|not found|no such"):  # the indexed version's files are gone
        live.read_live(table, ["image_id"], version=index.manifest["table_version"])

    got, uris = index.vectors_for_ids([7, 298])
    np.testing.assert_allclose(got, vectors[[7, 298]], atol=1e-6)
    assert uris == ["s3://b/img_7.jpg", "s3://b/img_298.jpg"]
    assert index.image_id_of_uri("s3://b/img_298.jpg") == 298 and index.image_id_of_uri("s3://b/nope.jpg") is None
    assert index.hits(got[:1], 1)[0][0].image_id == 7
    with pytest.raises(ValueError, match=r"changed or deleted since .* vacuumed"):
        index.vectors_for_ids([150])

    # The update cannot read the removed files the log names: it diffs the whole table instead.
    updated = update_index(UpdateConfig(table, root))
    assert updated["update"]["added_rows"]["read_from"] != "log", updated["update"]
    assert (updated["update"]["removed"], updated["update"]["added"]) == (3, 1)
    now = ShardedIndex.open(root)
    assert now.ntotal == live.read_live(table, ["image_id"]).num_rows == 298
    np.testing.assert_allclose(now.vectors_for_ids([150])[0], unit_vectors(1, d, seed=42), atol=1e-6)
