"""The index planner's arithmetic (pure: no faiss, no Ray) and the tuning helpers."""
from __future__ import annotations

import numpy as np
import pytest

from sparse_embed.pipeline.index.plan import (choose_nlist, flat_bytes, ivf_bytes, nprobe_candidates, parse_bytes, pick_search_param,
                                 plan_index, rebuild_reason, train_size)
from sparse_embed.pipeline.index.tune import drop_self, exact_topk, merge_topk, recall_at_k


@pytest.mark.parametrize("text, want", [("16GB", 16 * 10**9), ("16GiB", 16 * 2**30), ("16G", 16 * 2**30),
                                        ("512MB", 512 * 10**6), ("1.5GB", 1_500_000_000), ("4096", 4096), (123, 123)])
def test_parse_bytes(text, want):
    assert parse_bytes(text) == want


@pytest.mark.parametrize("bad", ["", "16XB", "-1GB", "0", "GB"])
def test_parse_bytes_names_the_option_and_units(bad):
    with pytest.raises(ValueError, match=r"--memory-budget.*16GB"):
        parse_bytes(bad)


def test_flat_when_it_fits():
    p = plan_index(100_000, 256, 16 * 10**9)
    assert p.factory == "IDMap2,Flat" and p.kind == "flat" and p.estimated_bytes == flat_bytes(100_000, 256)
    assert p.layout == "shards" and p.train_size == 0


def test_ivf_lists_follow_the_guidelines():
    assert choose_nlist(250_000) == 2048  # 4*sqrt(N) = 2000 -> nearest power of two
    assert choose_nlist(5_000_000) == 65536
    assert choose_nlist(50_000_000) == 262144
    assert choose_nlist(2_000_000_000) == 1048576
    assert choose_nlist(5000) == 128  # capped at N/39 points per centroid
    assert choose_nlist(5_000_000, max_nlist=1024) == 1024
    big = plan_index(5_000_000, 128, 10**12)  # past FLAT_MAX_VECTORS: IVF even with memory to spare
    assert big.factory == "IVF65536_HNSW32,Flat" and big.hnsw_quantizer and big.layout == "merged"


def test_codes_shrink_as_the_budget_tightens():
    n, d = 1_000_000, 256
    kinds = [plan_index(n, d, b).kind for b in (2 * 10**9, 300 * 10**6, 150 * 10**6)]
    assert kinds == ["flat", "ivf_sq8", "ivf_pq"]
    tight = plan_index(n, d, 40 * 10**6)
    assert tight.factory.startswith("OPQ") and tight.code_bytes <= 16 and tight.estimated_bytes <= 40 * 10**6
    for b in (300 * 10**6, 150 * 10**6, 40 * 10**6):
        p = plan_index(n, d, b)
        assert p.estimated_bytes == ivf_bytes(n, d, p.nlist, p.code_bytes, p.hnsw_quantizer) <= b
    with pytest.raises(ValueError, match="--memory-budget of at least"):
        plan_index(n, d, 10**6)


def test_plan_rejects_bad_options_naming_them():
    with pytest.raises(ValueError, match="--layout one of auto, merged, shards"):
        plan_index(10, 4, 10**6, layout="tree")
    with pytest.raises(ValueError, match="--nlist"):
        plan_index(10, 4, 10**6, nlist=100)


def test_train_size_bounds():
    assert train_size(5000, 128) == 5000
    assert train_size(10**7, 1024) == 1024 * 64
    assert train_size(10**9, 1048576) == 1048576 * 39  # at least 39 per centroid, past the 1M cap
    assert train_size(10**7, 16) == 16384


