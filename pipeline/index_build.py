"""Stage 6: a FAISS inner-product index over one version of the embeddings table, planned
under a memory budget (index_plan), trained once, filled by parallel Ray tasks, tuned.

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

import json
import logging
import time
import uuid
from datetime import datetime, timezone

from . import storage, tables
from .index_plan import IndexPlan, parse_bytes, plan_index
from .index_tune import TIE_MARGIN, drop_self, exact_topk, merge_topk, recall_at_k, tune  # noqa: F401  (public re-exports)

log = logging.getLogger(__name__)

FACTORY = "IDMap2,Flat"  # the exact plan's factory
RECALL_QUERIES = 512  # table rows sampled as queries: half tune nprobe, half measure recall
RECALL_K = 10
DEFAULT_MEMORY_BUDGET = "16GB"
DEFAULT_TARGET_RECALL = 0.95
EXECUTORS = ("ray", "local")


def _ids_schema():
    import pyarrow as pa

    return pa.schema([("image_id", pa.int64()), ("uri", pa.string()), ("etag", pa.string())])


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


def vectors_of(column):
    """An embedding column -> (n, D) float32. Files this job writes hold fixed_size_list;
    files deltalake rewrites (deletes, merges) hold list, since Delta has no fixed-size
    array type. Both read the same."""
    import numpy as np

    emb = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if len(emb) == 0:
        return np.zeros((0, 0), dtype="float32")
    flat = emb.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(len(emb), -1), dtype="float32")


def read_file(path: str, table_uri: str, columns=("image_id", "uri", "etag", "embedding")):
    import pyarrow.parquet as pq

    import pyarrow as pa

    fs, _ = storage.arrow_filesystem(table_uri)
    t = pq.read_table(path, columns=list(columns), filesystem=fs)
    if "embedding" in t.column_names and pa.types.is_fixed_size_list(t.schema.field("embedding").type):
        # Files deltalake rewrote hold list<float>: one type, so slices concatenate.
        i = t.schema.get_field_index("embedding")
        t = t.set_column(i, "embedding", t.column("embedding").cast(pa.list_(pa.float32())))
    return t


class TableSnapshot:
    """One version of the embeddings table: its data files, row counts and dimension."""

    def __init__(self, table_uri: str, version: int | None = None):
        dt = tables.open_table(table_uri, version)
        if dt is None:
            raise FileNotFoundError(f"No embeddings table at {table_uri!r}")
        self.uri, self.dt, self.version = table_uri, dt, dt.version()
        adds = dt.get_add_actions(flatten=True)
        by_name = {}
        if adds.num_rows:
            for p, size, rows in zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist(),
                                     adds.column("num_records").to_pylist()):
                by_name[p.rsplit("/", 1)[-1]] = (int(size or 0), int(rows or 0))
        self.paths = [storage.strip_scheme(f) for f in dt.file_uris()]
        self.sizes = [by_name.get(p.rsplit("/", 1)[-1], (0, 0))[0] for p in self.paths]
        self.rows = [by_name.get(p.rsplit("/", 1)[-1], (0, 0))[1] for p in self.paths]
        self.n = sum(self.rows)

    def dim(self) -> int:
        """From the first non-empty file's Parquet schema (fixed_size_list) or first row."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        first = next(i for i, r in enumerate(self.rows) if r)
        fs, _ = storage.arrow_filesystem(self.uri)
        with fs.open_input_file(self.paths[first]) as f:
            typ = pq.ParquetFile(f).schema_arrow.field("embedding").type
        if pa.types.is_fixed_size_list(typ):
            return typ.list_size
        return vectors_of(read_file(self.paths[first], self.uri, ["embedding"]).column("embedding")).shape[1]

    def sample(self, count: int, seed: int, *, columns=("image_id", "embedding")):
        """`count` rows drawn uniformly from a seeded random subset of files holding at
        least 4x `count` rows (all files for small tables): (ids, vectors)."""
        import numpy as np
        import pyarrow as pa

        rng = np.random.default_rng(seed)
        order = [i for i in rng.permutation(len(self.paths)) if self.rows[i]]
        chosen, have = [], 0
        for i in order:
            chosen.append(i)
            have += self.rows[i]
            if have >= 4 * count:
                break
        t = pa.concat_tables([read_file(self.paths[i], self.uri, list(columns)) for i in sorted(chosen)])
        take = np.sort(rng.choice(t.num_rows, size=min(count, t.num_rows), replace=False))
        t = t.take(take)
        return t.column("image_id").to_numpy().astype("int64"), vectors_of(t.column("embedding"))


