"""`sparse-embed bench index-serving`: the searcher's memory after opening against the index's
bytes, query latency cold and warm, and an update with a fraction of rows changed against a
rebuild of the same table version (cost and results), in one run.

Data: `benchmarks.index` tables (seeded vectors of low intrinsic dimension). A change
replaces rows the way the embed job does: tombstones mask the rows, and they are appended
again with a new etag and a new vector (same image_id). Two updates run one after the
other, each bringing its parent's recall ground truth up to date from the changes alone (a
build records its self queries' truth). Searcher figures come from a fresh subprocess whose
shard files were first dropped from the page cache (posix_fadvise DONTNEED): "cold" is the
first pass of single queries, "warm" the second pass.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from sparse_embed.jobs.options import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vectors", type=positive_int, default=1_000_000, help="database vectors (default 1M)")
    p.add_argument("--dim", type=positive_int, default=128, help="vector dimension (default 128)")
    p.add_argument("--files", type=positive_int, default=16, help="Parquet files the table is written in (default 16)")
    p.add_argument("--memory-budget", default="300MB", help="index memory budget (default 300MB)")
    p.add_argument("--nlist", type=positive_int, default=1024, help="IVF list count (default 1024)")
    p.add_argument("--changed", type=float, default=0.01, help="fraction of rows each update replaces (default 0.01)")
    p.add_argument("--queries", type=positive_int, default=500, help="single queries timed per pass (default 500)")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray CPUs (default 2)")
    p.add_argument("--workdir", default=None, help="where tables and indexes go (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated vectors (default 0)")
    p.add_argument("--searcher", default=None, help=argparse.SUPPRESS)  # internal: index root to open in this process


def rss_now() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


def percentile_ms(seconds: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `seconds`, in ms (pure; nearest rank)."""
    s = sorted(seconds)
    return 1000.0 * s[min(len(s) - 1, max(0, int(round(q / 100.0 * len(s) + 0.5)) - 1))]


def _searcher(args) -> dict:
    """Runs in a fresh process: drop the shards from the page cache, open, time single queries."""
    import faiss  # noqa: F401 - imported before the baseline: libraries are not the index's memory
    import fsspec  # noqa: F401
    import pyarrow.compute  # noqa: F401
    import pyarrow.ipc  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    pyarrow.array([0]).to_numpy()  # pyarrow's first to_numpy imports ~50 MiB of modules, whatever the array

    from benchmarks.index import generate
    from sparse_embed.pipeline.index import idmap  # noqa: F401
    from sparse_embed.pipeline.index.searcher import ShardedIndex, current_index_id, read_manifest, shard_uris

    root = args.searcher
    manifest = read_manifest(root, current_index_id(root))
    files = shard_uris(root, manifest)
    index_bytes = sum(os.path.getsize(f) for f in files)
    for f in files:  # cold: the files leave the page cache (clean pages; no root needed)
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    queries = generate(args.queries, args.dim, seed=args.seed * 100003 + 77777)
    before = rss_now()
    t0 = time.perf_counter()
    index = ShardedIndex.open(root)
    open_s = time.perf_counter() - t0
    opened = rss_now()
    passes = []
    for _ in range(2):
        times = []
        for i in range(len(queries)):
            t = time.perf_counter()
            index.search_vectors(queries[i:i + 1], 10)
            times.append(time.perf_counter() - t)
        passes.append(times)
    after = rss_now()
    return {"index_bytes": index_bytes, "open_s": open_s, "rss_before": before["VmRSS"], "rss_opened": opened["VmRSS"],
            "rss_open_delta": opened["VmRSS"] - before["VmRSS"], "anon_after_queries": after["RssAnon"],
            "file_after_queries": after["RssFile"], "cold_p50": percentile_ms(passes[0], 50),
            "cold_p99": percentile_ms(passes[0], 99), "warm_p50": percentile_ms(passes[1], 50),
            "warm_p99": percentile_ms(passes[1], 99), "params": manifest.get("search_params"),
            "shards": len(files)}


