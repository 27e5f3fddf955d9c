"""A write task that Ray retries or re-executes rewrites the same files: its outputs are named
by their rows, so a first attempt's file and marker are overwritten, never left beside the
second; recovery then commits each row once, and never rows the table already holds."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from sparse_embed.pipeline.embed.sink import EmbeddingTableSink, file_name, recover_pending
from sparse_embed.pipeline.store import live, tables

DIM = 4


def _block(uris, *, model_version="mv-a", failed=()):
    n = len(uris)
    vectors = np.random.default_rng(0).standard_normal((n, DIM)).astype("float32")
    stage = ["decode" if u in failed else None for u in uris]
    return pa.table({
        "image_id": pa.array(range(n), pa.int64()), "uri": uris, "etag": ["e1"] * n,
        "size": pa.array([10] * n, pa.int64()), "mtime": pa.array([None] * n, pa.timestamp("us", tz="UTC")),
        "width": pa.array([8] * n, pa.int32()), "height": pa.array([8] * n, pa.int32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
        "model": ["m"] * n, "model_version": [model_version] * n, "attempts": pa.array([0] * n, pa.int32()),
        "error_stage": pa.array(stage, pa.string()), "error_type": pa.array(["NotAnImage" if s else None for s in stage]),
        "error_message": pa.array(["no image" if s else None for s in stage]),
    })


def _markers(out):
    import glob

    return sorted(glob.glob(f"{out}/_pending/**/*.json", recursive=True))


def test_a_retried_write_task_rewrites_the_same_file_and_recovery_commits_once(tmp_path):
    out = str(tmp_path / "out")
    sink = EmbeddingTableSink(out, run_id="r1", dim=DIM, rows_per_file=100)
    sink.on_write_start()
    block = _block([f"s3://b/{i}.jpg" for i in range(5)], failed={"s3://b/4.jpg"})
    first = sink.write([block], SimpleNamespace(task_idx=3))  # the attempt whose worker died after writing
    second = sink.write([block], SimpleNamespace(task_idx=3))  # Ray's retry of the same task
    assert [f.path for f in first.files] == [f.path for f in second.files]
    assert len(_markers(out)) == 2  # one embeddings file, one errors file: not four
    # a re-execution may see the same rows in another order, as another task: the same files
    third = sink.write([block.take(list(range(block.num_rows))[::-1])], SimpleNamespace(task_idx=7))
    assert sorted(f.path for f in third.files) == sorted(f.path for f in first.files) and len(_markers(out)) == 2
    assert recover_pending(out, dim=DIM, model_version="mv-a") == 5, "each row committed once"
    uris = live.read_live(f"{out}/embeddings", ["uri"]).column("uri").to_pylist()
    assert sorted(uris) == [f"s3://b/{i}.jpg" for i in range(4)]
    assert live.read_live(f"{out}/errors", ["uri"]).column("uri").to_pylist() == ["s3://b/4.jpg"]
    assert _markers(out) == []
    assert recover_pending(out, dim=DIM, model_version="mv-a") == 0  # nothing left to commit


def test_recovery_skips_rows_already_in_the_table_and_files_of_another_model(tmp_path):
    out = str(tmp_path / "out")
    sink = EmbeddingTableSink(out, run_id="r1", dim=DIM, rows_per_file=100)
    sink.on_write_start()
    committed = _block(["s3://b/0.jpg", "s3://b/1.jpg"])
    sink.on_write_complete(SimpleNamespace(write_returns=[sink.write([committed], SimpleNamespace(task_idx=0))]))
    # A second writer's leftovers: one file overlapping the committed rows, one of another model.
    sink2 = EmbeddingTableSink(out, run_id="r2", dim=DIM, rows_per_file=100)
    sink2.write([_block(["s3://b/1.jpg", "s3://b/2.jpg"])], SimpleNamespace(task_idx=0))
    sink2.write([_block(["s3://b/9.jpg"], model_version="mv-old")], SimpleNamespace(task_idx=1))
    assert recover_pending(out, dim=DIM, model_version="mv-a") == 1  # only 2.jpg is new
    rows = live.read_live(f"{out}/embeddings", ["uri", "model_version"])
    assert sorted(rows.column("uri").to_pylist()) == ["s3://b/0.jpg", "s3://b/1.jpg", "s3://b/2.jpg"]
    assert set(rows.column("model_version").to_pylist()) == {"mv-a"}
    assert _markers(out) == []


def test_file_names_follow_the_rows():
    a = pa.table({"uri": ["x", "y"], "etag": ["1", "1"]})
    assert file_name("r", a) == file_name("r", pa.table({"uri": ["x", "y"], "etag": ["1", "1"]}))
    assert file_name("r", a) != file_name("r", pa.table({"uri": ["x", "y"], "etag": ["1", "2"]}))
    assert file_name("r", a) != file_name("r2", a)
    assert json.dumps(file_name("r", a)).endswith('.parquet"')


class Killed(Exception):
    """The recovering process dies here."""


def _after(target, name, kill_when=lambda *a, **k: True):
    """`target.name` that does its work, then dies when kill_when(*args) says so."""
    real = getattr(target, name)

    def step(*args, **kw):
        out = real(*args, **kw)
        if kill_when(*args, **kw):
            raise Killed(name)
        return out
    return step


def _dies_removing_old_markers(root, files):
    """remove_markers that dies before removing a marker of the run being recovered (and
    leaves the recovered files' markers)."""
    if any(not f.path.startswith("part-recovered-") for f in files):
        raise Killed("remove_markers")


def _kills(monkeypatch):
    """Each step of recovering a file that is partly in the table, as a kill right after it."""
    from sparse_embed.pipeline.embed import sink
    from sparse_embed.pipeline.store import storage

    trimmed = lambda root, f, *a, **k: f.path.startswith("part-recovered-")  # noqa: E731
    return {
        "trimmed file written": lambda: monkeypatch.setattr(tables, "write_parquet_file",
                                                            _after(tables, "write_parquet_file")),
        "its marker written": lambda: monkeypatch.setattr(storage, "write_bytes_atomic", _after(storage, "write_bytes_atomic")),
        "old file deleted, old marker not": lambda: monkeypatch.setattr(sink, "remove_markers", _dies_removing_old_markers),
        "old marker dropped": lambda: monkeypatch.setattr(sink, "_drop", _after(sink, "_drop", lambda *a, **k: not trimmed(*a))),
        "committed, markers not cleared": lambda: monkeypatch.setattr(tables, "commit_files", _after(tables, "commit_files")),
    }


def test_recovery_killed_at_each_step_is_finished_by_the_next(tmp_path, monkeypatch):
    import pytest

    from helpers.readers import polars

    for step, kill in _kills(monkeypatch).items():
        out = str(tmp_path / step.replace(" ", "-").replace(",", ""))
        sink = EmbeddingTableSink(out, run_id="r1", dim=DIM, rows_per_file=100)
        sink.on_write_start()
        sink.on_write_complete(SimpleNamespace(write_returns=[sink.write([_block(["s3://b/0.jpg", "s3://b/1.jpg"])],
                                                                         SimpleNamespace(task_idx=0))]))
        # a crashed writer's file: one row the table holds, two it does not
        EmbeddingTableSink(out, run_id="r2", dim=DIM, rows_per_file=100).write(
            [_block(["s3://b/1.jpg", "s3://b/2.jpg", "s3://b/3.jpg"])], SimpleNamespace(task_idx=0))
        kill()
        with pytest.raises(Killed):
            recover_pending(out, dim=DIM, model_version="mv-a")
        monkeypatch.undo()
        recover_pending(out, dim=DIM, model_version="mv-a")
        want = [f"s3://b/{i}.jpg" for i in range(4)]
        assert sorted(live.read_live(f"{out}/embeddings", ["uri"]).column("uri").to_pylist()) == want, step
        rows, _ = polars(f"{out}/embeddings")
        assert sorted(uri for _, uri, _ in rows) == want, f"{step}: another reader reads every file"
        assert _markers(out) == [], step
        assert recover_pending(out, dim=DIM, model_version="mv-a") == 0, f"{step}: settled"
