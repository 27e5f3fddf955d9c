"""Stage 6: a FAISS inner-product index over one version of the embeddings table, planned
under a memory budget per serving node (plan.py), trained once in a task, filled by Ray
tasks that each declare their memory, merged on disk in a task, tuned on held-out rows.

The driver holds the recall queries (RECALL_QUERIES + SELF_QUERIES rows) and the trained
empty index's bytes (its quantizer: nlist * D * 4), never a slice, the sample or the merged
index (executor "ray"; executor "local" runs every step in this process):
  1. plan (pure) and refuse a plan expected to miss the target recall unless
     accept_lower_recall (plan.check_recall);
  2. hold out RECALL_QUERIES table rows (IVF plans): they are left out of the training
     sample and of the slices, so they are new queries to the index that tuning sees;
  3. sample in tasks (sample.py: a reservoir per file) and train in one task (train.py:
     GPU when faiss-gpu imports on a GPU worker, else all CPUs of a node);
  4. fill slices in tasks, each at most MAX_SLICE_VECTORS and the memory it declares;
  5. tune nprobe in a task on the slices with the held-out rows (exact top-k from the
     slice tasks), then add the held-out rows as a small slice;
  6. merge slices on disk in a task (merge.py) for layout "merged", or merge the held-out
     slice into slice 0 for layout "shards";
  7. measure recall with "self" queries (rows in the index, own id dropped) on the final
     files at the tuned parameters, write the manifest, move CURRENT.

Layout under <index root>:
  <index_id>/shard_00000.faiss   a slice's index (shard set), or index.faiss (merged);
                                 plain faiss.read_index files (IO_FLAG_MMAP works on them)
  <index_id>/trained.faiss       the trained empty index (IVF plans): updates and
                                 rebuilds-with-the-same-quantizer start from it
  <index_id>/ids_00000.parquet   image_id, uri, etag of the slice's rows (held-out rows
                                 included: they are in the final index)
  <index_id>/manifest.json
  CURRENT                        the complete, verified index to serve; written last, so a
                                 build that dies midway leaves it on the previous index

Manifest keys this module adds (the others are described in publish.py/update.py):
  recall: {"held_out": recall@10 of held-out queries at search_params (what nprobe was
           tuned on; also `recall_at_10`), "self": recall@10 of table rows in the index,
           own id dropped, at search_params, "held_out_queries"/"self_queries": counts,
           "held_out_kind": "table rows held out of the build" | "caller's queries"}
  plan.recall_ceiling, plan.serving_nodes: see plan.IndexPlan
  build.recall_shortfall: the planner's warning (None when the plan should reach the
           target); build.accepted_lower_recall: the --accept-lower-recall flag
  build.training: {"placement": "gpu"|"cpu"|"local", "threads", "memory", "sample_size",
           "two_level"}; build.slice_vectors, build.slice_memory: the slice sizing;
  build.merge: {"seconds", "bytes"} of the on-disk merge (absent without one);
  build.held_out_ids: the held-out rows' image_ids (added to the index after tuning)
  build.complete: False in the manifest written for tuning (the slices without the
           held-out rows), True in the final one; CURRENT only ever names a complete one
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sparse_embed.pipeline.index.merge import merge_task
from sparse_embed.pipeline.index.plan import IndexPlan, check_recall, parse_bytes, plan_index, slice_count, slice_plan
from sparse_embed.pipeline.index.publish import (TRUTH_DEPTH, new_index_id, publish, publish_empty, verify_and_tune,
                                                 write_manifest, write_truth)
from sparse_embed.pipeline.index.snapshot import TableSnapshot, ids_schema, model_version_of, vectors_of
from sparse_embed.pipeline.index.train import train_empty_index, use_two_level
from sparse_embed.pipeline.index.tune import RECALL_K, RECALL_QUERIES, TIE_MARGIN, drop_self, exact_topk, merge_topk
from sparse_embed.pipeline.store import live, storage

log = logging.getLogger(__name__)

FACTORY = "IDMap2,Flat"  # the exact plan's factory
DEFAULT_MEMORY_BUDGET = "16GB"
DEFAULT_TARGET_RECALL = 0.95
EXECUTORS = ("ray", "local")
SELF_QUERIES = 256  # table rows in the index searched for the "self" recall figure
ADD_BATCH_ROWS = 65536  # rows a slice task reads and adds at a time
TRAIN_MEMORY_SHARE = 0.5  # of one node's memory, for the training sample and k-means

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


def machine_memory() -> int:
    """This machine's physical memory in bytes (the local executor's node budget)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def build_slice(slice_no: int, paths: list[str], table_uri: str, index_dir: str, empty: bytes, queries, k: int,
                skip_ids=None, dvs=None) -> dict:
    """Ray task body: add one slice (its Parquet files, ADD_BATCH_ROWS rows at a time) to a
    copy of the trained empty index, leaving out `skip_ids` (held-out rows), write it and
    the ids of all its rows, and return the brute-force top-k of `queries` over the rows it
    added (for the driver's recall check). Rows a file's deletion vector (`dvs`: path ->
    descriptor) marks are not added."""
    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparse_embed.pipeline.index.snapshot import OPTIONAL_COLUMNS
    from sparse_embed.pipeline.index.idmap import write_id_map

    t0 = time.perf_counter()
    index = faiss.deserialize_index(np.frombuffer(empty, dtype="uint8"))
    id_parts = []
    ex_ids = np.full((len(queries), 0), -1, dtype="int64")
    ex_scores = np.zeros((len(queries), 0), dtype="float32")
    for p in paths:
        f = live.file_at(table_uri, p, (dvs or {}).get(p))
        for batch in live.file_batches(table_uri, f, ("image_id", "uri", "etag", "embedding"), batch_size=ADD_BATCH_ROWS):
            present = batch.column_names
            ids = batch.column("image_id").to_numpy(zero_copy_only=False).astype("int64")
            vectors = vectors_of(batch.column("embedding"))
            if skip_ids is not None and len(skip_ids):
                keep = ~np.isin(ids, skip_ids)
                ids, vectors = ids[keep], vectors[keep]
            if len(ids):
                index.add_with_ids(vectors, ids)
                fi, fs_ = exact_topk(queries, vectors, ids, k)
                ex_ids, ex_scores = merge_topk([ex_ids, fi], [ex_scores, fs_], k)
            cols = {c: batch.column(c) if c in present else pa.nulls(batch.num_rows, pa.string())
                    for c in ("image_id",) + OPTIONAL_COLUMNS}
            id_parts.append(pa.table(cols).cast(ids_schema()))  # rewritten files may hold large_string
            del vectors
    shard_file, ids_file = f"shard_{slice_no:05d}.faiss", f"ids_{slice_no:05d}.parquet"
    ntotal = int(index.ntotal)
    serialised = faiss.serialize_index(index)
    del index  # the serialised copy and its bytes: at most two copies of the codes at once
    storage.write_bytes_atomic(storage.join(index_dir, shard_file), serialised.tobytes())
    del serialised
    sink = pa.BufferOutputStream()
    ids_t = pa.concat_tables(id_parts) if id_parts else ids_schema().empty_table()
    pq.write_table(ids_t, sink)
    storage.write_bytes_atomic(storage.join(index_dir, ids_file), sink.getvalue().to_pybytes())
    write_id_map(storage.join(index_dir, f"idmap_{slice_no:05d}.arrow"), ids_t["image_id"], ids_t["uri"], ids_t["etag"])
    return {"slice": slice_no, "file": shard_file, "ids_file": ids_file, "idmap_file": f"idmap_{slice_no:05d}.arrow",
            "ntotal": ntotal,
            "exact_ids": ex_ids, "exact_scores": ex_scores, "seconds": time.perf_counter() - t0,
            "peak_rss": peak_rss_bytes()}


