"""The output lock on a local output (the same protocol as on S3: create-if-absent, refresh
if unchanged): one holder, a second writer told who holds it, --wait, a lost lock stopping
the next commit. Deterministic: heartbeats are driven by calling beat(), not by time."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from sparse_embed.pipeline.store import live, lock as lock_mod
from sparse_embed.pipeline.store import tables
from sparse_embed.pipeline.store.lock import LockHeld, LockLost, OutputLock, check_before_commit, output_lock
from sparse_embed.pipeline.store.vacuum import vacuum_table


def test_a_second_writer_is_told_who_holds_the_lock(tmp_path):
    out = str(tmp_path / "out")
    with output_lock(out, owner="run-a"):
        with pytest.raises(LockHeld) as e:
            OutputLock(out, owner="run-b").acquire()
        msg = str(e.value)
        assert msg.startswith(f"{out} is locked by run run-a (host {socket.gethostname()}, pid ")
        assert " since 20" in msg and "--wait SECONDS" in msg
    OutputLock(out, owner="run-b").acquire().release()  # released on exit


def test_wait_takes_the_lock_once_the_holder_releases_it(tmp_path):
    out = str(tmp_path / "out")
    holder = OutputLock(out, owner="run-a").acquire()
    got = {}

    def waiter():
        got["lock"] = OutputLock(out, owner="run-b").acquire(wait_s=60)

    t = threading.Thread(target=waiter)
    t.start()
    holder.release()
    t.join(60)
    assert got["lock"].read()[0].owner == "run-b"
    got["lock"].release()


def test_output_lock_is_reentrant_in_one_process(tmp_path):
    out = str(tmp_path / "out")
    with output_lock(out, owner="run-a") as outer:
        with output_lock(out, owner="index-update") as inner:  # the embed run's index stage
            assert inner is outer
        assert outer.read()[0].owner == "run-a"


def _table(uri):
    t = pa.table({"image_id": pa.array([1], pa.int64()), "embedding": pa.array([[0.5, 0.5]], pa.list_(pa.float32()))})
    tables.append(uri, t, t.schema)
    return t.schema


def test_a_failed_heartbeat_stops_the_next_commit(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    uri = f"{out}/embeddings"
    schema = _table(uri)
    with output_lock(out, owner="run-a", ttl_s=6) as held:  # a failing heartbeat is retried for ttl/6 (1 s) here
        check_before_commit(uri)  # held: commits go ahead

        def store_down(*a, **k):
            raise ConnectionError("the store is unreachable")

        monkeypatch.setattr(held, "_replace", store_down)
        assert held.beat() is False
        with pytest.raises(LockLost, match=r"lost the output lock \(heartbeat failed: ConnectionError: the store is "
                                           r"unreachable\); it stopped before its next commit"):
            tables.append(uri, pa.table({"image_id": pa.array([2], pa.int64()),
                                         "embedding": pa.array([[1.0, 0.0]], pa.list_(pa.float32()))}), schema)
    assert live.read_live(uri, ["image_id"]).column("image_id").to_pylist() == [1]


def test_a_lock_taken_over_stops_the_next_commit(tmp_path):
    out = str(tmp_path / "out")
    uri = f"{out}/embeddings"
    schema = _table(uri)
    with output_lock(out, owner="run-a") as held:
        other = OutputLock(out, owner="run-b")
        info, etag = other.read()
        assert other._replace(other._body(info.acquired_at), etag)  # what a takeover of a stale lock writes
        assert held.beat() is False and held.lost
        with pytest.raises(LockLost, match="taken over by another run"):
            tables.append(uri, pa.table({"image_id": pa.array([2], pa.int64()),
                                         "embedding": pa.array([[1.0, 0.0]], pa.list_(pa.float32()))}), schema)
        other.release()
    assert live.read_live(uri, ["image_id"]).column("image_id").to_pylist() == [1]


def test_a_run_that_lost_its_lock_removes_and_overwrites_nothing(tmp_path):
    """Besides commits: the work directory, encoder.json and a vacuum are the output's too;
    a run whose lock was taken over leaves them to the run that holds it."""
    import os
    from types import SimpleNamespace

    from sparse_embed.pipeline.embed.report import write_encoder_spec
    from sparse_embed.pipeline.embed.todo import remove_work

    out = str(tmp_path / "out")
    uri = f"{out}/embeddings"
    _table(uri)
    os.makedirs(f"{out}/_work/run-b")
    with open(f"{out}/encoder.json", "w") as f:
        f.write("{}")
    enc = SimpleNamespace(spec=SimpleNamespace(to_dict=lambda: {"model": "x"}), model_version="mv", dim=2, data_config={})
    with output_lock(out, owner="run-a") as held:
        other = OutputLock(out, owner="run-b")
        info, etag = other.read()
        assert other._replace(other._body(info.acquired_at), etag)
        assert held.beat() is False
        for step in (lambda: remove_work(out), lambda: write_encoder_spec(out, enc),
                     lambda: vacuum_table(uri, cutoff=time.time())):
            with pytest.raises(LockLost, match="taken over by another run"):
                step()
        other.release()
    assert os.path.isdir(f"{out}/_work/run-b") and open(f"{out}/encoder.json").read() == "{}"


def test_commits_outside_a_held_output_are_not_checked(tmp_path):
    with output_lock(str(tmp_path / "a"), owner="run-a"):
        assert lock_mod.held_lock_for(str(tmp_path / "b" / "embeddings")) is None
        assert lock_mod.held_lock_for(str(tmp_path / "a" / "embeddings")) is not None
        assert lock_mod.held_lock_for(str(tmp_path / "ab" / "embeddings")) is None  # a sibling prefix, not a child
    np.testing.assert_equal(lock_mod.lock_root_of_index("s3://b/emb/index"), "s3://b/emb")
    assert lock_mod.lock_root_of_index("s3://b/indexes/x") == "s3://b/indexes/x"


def test_the_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "out")
    code = ("import sys; from sparse_embed.pipeline.store.lock import OutputLock; "
            "OutputLock(sys.argv[1], owner='killed-run', ttl_s=3600).acquire()")  # exits without releasing
    subprocess.run([sys.executable, "-c", code, out], check=True, timeout=120)
    held = OutputLock(out, owner="x").read()[0]
    assert held.owner == "killed-run" and held.holder_is_gone()
    with output_lock(out, owner="run-b") as mine:
        assert mine.read()[0].owner == "run-b"


def test_a_live_holder_elsewhere_is_never_judged_gone(tmp_path):
    from sparse_embed.pipeline.store.lock import LockInfo

    assert not LockInfo("r", "another-host", 1, 0.0, 0.0, 60.0, 1).holder_is_gone()
    assert not LockInfo("r", socket.gethostname(), 999_999_999, 0.0, 0.0, 60.0, None).holder_is_gone()  # no namespace recorded


def test_a_task_committing_for_the_run_checks_the_run_still_holds_the_lock(tmp_path):
    """verify_owner: what a Ray task (another process, no lock of its own) checks before the
    merge-delete it runs for the driver."""
    out = str(tmp_path / "out")
    assert lock_mod.owner_for_tasks(out) is None
    lock_mod.verify_owner(out, None)  # no lock held: nothing to check, as check_before_commit
    with output_lock(out, owner="run-a"):
        assert lock_mod.owner_for_tasks(out) == "run-a"
        lock_mod.verify_owner(out, "run-a")
        with pytest.raises(LockLost, match=r"this run \(run-b\) lost the output lock \(taken over by another run\)"):
            lock_mod.verify_owner(out, "run-b")
    with pytest.raises(LockLost, match="the lock object is gone"):
        lock_mod.verify_owner(out, "run-a")
