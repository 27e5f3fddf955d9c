"""The paths that let a build scale (issue 16), each at a small size: sampling in Ray tasks,
the on-disk merge, held-out tuning, and the planner's refusal of a budget that cannot
reach the target recall."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pytest

from helpers import unit_vectors, write_table
from sparse_embed.pipeline.index.merge import merge_in_memory, merge_task
from sparse_embed.pipeline.index.sample import sample_in_tasks, sample_local
from sparse_embed.pipeline.index.snapshot import TableSnapshot, vectors_of
from sparse_embed.pipeline.index.tune import exact_topk, recall_at_k
from sparse_embed.pipeline.store import storage


def _clustered(n, d, seed, centers=20):
    """Unit vectors around `centers` seeded directions (clustered like embeddings)."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(999).standard_normal((centers, d)).astype("float32")
    x = c[rng.integers(0, centers, n)] + 0.6 * rng.standard_normal((n, d)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_vectors_of_reads_fixed_and_variable_lists_alike_across_chunks():
    x = unit_vectors(10, 4, seed=0)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)
    var = pa.array(x.tolist(), pa.list_(pa.float32()))
    chunked = pa.chunked_array([fixed.slice(0, 3), fixed.slice(3, 7)])  # a sliced chunk has an offset
    for col in (fixed, var, chunked, pa.chunked_array([var.slice(2, 8)])):
        want = x if len(col) == 10 else x[2:]
        np.testing.assert_array_equal(vectors_of(col), want)