def test_search_param_choice():
    assert nprobe_candidates(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    # an update starts near its parent's nprobe: one step below it, so recall may also fall back
    assert nprobe_candidates(1024, start=128) == [128, 256, 512, 1024]
    assert nprobe_candidates(100, start=100) == [64, 100]
    assert nprobe_candidates(100, start=3) == [2, 4, 8, 16, 32, 64, 100]
    assert nprobe_candidates(100, start=1) == nprobe_candidates(100)
    assert nprobe_candidates(16, start=1000) == [16]
    assert pick_search_param([(1, 0.5), (2, 0.96), (4, 0.99)], 0.95) == (2, True)
    assert pick_search_param([(1, 0.5), (2, 0.9), (4, 0.9)], 0.95) == (2, False)


def test_rebuild_reasons():
    same = dict(same_model=True, same_dim=True, same_plan_kind=True)
    assert rebuild_reason(index_n_trained=1000, table_n=1400, growth=0.5, **same) is None
    assert "grew" in rebuild_reason(index_n_trained=1000, table_n=1600, growth=0.5, **same)
    assert "model_version" in rebuild_reason(index_n_trained=1000, table_n=1000, growth=0.5, **dict(same, same_model=False))
    assert "different kind" in rebuild_reason(index_n_trained=1000, table_n=1000, growth=0.5, **dict(same, same_plan_kind=False))


def test_exact_topk_blocks_equal_one_sort_and_drop_self():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 8)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # normalised: each query is its own top hit
    ids = rng.permutation(5000)[:1000].astype("int64")
    q = x[:20]
    got_ids, got_scores = exact_topk(q, x, ids, 5, block=64)
    want = np.argsort(-(q @ x.T), axis=1)[:, :5]
    np.testing.assert_array_equal(got_ids, ids[want])
    np.testing.assert_allclose(got_scores, np.take_along_axis(q @ x.T, want, axis=1), rtol=1e-6)
    no_self, _ = drop_self(got_ids, got_scores, ids[:20], 4)
    assert no_self.shape == (20, 4) and not (no_self == ids[:20, None]).any()
    np.testing.assert_array_equal(no_self, ids[want[:, 1:5]])  # self is each query's top hit here
    padded_i, padded_s = merge_topk([np.array([[3, -1]])], [np.array([[0.1, 0.0]], dtype="float32")], 2)
    assert padded_i.tolist() == [[3, -1]]
    assert recall_at_k(np.array([[1, 2, -1]]), np.array([[1, 2, 3]])) == pytest.approx(2 / 3)
    # exact scores past the k-th: an id tied with the k-th counts, a lower one does not
    exact, scores = np.array([[1, 2, 3, 4]]), np.array([[0.9, 0.8, 0.8 - 1e-7, 0.5]])
    assert recall_at_k(np.array([[1, 3]]), exact, scores) == 1.0
    assert recall_at_k(np.array([[1, 4]]), exact, scores) == 0.5
    assert recall_at_k(np.array([[3, 3]]), exact, scores) == 0.5  # a repeated id is one hit


# --- issue 16: recall before building, slices sized by memory, training placement ---

from sparse_embed.pipeline.index.plan import (budget_for_recall, check_recall, layout_for, recall_ceiling,  # noqa: E402
                                              recall_shortfall, slice_count, slice_plan)
from sparse_embed.pipeline.index.resources import task_memory  # noqa: E402
from sparse_embed.pipeline.index.sample import capped_train_size, file_quotas  # noqa: E402
from sparse_embed.pipeline.index.train import training_cpus, training_placement, two_level_coarse, use_two_level  # noqa: E402


def test_recall_ceiling_falls_with_dims_per_code_byte():
    assert recall_ceiling("ivf_flat", 512, 2048) == 1.0
    assert recall_ceiling("ivf_sq8", 512, 512) == pytest.approx(0.99)
    assert recall_ceiling("ivf_pq", 64, 32) == pytest.approx(0.92)  # 2 dims a byte: a measured point
    three = recall_ceiling("ivf_pq", 96, 32)  # 3 dims a byte: between the 2 and 4 points
    assert 0.74 < three < 0.92
    assert recall_ceiling("ivf_pq", 512, 4) == pytest.approx(0.09)  # 128 dims a byte: past the last point


def test_a_budget_that_cannot_reach_the_target_is_refused_with_the_budget_that_would():
    """1e9 x 512 in 16 GB: the plan falls to 4-byte codes (OPQ4 + PQ4, ceiling ~0.09); SQ8 is
    the smallest code estimated to reach 0.95, at 1e9 * (512 + 8) bytes + the quantizer."""
    p = plan_index(10**9, 512, 16 * 10**9)
    assert p.code_bytes == 4 and p.recall_ceiling < 0.2
    need, factory = budget_for_recall(p.n, p.dim, p.nlist, p.hnsw_quantizer, 0.95)
    assert factory.endswith(",SQ8") and need == ivf_bytes(10**9, 512, p.nlist, 512, True)
    why = recall_shortfall(p, 0.95)
    assert f"{need}" in why and "0.86 below the target 0.95" in why
    with pytest.raises(ValueError, match=r"--accept-lower-recall") as e:
        check_recall(p, 0.95, accept_lower_recall=False)
    assert f"at least {need} bytes" in str(e.value)
    assert check_recall(p, 0.95, accept_lower_recall=True) == why  # accepted: the warning is returned, no error
    # Spread over serving nodes, the same per-node budget keeps SQ8 codes and reaches the target.
    spread = plan_index(10**9, 512, 16 * 10**9, serving_nodes=40)
    assert spread.kind == "ivf_sq8" and spread.layout == "shards" and recall_shortfall(spread, 0.95) is None
    per_node = recall_shortfall(plan_index(10**9, 512, 16 * 10**9, serving_nodes=4), 0.95)
    assert f"at least {-(-need // 4)} bytes per node" in per_node and "on each of 4 nodes" in per_node


