"""Incremental updates: add/remove/replace give the results a rebuild gives; growth past
the threshold rebuilds; an update of an unchanged table is a no-op."""
from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest

from sparse_embed.pipeline.store import live, storage, tables
from sparse_embed.pipeline.index.build import BuildConfig, build_index
from sparse_embed.pipeline.index.snapshot import vectors_of
from sparse_embed.pipeline.index.update import UpdateConfig, diff_ids, update_index
from sparse_embed.pipeline.index.searcher import ShardedIndex, current_index_id

from helpers import remove_ids, unit_vectors, write_table


def test_diff_ids_counts_changes_as_remove_plus_add():
    removed, added = diff_ids(np.array([1, 2, 3, 4]), ["a", "b", "c", "d"], np.array([2, 3, 4, 5]), ["b", "X", "d", "e"])
    assert removed.tolist() == [1, 3] and added.tolist() == [3, 5]


def _mutate(table, d, seed):
    """Append 300 new rows (ids 5000+), delete 200, change 100 (same id, new etag and vector)."""
    write_table(table, unit_vectors(300, d, seed=seed), np.arange(5000, 5300, dtype="int64"), files=1)
    tables.delete_matching(table, pa.table({"image_id": pa.array(np.arange(0, 400, 2), pa.int64())}), on=("image_id",))
    changed = np.arange(1001, 1201, 2, dtype="int64")
    tables.delete_matching(table, pa.table({"image_id": pa.array(changed, pa.int64())}), on=("image_id",))
    write_table(table, unit_vectors(100, d, seed=seed + 1), changed, files=1, etag="e2")
    return changed


def _table_ids(table):
    return np.sort(live.read_live(table, ["image_id"]).column("image_id").to_numpy())


@pytest.mark.integration
def test_flat_update_equals_a_rebuild_then_growth_rebuilds(ray_local, bucket):
    d = 16
    table, root, ref_root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index", f"{bucket}/emb/ref"
    write_table(table, unit_vectors(1500, d, seed=1), np.arange(1500, dtype="int64"), files=3)
    first = build_index(BuildConfig(table, root, shards=2))
    _mutate(table, d, seed=2)

    m = update_index(UpdateConfig(table, root))
    assert m["update"] == dict(m["update"], parent=first["index_id"], removed=300, added=400)
    assert "rebuild_reason" not in m["build"] and current_index_id(root) == m["index_id"] != first["index_id"]
    assert m["ntotal"] == 1600 and m["table_version"] == tables.version_of(table) and m["recall_at_10"] == 1.0
    updated = _assert_searches_like_a_rebuild(root, table, ref_root, d)
    np.testing.assert_array_equal(updated.live_ids(), _table_ids(table))
    assert updated.uri_of(1001) == "s3://b/img_1001.jpg"

    from sparse_embed.jobs.cli import main

    assert main(["index", "update", "--table", table, "--out", root]) == 0  # unchanged table: nothing to do
    assert current_index_id(root) == m["index_id"]
    write_table(table, unit_vectors(1000, d, seed=3), np.arange(6000, 7000, dtype="int64"), files=1)  # 2600 > 1.5 x 1500
    grown = update_index(UpdateConfig(table, root))
    assert "grew" in grown["build"]["rebuild_reason"] and grown["ntotal"] == 2600
    assert current_index_id(root) == grown["index_id"]


@pytest.mark.integration
def test_ivf_update_equals_adding_the_new_table_to_the_same_trained_index(ray_local, bucket):
    d, n = 32, 3000
    table, root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index"
    write_table(table, unit_vectors(n, d, seed=11), np.arange(n, dtype="int64"), files=3)
    first = build_index(BuildConfig(table, root, shards=2, memory_budget="150KB", target_recall=0.5))
    assert first["factory"] == "IVF64,SQ8" and first["shards"][0]["file"] == "index.faiss"
    _mutate(table, d, seed=12)

    m = update_index(UpdateConfig(table, root, target_recall=0.5))
    assert m["update"]["removed"] == 300 and m["update"]["added"] == 400 and m["factory"] == first["factory"]
    updated = ShardedIndex.open(root)
    updated.set_search_params({"nprobe": 64})  # exhaustive: compares codes, not probing luck

    trained = storage.read_bytes(f"{root}/{m['trained_index_id']}/trained.faiss")  # the build's: updates keep it
    ref = faiss.deserialize_index(np.frombuffer(trained, dtype="uint8"))
    t = live.read_live(table, ["image_id", "embedding"])
    ref.add_with_ids(vectors_of(t.column("embedding")), t.column("image_id").to_numpy())
    faiss.ParameterSpace().set_index_parameter(ref, "nprobe", 64)
    queries = unit_vectors(50, d, seed=19)
    want_scores, want_ids = ref.search(queries, 10)
    got_ids, got_scores = updated.search_vectors(queries, 10)
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-5)  # same codes: same scores
    for g, w in zip(got_ids, want_ids):  # ids equal up to the order of exactly tied scores
        assert set(g) == set(w)