@pytest.mark.integration
def test_task_sampling_matches_the_driver_sample(ray_local, bucket):
    import ray

    n, d = 6000, 16
    x = _clustered(n, d, seed=1)
    ids = np.arange(n, dtype="int64") * 5
    table = f"{bucket}/emb/embeddings"
    write_table(table, x, ids, files=7)
    snap = TableSnapshot(table)
    exclude = ids[:300]
    local_ids, local_v = sample_local(snap, 2000, seed=3, exclude=exclude)
    parts = ray.get(sample_in_tasks(snap, 2000, seed=3, exclude=exclude))
    task_ids = np.concatenate([p[0] for p in parts])
    task_v = np.concatenate([p[1] for p in parts])
    # One seed, one sample: the tasks draw exactly what the driver draws.
    np.testing.assert_array_equal(task_ids, local_ids)
    np.testing.assert_array_equal(task_v, local_v)
    assert len(np.unique(task_ids)) == len(task_ids) <= 2000 and not np.isin(task_ids, exclude).any()
    # Each sampled row is the table's row; the sample's statistics match the table's.
    np.testing.assert_array_equal(task_v, x[task_ids // 5])
    np.testing.assert_allclose(task_v.mean(axis=0), x.mean(axis=0), atol=0.03)  # stderr ~0.25/sqrt(2000)=0.006
    assert abs(task_ids.mean() / 5 - n / 2) < 0.05 * n  # uniform over files: no file over-drawn
    other = np.concatenate([p[0] for p in ray.get(sample_in_tasks(snap, 2000, seed=4))])
    assert len(np.intersect1d(other, task_ids)) < 1500  # another seed draws another sample (overlap ~2000^2/6000)


def _slices(index_dir, trained, x, ids, parts):
    files = []
    for s, rows in enumerate(np.array_split(np.arange(len(ids)), parts)):
        index = faiss.deserialize_index(np.frombuffer(trained, dtype="uint8"))
        index.add_with_ids(x[rows], ids[rows])
        f = f"shard_{s:05d}.faiss"
        storage.write_bytes_atomic(storage.join(index_dir, f), faiss.serialize_index(index).tobytes())
        files.append(f)
    return files


@pytest.mark.integration
@pytest.mark.parametrize("factory", ["IVF32,SQ8", "OPQ8_32,IVF32,PQ8"])
def test_on_disk_merge_equals_the_in_memory_merge(ray_local, bucket, tmp_path, factory):
    import ray

    n, d = 6000, 32
    x = _clustered(n, d, seed=2)
    ids = np.random.default_rng(3).permutation(10 * n)[:n].astype("int64")
    empty = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    empty.train(x)
    trained = faiss.serialize_index(empty).tobytes()
    index_dir = f"{bucket}/idx/one"
    files = _slices(index_dir, trained, x, ids, 3)
    local = []
    for f in files:  # the reference merge reads the same slices, loaded whole
        p = tmp_path / f
        p.write_bytes(storage.read_bytes(f"{index_dir}/{f}"))
        local.append(str(p))
    want = merge_in_memory(local)
    out = ray.get(ray.remote(merge_task).remote(index_dir, trained, files, "index.faiss"))
    assert out["ntotal"] == n and out["file"] == "index.faiss"
    assert not any(storage.exists(f"{index_dir}/{f}") for f in files)  # the slices are in the merged file now
    merged_path = tmp_path / "index.faiss"
    merged_path.write_bytes(storage.read_bytes(f"{index_dir}/index.faiss"))
    got = faiss.read_index(str(merged_path))
    mapped = faiss.read_index(str(merged_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    q = _clustered(100, d, seed=4)
    for index in (want, got, mapped):
        faiss.extract_index_ivf(index).nprobe = 8
    ws, wi = want.search(q, 10)
    for index in (got, mapped):
        s, i = index.search(q, 10)
        np.testing.assert_array_equal(i, wi)
        np.testing.assert_array_equal(s, ws)
    assert got.ntotal == want.ntotal == n


@pytest.mark.integration
def test_held_out_tuning_records_both_figures_and_new_queries_reach_the_target(ray_local, bucket, tmp_path):
    from sparse_embed.pipeline.index.build import BuildConfig, build_index

    n, d = 8000, 32
    x = _clustered(n, d, seed=5, centers=64)
    ids = np.arange(n, dtype="int64") + 100
    table, root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index"
    write_table(table, x, ids, files=4)
    target = 0.9
    m = build_index(BuildConfig(table, root, shards=2, memory_budget=2_000_000, nlist=64, target_recall=target))
    assert m["factory"] == "IVF64,Flat" and m["plan"]["layout"] == "merged" and m["ntotal"] == n
    r = m["recall"]
    assert r["held_out_kind"] == "table rows held out of the build" and r["held_out"] == m["recall_at_10"]
    assert r["held_out_queries"] == 256 and r["self_queries"] == 256 and 0 < r["self"] <= 1
    held = np.asarray(m["build"]["held_out_ids"])
    assert len(held) == 512 and np.isin(held, ids).all() and m["build"]["complete"]
    # nprobe is the smallest that reached the target on the held-out tuning half.
    nprobe = m["search_params"]["nprobe"]
    curve = {c["nprobe"]: c["recall"] for c in m["tuning"]["tune_curve"]}
    assert curve[nprobe] >= target and all(v < target for p, v in curve.items() if p < nprobe)
    # The held-out rows were added after tuning: the merged file finds each one first.
    path = tmp_path / "index.faiss"
    path.write_bytes(storage.read_bytes(f"{root}/{m['index_id']}/index.faiss"))
    index = faiss.read_index(str(path))
    faiss.extract_index_ivf(index).nprobe = nprobe
    rows = held[:50] - 100
    _, found = index.search(x[rows], 1)
    assert (found[:, 0] == held[:50]).mean() >= 0.98
    # New queries (never in the table), plain faiss at the manifest's nprobe: within 0.04 of the target.
    q = _clustered(300, d, seed=6, centers=64)
    _, got = index.search(q, 10)
    assert recall_at_k(got, exact_topk(q, x, ids, 10)[0]) >= target - 0.04


@pytest.mark.integration
def test_a_budget_that_misses_the_target_needs_accept_lower_recall(ray_local, bucket, capsys):
    from sparse_embed.jobs.cli import main

    x = _clustered(3000, 64, seed=7)
    table, root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index"
    write_table(table, x, np.arange(3000, dtype="int64"), files=2)
    argv = ["index", "build", "--table", table, "--out", root, "--memory-budget", "150KB", "--target-recall", "0.95"]
    assert main(argv) == 2  # PQ codes of 2+ dims a byte: estimated ceiling below 0.95
    err = capsys.readouterr().err
    assert "--accept-lower-recall" in err and "would reach it" in err and "\n" not in err.strip()
    assert not storage.exists(f"{root}/CURRENT")  # refused before building anything
    assert main(argv + ["--accept-lower-recall"]) == 0
    out = capsys.readouterr().out
    m = json.loads(storage.read_bytes(f"{root}/{out.split()[1]}/manifest.json"))
    assert m["plan"]["kind"] == "ivf_pq" and m["build"]["accepted_lower_recall"] is True
    assert "below the target 0.95" in m["build"]["recall_shortfall"]


def test_two_level_training_reaches_the_recall_of_one_level():
    """faiss's two-level clustering (used from TWO_LEVEL_MIN_NLIST lists) at a small nlist:
    16 coarse clusters split into 256 lists give recall within 0.05 of plain k-means."""
    from sparse_embed.pipeline.index.train import _train_two_level

    d = 32
    x = _clustered(20000, d, seed=8, centers=64)
    q = _clustered(200, d, seed=9, centers=64)
    exact = exact_topk(q, x, np.arange(len(x)), 10)[0]
    recalls = []
    for two_level in (False, True):
        index = faiss.index_factory(d, "IVF256,SQ8", faiss.METRIC_INNER_PRODUCT)
        if two_level:
            _train_two_level(index, x, seed=0, gpu=False)
        else:
            index.train(x)
        assert index.is_trained and faiss.extract_index_ivf(index).quantizer.ntotal == 256
        index.add(x)
        faiss.extract_index_ivf(index).nprobe = 16
        recalls.append(recall_at_k(index.search(q, 10)[1], exact))
    assert recalls[1] >= recalls[0] - 0.05, recalls
