"""Exact ground truth, recall and search-parameter tuning for an index.

recall@k here is the k-intersection measure: |found top-k ∩ exact top-k| / k, averaged
over queries; with exact scores beyond the k-th, an id tied with the exact k-th score (within
TIE_TOL) also counts, since which of tied ids is k-th is a matter of rounding. Exact top-k comes from numpy (blocked matrix products), independent of faiss.
Queries drawn from the table ("self" queries) are in the index; their own id is dropped
from both the exact and the found lists (search asks for k+1), so a query never counts
itself. Such queries still overstate the recall a new query gets (the quantizer was trained
on rows like them; measured: 0.95 tuned vs 0.936 for new queries at 4.5e6 x 512), so a build
tunes on held-out rows (build.py) and records both figures.
"""
from __future__ import annotations

import time

from sparse_embed.pipeline.index.plan import nprobe_candidates, pick_search_param

RECALL_K = 10  # recall@10 is the figure the manifest records
RECALL_QUERIES = 512  # table rows sampled as queries: half tune nprobe, half measure recall
TIE_MARGIN = 5  # exact neighbours kept past the k-th, to recognise ties with it
TIE_TOL = 1e-5  # inner products of unit vectors closer than this are ties (float32 rounding)
EXACT_BLOCK = 16384  # rows per matrix product: (Q, 16384) float32 scores are 64 MB at Q=1000


