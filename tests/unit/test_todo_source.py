"""The todo files read as blocks sized by rows (pipeline/embed/todo_source.py)."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_embed.pipeline.embed.todo import TodoParts
from sparse_embed.pipeline.embed.todo_source import block_rows_for, read_range, read_ranges, read_todo


def _todo_file(path, first: int, n: int, row_group: int) -> str:
    t = pa.table({"image_id": pa.array(range(first, first + n), pa.int64()),
                  "uri": [f"s3://b/img/{i:08d}.jpg" for i in range(first, first + n)]})
    pq.write_table(t, path, row_group_size=row_group)
    return str(path)


@pytest.mark.parametrize("rows,batch,actors,expected", [
    (10_000_000, 32, 8, 32),  # a big run: one decode batch per block
    (100, 32, 1, 25),  # 4 blocks of 25: ceil(100 / 32) blocks, rows spread evenly
    (10, 32, 2, 3),  # a small run: 2 blocks per actor, so none idles
    (3, 32, 8, 1),  # fewer rows than 2 x actors: one row per block
    (0, 32, 2, 32),
])
def test_block_rows_are_one_decode_batch_or_fewer_for_small_runs(rows, batch, actors, expected):
    assert block_rows_for(rows, batch, actors) == expected


def test_ranges_cover_every_file_in_order_and_bound_the_rows_per_task():
    ranges = read_ranges(["a", "b", "c"], [10, 0, 25], per_task=10)
    assert ranges == [("a", 0, 10), ("c", 0, 10), ("c", 10, 20), ("c", 20, 25)]  # an empty file gives none
    with pytest.raises(ValueError, match="per_task >= 1"):
        read_ranges(["a"], [1], per_task=0)


@pytest.mark.parametrize("start,stop,block", [(0, 1000, 32), (5, 6, 32), (95, 405, 7), (0, 100, 100), (900, 1000, 64)])
def test_a_range_reads_exactly_its_rows_in_blocks(tmp_path, start, stop, block):
    path = _todo_file(tmp_path / "t.parquet", 0, 1000, row_group=100)
    blocks = list(read_range(path, start, stop, block))
    assert pa.concat_tables(blocks).column("image_id").to_pylist() == list(range(start, stop))
    assert all(b.num_rows == block for b in blocks[:-1]) and 0 < blocks[-1].num_rows <= block


def test_ray_data_reads_every_row_once_in_blocks_of_the_asked_rows(tmp_path, ray_local, monkeypatch):
    """With 0.25 CPU free, as a CPU-only actor plan leaves it: every task of the read asks for no more."""
    import ray

    import sparse_embed.pipeline.embed.todo_source as source

    hold = ray.util.placement_group([{"CPU": 1.75}])  # what a 2-actor CPU plan takes
    ray.get(hold.ready())

    monkeypatch.setattr(source, "ROWS_PER_READ_TASK", 300)  # several read tasks per file
    paths = [_todo_file(tmp_path / "b0.parquet", 0, 700, row_group=128),
             _todo_file(tmp_path / "b1.parquet", 700, 50, row_group=128)]
    todo = TodoParts(paths, [700, 50], 750, 750)
    ds = read_todo(todo, block_rows=32, num_cpus=0.25)
    sizes = ds.map_batches(lambda b: pa.table({"n": [b.num_rows]}), batch_format="pyarrow", batch_size=None,
                           num_cpus=0.25).take_all()
    ids = sorted(r["image_id"] for r in ds.take_all())
    ray.util.remove_placement_group(hold)
    assert ids == list(range(750))
    assert max(r["n"] for r in sizes) == 32 and len(sizes) >= 750 // 32


def test_a_run_shorter_than_one_read_range_is_not_cut_into_one_row_blocks(tmp_path, ray_local):
    """A 100-row run in blocks of 32: 4 blocks of ~25-32 rows, not ROWS_PER_READ_TASK // 32 = 2,048
    pieces of one row each (what starved the embed actors: BENCHMARKS.md, pipeline throughput)."""
    paths = [_todo_file(tmp_path / "b0.parquet", 0, 100, row_group=128)]
    ds = read_todo(TodoParts(paths, [100], 100, 100), block_rows=32, num_cpus=0.25)
    sizes = [r["n"] for r in ds.map_batches(lambda b: pa.table({"n": [b.num_rows]}), batch_format="pyarrow",
                                             batch_size=None, num_cpus=0.25).take_all()]
    assert sum(sizes) == 100 and len(sizes) == 4 and min(sizes) >= 25, sizes
