"""The output lock on the real S3 server (conditional PUTs): one holder; a check that runs
while the heartbeat refreshes never reports a takeover; a response lost on the way back
(through the fault proxy) is recognised as our own write; a heartbeat rides out store
errors; a stale lock is taken over after its TTL and its old holder stops and does not
delete the new holder's lock."""
from __future__ import annotations

import os
import threading
import time

import pytest

from helpers.fault_proxy import FaultPlan, FaultProxy
from sparse_embed.pipeline.store.lock import LockHeld, LockLost, OutputLock

pytestmark = pytest.mark.integration


@pytest.fixture
def through_proxy(object_store):
    """AWS_ENDPOINT_URL pointed at a fault proxy (faults off) for the test."""
    with FaultProxy(object_store.endpoint_url, FaultPlan(), lifetime_s=300) as px:
        saved = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = px.url
        try:
            yield px
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved


def test_one_holder_and_the_next_after_release(bucket):
    out = f"{bucket}/out"
    a = OutputLock(out, owner="run-a").acquire()
    with pytest.raises(LockHeld, match="is locked by run run-a"):
        OutputLock(out, owner="run-b").acquire()
    a.release()
    b = OutputLock(out, owner="run-b").acquire()
    assert b.read()[0].owner == "run-b"
    b.release()
    assert b.read() is None


def test_checks_during_heartbeats_never_see_a_takeover(bucket):
    lock = OutputLock(f"{bucket}/out", owner="run-a", ttl_s=3600).acquire()
    errors = []

    def beats():
        for _ in range(40):
            assert lock.beat()

    t = threading.Thread(target=beats)
    t.start()
    while t.is_alive():
        try:
            lock.check()
        except LockLost as e:
            errors.append(str(e))
            break
    t.join()
    assert errors == [] and lock.failure is None
    lock.release()
    assert lock.read() is None


def test_a_lost_response_is_recognised_as_our_own_write(bucket, through_proxy):
    key = f"/{bucket.removeprefix('s3://')}/out/_lock.json"
    through_proxy.set_plan(FaultPlan(drop_response=(f"PUT {key}",)))
    lock = OutputLock(f"{bucket}/out", owner="run-a", ttl_s=3600).acquire()  # the create's answer is lost, the retry gets 412
    assert through_proxy.counts.get("dropped_response") == 1
    lock.check()
    through_proxy.set_plan(FaultPlan(drop_response=(f"PUT {key}",)))
    assert lock.beat(), "the heartbeat's retry got 412 on its own refresh"
    assert through_proxy.counts.get("dropped_response") == 2
    lock.check()
    assert lock.read()[0].owner == "run-a" and lock.failure is None
    lock.release()
    assert lock.read() is None


def test_a_heartbeat_rides_out_store_errors(bucket, through_proxy):
    lock = OutputLock(f"{bucket}/out", owner="run-a", ttl_s=120).acquire()
    # every request reset until 7 faults: more than botocore retries within one call (3)
    through_proxy.set_plan(FaultPlan(reset=1.0, max_faults=7, seed=3))
    assert lock.beat(), "retried until the store answered, within half the TTL"
    assert through_proxy.faults() == 7
    lock.check()
    lock.release()


def test_a_stale_lock_is_taken_over_and_its_old_holder_stops(bucket):
    out = f"{bucket}/out"
    old = OutputLock(out, owner="run-old", ttl_s=1.0).acquire()
    old._stop.set()  # its heartbeat dies (a stalled driver)
    old._thread.join()
    time.sleep(1.2)
    old_info = old.read()[0]
    assert old_info.expired(time.time()) and old_info.owner == "run-old"
    new = OutputLock(out, owner="run-new", ttl_s=3600).acquire()
    with pytest.raises(LockLost, match=r"run-old\) lost the output lock \(taken over by another run\)"):
        old.check()
    old.release()
    assert new.read()[0].owner == "run-new", "the old holder did not delete the new holder's lock"
    new.check()
    new.release()