def _change(table: str, n: int, fraction: float, dim: int, seed: int, etag: str) -> int:
    """Replace `fraction` of the rows (seeded ids) as a nightly does: remove the live rows
    (one commit, the table's mechanism: store/removal.py), append new rows with new
    vectors (one append)."""
    import numpy as np
    import pyarrow as pa

    from benchmarks.index import generate
    from sparse_embed.pipeline.store import live, removal, tables

    ids = np.sort(np.random.default_rng(seed).choice(n, size=max(1, int(n * fraction)), replace=False)).astype("int64")
    schema = tables.embeddings_schema(dim)
    by_file = []
    for f in live.table_files(table).files:
        t = live.read_file(table, f, ["image_id"], positions=True)
        hit = np.isin(t.column("image_id").to_numpy(), ids)
        if hit.any():
            by_file.append((f, t.column("_row").to_numpy()[hit]))
    removal.remove_positions(table, by_file, tag=f"bench-{etag}")
    x = generate(len(ids), dim, seed=seed * 7919 + 3)
    m = len(ids)
    tables.append(table, pa.table({
        "image_id": pa.array(ids), "uri": [f"bench://{i}" for i in ids.tolist()], "etag": pa.array([etag] * m),
        "size": pa.array(np.zeros(m, dtype="int64")), "mtime": pa.array([None] * m, pa.timestamp("us", tz="UTC")),
        "width": pa.array(np.zeros(m, dtype="int32")), "height": pa.array(np.zeros(m, dtype="int32")),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
        "model": pa.array(["bench"] * m), "model_version": pa.array(["bench"] * m), "run_id": pa.array([f"bench-{etag}"] * m),
    }), schema)
    return m


def _recall(index, queries, exact_ids, params) -> float:
    from sparse_embed.pipeline.index.tune import recall_at_k

    index.set_search_params(params)
    return recall_at_k(index.search_vectors(queries, 10)[0], exact_ids)


def _exact(table: str, queries, k: int):
    from sparse_embed.pipeline.index.snapshot import TableSnapshot
    from sparse_embed.pipeline.index.update import _exact_over_table

    return _exact_over_table(TableSnapshot(table), queries, k)


