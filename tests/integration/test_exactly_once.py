"""Exactly-once from durable state, against the real local S3 server and a real Ray:
overlapping writers, the index following the table version, lock loss, infrastructure
failures that never give an object up, a model change with files pending, an emptied table.
Each test asserts one outcome, then runs the job again and checks it settled (nothing
redone, recovered, pending or duplicated)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import SPEC
from helpers.faults import assert_exactly_once, assert_no_key_twice, assert_settled, fill, pending_files, wait_for
from sparse_embed.jobs.cli import main
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
from sparse_embed.pipeline.index.publish import current_manifest
from sparse_embed.pipeline.index.searcher import ShardedIndex
from sparse_embed.pipeline.store import live, storage, tables
from sparse_embed.pipeline.store.lock import LockLost, OutputLock

pytestmark = pytest.mark.integration


def _cfg(source, out, **kw) -> EmbedConfig:
    return EmbedConfig(source=source, out=out, spec=SPEC, rows_per_file=8, index_shards=1, **kw)


def _index_matches_table(out: str) -> dict:
    m = current_manifest(f"{out}/index")
    assert m is not None, "no CURRENT index"
    assert m["table_version"] == tables.version_of(f"{out}/embeddings")
    assert m["ntotal"] == live.read_live(f"{out}/embeddings", ["uri"]).num_rows
    return m


def test_a_second_writer_exits_3_naming_the_holder_and_nothing_is_written_twice(ray_local, bucket, capsys):
    source, _ = fill(bucket, 6, seed=21)
    out = f"{bucket}/emb"
    holder = OutputLock(out, owner="nightly-0001").acquire()  # another run, mid-flight
    try:
        argv = ["embed", source, "--out", out, "--model", "resnet10t", "--rows-per-file", "8"]
        assert main(argv) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"sparse-embed embed: {out} is locked by run nightly-0001 (host ")
        assert " since " in err[0] and tables.version_of(f"{out}/embeddings") is None, "the second writer wrote nothing"
        assert main(["index", "build", "--table", f"{out}/embeddings", "--out", f"{out}/index"]) == 3
        capsys.readouterr()
    finally:
        holder.release()
    cfg = _cfg(source, out)
    first = run_embed(cfg)
    assert first["counts"]["embedded"] == 12
    assert_exactly_once(source, out)
    assert_settled(cfg)


@pytest.mark.slow  # > 40 s on 2 cores; ./dev test -m slow
def test_the_index_catches_up_after_a_no_index_run_and_after_a_failed_index_stage(ray_local, bucket, monkeypatch):
    source, _ = fill(bucket, 4, seed=22)
    out = f"{bucket}/emb"
    cfg = _cfg(source, out)
    run_embed(cfg)
    assert _index_matches_table(out)["ntotal"] == 8
    fill(bucket, 2, seed=23, under="day2/")  # two more base images (+ variants) under the same source
    skipped = run_embed(_cfg(source, out, build_index=False, run_id="no-index"))
    assert skipped["counts"]["embedded"] == 4 and skipped["index_id"] is None
    assert current_manifest(f"{out}/index")["ntotal"] == 8, "the --no-index run left the index behind"
    repaired = run_embed(_cfg(source, out, run_id="repair"))
    assert repaired["counts"]["processed"] == 0 and repaired["index_id"] is not None
    assert _index_matches_table(out)["ntotal"] == 12

    # A failed index stage: the rows are committed, the index is not; the next run repairs it.
    fill(bucket, 1, seed=24, under="day3/")
    import sparse_embed.pipeline.index.update as update

    def killed(*a, **k):
        raise RuntimeError("index stage killed")

    monkeypatch.setattr(update, "update_index", killed)
    with pytest.raises(RuntimeError, match="index stage killed"):
        run_embed(_cfg(source, out, run_id="killed-index"))
    monkeypatch.undo()
    assert current_manifest(f"{out}/index")["ntotal"] == 12
    assert_settled(_cfg(source, out, run_id="after-kill"))
    assert _index_matches_table(out)["ntotal"] == 14


def test_a_run_that_loses_its_lock_stops_before_its_next_commit_and_a_rerun_completes(ray_local, bucket, monkeypatch):
    source, _ = fill(bucket, 6, seed=25)
    out = f"{bucket}/emb"
    from sparse_embed.pipeline.embed import sink

    real = sink.commit_files

    def taken_over_before_commit(root, files, *, dim):
        other = OutputLock(out, owner="someone-else")
        info, etag = other.read()
        assert other._replace(other._body(info.acquired_at), etag)  # a takeover of the lock, as a stale-lock taker writes it
        try:
            return real(root, files, dim=dim)
        finally:
            other._delete()  # the other run ends; its lock is gone

    monkeypatch.setattr(sink, "commit_files", taken_over_before_commit)
    cfg = _cfg(source, out)
    with pytest.raises(LockLost, match="lost the output lock .taken over by another run.; it stopped before its next commit"):
        run_embed(cfg)
    monkeypatch.undo()
    assert tables.version_of(f"{out}/embeddings") in (None, 0), "no rows were committed after the lock was lost"
    assert pending_files(out), "the finished files wait for the next run"
    resumed = run_embed(_cfg(source, out, run_id="resume"))
    assert resumed["counts"]["recovered_rows"] == 12 and resumed["counts"]["processed"] == 0
    assert_exactly_once(source, out)
    assert_settled(cfg)


@pytest.mark.slow  # > 40 s on 2 cores; ./dev test -m slow
def test_infrastructure_failures_never_give_an_object_up_but_object_failures_do(object_store, bucket):
    """Two objects always answer 403 AccessDenied (revoked credentials for them) and one
    object is no image: after max_attempts runs the bad image is given up, the denied ones
    are still retried, and every such run exits 1 naming the cause."""
    import ray

    from helpers.fault_proxy import FaultPlan, FaultProxy

    source, keys = fill(bucket, 3, seed=26)
    storage.put_many(source, {"junk.jpg": b"not an image at all"})
    denied = keys[:2]
    out = f"{bucket}/emb"
    plan = FaultPlan(deny_get=tuple(storage.strip_scheme(k).split("/", 1)[1] for k in denied))  # the key, in the GET path
    if ray.is_initialized():
        ray.shutdown()
    with FaultProxy(object_store.endpoint_url, plan, lifetime_s=900) as px:
        saved = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = px.url
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": object_store.aws_env() | {"AWS_ENDPOINT_URL": px.url}})
        try:
            reports = [run_embed(_cfg(source, out, max_attempts=2, run_id=f"night-{i}")) for i in range(3)]
        finally:
            ray.shutdown()
            os.environ["AWS_ENDPOINT_URL"] = saved
    last = reports[-1]["counts"]
    assert [r["counts"]["failed_infrastructure"] for r in reports] == [2, 2, 2]
    assert [r["counts"]["failed_object"] for r in reports] == [1, 1, 0]
    assert last["gave_up"] == 1 and last["processed"] == 2, "junk.jpg given up after 2 attempts; the denied two retried"
    assert last["failed_infrastructure_by_reason"] == {"fetch:PermissionError": 2}
    err = live.read_live(f"{out}/errors", ["uri", "attempts"])
    attempts = dict(zip(err.column("uri").to_pylist(), err.column("attempts").to_pylist()))
    assert attempts == {**{k: 0 for k in denied}, f"{source}junk.jpg": 2}
    assert_no_key_twice(out)


def test_infrastructure_failures_exit_1_naming_them(capsys):
    from sparse_embed.jobs import embed as embed_cmd

    result = {"error_rate": 0.0, "counts": {"failed_infrastructure": 3,
                                            "failed_infrastructure_by_reason": {"fetch:PermissionError": 3}}}
    assert embed_cmd.outcome(result, 1.0, prog="sparse-embed embed", option="--max-error-rate") == 1
    assert capsys.readouterr().err.strip() == (
        "sparse-embed embed: 3 objects failed for infrastructure reasons (fetch:PermissionError): they are not given "
        "up; fix the cause and rerun")


@pytest.mark.slow  # > 40 s on 2 cores; ./dev test -m slow
def test_pending_files_of_another_model_are_never_committed_into_the_new_model(ray_local, bucket):
    """A run of model A is killed with files pending; model B is then promoted; B's next run
    must not commit A's files into B's table (they are dropped)."""
    source, _ = fill(bucket, 10, seed=27)
    out = f"{bucket}/emb"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "sparse_embed.jobs.cli", "embed", source, "--out", out, "--model", "resnet10t",
           "--rows-per-file", "2", "--batch-size", "2", "--decode-batch-size", "2", "--no-index"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: pending_files(out), 240, "a pending file of model A")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert pending_files(out)  # and its lock: its process is gone, so the next run takes the lock over at once
    spec_b = {**SPEC, "proj_dim": 32}  # another model_version
    b = run_embed(EmbedConfig(source=source, out=out, spec=spec_b, rows_per_file=8, index_shards=1))
    assert b["promoted_model_version"] == b["model_version"]
    again = run_embed(EmbedConfig(source=source, out=out, spec=spec_b, rows_per_file=8, index_shards=1, run_id="b2"))
    versions = set(live.read_live(f"{out}/embeddings", ["model_version"]).column("model_version").to_pylist())
    assert versions == {b["model_version"]}, "model A's pending rows were committed into model B's table"
    assert again["counts"]["processed"] == 0 and again["counts"]["recovered_rows"] == 0
    assert pending_files(out) == []
    assert_exactly_once(source, out)
    assert_no_key_twice(out)


def test_an_emptied_table_publishes_an_empty_index(ray_local, bucket, capsys):
    source, keys = fill(bucket, 2, seed=28)
    out = f"{bucket}/emb"
    run_embed(_cfg(source, out))
    assert ShardedIndex.open(f"{out}/index").ntotal == 4
    fs = storage.filesystem(source)
    for k in keys:
        fs.rm_file(storage.strip_scheme(k))
    argv = ["embed", source, "--out", out, "--model", "resnet10t", "--rows-per-file", "8"]
    assert main(argv) == 2, "an empty source is refused without --allow-empty-source"
    assert "No images to embed" in capsys.readouterr().err
    assert main(argv + ["--allow-empty-source"]) == 0
    capsys.readouterr()
    m = _index_matches_table(out)
    assert m["ntotal"] == 0 and m["build"]["empty"]
    index = ShardedIndex.open(f"{out}/index")
    assert index.hits(np.ones((1, 512), "float32"), 5) == [[]]
    assert_settled(EmbedConfig(source=source, out=out, spec=SPEC, rows_per_file=8, index_shards=1, run_id="empty",
                               allow_empty_source=True))


@pytest.mark.slow  # > 40 s on 2 cores; ./dev test -m slow
def test_index_build_of_an_older_version_records_that_versions_encoder(ray_local, bucket, capsys):
    source, _ = fill(bucket, 3, seed=29)
    out = f"{bucket}/emb"
    a = run_embed(_cfg(source, out))
    version_a = tables.version_of(f"{out}/embeddings")
    b = run_embed(EmbedConfig(source=source, out=out, spec={**SPEC, "proj_dim": 32}, rows_per_file=8, index_shards=1))
    assert a["model_version"] != b["model_version"]
    root = f"{bucket}/older-index"
    assert main(["index", "build", "--table", f"{out}/embeddings", "--out", root, "--version", str(version_a)]) == 0
    capsys.readouterr()
    m = current_manifest(root)
    assert m["table_version"] == version_a and m["model_version"] == a["model_version"]
    assert m["encoder"]["model_version"] == a["model_version"] and m["encoder"]["spec"]["proj_dim"] is None
    assert json.loads(storage.read_bytes(f"{out}/encoder.json"))["model_version"] == b["model_version"]


def test_delta_commits_use_conditional_writes_so_concurrent_commits_never_overwrite(bucket):
    """The local store honours If-None-Match, so commits are put-if-absent (no unsafe rename):
    six appends racing from six threads all land, each as its own version."""
    import threading

    import pyarrow as pa

    uri = f"{bucket}/race/embeddings"
    assert storage.delta_storage_options(uri, write=True)["conditional_put"] == "etag"
    assert "AWS_S3_ALLOW_UNSAFE_RENAME" not in storage.delta_storage_options(uri, write=True)
    schema = pa.schema([("image_id", pa.int64())])
    tables.append(uri, pa.table({"image_id": pa.array([0], pa.int64())}), schema)
    threads = [threading.Thread(target=tables.append, args=(uri, pa.table({"image_id": pa.array([i], pa.int64())}), schema))
               for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(live.read_live(uri, ["image_id"]).column("image_id").to_pylist()) == list(range(7))
    assert tables.version_of(uri) == 7  # v0 creates the table, then seven appends


def _attempts(out: str) -> list[tuple]:
    err = live.read_live(f"{out}/errors", ["uri", "attempts", "run_id"])
    return sorted(zip(*(err.column(c).to_pylist() for c in ("uri", "attempts", "run_id"))))


def test_attempts_survive_runs_killed_before_and_after_their_embed_stage(ray_local, bucket, monkeypatch):
    """An object that is no image, max_attempts 2: a run killed before its embed stage keeps
    the object's attempt (its error row is deleted only after the stage); a run killed after
    the stage wrote the new row and before it deleted the old one leaves both, and the next
    run counts the higher: it gives the object up and keeps that one row."""
    from sparse_embed.pipeline.embed import run as run_mod
    from sparse_embed.pipeline.embed import todo as todo_mod

    source, _ = fill(bucket, 2, seed=28)
    storage.put_many(source, {"junk.jpg": b"not an image at all"})
    junk, out = f"{source}junk.jpg", f"{bucket}/emb"
    run_embed(_cfg(source, out, max_attempts=2, run_id="night-1"))
    assert _attempts(out) == [(junk, 1, "night-1")]

    def die(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(run_mod, "_embed_todo", die)  # killed after the diff's commits, before the stage
    with pytest.raises(RuntimeError, match="killed"):
        run_embed(_cfg(source, out, max_attempts=2, run_id="night-2"))
    assert _attempts(out) == [(junk, 1, "night-1")], "the attempt survives"
    monkeypatch.undo()

    monkeypatch.setattr(todo_mod, "clear_retried", die)  # killed after the stage, before the old row goes
    with pytest.raises(RuntimeError, match="killed"):
        run_embed(_cfg(source, out, max_attempts=2, run_id="night-3"))
    assert _attempts(out) == [(junk, 1, "night-1"), (junk, 2, "night-3")]
    monkeypatch.undo()

    last = run_embed(_cfg(source, out, max_attempts=2, run_id="night-4"))
    assert last["counts"]["gave_up"] == 1 and last["counts"]["processed"] == 0, last["counts"]
    assert _attempts(out) == [(junk, 2, "night-3")], "the given-up object keeps its newest row only"
    assert_exactly_once(source, out, all_embedded=False)
    assert_settled(_cfg(source, out, max_attempts=2, run_id="night-5"))


def test_a_retried_object_that_succeeds_loses_its_earlier_error_rows(ray_local, bucket):
    """Two error rows of an earlier run for an object at its current etag (an infrastructure
    failure, then a run killed after its stage): the next run retries it, embeds it, and
    after its stage deletes both rows."""
    import pyarrow as pa

    from sparse_embed.pipeline.embed.listing import list_objects

    source, keys = fill(bucket, 2, seed=29)
    out = f"{bucket}/emb"
    etag = dict(zip(*(list_objects(source).column(c).to_pylist() for c in ("uri", "etag"))))[keys[0]]
    tables.ensure_table(f"{out}/errors", tables.errors_schema())
    tables.append(f"{out}/errors", pa.table({
        "image_id": pa.array([None, None], pa.int64()), "uri": [keys[0]] * 2, "etag": [etag] * 2,
        "stage": ["fetch"] * 2, "error_type": ["PermissionError"] * 2, "message": ["AccessDenied"] * 2,
        "attempts": pa.array([0, 0], pa.int32()), "run_id": ["night-0", None]}), tables.errors_schema())
    report = run_embed(_cfg(source, out, run_id="night-1"))
    assert report["counts"]["retried"] == 1 and report["counts"]["embedded"] == 4, report["counts"]
    assert _attempts(out) == []
    assert_exactly_once(source, out)
    assert_settled(_cfg(source, out, run_id="night-2"))
