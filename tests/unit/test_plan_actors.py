"""Embed actor pool sizing (pipeline.embed_run.plan_actors): a pure function of the cluster."""
import pytest

from sparse_embed.pipeline.embed.run import CPU_ACTOR_SHARE, DECODE_TASK_CPUS, plan_actors


def test_one_actor_per_gpu_with_whole_cpus_for_decode():
    pool = plan_actors({"CPU": 16, "GPU": 4}, actors=None, actor_cpus=None)
    assert {k: pool[k] for k in ("size", "num_gpus", "num_cpus", "decode_cpus", "decode")} == {
        "size": 4, "num_gpus": 1, "num_cpus": 1, "decode_cpus": 1.0, "decode": "cpu"}
    assert plan_actors({"CPU": 16, "GPU": 4}, actors=2, actor_cpus=3)["size"] == 2


def test_cpu_only_one_single_threaded_actor_per_cpu_and_room_for_decode():
    pool = plan_actors({"CPU": 2}, actors=None, actor_cpus=None)
    assert pool == {"size": 2, "num_gpus": 0, "num_cpus": CPU_ACTOR_SHARE, "decode_cpus": DECODE_TASK_CPUS, "decode": "cpu"}
    big = plan_actors({"CPU": 16}, actors=None, actor_cpus=None)
    assert big["size"] == 16 and big["num_cpus"] == CPU_ACTOR_SHARE
    for cpus in (1, 2, 3, 16):
        # every actor and one decode (or write) task fit at once, or the job would wait
        # forever for resources
        pool = plan_actors({"CPU": cpus}, actors=None, actor_cpus=None)
        assert pool["size"] == cpus and 0 < pool["num_cpus"] <= CPU_ACTOR_SHARE
        assert pool["size"] * pool["num_cpus"] + pool["decode_cpus"] <= cpus


def test_cpu_only_overcommit_is_refused_with_the_flags_named():
    with pytest.raises(ValueError, match="--actors or --actor-cpus"):
        plan_actors({"CPU": 2}, actors=2, actor_cpus=0.9)
    assert plan_actors({"CPU": 2}, actors=1, actor_cpus=1.0)["size"] == 1
