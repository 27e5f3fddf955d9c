"""Embed actor pool sizing (pipeline.embed_run.plan_actors): a pure function of the cluster."""
import pytest

from sparse_embed.pipeline.embed.run import CPU_ACTOR_SHARE, DECODE_TASK_CPUS, block_slices, plan_actors


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


@pytest.mark.parametrize("rows,n_blocks", [(2500, 79), (7, 4), (5, 5), (3, 8)])
def test_block_slices_cover_the_rows_in_order_in_blocks_no_larger_than_asked(rows, n_blocks):
    import pyarrow as pa

    table = pa.table({"i": list(range(rows))})
    blocks = block_slices(table, n_blocks)
    assert pa.concat_tables(blocks).column("i").to_pylist() == list(range(rows))
    size = -(-rows // n_blocks)
    assert all(b.num_rows == size for b in blocks[:-1]) and 0 < blocks[-1].num_rows <= size
    assert len(blocks) <= n_blocks