def model_version_of(snap: TableSnapshot) -> str | None:
    import pyarrow.compute as pc

    first = next((i for i, r in enumerate(snap.rows) if r), None)
    if first is None:
        return None
    col = read_file(snap.paths[first], snap.uri, ["model_version"]).column("model_version")
    return pc.min(col).as_py() if len(col) else None


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
        id_parts.append(t.select(["image_id", "uri", "etag"]).cast(_ids_schema()))  # rewritten files may hold large_string
        del t, vectors
    shard_file, ids_file = f"shard_{slice_no:05d}.faiss", f"ids_{slice_no:05d}.parquet"
    storage.write_bytes_atomic(storage.join(index_dir, shard_file), faiss.serialize_index(index).tobytes())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables(id_parts) if id_parts else _ids_schema().empty_table(), sink)
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


def new_index_id(table_version: int) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-v{table_version}-{uuid.uuid4().hex[:6]}"


def write_manifest(index_dir: str, manifest: dict) -> None:
    storage.write_bytes_atomic(storage.join(index_dir, "manifest.json"), json.dumps(manifest, indent=2).encode())


def publish(index_root: str, index_id: str) -> None:
    storage.write_bytes_atomic(storage.join(index_root, "CURRENT"), index_id.encode())


def verify_and_tune(index_root: str, index_id: str, manifest: dict, queries, exact_ids, self_ids, target: float,
                    exact_scores=None) -> dict:
    """Open the written index the way search does, tune it, record the result."""
    from .search import ShardedIndex

    index = ShardedIndex.open(index_root, index_id=index_id)
    result = tune(index, queries, exact_ids, nlist=manifest["plan"]["nlist"],
                  hnsw_quantizer=manifest["plan"]["hnsw_quantizer"], target=target, k=RECALL_K, self_ids=self_ids,
                  exact_scores=exact_scores)
    manifest.update({k: result[k] for k in ("search_params", "recall_at_10")})
    manifest["tuning"] = result
    if not result["reached_target"]:
        log.warning("index %s: recall@10 %.4f is below the target %.2f even at nprobe=nlist: the plan's codes "
                    "are too lossy (raise --memory-budget)", index_id, result["recall_at_10"], target)
    return manifest


