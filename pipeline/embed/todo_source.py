"""The todo files (todo.py) as a Ray Data datasource: the embed stage reads them in Ray
tasks, and the driver never holds a todo row.

Todo files are written in row groups of TODO_ROW_GROUP rows. Each read task covers at
most ROWS_PER_READ_TASK consecutive rows of one file, reads only the row groups that hold
them, and yields blocks of `block_rows` rows (`block_rows_for`): every decode task then
gets about one decode batch, at 10^3 todo rows or at 10^9 (a file's last blocks may be
smaller). The driver holds one (path, start, stop) per read task: about
todo rows / ROWS_PER_READ_TASK of them.

The read tasks ask for the decode tasks' CPUs (a CPU-only actor plan leaves less than one
CPU free; a 1-CPU read task would never be scheduled there).
"""
from __future__ import annotations

import functools

from sparse_embed.pipeline.store import storage

TODO_ROW_GROUP = 4096  # rows per Parquet row group of a todo file; a read task reads whole groups
ROWS_PER_READ_TASK = 65_536  # rows one read task streams out as blocks (~7 MB of todo rows)
TODO_ROW_BYTES = 160  # estimate of one todo row in memory (uri ~60 B + etag, size, mtime, ids)


def block_rows_for(rows: int, decode_batch_size: int, actors: int) -> int:
    """Rows per block: one decode batch, or fewer so that a small run still has two blocks
    per actor (no actor idles while another embeds the whole run)."""
    if rows <= 0:
        return decode_batch_size
    blocks = max(-(-rows // decode_batch_size), min(rows, 2 * actors))
    return max(1, -(-rows // blocks))


def read_ranges(paths: list[str], rows: list[int], per_task: int = ROWS_PER_READ_TASK) -> list[tuple[str, int, int]]:
    """(path, start, stop) row ranges of at most `per_task` rows covering every file in order."""
    if per_task < 1:
        raise ValueError(f"Expected per_task >= 1, got {per_task!r}")
    return [(p, start, min(n, start + per_task)) for p, n in zip(paths, rows) for start in range(0, n, per_task)]


def read_range(path: str, start: int, stop: int, block_rows: int):
    """Rows start..stop-1 of the todo file at `path`, as Arrow tables of `block_rows` rows
    (the last may be shorter). Reads only the row groups that hold those rows."""
    import pyarrow.parquet as pq

    fs, _ = storage.arrow_filesystem(path)
    with fs.open_input_file(storage.strip_scheme(path)) as src:
        pf = pq.ParquetFile(src)
        groups, first, at = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if at + n > start and at < stop:
                groups.append(g)
                first = at if first is None else first
            at += n
        if not groups:
            return
        table = pf.read_row_groups(groups).slice(start - first, stop - start)
    for lo in range(0, table.num_rows, block_rows):
        yield table.slice(lo, block_rows)


def _todo_source_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class TodoDatasource(Datasource):
        """Read tasks over read_ranges(paths, rows); `schema` is the todo files' schema."""

        def __init__(self, paths: list[str], rows: list[int], *, block_rows: int, schema):
            super().__init__()
            # Each range is a whole number of blocks (but a file's last), so that Ray's
            # split of a read task's output into blocks_per_task pieces cuts at block_rows.
            # No more blocks per task than the longest file holds: Ray splits every task's
            # output into the same number of blocks, and a run shorter than one full range
            # (every small run) was cut into 2,048 one-row blocks, which the decode tasks then
            # waited on (actors busy 28% of the stage; BENCHMARKS.md, pipeline throughput).
            longest = max(rows, default=0)
            self.blocks_per_task = max(1, min(ROWS_PER_READ_TASK // block_rows, -(-longest // block_rows)))
            self.ranges = read_ranges(paths, rows, per_task=block_rows * self.blocks_per_task)
            self.block_rows, self.schema = block_rows, schema

        def get_name(self) -> str:
            return "ReadTodo"

        def estimate_inmemory_data_size(self) -> int:
            return sum(stop - start for _, start, stop in self.ranges) * TODO_ROW_BYTES

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            # The ranges are fixed by the files, not by `parallelism`: blocks are sized by rows.
            return [ReadTask(functools.partial(read_range, path, start, stop, self.block_rows),
                             BlockMetadata(num_rows=stop - start, size_bytes=(stop - start) * TODO_ROW_BYTES,
                                           exec_stats=None, input_files=[path]),
                             schema=self.schema)
                    for path, start, stop in self.ranges]

    return TodoDatasource


def read_todo(todo, *, block_rows: int, num_cpus: float):
    """A Ray Dataset of the todo rows (a todo.TodoParts), read by tasks of `num_cpus` CPUs."""
    import ray

    source = _todo_source_class()(todo.paths, todo.rows, block_rows=block_rows, schema=todo.schema())
    # A read task's blocks leave it merged up to Ray Data's target block bytes; asking for
    # blocks_per_task blocks per read task makes Ray split each task's output into that
    # many, inside the read task (no other task, no other CPU ask).
    return ray.data.read_datasource(source, num_cpus=num_cpus,
                                    override_num_blocks=max(1, len(source.ranges) * source.blocks_per_task))
