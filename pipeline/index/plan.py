"""Index planning: the arithmetic behind a build, as pure functions (no faiss, no Ray).

From vector count, dimension and a memory budget, choose a faiss factory string following
the faiss wiki "Guidelines to choose an index":
  - exact (Flat) while the raw vectors fit and brute force stays cheap (< FLAT_MAX_VECTORS);
  - IVF with K lists, K ~ 4*sqrt(N) below 1M vectors, 65536 for 1M-10M, 262144 for 10M-100M,
    1048576 beyond; an HNSW32 quantizer once K >= HNSW_QUANTIZER_MIN_NLIST (a flat
    quantizer costs K*D flops per query/add at that size);
  - codes shrink as memory tightens: Flat (4*D bytes) -> SQ8 (D bytes) -> OPQ+PQ (M bytes).
  - training wants 30*K to 256*K vectors; faiss's k-means warns below 39 points per centroid,
    so K is capped at N / MIN_POINTS_PER_CENTROID.
Memory estimates count codes + 8-byte ids + the coarse quantizer; they are the resident
size of the served index, not of the build (a build task also holds its slice's vectors).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

FLAT_MAX_VECTORS = 1_000_000  # brute force over more than this is too slow per query on a CPU
HNSW_QUANTIZER_MIN_NLIST = 16384
HNSW_M = 32
MIN_POINTS_PER_CENTROID = 39  # faiss k-means warns below this
TRAIN_POINTS_PER_CENTROID = 64  # within the 30..256 of the guidelines; faiss subsamples above 256
MAX_TRAIN_VECTORS = 1_000_000
PQ_MS = (64, 48, 32, 24, 16, 12, 8, 4)  # PQ code sizes tried, largest (most accurate) first
ID_BYTES = 8
ROW_META_BYTES = 200  # an add task's (image_id, uri, etag) per row for its id map, held as batches and concatenated (2 x ~100 B)
LAYOUTS = ("auto", "merged", "shards")
MAX_SLICE_VECTORS = 10_000_000  # vectors one add task holds at most (autofaiss's cap)
# Estimated recall@10 ceiling of codes by input dims per code byte (SQ8: 1, PQ: D/M), measured
# with every list probed, intersection recall@10, on faiss SyntheticDataset (D=64, 30000
# L2-normalised vectors, 200 queries not in the data), 2026-12-01. Real embeddings differ;
# the planner uses it only to warn before a build, and tuning measures the real figure.
RECALL_CEILINGS = ((1, 0.99), (2, 0.92), (4, 0.74), (8, 0.51), (16, 0.22), (32, 0.09))
OPQ_MIN_DIMS_PER_CODE = 4  # OPQ's rotation pays off when each PQ byte codes >= 4 dims; below, it only costs training time

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str | int, *, option: str = "--memory-budget") -> int:
    """'16GB' (10^9), '16GiB' or '16G' (2^30), '512MB', '1.5GB', or a byte count -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"Expected {option} as a size such as 16GB, 512MiB or a byte count "
                             f"(units: {', '.join(u for u in _UNITS if u)}), got {text!r}")
        value, unit = float(m.group(1)), m.group(2).lower()
    out = int(value * _UNITS[unit])
    if out <= 0:
        raise ValueError(f"Expected {option} > 0 bytes (a size such as 16GB or 512MiB), got {text!r}")
    return out


@dataclass(frozen=True)
class IndexPlan:
    factory: str  # faiss index_factory string (metric inner product)
    kind: str  # "flat" | "ivf_flat" | "ivf_sq8" | "ivf_pq"
    n: int
    dim: int
    nlist: int  # 0 for flat
    code_bytes: int  # bytes per vector in the codes (ids excluded)
    estimated_bytes: int  # resident size of the whole index
    memory_budget: int
    train_size: int  # vectors sampled from the table for training (0 for flat)
    layout: str  # "shards": one file per build slice; "merged": one file
    hnsw_quantizer: bool = False
    opq: bool = False
    notes: list[str] = field(default_factory=list)
    recall_ceiling: float = 1.0  # estimated recall@10 of the codes with every list probed (RECALL_CEILINGS)
    serving_nodes: int = 1  # memory_budget is per serving node; the index may take memory_budget * serving_nodes

    def to_dict(self) -> dict:
        return asdict(self)


