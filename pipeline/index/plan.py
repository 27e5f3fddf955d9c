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
LAYOUTS = ("auto", "merged", "shards")
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


def plan_index(n: int, dim: int, memory_budget: int, *, nlist: int | None = None, max_nlist: int | None = None,
               layout: str = "auto", flat_max_vectors: int = FLAT_MAX_VECTORS) -> IndexPlan:
    """The index to build for `n` vectors of `dim` dims within `memory_budget` bytes."""
    if n < 1:
        raise ValueError(f"Expected a vector count >= 1, got {n!r}")
    if dim < 1:
        raise ValueError(f"Expected a dimension >= 1, got {dim!r}")
    if memory_budget < 1:
        raise ValueError(f"Expected --memory-budget > 0 bytes, got {memory_budget!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"Expected --layout one of {', '.join(LAYOUTS)}, got {layout!r}")
    if nlist is not None and not 1 <= nlist <= n:
        raise ValueError(f"Expected --nlist between 1 and the vector count {n}, got {nlist!r}")
    notes: list[str] = []
    fb = flat_bytes(n, dim)
    if nlist is None and fb <= memory_budget and n <= flat_max_vectors:
        return IndexPlan("IDMap2,Flat", "flat", n, dim, 0, 4 * dim, fb, memory_budget, 0,
                         "shards" if layout == "auto" else layout, notes=["exact: raw vectors fit the budget"])
    k = nlist or choose_nlist(n, max_nlist=max_nlist)
    hnsw = k >= HNSW_QUANTIZER_MIN_NLIST
    q = f"IVF{k}_HNSW{HNSW_M}" if hnsw else f"IVF{k}"
    train = train_size(n, k)
    lay = "merged" if layout == "auto" else layout  # one IVF file: one coarse search per query, not one per shard
    candidates = [("ivf_flat", f"{q},Flat", 4 * dim, False), ("ivf_sq8", f"{q},SQ8", dim, False)]
    for m in pq_m_choices(dim):
        opq = dim // m >= OPQ_MIN_DIMS_PER_CODE
        candidates.append(("ivf_pq", f"{f'OPQ{m}_{opq_dim(dim, m)},' if opq else ''}{q},PQ{m}", m, opq))
    for kind, factory, cb, opq in candidates:
        est = ivf_bytes(n, dim, k, cb, hnsw)
        if est <= memory_budget:
            return IndexPlan(factory, kind, n, dim, k, cb, est, memory_budget, train, lay, hnsw, opq, notes)
    smallest = candidates[-1]
    raise ValueError(f"Expected --memory-budget of at least {ivf_bytes(n, dim, k, smallest[2], hnsw)} bytes for "
                     f"{n} vectors of dim {dim} (smallest plan {smallest[1]}), got {memory_budget}")


def nprobe_candidates(nlist: int) -> list[int]:
    """Powers of two up to nlist, then nlist itself (exhaustive)."""
    out, p = [], 1
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
