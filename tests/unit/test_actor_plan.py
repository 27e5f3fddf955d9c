"""The actor plan is checked against the cluster before anything is fetched (actor_plan.py):
plans that cannot run are one ValueError naming the option; --actor-wait waits for an
autoscaling cluster and names what never came. The last test runs a real Ray cluster with
logical GPUs (ray.cluster_utils.Cluster)."""
from __future__ import annotations

import pytest

from sparse_embed.pipeline.embed.actor_plan import (DECODE_IMAGES_PER_CPU_S, FETCH_TASK_CPUS, GPU_IMAGES_S,
                                                    decode_cpus_per_gpu, missing_resources, plan_actors,
                                                    plan_when_ready, resolve_decode, wanted_resources)


@pytest.mark.parametrize("gpu_rate,decode_rate,want", [(1500, 92, 17), (92, 92, 1), (93, 92, 2), (10, 500, 1), (7800, 400, 20)])
def test_decode_cpus_per_gpu_is_the_rounded_up_rate_ratio(gpu_rate, decode_rate, want):
    assert decode_cpus_per_gpu(gpu_rate, decode_rate) == want
    assert decode_cpus_per_gpu(gpu_rate, decode_rate) * decode_rate >= gpu_rate  # the decode keeps up


def test_decode_cpus_per_gpu_refuses_non_positive_rates():
    with pytest.raises(ValueError, match="positive rates"):
        decode_cpus_per_gpu(100, 0)


def test_more_actors_than_gpus_is_refused_naming_actors():
    with pytest.raises(ValueError, match=r"--actors 3 exceeds the cluster's 2 GPUs.*--actor-wait"):
        plan_actors({"CPU": 32, "GPU": 2}, actors=3, actor_cpus=None)


def test_gpus_with_one_cpu_each_leave_no_cpu_for_decode():
    with pytest.raises(ValueError, match=r"leave 0 of the cluster's 2 CPUs for the cpu decode tasks.*--decode device"):
        plan_actors({"CPU": 2, "GPU": 2}, actors=None, actor_cpus=None)
    with pytest.raises(ValueError, match=r"device decode tasks.*lower --actor-cpus"):
        plan_actors({"CPU": 2, "GPU": 2}, actors=None, actor_cpus=None, decode="device")
    # half a CPU per actor and device decode: the fetch tasks fit
    pool = plan_actors({"CPU": 2, "GPU": 2}, actors=None, actor_cpus=0.5, decode="device")
    assert pool["size"] == 2 and pool["decode"] == "device" and pool["decode_cpus"] == FETCH_TASK_CPUS
    assert 2 * pool["num_cpus"] + pool["decode_cpus"] <= 2


def test_cpu_decode_on_gpus_asks_for_the_decode_cpus_the_rates_give(caplog):
    pool = plan_actors({"CPU": 8, "GPU": 2}, actors=None, actor_cpus=None)
    assert pool["decode_cpus_wanted"] == 2 * decode_cpus_per_gpu(GPU_IMAGES_S, DECODE_IMAGES_PER_CPU_S)
    assert "the GPUs will wait on decode" in caplog.text  # 6 CPUs left is fewer than wanted


def test_decode_auto_is_device_with_gpus_and_fp16_needs_gpus():
    assert resolve_decode("auto", 1) == "device" and resolve_decode("auto", 0) == "cpu"
    assert plan_actors({"CPU": 4}, actors=None, actor_cpus=None, decode="auto")["decode"] == "cpu"
    with pytest.raises(ValueError, match="--precision fp16 needs GPUs"):
        plan_actors({"CPU": 4}, actors=None, actor_cpus=None, precision="fp16")
    with pytest.raises(ValueError, match="--decode"):
        resolve_decode("gpu", 1)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_actor_wait_times_out_naming_the_missing_resources():
    clock = _Clock()
    with pytest.raises(ValueError, match=r"--actor-wait 5: after 5 s the cluster still lacks 2 GPU of the 3.25 CPU, 2 GPU the embed actors need \(it has 8 CPU, 0 GPU\)"):
        plan_when_ready(lambda: {"CPU": 8.0}, actors=2, actor_cpus=1.5, decode="device", wait_s=5, clock=clock,
                        sleep=clock.sleep)
    assert clock.t >= 5


def test_actor_wait_plans_once_the_nodes_arrive():
    clock = _Clock()
    seen = iter([{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 6.0, "GPU": 1.0}, {"CPU": 10.0, "GPU": 2.0}])
    pool = plan_when_ready(lambda: next(seen), actors=2, actor_cpus=None, wait_s=60, clock=clock, sleep=clock.sleep)
    assert pool["size"] == 2 and pool["num_gpus"] == 1 and clock.t == 3


def test_wanted_and_missing_resources():
    want = wanted_resources(actors=3, actor_cpus=2.0, decode="cpu")
    assert want == {"GPU": 3.0, "CPU": 7.0}
    assert missing_resources({"CPU": 8, "GPU": 1}, want) == {"GPU": 2.0}
    assert missing_resources({"CPU": 8, "GPU": 3}, want) == {}


@pytest.mark.slow
def test_plan_against_a_real_ray_cluster_with_logical_gpus():
    """Two-node Ray cluster, the GPU node added while the plan waits (what an autoscaler does)."""
    import subprocess
    import sys
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    try:
        ray.init(address=cluster.address)
        with pytest.raises(ValueError, match=r"--actors 1 exceeds the cluster's 0 GPUs|cluster still lacks 1 GPU"):
            plan_when_ready(ray.cluster_resources, actors=1, actor_cpus=None, wait_s=2, poll_s=0.5)
        # A second node joins from another process a second later, as an autoscaler's would
        # (Cluster.add_node cannot run off the main thread).
        ray_cli = str(Path(sys.executable).with_name("ray"))
        joiner = subprocess.Popen(["sh", "-c", f"sleep 1; exec {ray_cli} start --address={cluster.address} "
                                   "--num-cpus=2 --num-gpus=1 --block"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            pool = plan_when_ready(ray.cluster_resources, actors=1, actor_cpus=None, decode="auto", wait_s=120, poll_s=0.5)
            assert pool["size"] == 1 and pool["num_gpus"] == 1 and pool["decode"] == "device"
            resources = ray.cluster_resources()
            assert resources.get("GPU") == 1, resources
            with pytest.raises(ValueError, match=r"--actors 2 exceeds the cluster's 1 GPUs"):
                plan_actors(resources, actors=2, actor_cpus=None)
        finally:
            joiner.terminate()
            joiner.wait(timeout=60)
    finally:
        ray.shutdown()
        cluster.shutdown()
