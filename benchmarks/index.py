"""`sparse-embed bench index`: build an index over N x D seeded vectors in one process and
sharded on Ray workers, side by side in one run; print build time, peak memory, recall@10
and queries/s.

Data: a Delta table of L2-normalised vectors with a low intrinsic dimension (a seeded
Gaussian in INTRINSIC dims, projected to D, plus noise), written in chunks so RAM stays
at one chunk. Queries are drawn the same way from another seed: held aside, never indexed.
Each build runs in a subprocess of its own, so its peak RSS (VmHWM) is its own.
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

INTRINSIC = 32
NOISE = 0.05


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vectors", type=positive_int, default=1_000_000, help="number of database vectors (default 1M)")
    p.add_argument("--dim", type=positive_int, default=256, help="vector dimension (default 256)")
    p.add_argument("--queries", type=positive_int, default=1000, help="held-aside query vectors for recall and queries/s (default 1000)")
    p.add_argument("--files", type=positive_int, default=16, help="Parquet files (appends) the table is written in (default 16)")
    p.add_argument("--memory-budget", default="300MB",
                   help="index memory budget passed to the planner (default 300MB: IVF,SQ8 for 1M x 256)")
    p.add_argument("--nlist", type=positive_int, default=1024,
                   help="IVF list count; default 1024, since the guideline 16384+ takes hours of k-means on 2 CPU cores")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray workers (slices) for the sharded build (default 2)")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 the tuner aims for (default 0.95)")
    p.add_argument("--workdir", default=None, help="where the table and indexes go (default: a temporary directory, removed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated vectors (default 0)")
    p.add_argument("--mode", choices=("all", "local", "ray"), default="all",
                   help="internal: 'all' runs both builds as subprocesses; 'local'/'ray' runs one build")


def generate(rows: int, dim: int, seed: int, *, basis_seed: int = 12345):
    """(rows, dim) float32, L2-normalised, intrinsic dimension INTRINSIC (seeded)."""
    import numpy as np

    basis = np.random.default_rng(basis_seed).standard_normal((INTRINSIC, dim)).astype("float32")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, INTRINSIC)).astype("float32") @ basis
    x += NOISE * np.sqrt(INTRINSIC) * rng.standard_normal((rows, dim)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_table(uri: str, n: int, dim: int, files: int, seed: int) -> None:
    import numpy as np
    import pyarrow as pa

    from sparse_embed.pipeline.store import tables

    schema = tables.embeddings_schema(dim)
    bounds = [n * i // files for i in range(files + 1)]
    for f, (a, b) in enumerate(zip(bounds, bounds[1:])):
        x = generate(b - a, dim, seed * 100003 + f)
        m = b - a
        tables.append(uri, pa.table({
            "image_id": pa.array(np.arange(a, b, dtype="int64")), "uri": [f"bench://{i}" for i in range(a, b)],
            "etag": pa.array(["e"] * m), "size": pa.array(np.zeros(m, dtype="int64")),
            "mtime": pa.array([None] * m, pa.timestamp("us", tz="UTC")),
            "width": pa.array(np.zeros(m, dtype="int32")), "height": pa.array(np.zeros(m, dtype="int32")),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
            "model": pa.array(["bench"] * m), "model_version": pa.array(["bench"] * m), "run_id": pa.array(["bench"] * m),
        }), schema)
        del x


def _one_build(args) -> dict:
    """Runs in its own process: one build, its numbers as a dict."""
    from sparse_embed.pipeline.index.build import BuildConfig, build_index, peak_rss_bytes

    queries = generate(args.queries, args.dim, seed=args.seed * 100003 + 99991)
    if args.mode == "ray":
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, object_store_memory=512 * 1024**2)
    t0 = time.perf_counter()
    m = build_index(BuildConfig(f"{args.workdir}/embeddings", f"{args.workdir}/index_{args.mode}", memory_budget=args.memory_budget,
                    nlist=args.nlist, target_recall=args.target_recall, executor=args.mode, queries=queries,
                    shards=args.workers if args.mode == "ray" else 1))
    wall = time.perf_counter() - t0
    t = m["tuning"]
    return {"mode": args.mode, "factory": m["factory"], "slices": len(m["build"]["slices"]), "build_s": wall,
            **m["build"]["timings"], "driver_peak_rss": peak_rss_bytes(),
            "worker_peak_rss": max(s["peak_rss"] for s in m["build"]["slices"]) if args.mode == "ray" else 0,
            "recall_at_10": m["recall_at_10"], "search_params": m["search_params"], "qps": t["queries_per_s"],
            "ms_per_query": t["latency_ms_per_query"], "reached_target": t["reached_target"]}


def _gb(b: float) -> str:
    return f"{b / 1024**3:.2f}" if b else "-"


def run(args) -> int:
    if not 0.0 < args.target_recall <= 1.0:
        raise ValueError(f"Expected --target-recall in (0, 1], got {args.target_recall!r}")
    if args.mode != "all":
        print("BENCH_RESULT " + json.dumps(_one_build(args)), flush=True)
        return 0
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-index-")
        args.workdir = tmp.name
    try:
        t0 = time.perf_counter()
        if not os.path.exists(f"{args.workdir}/embeddings/_delta_log"):
            write_table(f"{args.workdir}/embeddings", args.vectors, args.dim, args.files, args.seed)
        print(f"[bench index] table of {args.vectors} x {args.dim} float32 ready in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        for mode in ("local", "ray"):
            cmd = [sys.executable, "-m", "sparse_embed.jobs.cli", "bench", "index", "--mode", mode, "--workdir", args.workdir,
                   "--vectors", str(args.vectors), "--dim", str(args.dim), "--queries", str(args.queries),
                   "--memory-budget", str(args.memory_budget), "--nlist", str(args.nlist), "--workers", str(args.workers),
                   "--target-recall", str(args.target_recall), "--seed", str(args.seed)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
            if out.returncode != 0 or not line:
                raise RuntimeError(f"bench build ({mode}) failed: {out.stderr[-2000:]}")
            rows.append(json.loads(line[-1].split(" ", 1)[1]))
        print_table(rows, args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def print_table(rows: list[dict], args) -> None:
    head = ("build", "factory", "slices", "train s", "add s", "merge s", "tune s", "total s", "driver peak GiB",
            "worker peak GiB", "recall@10", "params", "queries/s", "ms/query (1 at a time)")
    print(f"\n{args.vectors} x {args.dim} float32, {args.queries} held-aside queries, budget {args.memory_budget}, "
          f"target recall@10 {args.target_recall}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        name = "single process" if r["mode"] == "local" else f"Ray, {r['slices']} workers"
        params = ",".join(f"{k}={v}" for k, v in r["search_params"].items()) or "exact"
        print(f"| {name} | {r['factory']} | {r['slices']} | {r['train_s']:.1f} | {r['add_s']:.1f} | {r['merge_s']:.1f} | "
              f"{r['tune_s']:.1f} | {r['build_s']:.1f} | {_gb(r['driver_peak_rss'])} | {_gb(r['worker_peak_rss'])} | "
              f"{r['recall_at_10']:.4f} | {params} | {r['qps']:.0f} | {r['ms_per_query']:.2f} |")
    if len(rows) == 2:
        print(f"\nsharded / single-process build time: {rows[1]['build_s'] / rows[0]['build_s']:.2f}x "
              f"(add phase {rows[1]['add_s'] / max(rows[0]['add_s'], 1e-9):.2f}x)")
