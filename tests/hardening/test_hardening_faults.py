"""Hardening, injected faults (real ones) during the real embed job on the local S3 server:
the fault proxy (503 SlowDown, stalls, connection resets) between every client and the
store, an embed actor's process killed, the object store stopped. Each test asserts one
outcome (the run completes exactly once, or it stops with a message and the same command
resumes to exactly-once output), then that a further run has nothing to do.

Every client goes through the proxy for the whole module: the driver (os.environ) and the
Ray workers (runtime_env), so faults reach s3fs, pyarrow's S3 and deltalake alike.
"""
from __future__ import annotations

import os
import signal

import pytest

from helpers import SPEC
from helpers.fault_proxy import FaultPlan, FaultProxy
from helpers.faults import (RAY_INIT, assert_exactly_once, assert_settled, fill, finish_or_resume, pending_markers,
                           run_in_thread, wait_for)
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed

pytestmark = pytest.mark.integration

OFF = FaultPlan()


@pytest.fixture(scope="module")
def proxy(object_store):
    """The proxy in front of the store, faults off, and a local Ray whose workers use it."""
    import ray

    with FaultProxy(object_store.endpoint_url, OFF, lifetime_s=1800) as px:
        saved = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = px.url
        if ray.is_initialized():
            ray.shutdown()
        RAY_INIT.clear()
        RAY_INIT.update(num_cpus=2, include_dashboard=False,
                        runtime_env={"env_vars": object_store.aws_env() | {"AWS_ENDPOINT_URL": px.url}})
        ray.init(**RAY_INIT)
        try:
            yield px
        finally:
            ray.shutdown()
            os.environ["AWS_ENDPOINT_URL"] = saved
            px.set_plan(OFF)


def test_fault_proxy_injects_what_it_is_told(proxy, object_store):
    """The proxy itself: seeded decisions, each fault seen by a plain boto3 client."""
    import boto3
    from botocore.config import Config

    c = boto3.client("s3", endpoint_url=proxy.url, aws_access_key_id=object_store.access_key,
                     aws_secret_access_key=object_store.secret_key, region_name=object_store.region,
                     config=Config(retries={"max_attempts": 1}, read_timeout=5, connect_timeout=2))
    seen = {}
    proxy.set_plan(FaultPlan(slowdown=0.3, reset=0.3, stall=0.2, stall_s=0.2, seed=5))
    for _ in range(30):
        try:
            c.list_buckets()
            seen["ok"] = seen.get("ok", 0) + 1
        except Exception as e:  # noqa: BLE001
            kind = (getattr(e, "response", None) or {}).get("Error", {}).get("Code") or type(e).__name__
            seen[kind] = seen.get(kind, 0) + 1
    counts = dict(proxy.counts)
    proxy.set_plan(OFF)
    assert seen.get("SlowDown", 0) > 0 and seen.get("ok", 0) > 0, seen
    assert sum(v for k, v in seen.items() if k not in ("ok", "SlowDown")) > 0, f"resets surface as connection errors: {seen}"
    # botocore retries some of them itself, so the proxy counts at least what the caller saw
    assert counts["stall"] > 0 and counts["reset"] > 0 and counts["slowdown"] >= seen["SlowDown"], counts
    assert counts["requests"] == sum(counts[k] for k in ("passed", "slowdown", "reset", "stall"))


@pytest.mark.slow  # > 40 s on 2 cores; ./dev test -m slow
def test_slowdown_and_stalls_are_absorbed_exactly_once(proxy, object_store):
    """503 SlowDown on 10 % of requests and 0.5 s stalls on 5 %: the clients' retry policies
    absorb them; the run completes with every object embedded, and a rerun has nothing to do."""
    bucket = object_store.create_bucket("fault-slowdown")
    source, uris = fill(bucket, 10, seed=21)
    cfg = EmbedConfig(source=source, out=f"{bucket}/out", spec=SPEC, decode_batch_size=4, embed_batch_size=4, rows_per_file=4, build_index=False)
    proxy.set_plan(FaultPlan(slowdown=0.10, stall=0.05, stall_s=0.5, max_faults=100, seed=1))
    before = proxy.faults()
    try:
        t, box = run_in_thread(cfg)
        t.join(300)
    finally:
        proxy.set_plan(OFF)
    assert proxy.faults() - before > 5, proxy.counts
    assert not t.is_alive() and "result" in box, box.get("error")
    assert box["result"]["counts"]["embedded"] == len(uris), box["result"]["counts"]
    assert_exactly_once(source, cfg.out)
    assert_settled(cfg)


@pytest.mark.slow  # > 40 s on 2 cores; ./dev test -m slow
def test_connection_resets_on_image_reads_are_retried_and_the_run_completes(proxy, object_store):
    """Connection resets on 20 % of the reads of the images (and SlowDown on 5 %): the
    fetches retry them; the run completes with every object embedded, and a rerun has
    nothing to do."""
    bucket = object_store.create_bucket("fault-reset")
    source, uris = fill(bucket, 20, seed=22)
    cfg = EmbedConfig(source=source, out=f"{bucket}/out", spec=SPEC, decode_batch_size=4, embed_batch_size=4, rows_per_file=4, build_index=False)
    proxy.set_plan(FaultPlan(reset=0.20, slowdown=0.05, max_faults=60, seed=2, only=("/images/",)))
    resets = proxy.counts["reset"]
    try:
        t, box = run_in_thread(cfg)
        t.join(300)
    finally:
        proxy.set_plan(OFF)
    assert proxy.counts["reset"] - resets > 3, proxy.counts
    assert not t.is_alive() and "result" in box, box.get("error")
    assert box["result"]["counts"]["embedded"] == len(uris), box["result"]["counts"]
    assert_exactly_once(source, cfg.out)
    assert_settled(cfg)