def merge_topk(id_lists, score_lists, k: int):
    """Per-query top-k over shards: concatenate, sort by score desc (ties by id) (pure).
    -1 ids (faiss padding) sort last."""
    import numpy as np

    ids = np.concatenate(id_lists, axis=1)
    scores = np.concatenate(score_lists, axis=1)
    if not ids.size:
        return ids[:, :0], scores[:, :0]
    masked = np.where(ids < 0, -np.inf, scores)
    order = np.lexsort((ids, -masked), axis=1)[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def recall_at_k(found, exact, exact_scores=None) -> float:
    """found (Q, k) ids against exact (Q, >= k) ids, best first; exact_scores (same shape as
    exact) makes ids tied with the exact k-th count as hits."""
    k = found.shape[1] if exact_scores is not None else exact.shape[1]
    hits = 0
    for r, (f, e) in enumerate(zip(found, exact)):
        allowed = set(e[:k].tolist())
        if exact_scores is not None and len(e) > k:
            kth = exact_scores[r][k - 1]
            allowed |= {i for i, s in zip(e[k:].tolist(), exact_scores[r][k:]) if s >= kth - TIE_TOL}
        hits += min(k, len(set(f[:k].tolist()) & allowed - {-1}))
    total = len(exact) * k
    return hits / float(total) if total else 1.0


def exact_topk(queries, vectors, ids, k: int, *, block: int = EXACT_BLOCK):
    """Brute-force inner-product top-k of `queries` (Q, D) over `vectors` (n, D) with `ids`."""
    import numpy as np

    q = queries.shape[0]
    best_ids = np.full((q, 0), -1, dtype="int64")
    best_scores = np.zeros((q, 0), dtype="float32")
    for start in range(0, len(vectors), block):
        scores = queries @ vectors[start:start + block].T  # (Q, block)
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < scores.shape[1] else np.argsort(-scores, axis=1)
        block_ids = ids[start:start + block][top]
        best_ids, best_scores = merge_topk([best_ids, block_ids], [best_scores, np.take_along_axis(scores, top, axis=1)], k)
    return best_ids, best_scores


def drop_self(ids, scores, self_ids, k: int):
    """Remove each query's own id from its row, keep the first k (pure)."""
    import numpy as np

    if self_ids is None:
        return ids[:, :k], scores[:, :k]
    keep = ids != np.asarray(self_ids)[:, None]
    out_i = np.full((ids.shape[0], k), -1, dtype=ids.dtype)
    out_s = np.full((ids.shape[0], k), -np.inf, dtype=scores.dtype)
    for r in range(ids.shape[0]):
        row_i, row_s = ids[r][keep[r]][:k], scores[r][keep[r]][:k]
        out_i[r, :len(row_i)], out_s[r, :len(row_s)] = row_i, row_s
    return out_i, out_s


def search_params_for(nprobe: int, hnsw_quantizer: bool) -> dict:
    """The parameters one tuning step sets: nprobe, and the HNSW quantizer's efSearch
    (it must be >= nprobe to return nprobe lists; 2x keeps the coarse search accurate)."""
    params = {"nprobe": int(nprobe)}
    if hnsw_quantizer:
        params["quantizer_efSearch"] = int(max(2 * nprobe, 16))
    return params


def tune(index, queries, exact_ids, *, nlist: int, hnsw_quantizer: bool, target: float, k: int = 10,
         self_ids=None, eval_fraction: float = 0.5, exact_scores=None, start_nprobe: int | None = None,
         latency_repeats: int = 3) -> dict:
    """Pick the smallest nprobe reaching `target` recall@k on the first part of the
    queries, trying from 1 up, or from start_nprobe up (nprobe_candidates); report recall
    on the held-out rest and latency (best of `latency_repeats`). `index` has
    `.set_search_params(dict)` and `.search_vectors(q, k)` (a ShardedIndex)."""
    import numpy as np

    n_eval = int(len(queries) * eval_fraction) if len(queries) > 1 else 0
    n_tune = len(queries) - n_eval
    split = slice(0, n_tune), slice(n_tune, len(queries))

    def run(params, part):
        index.set_search_params(params)
        extra = 0 if self_ids is None else 1
        ids, scores = index.search_vectors(queries[part], k + extra)
        sid = None if self_ids is None else np.asarray(self_ids)[part]
        scores_part = None if exact_scores is None else exact_scores[part]
        return recall_at_k(drop_self(ids, scores, sid, k)[0], exact_ids[part], scores_part)

    curve = []
    if nlist:
        for p in nprobe_candidates(nlist, start_nprobe):
            r = run(search_params_for(p, hnsw_quantizer), split[0])
            curve.append((p, r))
            if r >= target:
                break
        nprobe, reached = pick_search_param(curve, target)
        params = search_params_for(nprobe, hnsw_quantizer)
    else:
        params, reached = {}, True
    eval_part = split[1] if n_eval else split[0]
    recall = run(params, eval_part)
    qps, ms = measure_latency(index, queries, k, repeats=latency_repeats)
    return {"search_params": params, "target_recall": target, "reached_target": bool(reached and recall >= target),
            "recall_at_10": recall, "tune_curve": [{"nprobe": p, "recall": r} for p, r in curve],
            "recall_queries": {"tune": n_tune, "eval": n_eval if n_eval else n_tune},
            "queries_per_s": qps, "latency_ms_per_query": ms}


# Queries timed for the manifest's latency figures, a cost every publish pays (an update's
# searches otherwise take ~0.5 s at 1e6 x 128): a batch for throughput, singles for latency.
LATENCY_BATCH, LATENCY_SINGLES = 64, 16


def measure_latency(index, queries, k: int, *, repeats: int = 3) -> tuple[float, float]:
    """(queries/s for a batch of up to LATENCY_BATCH queries, ms per query searched one at a
    time); best of `repeats`."""
    batch = one = float("inf")
    queries = queries[:LATENCY_BATCH]
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search_vectors(queries, k)
        batch = min(batch, time.perf_counter() - t0)
    few = queries[: min(LATENCY_SINGLES, len(queries))]
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(len(few)):
            index.search_vectors(few[i:i + 1], k)
        one = min(one, (time.perf_counter() - t0) / max(1, len(few)))
    return len(queries) / batch if batch > 0 else float("inf"), one * 1000.0


def recall_at(index, queries, exact_ids, params: dict, *, k: int = RECALL_K, self_ids=None, exact_scores=None) -> float:
    """recall@k of `index` (a ShardedIndex) at `params`; queries that are table rows in the
    index (`self_ids`) have their own id dropped from what is found."""
    import numpy as np

    index.set_search_params(params)
    extra = 0 if self_ids is None else 1
    ids, scores = index.search_vectors(queries, k + extra)
    found = drop_self(ids, scores, None if self_ids is None else np.asarray(self_ids), k)[0]
    return recall_at_k(found, exact_ids, exact_scores)
