"""Stage 6: a FAISS inner-product index over one version of the embeddings table, planned
under a memory budget (plan.py), trained once, filled by parallel Ray tasks, tuned.

faiss's recipe: train one empty index on a sample (on a GPU when faiss-gpu sees one),
hand it to parallel tasks that each add one slice of the table with its image_ids, then
merge the slices into one index or keep them as a shard set.

Layout under <index root>:
  <index_id>/shard_00000.faiss   a slice's index (shard set), or index.faiss (merged);
                                 plain faiss.read_index files
  <index_id>/trained.faiss       the trained empty index (IVF plans): updates and
                                 rebuilds-with-the-same-quantizer start from it
  <index_id>/ids_00000.parquet   image_id, uri, etag of the slice's vectors
  <index_id>/manifest.json
  CURRENT                        the complete, verified index to serve; written last, so a
                                 build that dies midway leaves it on the previous index
Each task reads its own Parquet files; the driver holds only samples (and the merged
index, whose size the plan bounds by the memory budget).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sparse_embed.pipeline.index.plan import IndexPlan, parse_bytes, plan_index
from sparse_embed.pipeline.index.publish import new_index_id, publish, publish_empty, verify_and_tune, write_manifest
from sparse_embed.pipeline.index.snapshot import TableSnapshot, ids_schema, model_version_of, read_file, vectors_of
from sparse_embed.pipeline.index.tune import RECALL_K, RECALL_QUERIES, TIE_MARGIN, drop_self, exact_topk, merge_topk
from sparse_embed.pipeline.store import storage

log = logging.getLogger(__name__)

FACTORY = "IDMap2,Flat"  # the exact plan's factory
DEFAULT_MEMORY_BUDGET = "16GB"
DEFAULT_TARGET_RECALL = 0.95
EXECUTORS = ("ray", "local")


def plan_shards(file_sizes: list[int], shards: int) -> list[list[int]]:
    """Greedy balance of files (by bytes) over `shards` groups; returns file indices per
    non-empty group, largest files first (pure)."""
    if shards < 1:
        raise ValueError(f"Expected shards >= 1, got {shards!r}")
    groups: list[list[int]] = [[] for _ in range(min(shards, max(1, len(file_sizes))))]
    load = [0] * len(groups)
    for i in sorted(range(len(file_sizes)), key=lambda i: -file_sizes[i]):
        g = load.index(min(load))
        groups[g].append(i)
        load[g] += file_sizes[i]
    return [g for g in groups if g]


def train_empty_index(factory: str, dim: int, train, *, seed: int = 0, use_gpu: bool | None = None) -> bytes:
    """Train an empty index for `factory` on `train` (n, D); serialized bytes. With
    faiss-gpu and a GPU, k-means runs on the GPU (the IVF's clustering_index)."""
    import faiss

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        pq = faiss.downcast_index(ivf)
        if hasattr(pq, "do_polysemous_training"):
            pq.do_polysemous_training = False  # only for Hamming pre-filtering, which search does not use; ~100x the PQ training time
        gpu = use_gpu if use_gpu is not None else (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0)
        if gpu:
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
        index.train(train)
        if gpu:
            ivf.clustering_index = None
    return faiss.serialize_index(index).tobytes()


def empty_index_bytes(plan: IndexPlan) -> bytes:
    import faiss

    return faiss.serialize_index(faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)).tobytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def build_slice(slice_no: int, paths: list[str], table_uri: str, index_dir: str, empty: bytes, queries, k: int) -> dict:
    """Ray task body: add one slice (its Parquet files, one at a time) to a copy of the
    trained empty index, write it and its ids, and return the brute-force top-k of
    `queries` over the slice (for the driver's recall check)."""
    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    index = faiss.deserialize_index(np.frombuffer(empty, dtype="uint8"))
    id_parts = []
    ex_ids = np.full((len(queries), 0), -1, dtype="int64")
    ex_scores = np.zeros((len(queries), 0), dtype="float32")
    for p in paths:
        t = read_file(p, table_uri)
        ids = t.column("image_id").to_numpy().astype("int64")
        vectors = vectors_of(t.column("embedding"))
        if len(ids):
            index.add_with_ids(vectors, ids)
            fi, fs = exact_topk(queries, vectors, ids, k)
            ex_ids, ex_scores = merge_topk([ex_ids, fi], [ex_scores, fs], k)
        id_parts.append(t.select(["image_id", "uri", "etag"]).cast(ids_schema()))  # rewritten files may hold large_string
        del t, vectors
    shard_file, ids_file = f"shard_{slice_no:05d}.faiss", f"ids_{slice_no:05d}.parquet"
    storage.write_bytes_atomic(storage.join(index_dir, shard_file), faiss.serialize_index(index).tobytes())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables(id_parts) if id_parts else ids_schema().empty_table(), sink)
    storage.write_bytes_atomic(storage.join(index_dir, ids_file), sink.getvalue().to_pybytes())
    return {"slice": slice_no, "file": shard_file, "ids_file": ids_file, "ntotal": int(index.ntotal),
            "exact_ids": ex_ids, "exact_scores": ex_scores, "seconds": time.perf_counter() - t0,
            "peak_rss": peak_rss_bytes()}