def _parent(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descends_from_us(pid: int) -> bool:
    """Only processes of the Ray this test process started (others may run Ray here too)."""
    me = os.getpid()
    while pid > 1:
        pid = _parent(pid)
        if pid == me:
            return True
    return False


def _embed_actor_pids() -> list[int]:
    """Processes of our Ray's embed actors (their title names the callable class)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or not _descends_from_us(int(d)):
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if cmd.startswith(b"ray::") and (b"EmbedActor" in cmd or b"MapWorker" in cmd):
            pids.append(int(d))
    return pids


def test_embed_actor_killed_mid_run(proxy, object_store):
    """Every embed actor SIGKILLed while the job runs: Ray Data restarts them (the pool's
    max_restarts=-1) and retries their batches, so the run completes, each object exactly
    once, and a rerun finds nothing left to do."""
    bucket = object_store.create_bucket("fault-actor")
    source, uris = fill(bucket, 40, seed=23)
    out = f"{bucket}/out"
    cfg = EmbedConfig(source=source, out=out, spec=SPEC, decode_batch_size=4, embed_batch_size=4, rows_per_file=4, build_index=False)
    t, box = run_in_thread(cfg)
    wait_for(lambda: _embed_actor_pids() and pending_markers(out) >= 1 or not t.is_alive(), 240, "an embed actor at work")
    assert t.is_alive(), f"the run ended before the fault: {box}"
    victims = _embed_actor_pids()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert victims, "no embed actor process found to kill"
    outcome = finish_or_resume(t, box, cfg)
    assert outcome == "completed", f"the run stopped after {len(victims)} actor(s) were killed: {box.get('message')}"
    assert box["result"]["counts"]["processed"] == len(uris), box["result"]["counts"]
    assert_exactly_once(source, out)
    assert_settled(cfg)


@pytest.mark.slow  # > 40 s on 2 cores; ./dev test -m slow
def test_object_store_restarted_mid_run_is_ridden_out(proxy, object_store):
    """weed mini stopped and started again (same ports and data) while the job writes: the
    commits and writes retry through the outage, so the run completes; an object whose
    fetch failed meanwhile is an infrastructure error row (never an object failure), which
    the rerun embeds; then a further run has nothing to do."""
    bucket = object_store.create_bucket("fault-restart")
    source, uris = fill(bucket, 40, seed=24)
    out = f"{bucket}/out"
    cfg = EmbedConfig(source=source, out=out, spec=SPEC, decode_batch_size=4, embed_batch_size=4, rows_per_file=4, build_index=False)
    t, box = run_in_thread(cfg)
    wait_for(lambda: pending_markers(out) >= 1 or not t.is_alive(), 240, "the first written files")
    assert t.is_alive(), f"the run ended before the fault: {box}"
    object_store.restart()
    t.join(300)
    assert not t.is_alive() and "result" in box, box.get("error")
    counts = box["result"]["counts"]
    print(f"store restart: {counts['embedded']} embedded, {counts['failed_infrastructure']} infrastructure failures")
    assert counts["failed_object"] == 0 and counts["embedded"] + counts["failed_infrastructure"] == len(uris), counts
    rerun = run_embed(EmbedConfig(**{**cfg.__dict__, "run_id": cfg.run_id + "-retry"}))
    assert rerun["counts"]["processed"] == counts["failed_infrastructure"], rerun["counts"]
    assert_exactly_once(source, out)
    assert_settled(cfg)


@pytest.mark.slow  # > 40 s on 2 cores; ./dev test -m slow
def test_a_lost_answer_to_a_delta_commit_never_commits_twice(proxy, object_store):
    """The data commit reaches the store and its answer is lost (the connection reset after
    the store wrote it): the client retries a commit that already landed. One outcome:
    every object is one row, and a further run has nothing to do."""
    bucket = object_store.create_bucket("fault-commit")
    source, uris = fill(bucket, 6, seed=25)
    out = f"{bucket}/out"
    cfg = EmbedConfig(source=source, out=out, spec=SPEC, rows_per_file=4, build_index=False)
    proxy.set_plan(FaultPlan(drop_response=("PUT /fault-commit/out/embeddings/_delta_log/00000000000000000001.json",)))
    try:
        t, box = run_in_thread(cfg)
        t.join(300)
    finally:
        proxy.set_plan(OFF)
    print(f"lost commit answer: {proxy.counts}; {box.get('error', '')[:400]}")
    assert proxy.counts.get("dropped_response", 0) == 1, proxy.counts
    assert not t.is_alive() and "result" in box, box.get("error")
    assert box["result"]["counts"]["embedded"] == len(uris), box["result"]["counts"]
    assert_exactly_once(source, out)
    assert_settled(cfg)