def _run_searcher(args, root: str) -> dict:
    cmd = [sys.executable, "-m", "sparse_embed.jobs.cli", "bench", "index-serving", "--searcher", root,
           "--dim", str(args.dim), "--queries", str(args.queries), "--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"searcher subprocess failed: {out.stderr[-2000:]}")
    return json.loads(line[-1].split(" ", 1)[1])


def run(args) -> int:
    if args.searcher:
        print("BENCH_RESULT " + json.dumps(_searcher(args)), flush=True)
        return 0
    if not 0.0 < args.changed < 1.0:
        raise ValueError(f"Expected --changed in (0, 1), got {args.changed!r}")
    import ray

    from benchmarks.index import generate, write_table
    from sparse_embed.pipeline.index.build import BuildConfig, build_index
    from sparse_embed.pipeline.index.searcher import ShardedIndex
    from sparse_embed.pipeline.index.update import UpdateConfig, update_index

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serving-")
        args.workdir = tmp.name
    try:
        table, root = f"{args.workdir}/embeddings", f"{args.workdir}/index"
        t0 = time.perf_counter()
        write_table(table, args.vectors, args.dim, args.files, args.seed)
        print(f"[bench index-serving] table {args.vectors} x {args.dim} in {time.perf_counter() - t0:.1f} s", flush=True)
        ray.init(num_cpus=args.workers, include_dashboard=False, object_store_memory=512 * 1024**2)
        cfg = dict(memory_budget=args.memory_budget, nlist=args.nlist)
        t0 = time.perf_counter()
        built = build_index(BuildConfig(table, root, **cfg))
        build_s = time.perf_counter() - t0
        print(f"[bench index-serving] built {built['factory']} in {build_s:.1f} s", flush=True)
        serving = _run_searcher(args, root)

        updates = []
        for step in (1, 2):
            changed = _change(table, args.vectors, args.changed, args.dim, args.seed * 31 + step, f"e{step + 1}")
            t0 = time.perf_counter()
            m = update_index(UpdateConfig(table, root))
            how = m["update"]["truth"] if "update" in m else f"rebuilt: {m['build'].get('rebuild_reason')}"
            updates.append({"changed": changed, "seconds": time.perf_counter() - t0, "truth": how,
                            "recall": m["recall_at_10"], "params": m["search_params"],
                            "diff": (m.get("update") or {}).get("added_rows")})
            print(f"[bench index-serving] update {step}: {updates[-1]}", flush=True)
        t0 = time.perf_counter()
        ref = build_index(BuildConfig(table, f"{args.workdir}/rebuilt", **cfg))
        rebuild_s = time.perf_counter() - t0
        print(f"[bench index-serving] rebuilt in {rebuild_s:.1f} s", flush=True)

        queries = generate(1000, args.dim, seed=args.seed * 100003 + 55555)  # not in the table
        exact_ids, _ = _exact(table, queries, 10)
        updated = ShardedIndex.open(root)
        rebuilt = ShardedIndex.open(f"{args.workdir}/rebuilt")
        compare = {"updated": _recall(updated, queries, exact_ids, m["search_params"]),
                   "rebuilt": _recall(rebuilt, queries, exact_ids, ref["search_params"]),
                   "updated_tuned": m["recall_at_10"], "rebuilt_tuned": ref["recall_at_10"],
                   "same_ids": bool(updated.ntotal == rebuilt.ntotal
                                    and (updated.live_ids() == rebuilt.live_ids()).all())}
        print_table(args, built, build_s, serving, updates, rebuild_s, compare)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    return 0


def print_table(args, built, build_s, s, updates, rebuild_s, c) -> None:
    mib = 1024**2
    print(f"\n{args.vectors} x {args.dim}, {built['factory']}, budget {args.memory_budget}, build {build_s:.1f} s\n")
    print("| index bytes | shards | open s | RSS growth on open | RSS / index bytes | anon RSS after 2 passes | "
          "file RSS after 2 passes | cold p50 ms | cold p99 ms | warm p50 ms | warm p99 ms | params |")
    print("|" + "---|" * 12)
    print(f"| {s['index_bytes'] / mib:.0f} MiB | {s['shards']} | {s['open_s']:.2f} | {s['rss_open_delta'] / mib:.1f} MiB | "
          f"{s['rss_open_delta'] / max(1, s['index_bytes']):.3f} | {s['anon_after_queries'] / mib:.0f} MiB | "
          f"{s['file_after_queries'] / mib:.0f} MiB | {s['cold_p50']:.2f} | {s['cold_p99']:.2f} | {s['warm_p50']:.2f} | "
          f"{s['warm_p99']:.2f} | {s['params']} |")
    print("\n| update | rows changed | seconds | / rebuild | diff read from | ground truth | tuned recall@10 | params |")
    print("|---|---|---|---|---|---|---|---|")
    for i, u in enumerate(updates, 1):
        diff = u.get("diff") or {}
        print(f"| {i} | {u['changed']} | {u['seconds']:.1f} | {u['seconds'] / rebuild_s:.3f} | "
              f"{diff.get('read_from')} ({diff.get('files_read')} files) | {u['truth']} | {u['recall']:.4f} | {u['params']} |")
    print(f"\nrebuild of the same table version: {rebuild_s:.1f} s")
    print(f"recall@10 on 1000 new queries: updated {c['updated']:.4f}, rebuilt {c['rebuilt']:.4f} "
          f"(tuned: {c['updated_tuned']:.4f} / {c['rebuilt_tuned']:.4f}); same live ids: {c['same_ids']}")