def merge_slices(index_dir: str, files: list[str], out_file: str = "index.faiss") -> int:
    """Merge IVF slice files into one (same trained quantizer, so lists concatenate);
    returns ntotal. Holds the merged index in memory: its size is what the plan bounds."""
    import faiss
    import numpy as np

    def load(f):
        return faiss.deserialize_index(np.frombuffer(storage.read_bytes(storage.join(index_dir, f)), dtype="uint8"))

    merged = load(files[0])
    for f in files[1:]:
        other = load(f)  # keep a reference: extract_index_ivf's proxy does not own the index
        faiss.extract_index_ivf(merged).merge_from(faiss.extract_index_ivf(other), 0)
        del other
    merged.ntotal = faiss.extract_index_ivf(merged).ntotal  # an IndexPreTransform wrapper keeps its own count
    storage.write_bytes_atomic(storage.join(index_dir, out_file), faiss.serialize_index(merged).tobytes())
    fs = storage.filesystem(index_dir)
    for f in files:  # the slices are in the merged file now
        fs.rm_file(storage.strip_scheme(storage.join(index_dir, f)))
    return int(merged.ntotal)


@dataclass
class BuildConfig:
    """What to index and how. `memory_budget` bounds the index's RAM (the plan fits it);
    `shards` is the number of parallel slices (default: one per CPU, at most one per file)."""

    table: str  # URI of a Delta table with image_id and embedding columns
    index_root: str  # <index root>: index directories and CURRENT go here
    version: int | None = None  # table version to index (default: the latest)
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET
    nlist: int | None = None  # IVF list count (default: the plan's, from the table size)
    layout: str = "auto"  # auto | merged | shards
    shards: int | None = None
    target_recall: float = DEFAULT_TARGET_RECALL  # recall@10 that nprobe is tuned for
    executor: str = "ray"  # ray: slices are Ray tasks; local: in this process (benchmarks)
    seed: int = 0
    queries: Any = None  # (Q, D) held-aside query vectors; default RECALL_QUERIES table rows
    trained: bytes | None = None  # a trained empty index to reuse (its factory wins over the plan's)
    extra: dict = field(default_factory=dict)  # recorded under manifest["build"] (e.g. rebuild_reason)

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ValueError(f"Expected executor one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"Expected --target-recall in (0, 1], got {self.target_recall!r}")
        if self.memory_budget is None:
            self.memory_budget = DEFAULT_MEMORY_BUDGET


def build_index(cfg: BuildConfig) -> dict | None:
    """Plan, train, fill, verify, tune and publish an index over one version of the table.
    Returns the manifest (of an empty index for an empty table version)."""
    t_all = time.perf_counter()
    snap = TableSnapshot(cfg.table, cfg.version)
    if snap.n == 0:
        encoder = encoder_of_table(cfg.table, None)
        return publish_empty(cfg.index_root, cfg.table, snap.version, dim=(encoder or {}).get("dim"),
                             model_version=(encoder or {}).get("model_version"), encoder=encoder, extra=cfg.extra)
    dim = snap.dim()
    budget = parse_bytes(cfg.memory_budget)
    plan = plan_index(snap.n, dim, budget, nlist=cfg.nlist, layout=cfg.layout)
    log.info("index plan for %d x %d within %d bytes: %s (%s, ~%d bytes)", snap.n, dim, budget, plan.factory,
             plan.layout, plan.estimated_bytes)
    self_ids, queries = _recall_queries(cfg, snap)
    k_exact = RECALL_K + TIE_MARGIN + (0 if self_ids is None else 1)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    empty = _trained_empty(cfg, plan, snap)
    timings["train_s"] = time.perf_counter() - t0

    index_id = new_index_id(snap.version)
    index_dir = storage.join(cfg.index_root, index_id)
    t0 = time.perf_counter()
    results = _fill_slices(cfg, snap, index_dir, empty, queries, k_exact)
    timings["add_s"] = time.perf_counter() - t0
    ntotal = sum(r["ntotal"] for r in results)
    if ntotal != snap.n:
        raise RuntimeError(f"Index holds {ntotal} vectors, table v{snap.version} has {snap.n} rows")
    if plan.kind != "flat":
        storage.write_bytes_atomic(storage.join(index_dir, "trained.faiss"), empty)

    t0 = time.perf_counter()
    shard_entries = _lay_out(plan, index_dir, results)
    timings["merge_s"] = time.perf_counter() - t0
    exact_ids, exact_scores = merge_topk([r["exact_ids"] for r in results], [r["exact_scores"] for r in results], k_exact)
    exact_ids, exact_scores = drop_self(exact_ids, exact_scores, self_ids, RECALL_K + TIE_MARGIN)
    manifest = _manifest(cfg, snap, plan, index_id, shard_entries, results)
    write_manifest(index_dir, manifest)

    t0 = time.perf_counter()
    manifest = verify_and_tune(cfg.index_root, index_id, manifest, queries, exact_ids, self_ids, cfg.target_recall,
                               exact_scores)
    timings["tune_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    manifest["build"]["timings"] = {k: round(v, 3) for k, v in timings.items()}
    write_manifest(index_dir, manifest)
    publish(cfg.index_root, index_id)
    log.info("index %s: %d vectors (%s) in %d file(s), recall@10 %.4f at %s", index_id, ntotal, plan.factory,
             len(shard_entries), manifest["recall_at_10"], manifest["search_params"] or "exact search")
    return manifest


def _recall_queries(cfg: BuildConfig, snap: TableSnapshot):
    """(self_ids, queries): table rows sampled as queries (their own ids are excluded from
    their results), or the caller's held-aside vectors (self_ids None)."""
    import numpy as np

    if cfg.queries is None:
        return snap.sample(RECALL_QUERIES, seed=snap.version)
    return None, np.ascontiguousarray(cfg.queries, dtype="float32")


def _trained_empty(cfg: BuildConfig, plan: IndexPlan, snap: TableSnapshot) -> bytes:
    if cfg.trained is not None:
        return cfg.trained
    if plan.kind == "flat":
        return empty_index_bytes(plan)
    _, train = snap.sample(plan.train_size, seed=cfg.seed + 1)
    return _train(plan, train, cfg.seed)


def _fill_slices(cfg: BuildConfig, snap: TableSnapshot, index_dir: str, empty: bytes, queries, k_exact: int) -> list[dict]:
    """Add the table's files, grouped into balanced slices, to copies of the trained empty
    index: one Ray task per slice (executor "ray") or one after another here ("local")."""
    if cfg.executor == "ray":
        import ray

        from sparse_embed.infra.ray_launcher import ensure_ray

        resources = ensure_ray()
        groups = plan_shards(snap.sizes, cfg.shards or max(1, min(len(snap.paths), int(resources.get("CPU", 1)))))
        task = ray.remote(num_cpus=1)(build_slice)
        empty_ref, q_ref = ray.put(empty), ray.put(queries)
        results = ray.get([task.remote(i, [snap.paths[j] for j in g], cfg.table, index_dir, empty_ref, q_ref, k_exact)
                           for i, g in enumerate(groups)])
    else:
        groups = plan_shards(snap.sizes, cfg.shards or 1)
        results = [build_slice(i, [snap.paths[j] for j in g], cfg.table, index_dir, empty, queries, k_exact)
                   for i, g in enumerate(groups)]
    return sorted(results, key=lambda r: r["slice"])


def _lay_out(plan: IndexPlan, index_dir: str, results: list[dict]) -> list[dict]:
    """The manifest's shard entries: IVF slices merged into one file for layout "merged";
    otherwise (and always for flat plans) the slices as they are."""
    if plan.layout == "merged" and plan.kind != "flat" and len(results) > 1:
        return [{"file": "index.faiss", "ntotal": merge_slices(index_dir, [r["file"] for r in results])}]
    if plan.layout == "merged" and plan.kind != "flat":
        return [{"file": results[0]["file"], "ntotal": results[0]["ntotal"]}]
    return [{"file": r["file"], "ntotal": r["ntotal"]} for r in results]


def _manifest(cfg: BuildConfig, snap: TableSnapshot, plan: IndexPlan, index_id: str, shard_entries: list[dict],
              results: list[dict]) -> dict:
    ntotal = sum(r["ntotal"] for r in results)
    model_version = model_version_of(snap)
    encoder = encoder_of_table(cfg.table, model_version)
    return {
        "index_id": index_id,
        "factory": plan.factory,
        "metric": "inner_product",
        "dim": int(plan.dim),
        "ntotal": ntotal,
        "shards": shard_entries,
        "ids_files": [r["ids_file"] for r in results],
        "trained_file": "trained.faiss" if plan.kind != "flat" else None,
        "model": (encoder or {}).get("spec", {}).get("model"),
        "model_version": model_version or (encoder or {}).get("model_version"),
        "encoder": encoder,
        "table": cfg.table,
        "table_version": snap.version,
        "plan": plan.to_dict(),
        "build": {"slices": [{"slice": r["slice"], "ntotal": r["ntotal"], "seconds": round(r["seconds"], 3),
                              "peak_rss": r["peak_rss"]} for r in results],
                  "executor": cfg.executor, "files": len(snap.paths), "seed": cfg.seed, "trained_ntotal": ntotal,
                  "train_size": 0 if plan.kind == "flat" or cfg.trained is not None else plan.train_size,
                  "created_at": datetime.now(timezone.utc).isoformat(), **cfg.extra},
        "search_params": {},
    }


def encoder_of_table(table_uri: str, model_version: str | None) -> dict | None:
    """The encoder that wrote this table version's rows, recorded beside the table by the
    embed job (<out>/encoders/<model_version>.json); for a table without a model_version
    column, the active <out>/encoder.json. None for a table another tool wrote."""
    from sparse_embed.pipeline.embed.report import read_encoder_spec, read_encoder_spec_of

    out = table_uri.rstrip("/").rsplit("/", 1)[0]
    try:
        return read_encoder_spec_of(out, model_version) if model_version else read_encoder_spec(out)
    except FileNotFoundError:
        return None


def _train(plan: IndexPlan, train, seed: int) -> bytes:
    """Train on a GPU Ray task when the cluster has a GPU and faiss-gpu is importable
    there; otherwise in this process (faiss uses every core through OpenMP)."""
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1:
        task = ray.remote(num_gpus=1)(train_empty_index)
        return ray.get(task.remote(plan.factory, plan.dim, train, seed=seed))
    return train_empty_index(plan.factory, plan.dim, train, seed=seed)