def test_plans_that_reach_the_target_pass_the_check():
    p = plan_index(4_500_000, 512, 4 * 10**9, nlist=1024)
    assert p.factory == "IVF1024,SQ8" and check_recall(p, 0.95, False) is None
    assert check_recall(plan_index(1000, 64, 10**9), 1.0, False) is None  # exact
    assert recall_shortfall(plan_index(1_000_000, 256, 40 * 10**6), 0.5) is not None  # 16+ dims a byte


def test_layout_auto_is_shards_beyond_one_node():
    assert layout_for("auto", "ivf_sq8", 10, 100) == "merged"
    assert layout_for("auto", "ivf_sq8", 101, 100) == "shards"
    assert layout_for("auto", "flat", 10, 100) == "shards"
    assert layout_for("merged", "ivf_sq8", 101, 100) == "merged"
    with pytest.raises(ValueError, match="--serving-nodes"):
        plan_index(10, 4, 10**6, serving_nodes=0)


def test_slices_are_sized_by_memory_and_capped_at_1e7():
    p = plan_index(2 * 10**7, 128, 10**11, nlist=4096)  # IVF4096,Flat: 512 + 8 bytes a vector
    per, mem = slice_plan(p.n, p, 65536, 64 * 10**9)
    assert per == 10**7  # autofaiss's cap, though memory would allow more
    fixed = 4096 * 128 * 4 + 2 * 65536 * 128 * 4
    per_vector = 3 * (512 + 8) + 200  # codes and ids thrice (lists grown by doubling, serialised copy), id-map columns
    assert mem == fixed + per * per_vector
    per, mem = slice_plan(p.n, p, 65536, 2 * 10**9)
    assert per == (2 * 10**9 - fixed) // per_vector and mem <= 2 * 10**9
    assert slice_count(p.n, per, cpus=2, files=100) == -(-p.n // per)  # memory needs more than one per CPU
    assert slice_count(1000, 10**7, cpus=8, files=3) == 3  # at most one per file
    assert slice_count(1000, 10**7, cpus=2, files=10, requested=5) == 5
    assert task_memory(10, [{"memory": 10**9}]) == 64 * 1024**2  # at least the floor
    assert task_memory(10**12, [{"memory": 10**9}, {"memory": 2 * 10**9}]) == 2 * 10**9  # schedulable


def test_training_goes_to_gpu_only_where_faiss_gpu_imports():
    assert training_placement(1, True) == "gpu"
    assert training_placement(1, False) == "cpu"  # a GPU, but CPU-only faiss on the worker
    assert training_placement(1, None) == "cpu"  # the probe did not run
    assert training_placement(0, True) == "cpu"
    assert training_cpus([2.0, 16.0, 8.0]) == 16 and training_cpus([]) == 1
    assert not use_two_level(16384) and use_two_level(65536) and two_level_coarse(1048576) == 1024


def test_sample_quotas_and_memory_cap():
    rows = [100, 0, 300, 600]
    q = file_quotas(rows, 200, seed=1)
    assert sum(q) == 200 and q[1] == 0 and all(0 <= a <= r for a, r in zip(q, rows))
    assert q == file_quotas(rows, 200, seed=1) and file_quotas(rows, 5000, seed=1) == rows
    # Proportional on average: over seeds, each file's mean share is within 3% of its row share.
    mean = np.mean([file_quotas(rows, 200, seed=s) for s in range(300)], axis=0)
    np.testing.assert_allclose(mean / 200, np.array(rows) / 1000, atol=0.03)
    assert capped_train_size(10**6, 512, 10**9) == 10**9 // (4 * 512 * 2)
    assert capped_train_size(1000, 512, 10**9) == 1000
