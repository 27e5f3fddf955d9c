"""Delta-shard arithmetic: where a removed id lives, when the delta warrants a rebuild, and
the recall ground truth brought up to date from changes alone (checked against brute force)."""
from __future__ import annotations

import numpy as np

from sparse_embed.pipeline.index.delta import delta_rebuild_reason, split_removed, update_truth
from sparse_embed.pipeline.index.tune import drop_self, exact_topk

from helpers import unit_vectors


def test_removed_ids_split_between_the_delta_and_the_deletion_set():
    in_delta, in_base = split_removed([3, 10, 11, 40], delta_ids=[10, 40, 99])
    assert in_delta.tolist() == [10, 40] and in_base.tolist() == [3, 11]


def test_delta_rebuild_reason_past_the_fraction_only():
    assert delta_rebuild_reason(base_ntotal=1000, delta_ntotal=150, deleted=50, max_fraction=0.2) is None
    reason = delta_rebuild_reason(base_ntotal=1000, delta_ntotal=150, deleted=51, max_fraction=0.2)
    assert "150 vectors" in reason and "51 ids" in reason and "1000" in reason


def test_updated_truth_equals_brute_force_over_the_changed_rows():
    d, depth = 16, 40
    base = unit_vectors(2000, d, seed=1)
    ids = np.arange(2000, dtype="int64")
    queries, self_ids = base[:30], ids[:30]  # rows of the table: their own id never counts
    ti, ts = drop_self(*exact_topk(queries, base, ids, depth + 1), self_ids, depth)

    removed = np.random.default_rng(2).choice(2000, 20, replace=False).astype("int64")
    added_ids = np.arange(5000, 5050, dtype="int64")
    added = unit_vectors(50, d, seed=3)
    got_i, got_s, valid = update_truth(ti, ts, removed, added_ids, added, queries, self_ids, depth)

    keep = ~np.isin(ids, removed)
    all_vectors, all_ids = np.concatenate([base[keep], added]), np.concatenate([ids[keep], added_ids])
    want_i, want_s = drop_self(*exact_topk(queries, all_vectors, all_ids, depth + 1), self_ids, depth)
    lost = np.isin(ti, removed).sum(axis=1)
    assert valid == depth - lost.max() and valid < depth  # some list lost a neighbour (seeded)
    np.testing.assert_array_equal(got_i[:, :valid], want_i[:, :valid])
    np.testing.assert_allclose(got_s[:, :valid], want_s[:, :valid], rtol=0, atol=1e-6)