def held_out_slice(slice_no: int, index_dir: str, empty: bytes, ids, vectors) -> dict:
    """The held-out rows as a slice of their own (no ids file: their slices' ids files list them)."""
    import faiss
    import numpy as np

    index = faiss.deserialize_index(np.frombuffer(empty, dtype="uint8"))
    index.add_with_ids(np.ascontiguousarray(vectors, dtype="float32"), np.asarray(ids, dtype="int64"))
    shard_file = f"shard_{slice_no:05d}.faiss"
    ntotal = int(index.ntotal)
    serialised = faiss.serialize_index(index)
    del index  # the serialised copy and its bytes: at most two copies of the codes at once
    storage.write_bytes_atomic(storage.join(index_dir, shard_file), serialised.tobytes())
    del serialised
    return {"file": shard_file, "ntotal": ntotal}


def tune_task(index_root: str, index_id: str, manifest: dict, queries, exact_ids, self_ids, target: float,
              exact_scores) -> dict:
    """Task body: verify_and_tune where the index is opened (not in the driver)."""
    return verify_and_tune(index_root, index_id, manifest, queries, exact_ids, self_ids, target, exact_scores)


def self_recall_task(index_root: str, index_id: str, params: dict, queries, exact_ids, self_ids, exact_scores) -> float:
    """Task body: recall@10 of table rows in the final index at the tuned parameters."""
    from sparse_embed.pipeline.index.searcher import ShardedIndex
    from sparse_embed.pipeline.index.tune import recall_at

    index = ShardedIndex.open(index_root, index_id=index_id)
    return recall_at(index, queries, exact_ids, params, self_ids=self_ids, exact_scores=exact_scores)