def build_index(table_uri: str, index_root: str, *, shards: int | None = None, version: int | None = None,
                memory_budget: int | str | None = None, nlist: int | None = None, layout: str = "auto",
                target_recall: float = DEFAULT_TARGET_RECALL, executor: str = "ray", queries=None,
                seed: int = 0, trained: bytes | None = None, extra: dict | None = None) -> dict | None:
    """Plan, train, fill, verify, tune and publish an index over `version` of the table.

    `queries` (Q, D): held-aside query vectors for recall (default: RECALL_QUERIES table
    rows, each query's own id excluded). `trained`: a trained empty index to reuse (its
    factory wins over the plan's). Returns the manifest; None for an empty table."""
    import numpy as np

    if executor not in EXECUTORS:
        raise ValueError(f"Expected executor one of {', '.join(EXECUTORS)}, got {executor!r}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"Expected --target-recall in (0, 1], got {target_recall!r}")
    budget = parse_bytes(memory_budget if memory_budget is not None else DEFAULT_MEMORY_BUDGET)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    snap = TableSnapshot(table_uri, version)
    if snap.n == 0:
        log.info("table %s v%d is empty: no index built", table_uri, snap.version)
        return None
    dim = snap.dim()
    plan = plan_index(snap.n, dim, budget, nlist=nlist, layout=layout)
    log.info("index plan for %d x %d within %d bytes: %s (%s, ~%d bytes)", snap.n, dim, budget, plan.factory,
             plan.layout, plan.estimated_bytes)
    out = table_uri.rstrip("/").rsplit("/", 1)[0]
    try:
        from .report import read_encoder_spec

        encoder = read_encoder_spec(out)
    except FileNotFoundError:
        encoder = None
    if queries is None:
        self_ids, queries = snap.sample(RECALL_QUERIES, seed=snap.version)
    else:
        self_ids, queries = None, np.ascontiguousarray(queries, dtype="float32")
    k_exact = RECALL_K + TIE_MARGIN + (0 if self_ids is None else 1)

    t0 = time.perf_counter()
    if trained is not None:
        empty = trained
    elif plan.kind == "flat":
        empty = empty_index_bytes(plan)
    else:
        _, train = snap.sample(plan.train_size, seed=seed + 1)
        empty = _train(plan, train, seed)
        del train
    timings["train_s"] = time.perf_counter() - t0

    index_id = new_index_id(snap.version)
    index_dir = storage.join(index_root, index_id)
    t0 = time.perf_counter()
    if executor == "ray":
        import ray

        from infra.ray_launcher import ensure_ray

        resources = ensure_ray()
        n_slices = shards or max(1, min(len(snap.paths), int(resources.get("CPU", 1))))
        groups = plan_shards(snap.sizes, n_slices)
        task = ray.remote(num_cpus=1)(build_slice)
        empty_ref, q_ref = ray.put(empty), ray.put(queries)
        results = ray.get([task.remote(i, [snap.paths[j] for j in g], table_uri, index_dir, empty_ref, q_ref, k_exact)
                           for i, g in enumerate(groups)])
    else:
        groups = plan_shards(snap.sizes, shards or 1)
        results = [build_slice(i, [snap.paths[j] for j in g], table_uri, index_dir, empty, queries, k_exact)
                   for i, g in enumerate(groups)]
    results.sort(key=lambda r: r["slice"])
    timings["add_s"] = time.perf_counter() - t0
    ntotal = sum(r["ntotal"] for r in results)
    if ntotal != snap.n:
        raise RuntimeError(f"Index holds {ntotal} vectors, table v{snap.version} has {snap.n} rows")
    if plan.kind != "flat":
        storage.write_bytes_atomic(storage.join(index_dir, "trained.faiss"), empty)
    t0 = time.perf_counter()
    if plan.layout == "merged" and plan.kind != "flat" and len(results) > 1:
        shard_entries = [{"file": "index.faiss", "ntotal": merge_slices(index_dir, [r["file"] for r in results])}]
    elif plan.layout == "merged" and plan.kind != "flat":
        shard_entries = [{"file": results[0]["file"], "ntotal": results[0]["ntotal"]}]
    else:
        shard_entries = [{"file": r["file"], "ntotal": r["ntotal"]} for r in results]
    timings["merge_s"] = time.perf_counter() - t0
    exact_ids, exact_scores = merge_topk([r["exact_ids"] for r in results], [r["exact_scores"] for r in results], k_exact)
    exact_ids, exact_scores = drop_self(exact_ids, exact_scores, self_ids, RECALL_K + TIE_MARGIN)
    manifest = {
        "index_id": index_id,
        "factory": plan.factory,
        "metric": "inner_product",
        "dim": int(dim),
        "ntotal": ntotal,
        "shards": shard_entries,
        "ids_files": [r["ids_file"] for r in results],
        "trained_file": "trained.faiss" if plan.kind != "flat" else None,
        "model": (encoder or {}).get("spec", {}).get("model"),
        "model_version": (encoder or {}).get("model_version") or model_version_of(snap),
        "encoder": encoder,
        "table": table_uri,
        "table_version": snap.version,
        "plan": plan.to_dict(),
        "build": {"slices": [{"slice": r["slice"], "ntotal": r["ntotal"], "seconds": round(r["seconds"], 3),
                              "peak_rss": r["peak_rss"]} for r in results],
                  "executor": executor, "files": len(snap.paths), "seed": seed, "trained_ntotal": ntotal,
                  "train_size": 0 if plan.kind == "flat" or trained is not None else plan.train_size,
                  "created_at": datetime.now(timezone.utc).isoformat(), **(extra or {})},
        "search_params": {},
    }
    write_manifest(index_dir, manifest)
    t0 = time.perf_counter()
    manifest = verify_and_tune(index_root, index_id, manifest, queries, exact_ids, self_ids, target_recall,
                               exact_scores)
    timings["tune_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    manifest["build"]["timings"] = {k: round(v, 3) for k, v in timings.items()}
    write_manifest(index_dir, manifest)
    publish(index_root, index_id)
    log.info("index %s: %d vectors (%s) in %d file(s), recall@10 %.4f at %s", index_id, ntotal, plan.factory,
             len(shard_entries), manifest["recall_at_10"], manifest["search_params"] or "exact search")
    return manifest


def _train(plan: IndexPlan, train, seed: int) -> bytes:
    """Train on a GPU Ray task when the cluster has a GPU and faiss-gpu is importable
    there; otherwise in this process (faiss uses every core through OpenMP)."""
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1:
        task = ray.remote(num_gpus=1)(train_empty_index)
        return ray.get(task.remote(plan.factory, plan.dim, train, seed=seed))
    return train_empty_index(plan.factory, plan.dim, train, seed=seed)