def _mutate_like_a_nightly(table, d, seed, run_id):
    """What a nightly commits: 200 deleted and 100 changed rows removed (one commit, the
    table's mechanism), then 300 new rows (ids 5000+) and the changed ones again (one
    append each)."""
    changed = np.arange(1001, 1201, 2, dtype="int64")
    gone = np.concatenate([np.arange(0, 400, 2, dtype="int64"), changed])
    assert remove_ids(table, gone, run_id).rows == 300
    write_table(table, unit_vectors(300, d, seed=seed), np.arange(5000, 5300, dtype="int64"), files=1, run_id=run_id)
    write_table(table, unit_vectors(100, d, seed=seed + 1), changed, files=1, etag="e2", run_id=run_id)


@pytest.mark.integration
@pytest.mark.parametrize("mechanism", ["copy-on-write", "deletion-vectors"])
def test_an_update_after_removals_reads_only_the_changed_files_and_equals_a_rebuild(ray_local, bucket, mechanism):
    from sparse_embed.pipeline.store import delta_log, removal

    d = 16
    table, root, ref_root = f"{bucket}/emb-{mechanism}/embeddings", f"{bucket}/emb-{mechanism}/index", f"{bucket}/emb-{mechanism}/ref"
    tables.ensure_table(table, tables.embeddings_schema(d))
    if mechanism == "deletion-vectors":
        delta_log.enable_deletion_vectors(table)
    write_table(table, unit_vectors(1500, d, seed=1), np.arange(1500, dtype="int64"), files=3)
    build_index(BuildConfig(table, root, shards=2))
    _mutate_like_a_nightly(table, d, seed=2, run_id="n1")

    m = update_index(UpdateConfig(table, root))
    # the two files that lost rows, their rewrites (copy-on-write only) and the two appends
    files_read = 6 if mechanism == "copy-on-write" else 4
    assert m["update"]["added_rows"] == {"read_from": "log", "files_read": files_read}
    assert (m["update"]["removed"], m["update"]["added"], m["ntotal"]) == (300, 400, 1600)
    updated = _assert_searches_like_a_rebuild(root, table, ref_root, d)
    np.testing.assert_array_equal(updated.live_ids(), _table_ids(table))
    assert updated.uri_of(1001) == "s3://b/img_1001.jpg" and updated.uri_of(0) is None

    # A second night changes rows the first update put in the delta shard; then a
    # compaction sits between two versions: the log still decides.
    again = np.array([5000, 5001, 1001], dtype="int64")
    remove_ids(table, again, "n2")
    compacted = removal.compact(table, fraction=0.0)
    assert compacted.files_rewritten == (0 if mechanism == "copy-on-write" else 4)
    write_table(table, unit_vectors(3, d, seed=5), again, files=1, etag="e3", run_id="n2")
    m2 = update_index(UpdateConfig(table, root, delta_max_fraction=1.0))  # 700 delta + deleted rows of 1500: no rebuild
    assert m2["update"]["added_rows"]["read_from"] == "log" and m2["ntotal"] == 1600
    assert (m2["update"]["removed"], m2["update"]["added"]) == (3, 3)
    _assert_searches_like_a_rebuild(root, table, ref_root, d)


def _assert_searches_like_a_rebuild(root, table, ref_root, d):
    """The current index at `root` finds what a flat rebuild of the table's latest version
    finds, ids and scores; returns the opened index."""
    updated = ShardedIndex.open(root)
    rebuilt = ShardedIndex.open(ref_root, index_id=build_index(BuildConfig(table, ref_root, shards=2))["index_id"])
    queries = unit_vectors(50, d, seed=9)
    got_ids, got_scores = updated.search_vectors(queries, 10)
    want_ids, want_scores = rebuilt.search_vectors(queries, 10)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-6)
    return updated