@dataclass
class BuildConfig:
    """What to index and how. `memory_budget` is the memory of one serving node (the plan
    fits the index in memory_budget * serving_nodes); `shards` is the number of parallel
    slices (default: one per CPU, at most one per file, more when memory needs them)."""

    table: str  # URI of a Delta table with image_id and embedding columns
    index_root: str  # <index root>: index directories and CURRENT go here
    version: int | None = None  # table version to index (default: the latest)
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET
    nlist: int | None = None  # IVF list count (default: the plan's, from the table size)
    layout: str = "auto"  # auto | merged | shards
    shards: int | None = None
    target_recall: float = DEFAULT_TARGET_RECALL  # recall@10 that nprobe is tuned for
    accept_lower_recall: bool = False  # build a plan whose codes are expected to miss target_recall
    serving_nodes: int = 1  # nodes the index may be spread over (layout shards beyond one)
    executor: str = "ray"  # ray: sampling, training, slices, tuning, merge are Ray tasks; local: in this process
    seed: int = 0
    queries: Any = None  # (Q, D) query vectors not in the table; default: RECALL_QUERIES table rows held out
    trained: bytes | None = None  # a trained empty index to reuse (its factory wins over the plan's)
    extra: dict = field(default_factory=dict)  # recorded under manifest["build"] (e.g. rebuild_reason)

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ValueError(f"Expected executor one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"Expected --target-recall in (0, 1], got {self.target_recall!r}")
        if self.memory_budget is None:
            self.memory_budget = DEFAULT_MEMORY_BUDGET


@dataclass
class _Cluster:
    """What the build may ask of the executor: CPUs, one node's memory, and how to run a task."""

    executor: str
    cpus: int
    node_memory: int
    nodes: list

    def run(self, fn, *args, num_cpus: int = 1, memory: int | None = None, **kwargs):
        """fn(*args) in a Ray task declaring `memory` (capped at the largest node), or here."""
        return self.wait(self.submit(fn, *args, num_cpus=num_cpus, memory=memory, **kwargs))

    def submit(self, fn, *args, num_cpus: int = 1, memory: int | None = None, **kwargs):
        if self.executor != "ray":
            return fn(*args, **kwargs)
        import ray

        from sparse_embed.pipeline.index.resources import task_memory

        opts = {"num_cpus": num_cpus}
        if memory:
            opts["memory"] = task_memory(memory, self.nodes)
        return ray.remote(**opts)(fn).remote(*args, **kwargs)

    def wait(self, refs):
        if self.executor != "ray":
            return refs
        import ray

        return ray.get(refs)


def _cluster(executor: str) -> _Cluster:
    if executor == "ray":
        from sparse_embed.infra.ray_launcher import ensure_ray
        from sparse_embed.pipeline.index.resources import largest_node_memory, node_resources

        resources = ensure_ray()
        nodes = node_resources()
        return _Cluster("ray", int(resources.get("CPU", 1)), largest_node_memory(nodes), nodes)
    return _Cluster("local", os.cpu_count() or 1, machine_memory(), [])


def build_index(cfg: BuildConfig) -> dict | None:
    """Plan, train, fill, tune, merge and publish an index over one version of the table.
    Returns the manifest (of an empty index for an empty table version)."""
    t_all = time.perf_counter()
    snap = TableSnapshot(cfg.table, cfg.version)
    if snap.n == 0:
        encoder = encoder_of_table(cfg.table, None)
        return publish_empty(cfg.index_root, cfg.table, snap.version, dim=(encoder or {}).get("dim"),
                             model_version=(encoder or {}).get("model_version"), encoder=encoder, extra=cfg.extra)
    dim = snap.dim()
    budget = parse_bytes(cfg.memory_budget)
    plan = plan_index(snap.n, dim, budget, nlist=cfg.nlist, layout=cfg.layout, serving_nodes=cfg.serving_nodes)
    shortfall = check_recall(plan, cfg.target_recall, cfg.accept_lower_recall)
    if shortfall:
        log.warning("building anyway (--accept-lower-recall): %s", shortfall)
    log.info("index plan for %d x %d within %d bytes per node: %s (%s, ~%d bytes)", snap.n, dim, budget, plan.factory,
             plan.layout, plan.estimated_bytes)
    cluster = _cluster(cfg.executor)
    q = _recall_queries(cfg, snap, plan, cluster)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    empty, training = _trained_empty(cfg, plan, snap, cluster, q.held_ids)
    timings["train_s"] = time.perf_counter() - t0

    index_id = new_index_id(snap.version)
    index_dir = storage.join(cfg.index_root, index_id)
    t0 = time.perf_counter()
    sizing, results = _fill_slices(cfg, snap, plan, cluster, index_dir, empty, q)
    timings["add_s"] = time.perf_counter() - t0
    held_n = 0 if q.held_ids is None else len(q.held_ids)
    ntotal = sum(r["ntotal"] for r in results) + held_n
    if ntotal != snap.n:
        raise RuntimeError(f"Index holds {ntotal} vectors, table v{snap.version} has {snap.n} rows")
    if plan.kind != "flat":
        storage.write_bytes_atomic(storage.join(index_dir, "trained.faiss"), empty)

    # Tune on the slices without the held-out rows: for those queries the index is new.
    t0 = time.perf_counter()
    nq = len(q.queries)
    exact_ids, exact_scores = merge_topk([r["exact_ids"] for r in results], [r["exact_scores"] for r in results], q.k_exact)
    held_exact = drop_self(exact_ids[:nq], exact_scores[:nq], q.query_self_ids, RECALL_K + TIE_MARGIN)
    slices_entries = [{"file": r["file"], "ntotal": r["ntotal"]} for r in results]
    manifest = _manifest(cfg, snap, plan, index_id, slices_entries, results)
    write_manifest(index_dir, manifest)
    manifest = cluster.run(tune_task, cfg.index_root, index_id, manifest, q.queries, held_exact[0], q.query_self_ids,
                           cfg.target_recall, held_exact[1], memory=_open_memory(plan, snap.n))
    timings["tune_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    held = None
    if held_n:
        held = cluster.run(held_out_slice, len(results), index_dir, empty, q.held_ids, q.held_vectors,
                           memory=2 * len(empty))  # the trained index (its quantizer) is what it holds
    shard_entries, merge_info = _lay_out(plan, cluster, index_dir, empty, results, held)
    timings["merge_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    manifest["shards"] = shard_entries
    manifest["ntotal"] = ntotal
    write_manifest(index_dir, manifest)
    self_exact = _self_exact(exact_ids[nq:], exact_scores[nq:], q)
    depth = RECALL_K + TIE_MARGIN
    self_recall = cluster.run(self_recall_task, cfg.index_root, index_id, manifest["search_params"], q.self_vectors,
                              self_exact[0][:, :depth], q.self_ids, self_exact[1][:, :depth],
                              memory=_open_memory(plan, snap.n))
    # The self queries are rows of the final index and their lists cover the whole table
    # version: the first update brings them up to date from its changes, without a table scan.
    manifest["truth"] = dict(write_truth(index_dir, q.self_vectors, q.self_ids, self_exact[0], self_exact[1]),
                             index_id=index_id)
    timings["self_recall_s"] = time.perf_counter() - t0
    manifest["recall"] = {"held_out": manifest["recall_at_10"], "self": self_recall,
                          "held_out_queries": manifest["tuning"]["recall_queries"]["eval"], "self_queries": len(q.self_ids),
                          "held_out_kind": q.kind}
    timings["total_s"] = time.perf_counter() - t_all
    manifest["build"].update({
        "complete": True, "timings": {k: round(v, 3) for k, v in timings.items()}, "training": training, **sizing,
        "recall_shortfall": shortfall, "accepted_lower_recall": cfg.accept_lower_recall,
        "held_out_ids": [] if q.held_ids is None else [int(i) for i in q.held_ids]})
    if merge_info:
        manifest["build"]["merge"] = merge_info
    write_manifest(index_dir, manifest)
    publish(cfg.index_root, index_id)
    log.info("index %s: %d vectors (%s) in %d file(s), recall@10 %.4f held-out / %.4f self at %s", index_id, ntotal,
             plan.factory, len(shard_entries), manifest["recall_at_10"], self_recall,
             manifest["search_params"] or "exact search")
    return manifest


@dataclass
class _Queries:
    """The recall queries: `queries` (held-out rows, or the caller's vectors, or for flat
    plans table rows in the index with `query_self_ids`), then the self queries; the
    slice tasks compute exact top-k of both (stacked) over the rows they add."""

    queries: Any
    query_self_ids: Any  # None unless the queries are rows in the index (flat plans)
    held_ids: Any  # rows left out of the slices and the training sample; None when none are
    held_vectors: Any
    self_ids: Any
    self_vectors: Any
    kind: str

    @property
    def stacked(self):
        import numpy as np

        return np.ascontiguousarray(np.concatenate([self.queries, self.self_vectors]), dtype="float32")

    @property
    def k_exact(self) -> int:
        # TRUTH_DEPTH: the self queries' lists become the index's recorded ground truth, which
        # updates keep exact by dropping removed ids (delta.update_truth); +1: a row query's own id
        return TRUTH_DEPTH + 1


def _sample(cluster: _Cluster, snap: TableSnapshot, count: int, seed: int):
    """(ids, vectors) of a small sample: drawn in tasks on Ray (the driver receives only the
    rows drawn, not the files), here otherwise; the same rows either way."""
    import numpy as np

    from sparse_embed.pipeline.index.sample import sample_in_tasks

    if cluster.executor != "ray":
        return snap.sample(count, seed=seed)
    import ray

    parts = [p for p in ray.get(sample_in_tasks(snap, count, seed)) if len(p[0])]
    if not parts:
        return np.zeros(0, dtype="int64"), np.zeros((0, 0), dtype="float32")
    return np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])


def _recall_queries(cfg: BuildConfig, snap: TableSnapshot, plan: IndexPlan, cluster: _Cluster) -> _Queries:
    """Held-out queries: the caller's vectors (not in the table), or RECALL_QUERIES rows
    held out of the build (IVF plans; an exact index answers every query exactly, so flat
    plans keep all rows in and tune nothing). Self queries: SELF_QUERIES other rows."""
    import numpy as np

    if cfg.queries is not None:
        self_ids, self_vectors = _sample(cluster, snap, min(SELF_QUERIES, snap.n), snap.version + 1)
        return _Queries(np.ascontiguousarray(cfg.queries, dtype="float32"), None, None, None, self_ids, self_vectors,
                        "caller's queries")
    held_count = RECALL_QUERIES if plan.kind != "flat" and snap.n >= 4 * RECALL_QUERIES else 0
    ids, vectors = _sample(cluster, snap, held_count + min(SELF_QUERIES, snap.n - held_count), snap.version)
    order = np.random.default_rng(snap.version).permutation(len(ids))  # file order -> random split
    ids, vectors = ids[order], vectors[order]
    held, rest = slice(0, held_count), slice(held_count, len(ids))
    if not held_count:
        why = "exact index" if plan.kind == "flat" else f"fewer than {4 * RECALL_QUERIES} rows to hold out from"
        return _Queries(vectors[rest], ids[rest], None, None, ids[rest], vectors[rest], f"table rows in the index ({why})")
    return _Queries(vectors[held], None, ids[held], vectors[held], ids[rest], vectors[rest],
                    "table rows held out of the build")


def _self_exact(ids, scores, q: _Queries):
    """Exact top-TRUTH_DEPTH of the self queries over the whole table: the slices' rows plus
    the held-out rows (which the slices left out), own id dropped."""
    if q.held_ids is not None:
        hi, hs = exact_topk(q.self_vectors, q.held_vectors, q.held_ids, q.k_exact)
        ids, scores = merge_topk([ids, hi], [scores, hs], q.k_exact)
    return drop_self(ids, scores, q.self_ids, TRUTH_DEPTH)


def _open_memory(plan: IndexPlan, n: int) -> int:
    """Memory of a task that opens the whole index: its codes plus the ids/URIs (~100 B a row)."""
    return plan.estimated_bytes + n * 100


def _trained_empty(cfg: BuildConfig, plan: IndexPlan, snap: TableSnapshot, cluster: _Cluster, held_ids):
    """(trained empty index bytes, training record). The sample leaves out held-out rows
    and is capped so k-means fits TRAIN_MEMORY_SHARE of one node."""
    from sparse_embed.pipeline.index.sample import capped_train_size, sample_in_tasks, sample_local

    if cfg.trained is not None:
        return cfg.trained, {"placement": "reused"}
    if plan.kind == "flat":
        return empty_index_bytes(plan), {"placement": "none"}
    size = capped_train_size(plan.train_size, plan.dim, int(cluster.node_memory * TRAIN_MEMORY_SHARE) or 2**34)
    record = {"sample_size": size, "two_level": use_two_level(plan.nlist)}
    if cluster.executor == "ray":
        from sparse_embed.pipeline.index.train import train_in_task

        refs = sample_in_tasks(snap, size, cfg.seed + 1, exclude=held_ids)
        out, where = train_in_task(plan.factory, plan.dim, refs, seed=cfg.seed, sample_bytes=size * plan.dim * 4)
        return out, {**record, **where}
    _, train = sample_local(snap, size, cfg.seed + 1, exclude=held_ids)
    out = train_empty_index(plan.factory, plan.dim, train, seed=cfg.seed, threads=cluster.cpus)
    return out, {**record, "placement": "local", "threads": cluster.cpus}


def _fill_slices(cfg: BuildConfig, snap: TableSnapshot, plan: IndexPlan, cluster: _Cluster, index_dir: str, empty: bytes,
                 q: _Queries) -> tuple[dict, list[dict]]:
    """Add the table's files, grouped into balanced slices sized by memory, to copies of
    the trained empty index: one task per slice, each declaring its memory."""
    per_task = max(1, cluster.node_memory // max(1, cluster.cpus)) if cluster.node_memory else 2**34
    per_slice, memory = slice_plan(snap.n, plan, min(ADD_BATCH_ROWS, max(snap.rows)), per_task)
    slices = slice_count(snap.n, per_slice, cluster.cpus if cfg.executor == "ray" else 1, len(snap.paths), cfg.shards)
    groups = plan_shards(snap.sizes, slices)
    queries = q.stacked
    if cluster.executor == "ray":
        import ray

        empty, queries = ray.put(empty), ray.put(queries)
    refs = [cluster.submit(build_slice, i, [snap.paths[j] for j in g], cfg.table, index_dir, empty, queries, q.k_exact,
                           q.held_ids, snap.dvs, memory=memory) for i, g in enumerate(groups)]
    results = cluster.wait(refs)
    sizing = {"slice_vectors": per_slice, "slice_memory": memory}
    return sizing, sorted(results, key=lambda r: r["slice"])


def merge_slices(cluster: _Cluster, index_dir: str, empty: bytes, files: list[str], out_file: str, memory: int) -> dict:
    """Merge IVF slice files into `out_file` on disk, in a task (merge.merge_task)."""
    t0 = time.perf_counter()
    out = cluster.run(merge_task, index_dir, empty, files, out_file, memory=memory)
    return {**out, "seconds": round(time.perf_counter() - t0, 3)}


def _lay_out(plan: IndexPlan, cluster: _Cluster, index_dir: str, empty: bytes, results: list[dict], held: dict | None):
    """(the manifest's shard entries, merge record): IVF slices (and the held-out slice)
    merged on disk into index.faiss for layout "merged"; for "shards", the held-out slice
    merged into slice 0; flat plans keep their slices as they are."""
    entries = [{"file": r["file"], "ntotal": r["ntotal"]} for r in results]
    if plan.kind == "flat":
        return entries, None
    files = [e["file"] for e in entries] + ([held["file"]] if held else [])
    memory = 256 * 1024**2  # one list at a time plus faiss's small header copies; the rest is page cache
    if plan.layout == "merged" and len(files) > 1:
        m = merge_slices(cluster, index_dir, empty, files, "index.faiss", memory)
        return [{"file": m["file"], "ntotal": m["ntotal"]}], {"seconds": m["seconds"], "bytes": m["bytes"]}
    if plan.layout == "merged" or not held:
        return entries, None
    m = merge_slices(cluster, index_dir, empty, [entries[0]["file"], held["file"]], entries[0]["file"], memory)
    entries[0] = {"file": m["file"], "ntotal": m["ntotal"]}
    return entries, {"seconds": m["seconds"], "bytes": m["bytes"]}


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
        "id_maps": [{"file": r["idmap_file"]} for r in results],  # searched memory-mapped (idmap.py)
        "trained_file": "trained.faiss" if plan.kind != "flat" else None,
        "model": (encoder or {}).get("spec", {}).get("model"),
        "model_version": model_version or (encoder or {}).get("model_version"),
        "encoder": encoder,
        "table": cfg.table,
        "table_version": snap.version,
        "plan": plan.to_dict(),
        "build": {"slices": [{"slice": r["slice"], "ntotal": r["ntotal"], "seconds": round(r["seconds"], 3),
                              "peak_rss": r["peak_rss"]} for r in results],
                  "executor": cfg.executor, "files": len(snap.paths), "seed": cfg.seed, "trained_ntotal": snap.n,
                  "train_size": 0 if plan.kind == "flat" or cfg.trained is not None else plan.train_size,
                  "created_at": datetime.now(timezone.utc).isoformat(), "complete": False, **cfg.extra},
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


