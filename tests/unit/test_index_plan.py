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
