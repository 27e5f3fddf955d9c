"""Delta shards, the deletion set and the recall ground truth of an incremental update.

An updated index keeps its build's base shards as they are (in the build's directory) and
adds, in its own directory:
  delta.faiss          one small shard from the trained empty index: the vectors added
                       since the build (the parent's delta minus removed ids, plus new rows)
  idmap_delta.arrow    the delta's (image_id, uri, etag), sorted by id (idmap.py)
  deleted.npy          sorted int64 ids removed from the base shards since the build; search
                       hides them there with an IDSelector
  truth.npz            the recall queries and their exact top-TRUTH_DEPTH (publish.py)
The update rewrites only the delta (bounded by DELTA_MAX_FRACTION of the base); past that
bound the planner's rebuild decision (update._rebuild_reason) starts a new build.
"""
from __future__ import annotations

DELTA_MAX_FRACTION = 0.2  # rebuild once delta vectors + deleted ids exceed this fraction of the base's vectors


def delta_rebuild_reason(*, base_ntotal: int, delta_ntotal: int, deleted: int, max_fraction: float) -> str | None:
    """Why the delta shard and deletion set warrant a rebuild (None: they do not) (pure)."""
    churn = delta_ntotal + deleted
    if churn > max_fraction * max(1, base_ntotal):
        return (f"the delta shard ({delta_ntotal} vectors) and deletion set ({deleted} ids) exceed "
                f"{max_fraction:.2f}x the {base_ntotal} vectors of the base shards")
    return None


def split_removed(removed, delta_ids):
    """(ids to drop from the delta shard, ids to add to the deletion set) (pure numpy):
    an id lives in the delta when the delta holds it, else in a base shard."""
    import numpy as np

    removed = np.asarray(removed, dtype="int64")
    in_delta = np.isin(removed, np.asarray(delta_ids, dtype="int64"))
    return removed[in_delta], removed[~in_delta]


def union_sorted(a, b):
    import numpy as np

    return np.union1d(np.asarray(a, dtype="int64"), np.asarray(b, dtype="int64"))


def update_truth(exact_ids, exact_scores, removed, added_ids, added_vectors, queries, self_ids, depth: int):
    """The exact top-`depth` of `queries` after removing `removed` and adding vectors, from
    the exact top-`depth` before (pure numpy). Returns (ids, scores, valid) where `valid`
    is the smallest per-query count of leading entries known to be exact: a list that lost
    m entries to removals is exact for its first depth - m entries only."""
    import numpy as np

    from sparse_embed.pipeline.index.tune import drop_self, exact_topk, merge_topk

    ids = np.asarray(exact_ids).copy()
    scores = np.asarray(exact_scores, dtype="float32").copy()
    gone = np.isin(ids, np.asarray(removed, dtype="int64")) | (ids < 0)
    lost = gone.sum(axis=1)
    ids[gone], scores[gone] = -1, -np.inf
    if len(added_ids):
        extra = 0 if self_ids is None else 1
        ai, ascore = exact_topk(queries, added_vectors, np.asarray(added_ids, dtype="int64"), depth + extra)
        ai, ascore = drop_self(ai, ascore, self_ids, depth)
        ids, scores = merge_topk([ids, ai], [scores, ascore], depth)
    else:
        ids, scores = merge_topk([ids], [scores], depth)
    valid = int((depth - lost).min()) if len(lost) else depth
    return ids, scores, valid


def empty_delta(trained_bytes: bytes | None, factory: str, dim: int):
    """An empty index for new vectors: the build's trained empty index (IVF: same quantizer,
    so lists and codes match the base shards), or a fresh one of the factory (flat)."""
    import faiss
    import numpy as np

    if trained_bytes is not None:
        return faiss.deserialize_index(np.frombuffer(trained_bytes, dtype="uint8"))
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        raise ValueError(f"Expected the trained index of {factory!r} for a delta shard, got none in the manifest")
    return index
