"""The driver SIGKILLed in each stage of a real run (a subprocess of the CLI, killed with its
local Ray as a dead machine would be, the moment its log says the stage started): the same
command run again completes with every object exactly once, the index describing the table,
and a third run finds nothing to redo, recover or commit. Stages: list, diff, the embed
stage, the commit, the index and the promotion of a new model; on a changed day, during
the removal's copy-on-write rewrites and between its deletion commit and the data commit;
on a changed day of a deletion-vector table with an object that fails, after the diff's
commits, inside compaction, between the embed stage and the deletion of the retried
object's old error row, and inside the index update."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from helpers import SPEC
from helpers.faults import assert_exactly_once, assert_settled, fill
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
from sparse_embed.pipeline.index.publish import current_manifest
from sparse_embed.pipeline.store import live, storage, tables

pytestmark = pytest.mark.integration

SPEC_B = {**SPEC, "proj_dim": 32}  # another model_version, for the promotion


def _kill_when_logged(argv: list[str], needle: str, timeout: float = 300) -> bool:
    """Run the CLI; SIGKILL its process group as soon as a stderr line contains `needle`.
    Returns whether it was killed (False: the run ended first)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "sparse_embed.jobs.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed = threading.Event()

    def watch():
        for line in proc.stderr:
            if needle in line and not killed.is_set():
                os.killpg(proc.pid, signal.SIGKILL)
                killed.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    t.join(10)
    return killed.is_set()


def _check_repaired(source: str, out: str, spec: dict, *, all_embedded: bool = True, **kw) -> None:
    cfg = EmbedConfig(source=source, out=out, spec=spec, rows_per_file=4, index_shards=1, run_id="rerun", **kw)
    run_embed(cfg)
    assert_exactly_once(source, out, all_embedded=all_embedded)
    m = current_manifest(f"{out}/index")
    assert m["table_version"] == tables.version_of(f"{out}/embeddings")
    assert set(live.read_live(f"{out}/embeddings", ["model_version"]).column("model_version").to_pylist()) == {
        m["model_version"]}
    assert_settled(cfg)


STAGES = [
    pytest.param("[list] start", id="list", marks=pytest.mark.slow),
    pytest.param("[diff] start", id="diff", marks=pytest.mark.slow),
    pytest.param("[fetch+decode+embed+write] start", id="embed"),
    pytest.param("[commit]", id="commit", marks=pytest.mark.slow),
    pytest.param("[index] start", id="index", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("needle", STAGES)
def test_driver_killed_in_a_stage_then_rerun_is_exactly_once(ray_local, bucket, needle):
    source, _ = fill(bucket, 6, seed=41)
    out = f"{bucket}/emb"
    argv = ["embed", source, "--out", out, "--model", SPEC["model"], "--rows-per-file", "4", "--batch-size", "4",
            "--decode-batch-size", "4", "--index-shards", "1"]
    assert _kill_when_logged(argv, needle), f"the run ended before {needle!r}"
    _check_repaired(source, out, SPEC)


REMOVAL_POINTS = [
    pytest.param("[remove] start", id="copy-on-write-rewrite", marks=pytest.mark.slow),  # the removal tasks are rewriting
    pytest.param("[remove] committed", id="after-deletion-commit", marks=pytest.mark.slow),  # before the data commit
]


@pytest.mark.parametrize("needle", REMOVAL_POINTS)
def test_driver_killed_while_removing_changed_rows_then_rerun_is_exactly_once(ray_local, bucket, needle):
    source, uris = fill(bucket, 4, seed=43)
    out = f"{bucket}/emb"
    run_embed(EmbedConfig(source=source, out=out, spec=SPEC, rows_per_file=4, index_shards=1))
    keys = sorted(u[len(source):] for u in uris)
    fs = storage.filesystem(source)
    storage.put_many(source, {keys[0]: fs.cat_file(storage.strip_scheme(source + keys[1]))})  # changed
    fs.rm_file(storage.strip_scheme(source + keys[2]))  # deleted
    # 1 of 8 rows deleted is over the default --max-delete of 10%
    argv = ["embed", source, "--out", out, "--model", SPEC["model"], "--rows-per-file", "4", "--index-shards", "1",
            "--max-delete", "1"]
    assert _kill_when_logged(argv, needle), f"the run ended before {needle!r}"
    _check_repaired(source, out, SPEC, max_delete="1")
    rows = live.read_live(f"{out}/embeddings", ["uri", "etag"])
    assert source + keys[2] not in rows.column("uri").to_pylist()
    assert len(set(rows.column("uri").to_pylist())) == rows.num_rows == len(uris) - 1


@pytest.mark.slow
def test_driver_killed_while_promoting_a_new_model_then_rerun_is_exactly_once(ray_local, bucket):
    source, _ = fill(bucket, 4, seed=42)
    out = f"{bucket}/emb"
    run_embed(EmbedConfig(source=source, out=out, spec=SPEC, rows_per_file=4, index_shards=1))
    argv = ["embed", source, "--out", out, "--model", SPEC["model"], "--proj-dim", "32", "--rows-per-file", "4",
            "--index-shards", "1"]
    assert _kill_when_logged(argv, "[promote] start"), "the run ended before the promotion"
    _check_repaired(source, out, SPEC_B)


INCREMENTAL_POINTS = [
    pytest.param("[diff] done", id="after-clearing-error-rows", marks=pytest.mark.slow),  # removal, compaction, error keys and ids committed
    pytest.param("[compact] start", id="inside-compaction", marks=pytest.mark.slow),
    pytest.param("[clear retried] start", id="before-clearing-retried-errors", marks=pytest.mark.slow),
    pytest.param("index update ", id="inside-index-update", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("needle", INCREMENTAL_POINTS)
def test_driver_killed_in_an_incremental_run_then_rerun_is_exactly_once(ray_local, bucket, needle):
    """Day 0: 8 images and one object that is no image (max_attempts 2), a deletion-vector
    table of 4-row files. Day 1: one image changed, one deleted (a quarter of their file:
    compaction is due), the bad object retried. Killed at `needle`, rerun: exactly once,
    the index describes the table, the bad object holds one error row with both attempts,
    and a third run has nothing to do."""
    source, uris = fill(bucket, 4, seed=44)
    storage.put_many(source, {"junk.jpg": b"not an image at all"})
    out = f"{bucket}/emb"
    run_embed(EmbedConfig(source=source, out=out, spec=SPEC, rows_per_file=4, index_shards=1, max_attempts=2,
                          deletion_vectors=True, run_id="day0"))
    keys = sorted(u[len(source):] for u in uris)
    fs = storage.filesystem(source)
    storage.put_many(source, {keys[0]: fs.cat_file(storage.strip_scheme(source + keys[1]))})  # changed
    fs.rm_file(storage.strip_scheme(source + keys[2]))  # deleted
    argv = ["embed", source, "--out", out, "--model", SPEC["model"], "--rows-per-file", "4", "--index-shards", "1",
            "--max-delete", "1", "--max-attempts", "2"]
    assert _kill_when_logged(argv, needle), f"the run ended before {needle!r}"
    _check_repaired(source, out, SPEC, all_embedded=False, max_delete="1", max_attempts=2)
    err = live.read_live(f"{out}/errors", ["uri", "attempts"])
    assert list(zip(err.column("uri").to_pylist(), err.column("attempts").to_pylist())) == [(source + "junk.jpg", 2)]
    rows = live.read_live(f"{out}/embeddings", ["uri"]).column("uri").to_pylist()
    assert sorted(rows) == sorted(u for u in uris if u != source + keys[2])
