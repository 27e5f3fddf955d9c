"""Training the empty index (coarse k-means, then the codes) in one Ray task.

Where it runs (`training_placement`): on a GPU task when the cluster has a GPU and a
probe task on a GPU worker imports faiss with GPU support; otherwise on a CPU task that
asks for every CPU of the largest node, with faiss's OpenMP threads set to that count
(a task's default is num_cpus=1 and, under Ray, one OpenMP thread).
Very large list counts (`use_two_level`) use faiss's two-level clustering: sqrt(nlist)
coarse clusters, each split in proportion to its size, so no k-means step compares every
training vector with every centroid.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

TWO_LEVEL_MIN_NLIST = 65536  # from here one flat k-means costs n*nlist*D flops per iteration; two levels cost ~n*sqrt(nlist)*D*2
GPU_PROBE_TIMEOUT_S = 120.0


def training_placement(cluster_gpus: float, faiss_gpu_on_worker: bool | None) -> str:
    """"gpu" when the cluster has a GPU and faiss-gpu imports (and sees it) on a GPU
    worker; "cpu" otherwise, including when the probe could not run (None) (pure)."""
    return "gpu" if cluster_gpus >= 1 and faiss_gpu_on_worker is True else "cpu"


def training_cpus(node_cpus: list[float]) -> int:
    """CPUs the CPU training task asks for: all of the largest node's (pure)."""
    return max([1] + [int(c) for c in node_cpus])


def use_two_level(nlist: int) -> bool:
    return nlist >= TWO_LEVEL_MIN_NLIST


def two_level_coarse(nlist: int) -> int:
    """First-level cluster count of the two-level clustering: ~sqrt(nlist) (pure)."""
    return max(1, int(math.isqrt(nlist)))


def faiss_gpu_available() -> bool:
    """Probe body: whether this process's faiss has GPU support and sees a GPU."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def train_empty_index(factory: str, dim: int, train, *, seed: int = 0, use_gpu: bool | None = None,
                      threads: int | None = None) -> bytes:
    """Train an empty index for `factory` on `train` (n, D); serialized bytes. With
    use_gpu, k-means runs on the GPU (the IVF's clustering_index); `threads` sets faiss's
    OpenMP threads."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(int(threads))
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        pq = faiss.downcast_index(ivf)
        if hasattr(pq, "do_polysemous_training"):
            pq.do_polysemous_training = False  # only for Hamming pre-filtering, which search does not use; ~100x the PQ training time
        gpu = use_gpu if use_gpu is not None else faiss_gpu_available()
        if use_two_level(ivf.nlist):
            _train_two_level(index, train, seed=seed, gpu=bool(gpu))
        else:
            if gpu:
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
            index.train(train)
            if gpu:
                ivf.clustering_index = None
    return faiss.serialize_index(index).tobytes()


def _train_two_level(index, xt, *, seed: int, gpu: bool) -> None:
    """Pre-transforms first (each trained on, then applied to, the sample), then the IVF's
    centroids from faiss.contrib.clustering.two_level_clustering, then its codes."""
    import faiss
    from faiss.contrib.clustering import two_level_clustering

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = index.chain.at(i)
            vt.train(xt)
            xt = vt.apply(xt)
        _train_two_level(index.index, xt, seed=seed, gpu=gpu)
        index.is_trained = True
        return
    ivf = faiss.extract_index_ivf(index)
    centroids, _ = two_level_clustering(xt, two_level_coarse(ivf.nlist), ivf.nlist, seed=seed, gpu=gpu,
                                        spherical=ivf.metric_type == faiss.METRIC_INNER_PRODUCT)
    ivf.quantizer.train(centroids)
    ivf.quantizer.add(centroids)
    index.train(xt)  # the quantizer holds nlist centroids, so IVF training goes straight to the codes


def train_from_parts(factory: str, dim: int, seed: int, use_gpu: bool, threads: int, *parts) -> bytes:
    """Ray task body: the sample parts (ids, vectors) that the sampling tasks returned,
    concatenated here (never in the driver), then trained on."""
    import numpy as np

    vectors = [v for _, v in parts if len(v)]
    train = np.ascontiguousarray(np.concatenate(vectors) if len(vectors) > 1 else vectors[0], dtype="float32")
    del parts, vectors
    return train_empty_index(factory, dim, train, seed=seed, use_gpu=use_gpu, threads=threads)


def probe_gpu_faiss() -> bool | None:
    """Run faiss_gpu_available on a GPU worker; None when no GPU task ran in time."""
    import ray

    ref = ray.remote(num_gpus=1)(faiss_gpu_available).remote()
    try:
        return bool(ray.get(ref, timeout=GPU_PROBE_TIMEOUT_S))
    except Exception as e:  # noqa: BLE001 - a probe that cannot run means: train on CPUs
        log.warning("faiss-gpu probe on a GPU worker failed (%s): training on CPUs", e)
        ray.cancel(ref, force=True)
        return None


def train_in_task(factory: str, dim: int, sample_refs: list, *, seed: int, sample_bytes: int) -> tuple[bytes, dict]:
    """Train in one Ray task placed by training_placement; (index bytes, placement record)."""
    import ray

    from sparse_embed.pipeline.index.resources import node_resources, task_memory

    nodes = node_resources()
    gpus = ray.cluster_resources().get("GPU", 0)
    probe = probe_gpu_faiss() if gpus >= 1 else None
    where = training_placement(gpus, probe)
    memory = task_memory(sample_bytes * 3, nodes)  # the sample parts, their concatenation and k-means' working set
    if where == "gpu":
        task = ray.remote(num_gpus=1, num_cpus=1, memory=memory)(train_from_parts)
        threads = 1
    else:
        threads = training_cpus([n.get("CPU", 0) for n in nodes])
        task = ray.remote(num_cpus=threads, memory=memory)(train_from_parts)
    log.info("training %s on a %s task (%d CPU thread(s), %d bytes declared)", factory, where, threads, memory)
    out = ray.get(task.remote(factory, dim, seed, where == "gpu", threads, *sample_refs))
    return out, {"placement": where, "threads": threads, "memory": memory}
