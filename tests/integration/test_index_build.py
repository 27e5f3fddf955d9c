"""Compressed builds: an IVF-PQ index planned under a memory budget reaches its recall
target after tuning; a build SIGKILLed midway leaves CURRENT alone and a rerun completes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sparse_embed.pipeline.store import storage, tables
from sparse_embed.pipeline.index.build import BuildConfig, build_index
from sparse_embed.pipeline.index.tune import exact_topk, recall_at_k
from sparse_embed.pipeline.index.searcher import ShardedIndex, current_index_id

from helpers import unit_vectors, write_table

D, N = 64, 5000
PQ_BUDGET = 250_000  # bytes: SQ8 (72 B/vector) does not fit, PQ32 (40 B/vector) does -> IVF128,PQ32


def _synthetic(n, nq, d=D, seed=1):
    """faiss's SyntheticDataset (low intrinsic dimension, like real embeddings), L2-normalised."""
    from faiss.contrib.datasets import SyntheticDataset

    ds = SyntheticDataset(d, 0, n, nq, metric="IP", seed=seed)
    xb, xq = ds.get_database(), ds.get_queries()
    return xb / np.linalg.norm(xb, axis=1, keepdims=True), xq / np.linalg.norm(xq, axis=1, keepdims=True)


@pytest.mark.integration
def test_ivf_pq_build_reaches_target_recall_after_tuning(ray_local, bucket):
    xb, xq = _synthetic(N, 200)
    ids = np.arange(N, dtype="int64") * 3 + 7
    table, root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index"
    write_table(table, xb, ids, files=4)
    # PQ32 at 2 dims per byte tops out near 0.91 intersection-recall@10 on this data: the
    # test's target sits below that ceiling, the default 0.95 would be recorded as not reached.
    target = 0.85
    m = build_index(BuildConfig(table, root, shards=2, memory_budget=PQ_BUDGET, target_recall=target))
    assert m["factory"] == "IVF128,PQ32" and m["plan"]["kind"] == "ivf_pq" and m["plan"]["layout"] == "merged"
    assert len(m["shards"]) == 1 and m["shards"][0]["file"] == "index.faiss" and m["shards"][0]["ntotal"] == N
    held = m["build"]["held_out_ids"]  # rows left out of the slices and tuned on, then merged in
    assert len(m["build"]["slices"]) == 2 and sum(s["ntotal"] for s in m["build"]["slices"]) + len(held) == N
    assert m["recall"]["held_out_kind"] == "table rows held out of the build" and len(held) == 512
    t = m["tuning"]
    nprobe = m["search_params"]["nprobe"]
    assert t["reached_target"] and 1 < nprobe < 128, t
    # The smallest reaching nprobe: the step before it missed the target.
    curve = {c["nprobe"]: c["recall"] for c in t["tune_curve"]}
    assert curve[nprobe] >= target and all(r < target for p, r in curve.items() if p < nprobe)
    assert m["recall_at_10"] >= target - 0.03, t  # measured on the held-out half of the queries; tolerance 0.03
    assert t["queries_per_s"] > 0 and t["latency_ms_per_query"] > 0

    # Independent check with queries held aside from the data (never in the table).
    index = ShardedIndex.open(root)
    assert index.search_params == {"nprobe": nprobe}
    found, _ = index.search_vectors(xq, 10)
    exact, _ = exact_topk(xq, xb, ids, 10)
    assert recall_at_k(found, exact) >= target - 0.03


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import sparse_embed.pipeline.index.build as ib

    def die(*a, **k):  # the build's shard files are written; die before merging or publishing
        os.killpg(0, signal.SIGKILL)

    ib.merge_slices = die
    ib.build_index(ib.BuildConfig(sys.argv[1], sys.argv[2], shards=2, memory_budget=sys.argv[3], target_recall=0.5))
""")


@pytest.mark.integration
def test_build_sigkilled_midway_leaves_current_and_a_rerun_completes(ray_local, bucket, tmp_path):
    table, root = f"{bucket}/emb/embeddings", f"{bucket}/emb/index"
    write_table(table, unit_vectors(1000, 16, seed=4), np.arange(1000, dtype="int64"), files=2)
    first = build_index(BuildConfig(table, root, shards=2))  # exact
    write_table(table, unit_vectors(1000, 16, seed=5), np.arange(1000, 2000, dtype="int64"), files=2)

    script = tmp_path / "kill_build.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), RAY_ADDRESS="local")  # a Ray of its own, killed with it
    proc = subprocess.run([sys.executable, str(script), table, root, "40KB"], env=env, cwd=os.getcwd(),
                          start_new_session=True, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # The killed build left shard files in a directory of its own; CURRENT did not move.
    assert current_index_id(root) == first["index_id"]
    dirs = [p.rsplit("/", 1)[-1] for p in storage.filesystem(root).ls(storage.strip_scheme(root))]
    orphans = [d for d in dirs if d not in ("CURRENT", first["index_id"])]
    assert len(orphans) == 1
    interim = f"{root}/{orphans[0]}/manifest.json"  # written for tuning, before the merge it died in
    assert not storage.exists(interim) or json.loads(storage.read_bytes(interim))["build"]["complete"] is False
    assert ShardedIndex.open(root).manifest["ntotal"] == 1000

    from sparse_embed.jobs.cli import main

    assert main(["index", "build", "--table", table, "--out", root, "--shards", "2", "--memory-budget", "40KB",
                 "--target-recall", "0.5"]) == 0
    second = ShardedIndex.open(root)
    assert second.manifest["index_id"] not in (first["index_id"], orphans[0]) and second.ntotal == 2000
    assert second.manifest["plan"]["kind"] == "ivf_pq" and second.manifest["table_version"] == tables.version_of(table)


@pytest.mark.gpu
def test_training_on_gpu_matches_cpu_recall():
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        pytest.skip("needs faiss-gpu and a GPU")
    from sparse_embed.pipeline.index.build import train_empty_index

    xb, xq = _synthetic(20000, 100)
    recalls = []
    for gpu in (False, True):
        index = faiss.deserialize_index(np.frombuffer(train_empty_index("IVF256,Flat", D, xb, use_gpu=gpu), dtype="uint8"))
        index.add(xb)
        index.nprobe = 16
        recalls.append(recall_at_k(index.search(xq, 10)[1], exact_topk(xq, xb, np.arange(len(xb)), 10)[0]))
    assert abs(recalls[0] - recalls[1]) <= 0.03, recalls
