"""Stage 5: a Ray Datasink that writes embedding rows and error rows to their Delta tables.

Write tasks put Parquet files into each table's directory; nothing is visible until the
driver commits them: one atomic Delta commit per table in on_write_complete. A crash
before the commit leaves only unreferenced files (invisible to readers, removed by
VACUUM), so a rerun neither duplicates nor drops rows.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ray.data import Datasink

from . import storage, tables


@dataclass
class WrittenFile:
    table: str  # tables.EMBEDDINGS or tables.ERRORS
    path: str  # relative to the table root
    size: int
    rows: int


@dataclass
class CommitResult:
    versions: dict = field(default_factory=dict)  # table -> version after commit (None: nothing committed)
    rows: dict = field(default_factory=dict)  # table -> rows committed
    error_counts: dict = field(default_factory=dict)  # "stage:error_type" -> count


def split_rows(batch, *, run_id: str, dim: int):
    """One embed-stage batch -> (embedding rows, error rows), cast to the table schemas."""
    import pyarrow as pa
    import pyarrow.compute as pc

    failed = pc.is_valid(batch.column("error_stage"))
    ok = batch.filter(pc.invert(failed))
    bad = batch.filter(failed)
    run = lambda t: pa.array([run_id] * t.num_rows, pa.string())  # noqa: E731
    emb = ok.append_column("run_id", run(ok)).select(tables.embeddings_schema(dim).names).cast(tables.embeddings_schema(dim))
    err = (bad.rename_columns({"error_stage": "stage", "error_message": "message"} | {c: c for c in bad.column_names if c not in ("error_stage", "error_message")})
           .append_column("run_id", run(bad)).select(tables.errors_schema().names).cast(tables.errors_schema()))
    return emb, err


class EmbeddingTableSink(Datasink):
    def __init__(self, out: str, *, run_id: str, dim: int):
        self.out = out
        self.run_id = run_id
        self.dim = dim
        self.result = CommitResult()

    @property
    def supports_distributed_writes(self) -> bool:
        return True

    def on_write_start(self, schema=None) -> None:
        tables.ensure_table(tables.table_uri(self.out, tables.EMBEDDINGS), tables.embeddings_schema(self.dim))
        tables.ensure_table(tables.table_uri(self.out, tables.ERRORS), tables.errors_schema())

    def write(self, blocks, ctx) -> list[WrittenFile]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        emb_parts, err_parts = [], []
        for block in blocks:
            batch = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            emb, err = split_rows(batch, run_id=self.run_id, dim=self.dim)
            emb_parts.append(emb)
            err_parts.append(err)
        written = []
        for name, parts, schema in ((tables.EMBEDDINGS, emb_parts, tables.embeddings_schema(self.dim)),
                                    (tables.ERRORS, err_parts, tables.errors_schema())):
            table = pa.concat_tables(parts) if parts else schema.empty_table()
            if table.num_rows == 0:
                continue
            rel = f"part-{self.run_id}-{ctx.task_idx:05d}-{uuid.uuid4().hex[:12]}.parquet"
            fs, root = storage.arrow_filesystem(tables.table_uri(self.out, name))
            path = f"{root}/{rel}"
            with fs.open_output_stream(path) as f:
                pq.write_table(table, f, compression="zstd")
            written.append(WrittenFile(name, rel, fs.get_file_info(path).size, table.num_rows))
        return written

    def on_write_complete(self, write_result) -> None:
        from deltalake.transaction import AddAction

        files = [f for task in write_result.write_returns for f in task]
        now_ms = int(time.time() * 1000)
        for name, schema in ((tables.EMBEDDINGS, tables.embeddings_schema(self.dim)), (tables.ERRORS, tables.errors_schema())):
            mine = [f for f in files if f.table == name]
            uri = tables.table_uri(self.out, name)
            self.result.rows[name] = sum(f.rows for f in mine)
            if not mine:
                self.result.versions[name] = tables.version_of(uri)
                continue
            actions = [AddAction(path=f.path, size=f.size, partition_values={}, modification_time=now_ms,
                                 data_change=True, stats=json.dumps({"numRecords": f.rows})) for f in mine]
            dt = tables.open_table(uri)
            dt.create_write_transaction(actions, mode="append", schema=schema)
            self.result.versions[name] = tables.version_of(uri)
