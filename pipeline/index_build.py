"""Stage 6: an exact inner-product FAISS index over one version of the embeddings table,
split into shards built by parallel Ray tasks.

Layout under <index root>:
  <index_id>/shard_00000.faiss   IndexIDMap2(IndexFlatIP(D)), readable by faiss.read_index
  <index_id>/ids_00000.parquet   image_id -> uri for the shard's vectors
  <index_id>/manifest.json
  CURRENT                        the complete index to serve; written last, so a build
                                 that dies midway leaves it on the previous index
Each shard task reads its own Parquet files of the table; the driver never holds vectors.
"""
from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timezone

from . import storage, tables

log = logging.getLogger(__name__)

FACTORY = "IDMap2,Flat"
RECALL_QUERIES = 256  # sample of table vectors used to check the built index against brute force
RECALL_K = 10


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


def _read_vectors(paths: list[str], table_uri: str):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = storage.arrow_filesystem(table_uri)
    parts = [pq.read_table(p, columns=["image_id", "uri", "embedding"], filesystem=fs) for p in paths]
    t = pa.concat_tables(parts) if parts else None
    ids = t.column("image_id").to_numpy().astype("int64")
    return ids, t.column("uri"), vectors_of(t.column("embedding"))


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


def build_shard(shard: int, paths: list[str], table_uri: str, index_dir: str, queries, k: int) -> dict:
    """Ray task body: build one shard, write it, and return brute-force top-k of `queries`
    over this shard's vectors (for the driver's recall check)."""
    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, uris, vectors = _read_vectors(paths, table_uri)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, ids)
    shard_file = f"shard_{shard:05d}.faiss"
    ids_file = f"ids_{shard:05d}.parquet"
    storage.write_bytes_atomic(storage.join(index_dir, shard_file), faiss.serialize_index(index).tobytes())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"image_id": pa.array(ids, pa.int64()), "uri": uris}), sink)
    storage.write_bytes_atomic(storage.join(index_dir, ids_file), sink.getvalue().to_pybytes())
    scores = queries @ vectors.T  # (Q, n) exact inner products, numpy: independent of faiss
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return {"shard": shard, "file": shard_file, "ids_file": ids_file, "ntotal": int(index.ntotal),
            "exact_ids": ids[top], "exact_scores": np.take_along_axis(scores, top, axis=1)}


def merge_topk(id_lists, score_lists, k: int):
    """Per-query top-k over shards: concatenate, sort by score desc (ties by id) (pure)."""
    import numpy as np

    ids = np.concatenate(id_lists, axis=1)
    scores = np.concatenate(score_lists, axis=1)
    order = np.lexsort((ids, -scores), axis=1)[:, :k] if ids.size else np.zeros((ids.shape[0], 0), dtype=int)
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def recall_at_k(found, exact) -> float:
    k = exact.shape[1]
    hits = sum(len(set(f[:k]) & set(e)) for f, e in zip(found, exact))
    return hits / float(exact.size) if exact.size else 1.0


def build_index(table_uri: str, index_root: str, *, shards: int | None = None, version: int | None = None) -> dict | None:
    """Build, verify and publish an index; returns its manifest (None for an empty table)."""
    import numpy as np
    import ray

    from infra.ray_launcher import ensure_ray

    from .search import ShardedIndex

    dt = tables.open_table(table_uri, version)
    if dt is None:
        raise FileNotFoundError(f"No embeddings table at {table_uri!r}")
    table_version = dt.version()
    files = dt.file_uris()
    adds = dt.get_add_actions(flatten=True)
    sizes = dict(zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist()))
    n_rows = sum(adds.column("num_records").to_pylist()) if adds.num_rows else 0
    if n_rows == 0:
        log.info("table %s v%d is empty: no index built", table_uri, table_version)
        return None
    out = table_uri.rstrip("/").rsplit("/", 1)[0]
    try:
        from .report import read_encoder_spec

        encoder = read_encoder_spec(out)
    except FileNotFoundError:
        encoder = None
    resources = ensure_ray()
    shards = shards or max(1, min(len(files), int(resources.get("CPU", 1))))
    _, fs_root = storage.arrow_filesystem(table_uri)
    paths = [storage.strip_scheme(f) for f in files]
    groups = plan_shards([sizes.get(p.rsplit("/", 1)[-1], sizes.get(p, 0)) or 0 for p in paths], shards)
    # Queries: the first vectors of a seeded random file, read on the driver (a small sample).
    rng = np.random.default_rng(table_version)
    _, _, sample = _read_vectors([paths[int(rng.integers(len(paths)))]], table_uri)
    queries = sample[rng.permutation(len(sample))[:RECALL_QUERIES]]
    created = datetime.now(timezone.utc)
    index_id = f"{created:%Y%m%dT%H%M%SZ}-v{table_version}-{uuid.uuid4().hex[:6]}"
    index_dir = storage.join(index_root, index_id)
    task = ray.remote(num_cpus=1)(build_shard)
    results = ray.get([task.remote(i, [paths[j] for j in g], table_uri, index_dir, queries, RECALL_K)
                       for i, g in enumerate(groups)])
    results.sort(key=lambda r: r["shard"])
    exact_ids, _ = merge_topk([r["exact_ids"] for r in results], [r["exact_scores"] for r in results], RECALL_K)
    manifest = {
        "index_id": index_id,
        "factory": FACTORY,
        "metric": "inner_product",
        "dim": int(queries.shape[1]),
        "ntotal": sum(r["ntotal"] for r in results),
        "shards": [{"file": r["file"], "ids_file": r["ids_file"], "ntotal": r["ntotal"]} for r in results],
        "model": (encoder or {}).get("spec", {}).get("model"),
        "model_version": (encoder or {}).get("model_version"),
        "encoder": encoder,
        "table": table_uri,
        "table_version": table_version,
        "build": {"shards": len(results), "files": len(files), "created_at": created.isoformat()},
        "search_params": {},
    }
    if manifest["ntotal"] != n_rows:
        raise RuntimeError(f"Index holds {manifest['ntotal']} vectors, table v{table_version} has {n_rows} rows")
    storage.write_bytes_atomic(storage.join(index_dir, "manifest.json"), json.dumps(manifest, indent=2).encode())
    # Verify what was written, read back the way search reads it, before publishing.
    found, _ = ShardedIndex.open(index_root, index_id=index_id).search_vectors(queries, RECALL_K)
    manifest["recall_at_10"] = recall_at_k(found, exact_ids)
    manifest["recall_queries"] = int(len(queries))
    storage.write_bytes_atomic(storage.join(index_dir, "manifest.json"), json.dumps(manifest, indent=2).encode())
    storage.write_bytes_atomic(storage.join(index_root, "CURRENT"), index_id.encode())
    log.info("index %s: %d vectors in %d shards, recall@10 %.4f vs brute force",
             index_id, manifest["ntotal"], len(results), manifest["recall_at_10"])
    return manifest
