"""Uniform row samples of a table version, drawn where the data is.

A sample of `count` rows without replacement is split into per-file quotas (a seeded
multivariate hypergeometric draw over the files' row counts, which is exactly how many of
a uniform sample's rows fall in each file); each file then fills its quota with a
reservoir over its record batches (Algorithm R), so a file is never held whole and the
embedding is read as float32 from each batch's flat list values (no Arrow list
concatenation, so no 32-bit list offsets). The same function draws in this process
(`sample_local`) or in Ray tasks (`sample_in_tasks`): with one seed both give one sample.

Training samples are capped by memory (`capped_train_size`): the k-means task holds the
sample (4*D bytes a vector) and about as much again while training.
"""
from __future__ import annotations

SAMPLE_BATCH_ROWS = 16384  # rows per record batch while sampling: 32 MiB of float32 at D=512
TRAIN_MEMORY_FACTOR = 2  # k-means holds the sample and about as much again (assignments, copies): measured ~1.8x
FILES_PER_SAMPLE_TASK = 8  # files a sampling task reads one after another


def file_quotas(rows: list[int], count: int, seed: int) -> list[int]:
    """How many of a uniform `count`-row sample (without replacement) fall in each file of
    `rows` rows: a seeded multivariate hypergeometric draw; all rows when count >= sum (pure)."""
    import numpy as np

    total = sum(rows)
    if count >= total:
        return list(rows)
    if count <= 0:
        return [0] * len(rows)
    rng = np.random.default_rng([seed, 0x5A4D])
    return [int(q) for q in rng.multivariate_hypergeometric(np.asarray(rows, dtype="int64"), count)]


def sample_cap(memory_bytes: int, dim: int) -> int:
    """Training vectors whose k-means fits in `memory_bytes` (pure)."""
    return max(1, int(memory_bytes) // (4 * dim * TRAIN_MEMORY_FACTOR))


def capped_train_size(want: int, dim: int, memory_bytes: int) -> int:
    """The plan's training sample size, capped by the memory of the task that trains (pure)."""
    return max(1, min(int(want), sample_cap(memory_bytes, dim)))


class Reservoir:
    """A uniform sample of `k` rows from a stream of (ids, vectors) batches (Algorithm R,
    vectorised per batch): row j of the stream is kept with probability k / (j + 1) and
    replaces a uniformly chosen slot."""

    def __init__(self, k: int, rng):
        self.k, self.rng, self.seen = int(k), rng, 0
        self.ids = None
        self.vectors = None

    def offer(self, ids, vectors) -> None:
        import numpy as np

        b = len(ids)
        if b == 0 or self.k == 0:
            self.seen += b
            return
        if self.vectors is None:
            self.ids = np.zeros(self.k, dtype="int64")
            self.vectors = np.zeros((self.k, vectors.shape[1]), dtype="float32")
        j = np.arange(self.seen, self.seen + b)  # stream positions of this batch
        fill = j < self.k
        self.ids[j[fill]], self.vectors[j[fill]] = ids[fill], vectors[fill]
        rest = np.flatnonzero(~fill)
        if len(rest):
            slot = self.rng.integers(0, j[rest] + 1)  # uniform in [0, j]
            keep = slot < self.k
            rows, slots = rest[keep], slot[keep]
            # Sequential semantics: a later row replacing the same slot wins.
            last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
            self.ids[slots[last]], self.vectors[slots[last]] = ids[rows[last]], vectors[rows[last]]
        self.seen += b

    def result(self):
        """(ids, vectors) of the min(k, seen) kept rows."""
        import numpy as np

        n = min(self.k, self.seen)
        if self.vectors is None:
            return np.zeros(0, dtype="int64"), np.zeros((0, 0), dtype="float32")
        return self.ids[:n].copy(), self.vectors[:n].copy()


def reservoir_file(path: str, table_uri: str, quota: int, seed: int, exclude=None, dv=None):
    """One file's share of the sample: `quota` rows by a reservoir over its live rows'
    record batches (`dv`: its deletion vector, or None); rows whose image_id is in
    `exclude` are skipped. Returns (ids, vectors (quota, D)); fewer rows when the file has fewer."""
    import numpy as np

    from sparse_embed.pipeline.index.vectors import vectors_of
    from sparse_embed.pipeline.store import live

    res = Reservoir(quota, np.random.default_rng([seed, 0x5E5E]))
    if quota <= 0:
        return res.result()
    for batch in live.file_batches(table_uri, live.file_at(table_uri, path, dv), ["image_id", "embedding"],
                                   batch_size=SAMPLE_BATCH_ROWS):
        ids = batch.column("image_id").to_numpy(zero_copy_only=False).astype("int64")
        vectors = vectors_of(batch.column("embedding"))
        if exclude is not None and len(exclude):
            keep = ~np.isin(ids, exclude)
            ids, vectors = ids[keep], vectors[keep]
        res.offer(ids, vectors)
    return res.result()


def sample_files(jobs: list[tuple[str, int, int]], table_uri: str, exclude=None, dvs=None):
    """Ray task body (and the local path): (ids, vectors) of the files' reservoirs, in order;
    `jobs` holds (path, quota, seed) per file; rows a file's deletion vector (`dvs`:
    path -> descriptor) marks are not drawn."""
    import numpy as np

    parts = [reservoir_file(p, table_uri, q, s, exclude, (dvs or {}).get(p)) for p, q, s in jobs]
    parts = [(i, v) for i, v in parts if len(i)]
    if not parts:
        return np.zeros(0, dtype="int64"), np.zeros((0, 0), dtype="float32")
    return np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])


def sample_jobs(snap, count: int, seed: int) -> list[list[tuple[str, int, int]]]:
    """The per-file (path, quota, seed) of a sample, grouped FILES_PER_SAMPLE_TASK files a
    task; files with no quota are left out."""
    quotas = file_quotas(snap.rows, count, seed)
    jobs = [(p, q, seed * 1_000_003 + i) for i, (p, q) in enumerate(zip(snap.paths, quotas)) if q > 0]
    return [jobs[i:i + FILES_PER_SAMPLE_TASK] for i in range(0, len(jobs), FILES_PER_SAMPLE_TASK)]


def sample_local(snap, count: int, seed: int, *, exclude=None):
    """The sample drawn in this process: (ids, vectors)."""
    import numpy as np

    parts = [sample_files(g, snap.uri, exclude, snap.dvs) for g in sample_jobs(snap, count, seed)]
    parts = [(i, v) for i, v in parts if len(i)]
    if not parts:
        return np.zeros(0, dtype="int64"), np.zeros((0, 0), dtype="float32")
    return np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])


def sample_in_tasks(snap, count: int, seed: int, *, exclude=None) -> list:
    """The sample drawn in Ray tasks, one per group of files: a list of ObjectRefs to
    (ids, vectors) parts, which the driver passes on without fetching."""
    import ray

    task = ray.remote(num_cpus=1)(sample_files)
    exclude_ref = ray.put(exclude) if exclude is not None else None
    return [task.remote(g, snap.uri, exclude_ref, snap.dvs) for g in sample_jobs(snap, count, seed)]
