"""Hardening, a worker node lost mid-run: a multi-node `ray.cluster_utils.Cluster` (head +
two workers with one logical GPU each, so one embed actor per worker node) loses a worker
node while the job runs (`remove_node(allow_graceful=False)` kills its raylet and every
process on it). Ray Data restarts the lost actor (max_restarts=-1) and retries its batches,
so the run completes exactly once, and a rerun finds nothing left to do."""
from __future__ import annotations

import pytest

from sparse_embed.pipeline.embed.run import EmbedConfig

from helpers import SPEC
from helpers.faults import (RAY_INIT, assert_exactly_once, assert_settled, fill, finish_or_resume, pending_markers,
                           run_in_thread, wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~100 s on a loaded 2-core machine


def test_worker_node_removed_mid_run(object_store, bucket):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": object_store.aws_env()})
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1, env_vars=object_store.aws_env()) for _ in range(2)]
        RAY_INIT.clear()
        RAY_INIT.update(address=cluster.address, runtime_env={"env_vars": object_store.aws_env()})
        ray.init(**RAY_INIT)
        source, uris = fill(bucket, 40, seed=25)
        out = f"{bucket}/out"
        cfg = EmbedConfig(source=source, out=out, spec=SPEC, decode_batch_size=4, embed_batch_size=4, rows_per_file=4, build_index=False)
        t, box = run_in_thread(cfg)
        wait_for(lambda: pending_markers(out) >= 1 or not t.is_alive(), 240, "the first written files")
        assert t.is_alive(), f"the run ended before the fault: {box}"
        cluster.remove_node(workers[0], allow_graceful=False)
        outcome = finish_or_resume(t, box, cfg, timeout=300)
        assert outcome == "completed", f"the run stopped when a worker node was removed: {box.get('message')}"
        assert box["result"]["counts"]["processed"] == len(uris), box["result"]["counts"]
        assert_exactly_once(source, out)
        assert_settled(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