def guideline_nlist(n: int) -> int:
    """List count from the faiss guidelines for N vectors (before the training cap)."""
    if n < 1_000_000:
        return max(1, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    if n < 10_000_000:
        return 65536
    if n < 100_000_000:
        return 262144
    return 1048576


def choose_nlist(n: int, *, max_nlist: int | None = None) -> int:
    """Guideline list count, capped so training sees >= MIN_POINTS_PER_CENTROID points per
    list (a power of two, >= 1) and by `max_nlist` if given."""
    k = guideline_nlist(n)
    cap = max(1, n // MIN_POINTS_PER_CENTROID)
    if max_nlist:
        cap = min(cap, max_nlist)
    while k > cap and k > 1:
        k //= 2
    return k


def train_size(n: int, nlist: int) -> int:
    """Training sample: TRAIN_POINTS_PER_CENTROID per list, at most MAX_TRAIN_VECTORS unless
    that leaves fewer than MIN_POINTS_PER_CENTROID per list, at least 16384 (PQ trains 256
    centroids per sub-quantizer), never more than n."""
    want = min(nlist * TRAIN_POINTS_PER_CENTROID, max(nlist * MIN_POINTS_PER_CENTROID, MAX_TRAIN_VECTORS))
    return min(n, max(want, 16384))


def quantizer_bytes(nlist: int, dim: int, hnsw: bool) -> int:
    return nlist * dim * 4 + (nlist * HNSW_M * 2 * 4 if hnsw else 0)  # centroids (+ HNSW links, level 0 ~2M)


def flat_bytes(n: int, dim: int) -> int:
    return n * (4 * dim + ID_BYTES)


def ivf_bytes(n: int, dim: int, nlist: int, code_bytes: int, hnsw: bool) -> int:
    return n * (code_bytes + ID_BYTES) + quantizer_bytes(nlist, dim, hnsw)


def pq_m_choices(dim: int) -> list[int]:
    """PQ sizes M (bytes/vector), largest first: M divides D, or OPQ (which rounds D down
    to a multiple of M) is used."""
    return [m for m in PQ_MS if m < dim and (dim % m == 0 or dim // m >= OPQ_MIN_DIMS_PER_CODE)]  # M == D: SQ8 in disguise


def opq_dim(dim: int, m: int) -> int:
    """OPQ output dimension: the input dimension rounded down to a multiple of M (no
    reduction beyond that: PQ already loses what it must)."""
    return dim // m * m


def code_candidates(dim: int, quantizer: str) -> list[tuple[str, str, int, bool]]:
    """(kind, factory, code bytes, opq) from the most accurate (largest) codes down (pure)."""
    q = quantizer
    candidates = [("ivf_flat", f"{q},Flat", 4 * dim, False), ("ivf_sq8", f"{q},SQ8", dim, False)]
    for m in pq_m_choices(dim):
        opq = dim // m >= OPQ_MIN_DIMS_PER_CODE
        candidates.append(("ivf_pq", f"{f'OPQ{m}_{opq_dim(dim, m)},' if opq else ''}{q},PQ{m}", m, opq))
    return candidates


def recall_ceiling(kind: str, dim: int, code_bytes: int) -> float:
    """Estimated recall@10 of the codes alone (all lists probed), by dims per code byte,
    interpolated in log2 over RECALL_CEILINGS (pure). An estimate: the data decides."""
    if kind in ("flat", "ivf_flat"):
        return 1.0
    ratio = max(1.0, dim / max(1, code_bytes))
    x = math.log2(ratio)
    pts = [(math.log2(r), c) for r, c in RECALL_CEILINGS]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, c0), (x1, c1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return c0 + (c1 - c0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def layout_for(layout: str, kind: str, estimated_bytes: int, node_budget: int) -> str:
    """"auto": shards for flat plans and for an index beyond one serving node's budget;
    otherwise one merged IVF file (one coarse search per query, not one per shard) (pure)."""
    if layout != "auto":
        return layout
    if kind == "flat" or estimated_bytes > node_budget:
        return "shards"
    return "merged"


def plan_index(n: int, dim: int, memory_budget: int, *, nlist: int | None = None, max_nlist: int | None = None,
               layout: str = "auto", flat_max_vectors: int = FLAT_MAX_VECTORS, serving_nodes: int = 1) -> IndexPlan:
    """The index to build for `n` vectors of `dim` dims within `memory_budget` bytes per
    serving node, over `serving_nodes` nodes (shards spread over them)."""
    if n < 1:
        raise ValueError(f"Expected a vector count >= 1, got {n!r}")
    if dim < 1:
        raise ValueError(f"Expected a dimension >= 1, got {dim!r}")
    if memory_budget < 1:
        raise ValueError(f"Expected --memory-budget > 0 bytes, got {memory_budget!r}")
    if serving_nodes < 1:
        raise ValueError(f"Expected --serving-nodes >= 1, got {serving_nodes!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"Expected --layout one of {', '.join(LAYOUTS)}, got {layout!r}")
    if nlist is not None and not 1 <= nlist <= n:
        raise ValueError(f"Expected --nlist between 1 and the vector count {n}, got {nlist!r}")
    notes: list[str] = []
    total = memory_budget * serving_nodes
    fb = flat_bytes(n, dim)
    if nlist is None and fb <= total and n <= flat_max_vectors:
        return IndexPlan("IDMap2,Flat", "flat", n, dim, 0, 4 * dim, fb, memory_budget, 0,
                         layout_for(layout, "flat", fb, memory_budget), notes=["exact: raw vectors fit the budget"],
                         recall_ceiling=1.0, serving_nodes=serving_nodes)
    k = nlist or choose_nlist(n, max_nlist=max_nlist)
    hnsw = k >= HNSW_QUANTIZER_MIN_NLIST
    q = f"IVF{k}_HNSW{HNSW_M}" if hnsw else f"IVF{k}"
    train = train_size(n, k)
    candidates = code_candidates(dim, q)
    for kind, factory, cb, opq in candidates:
        est = ivf_bytes(n, dim, k, cb, hnsw)
        if est <= total:
            return IndexPlan(factory, kind, n, dim, k, cb, est, memory_budget, train,
                             layout_for(layout, kind, est, memory_budget), hnsw, opq, notes,
                             recall_ceiling=round(recall_ceiling(kind, dim, cb), 4), serving_nodes=serving_nodes)
    smallest = candidates[-1]
    raise ValueError(f"Expected --memory-budget of at least {ivf_bytes(n, dim, k, smallest[2], hnsw)} bytes for "
                     f"{n} vectors of dim {dim} (smallest plan {smallest[1]}), got {memory_budget}")


def budget_for_recall(n: int, dim: int, nlist: int, hnsw: bool, target: float) -> tuple[int, str] | None:
    """(the smallest index size whose codes' estimated recall ceiling reaches `target`, its
    factory); None when none does (pure)."""
    q = f"IVF{nlist}_HNSW{HNSW_M}" if hnsw else f"IVF{nlist}"
    best = None
    for kind, factory, cb, _ in code_candidates(dim, q):
        if recall_ceiling(kind, dim, cb) >= target:
            best = (ivf_bytes(n, dim, nlist, cb, hnsw), factory)
    return best


def recall_shortfall(plan: IndexPlan, target: float) -> str | None:
    """Why `plan` is expected to miss `target` recall@10, by how much, and what budget
    would reach it; None when its codes' estimated ceiling reaches the target (pure)."""
    if plan.kind == "flat" or plan.recall_ceiling >= target:
        return None
    need = budget_for_recall(plan.n, plan.dim, plan.nlist, plan.hnsw_quantizer, target)
    per_node = None if need is None else -(-need[0] // plan.serving_nodes)
    fix = (f"a --memory-budget of at least {per_node} bytes per node ({need[1]}, {per_node / 1e9:.2f} GB"
           f"{f' on each of {plan.serving_nodes} nodes' if plan.serving_nodes > 1 else ''}) would reach it"
           if need else "no code size reaches it: lower --target-recall")
    return (f"{plan.factory} ({plan.code_bytes}-byte codes for {plan.dim} dims) fits --memory-budget {plan.memory_budget} "
            f"but its estimated recall@10 ceiling is {plan.recall_ceiling:.2f}, {target - plan.recall_ceiling:.2f} "
            f"below the target {target}: {fix}")


def check_recall(plan: IndexPlan, target: float, accept_lower_recall: bool) -> str | None:
    """Raise ValueError before building when the plan is expected to miss `target` and
    the caller did not accept that; returns the shortfall (or None)."""
    why = recall_shortfall(plan, target)
    if why and not accept_lower_recall:
        raise ValueError(f"Expected a --memory-budget that can reach --target-recall {target}: {why}; "
                         f"or pass --accept-lower-recall to build it anyway")
    return why


def slice_plan(n: int, plan: IndexPlan, max_file_rows: int, task_memory: int, *,
               max_vectors: int = MAX_SLICE_VECTORS) -> tuple[int, int]:
    """(vectors per slice, memory a slice task declares): a slice holds its codes and ids
    up to three times (inverted lists grow by doubling, then the serialised copy), its
    rows' id-map columns (ROW_META_BYTES), the quantizer, and one batch of rows as float32
    while adding them (read and converted: 2x); at most `max_vectors` (autofaiss caps an
    add task at 1e7) and what fits `task_memory` (pure). Measured (BENCHMARKS.md, issue
    16): slices of 1e7 x 128 SQ8 peaked at ~595 B a vector, 3 x (128 + 8) + 200 = 608."""
    fixed = quantizer_bytes(plan.nlist, plan.dim, plan.hnsw_quantizer) + 2 * max_file_rows * 4 * plan.dim
    per_vector = 3 * (plan.code_bytes + ID_BYTES) + ROW_META_BYTES
    fit = max(1, (task_memory - fixed) // per_vector) if task_memory > fixed else 1
    per_slice = max(1, min(max_vectors, fit, n))
    return per_slice, fixed + per_slice * per_vector


def slice_count(n: int, per_slice: int, cpus: int, files: int, requested: int | None = None) -> int:
    """Slices: the requested count or one per CPU, raised to what memory needs
    (ceil(n / per_slice)), at most one per file (pure)."""
    need = -(-n // max(1, per_slice))
    want = max(requested or max(1, cpus), need)
    return max(1, min(want, max(1, files)))


def nprobe_candidates(nlist: int, start: int | None = None) -> list[int]:
    """Powers of two up to nlist, then nlist itself (exhaustive). With `start` (an index
    update: its parent's tuned nprobe) they begin at the largest power of two <= start, so
    an update that kept its parent's recall needs one probe, not log2(nlist). An update
    never lowers nprobe below its parent's; the next rebuild tunes from 1 again."""
    out, p = [], 1
    while start is not None and p * 2 <= start:
        p *= 2
    while p < nlist:
        out.append(p)
        p *= 2
    out.append(nlist)
    return out


def pick_search_param(curve: list[tuple[int, float]], target: float) -> tuple[int, bool]:
    """Smallest parameter whose recall reaches `target`, from (param, recall) pairs sorted by
    param; the best one (and False) when none does."""
    for p, r in curve:
        if r >= target:
            return p, True
    best = max(curve, key=lambda pr: (pr[1], -pr[0]))
    return best[0], False


def rebuild_reason(*, index_n_trained: int, table_n: int, growth: float, same_model: bool, same_dim: bool,
                   same_plan_kind: bool) -> str | None:
    """Why an incremental update must rebuild instead (None: update in place)."""
    if not same_model:
        return "the table's model_version differs from the index's"
    if not same_dim:
        return "the table's dimension differs from the index's"
    if not same_plan_kind:
        return "the planner now chooses a different kind of index for the table's size"
    if table_n > (1.0 + growth) * max(1, index_n_trained):
        return f"the table grew past {1.0 + growth:.2f}x the {index_n_trained} vectors the index was trained for"
    return None
