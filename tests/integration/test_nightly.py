"""The nightly job: config validation, the output lock (real conditional PUTs on the local
S3 server), exit codes."""
from __future__ import annotations

import json
import threading
import time

import pytest
import yaml

from sparse_embed.infra.synthetic_images import generate
from sparse_embed.jobs.cli import main
from sparse_embed.jobs.nightly_config import parse
from sparse_embed.pipeline.store import storage
from sparse_embed.pipeline.store.lock import LockHeld, OutputLock

BASE = {"source": "s3://b/images/", "out": "s3://b/emb", "model": "resnet10t"}


@pytest.mark.parametrize("change, needle", [
    ({"max_error_rat": 0.1}, "unknown field(s) ['max_error_rat']"),
    ({"max_error_rate": 2}, "'max_error_rate': expected a number in [0, 1], got 2"),
    ({"max_error_rate": "low"}, "'max_error_rate'"),
    ({"batch_size": 0}, "'batch_size': expected an integer >= 1"),
    ({"batch_size": True}, "'batch_size'"),
    ({"pool": "max"}, "'pool': expected one of ['token', 'avg', 'gem']"),
    ({"extensions": "jpg"}, "'extensions'"),
    ({"index": "yes"}, "'index': expected true or false"),
    ({"compile": "yes"}, "'compile': expected true or false"),
    ({"rows_per_file": 0}, "'rows_per_file': expected an integer >= 1"),
    ({"lock_ttl_s": -1}, "'lock_ttl_s'"),
    ({"retain_hours": -1}, "'retain_hours': expected a number of hours >= 0 or null"),
    ({"model": None}, "required field(s) ['model']"),
])
def test_every_wrong_field_is_named(change, needle):
    with pytest.raises(ValueError) as e:
        parse(BASE | change)
    assert needle in str(e.value)


def test_valid_config_and_cli_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE | {"max_error_rate": 0.1}))
    assert main(["nightly", "--config", str(good), "--check"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: s3://b/\nout: s3://b/o\nmodel: resnet10t\nbatchsize: 3\n")
    assert main(["nightly", "--config", str(bad)]) == 2
    assert "unknown field(s) ['batchsize']" in capsys.readouterr().err
    assert main(["nightly", "--config", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.integration
def test_lock_admits_one_holder_and_expires_when_stale(bucket):
    out = f"{bucket}/emb"
    first = OutputLock(out, owner="run-a", ttl_s=60).acquire()
    with pytest.raises(LockHeld, match="is locked by run run-a"):
        OutputLock(out, owner="run-b", ttl_s=60).acquire()
    first.release()
    OutputLock(out, owner="run-c", ttl_s=60).acquire().release()

    # A dead run's lock: heartbeat long ago. Two runs race to take it over; one wins.
    stale = {"owner": "dead", "host": "h", "pid": 1, "acquired_at": 0.0, "heartbeat_at": time.time() - 3600, "ttl_s": 60.0}
    storage.write_bytes_atomic(f"{out}/_lock.json", json.dumps(stale).encode())
    winners, losers = [], []

    def take(name):
        try:
            winners.append(OutputLock(out, owner=name, ttl_s=60).acquire())
        except LockHeld:
            losers.append(name)

    threads = [threading.Thread(target=take, args=(f"racer-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 3
    winners[0].release()


class _Clock:
    """The lock module's `time`, with time() under the test's control (the rest is the real module)."""

    def __init__(self):
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.mark.integration
def test_heartbeat_keeps_a_live_lock_fresh(bucket, monkeypatch):
    """Deterministic: the lock's clock is the test's, and heartbeats are beat() calls (the
    heartbeat thread's first one is ttl/3 = 20 min away)."""
    from sparse_embed.pipeline.store import lock as lock_mod

    clock, ttl = _Clock(), 3600.0
    monkeypatch.setattr(lock_mod, "time", clock)
    out = f"{bucket}/emb"
    lock = OutputLock(out, owner="slow-run", ttl_s=ttl).acquire()
    try:
        clock.now += 0.6 * ttl
        assert lock.beat()
        clock.now += 0.6 * ttl  # 1.2 ttl after acquiring, 0.6 ttl after the last heartbeat
        with pytest.raises(LockHeld, match="is locked by run slow-run"):
            OutputLock(out, owner="other", ttl_s=ttl).acquire()
        assert not lock.lost and lock.read()[0].owner == "slow-run"
    finally:
        lock.release()


@pytest.mark.integration
def test_nightly_end_to_end_exit_codes(object_store, ray_local, tmp_path, capsys):
    bucket = object_store.create_bucket("nightly")
    source, out = f"{bucket}/images/", f"{bucket}/emb"
    objects = {im.key: im.data for im in generate(6, seed=21, variants=(), min_side=48, max_side=64)}
    storage.put_many(source, objects | {"broken.jpg": b"not an image"})
    cfg = tmp_path / "nightly.yaml"
    cfg.write_text(yaml.safe_dump({"source": source, "out": out, "model": "resnet10t", "max_error_rate": 0.5,
                                   "index_shards": 1}))
    assert main(["nightly", "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "embedded 6, failed 1" in printed
    assert "vacuum (retain 168 h): 0 table files and 0 index versions removed" in printed, printed  # nothing old yet

    assert main(["nightly", "--config", str(cfg)]) == 0  # only the broken object is retried
    printed = capsys.readouterr().out
    assert "embedded 0" in printed and "unchanged 6" in printed

    held = OutputLock(out, owner="someone-else", ttl_s=60).acquire()
    try:
        assert main(["nightly", "--config", str(cfg)]) == 3
        assert "is locked by run someone-else" in capsys.readouterr().err
    finally:
        held.release()

    storage.put_many(source, {"broken2.jpg": b"<html>503</html>"})
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({"source": source, "out": out, "model": "resnet10t", "max_error_rate": 0.0}))
    assert main(["nightly", "--config", str(strict)]) == 1  # a new broken object: 1 of 1 first tries failed
    assert "exceeds max_error_rate" in capsys.readouterr().err

    assert main(["runs", "list", "--out", out]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("2")]) == 3
