"""The sharded exact index returns exactly what one flat index returns, and CURRENT only
ever points at a complete index."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from helpers import unit_vectors, write_table
from sparse_embed.pipeline.store import storage, tables
from sparse_embed.pipeline.index.build import BuildConfig, build_index, plan_shards
from sparse_embed.pipeline.index.tune import merge_topk, recall_at_k
from sparse_embed.pipeline.index.searcher import ShardedIndex, current_index_id


def test_plan_shards_balances_bytes_and_keeps_every_file():
    """Greedy, largest file first onto the least-loaded shard. Files of 1..10 bytes (listed
    smallest first) over 3 shards: 10,9,8 open the shards; 7 joins 8 (15), 6 joins 9 (15),
    5 joins 10 (15); then 4 -> 19, 3 -> 18, 2 -> 17, 1 -> 18. The max load 19 is the
    optimum (ceil(55 / 3)); round-robin in listing order gives 1+4+7+10 = 22."""
    sizes = list(range(1, 11))  # file i holds i + 1 bytes
    groups = plan_shards(sizes, 3)
    assert groups == [[9, 4, 3], [8, 5, 2], [7, 6, 1, 0]]
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert max(loads) == 19
    round_robin = [sum(sizes[s::3]) for s in range(3)]
    assert max(round_robin) == 22, "round-robin would fail the max-load assertion above"
    assert plan_shards([7], 4) == [[0]]
    with pytest.raises(ValueError, match="shards >= 1"):
        plan_shards(sizes, 0)


def test_merge_topk_equals_global_sort():
    rng = np.random.default_rng(0)
    scores = rng.random((5, 30)).astype("float32")
    ids = np.arange(30)[None, :].repeat(5, axis=0)
    parts = np.array_split(np.arange(30), 4)
    got_ids, got_scores = merge_topk([ids[:, p] for p in parts], [scores[:, p] for p in parts], 7)
    want = np.argsort(-scores, axis=1)[:, :7]
    np.testing.assert_array_equal(got_ids, want)
    np.testing.assert_array_equal(got_scores, np.take_along_axis(scores, want, axis=1))
    assert recall_at_k(got_ids, want) == 1.0


@pytest.mark.integration
def test_sharded_index_equals_one_flat_index(ray_local, bucket, capsys):
    n, d = 3000, 64
    vectors = unit_vectors(n, d, seed=1)
    ids = np.random.default_rng(2).permutation(10 * n)[:n].astype("int64")  # sparse, unordered ids
    table = f"{bucket}/emb/embeddings"
    write_table(table, vectors, ids, files=5)
    manifest = build_index(BuildConfig(table, f"{bucket}/emb/index", shards=4))
    assert manifest["ntotal"] == n and len(manifest["shards"]) == 4 and manifest["recall_at_10"] == 1.0
    assert manifest["table_version"] == tables.version_of(table)

    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    flat.add_with_ids(vectors, ids)
    queries = unit_vectors(50, d, seed=3)
    want_scores, want_ids = flat.search(queries, 10)
    index = ShardedIndex.open(f"{bucket}/emb/index")
    got_ids, got_scores = index.search_vectors(queries, 10)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-6)
    hit = index.hits(queries[:1], 1)[0][0]
    assert hit.uri == f"s3://b/img_{want_ids[0, 0]}.jpg"
    # Search by image_id from the CLI: the image's own vector finds itself first.
    from sparse_embed.jobs.cli import main

    assert main(["search", "--index", f"{bucket}/emb/index", "--image-id", str(ids[7]), "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["query"] == f"s3://b/img_{ids[7]}.jpg" and out["results"][0]["image_id"] == ids[7]
    assert out["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert main(["search", "--index", f"{bucket}/emb/index", "--image-id", "-5"]) == 2
    assert "--image-id" in capsys.readouterr().err
    # Shard files are plain faiss files.
    shard = manifest["shards"][0]
    local = storage.read_bytes(f"{bucket}/emb/index/{manifest['index_id']}/{shard['file']}")
    assert faiss.deserialize_index(np.frombuffer(local, dtype="uint8")).ntotal == shard["ntotal"]


@pytest.mark.integration
def test_failed_build_leaves_current_on_the_previous_index(ray_local, bucket, monkeypatch):
    table, root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index"
    write_table(table, unit_vectors(200, 16, seed=4), np.arange(200, dtype="int64"), files=2)
    first = build_index(BuildConfig(table, root, shards=2))
    write_table(table, unit_vectors(50, 16, seed=5), np.arange(200, 250, dtype="int64"), files=1)

    import sparse_embed.pipeline.index.build as ib

    def broken_publish(*args, **kwargs):  # the build's files and manifest are written; CURRENT is not moved
        raise RuntimeError("killed before publishing")

    monkeypatch.setattr(ib, "publish", broken_publish)
    with pytest.raises(RuntimeError, match="killed"):
        build_index(BuildConfig(table, root, shards=2))
    assert current_index_id(root) == first["index_id"]
    assert ShardedIndex.open(root).manifest["ntotal"] == 200
    monkeypatch.undo()
    second = build_index(BuildConfig(table, root, shards=2))
    assert current_index_id(root) == second["index_id"] and second["ntotal"] == 250
    doc = json.loads(storage.read_bytes(f"{root}/{second['index_id']}/manifest.json"))
    assert doc["table_version"] == tables.version_of(table) and doc["metric"] == "inner_product"


@pytest.mark.parametrize("argv, needle", [
    (["index", "build", "--table", "/t", "--out", "/o", "--memory-budget", "16XB"], "--memory-budget"),
    (["index", "build", "--table", "/t", "--out", "/o", "--layout", "tree"], "merged"),
    (["index", "build", "--table", "/t", "--out", "/o", "--target-recall", "1.5"], "--target-recall"),
    (["index", "update", "--table", "/t", "--out", "/o", "--rebuild-growth", "-1"], "--rebuild-growth"),
    (["search", "--index", "/o", "--image", "q.jpg", "--image-id", "3"], "--image-id"),
])
def test_index_options_reject_wrong_values_naming_them(argv, needle, capsys):
    from sparse_embed.jobs.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err
