"""Helpers of the fault tests (tests/hardening): fill a bucket, run the embed job in a thread,
wait, resume with a fresh driver, and check every listed object is exactly one row."""
from __future__ import annotations

import gc
import threading
import time

from sparse_embed.infra.synthetic_images import generate
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
from sparse_embed.pipeline.store import live, storage, tables


def fill(bucket: str, n_base: int, seed: int, *, under: str = "") -> tuple[str, list[str]]:
    """n_base images and a JPEG variant of each under <bucket>/images/<under>; (source, their URIs)."""
    source = f"{bucket}/images/"
    images = generate(n_base, seed=seed, variants=("jpeg",), min_side=32, max_side=64)
    return source, storage.put_many(source, {under + im.key: im.data for im in images})


def assert_exactly_once(source: str, out: str, *, all_embedded: bool = True) -> None:
    """Every listed object is exactly one row of embeddings or errors (the pattern of
    tests/integration/test_incremental.py), with no duplicate in either table."""
    fs = storage.filesystem(source)
    listed = sorted(storage.with_scheme(p, source) for p in fs.find(storage.strip_scheme(source)))
    emb = live.read_live(tables.table_uri(out, tables.EMBEDDINGS), ["uri"]).column("uri").to_pylist()
    err_t = live.read_live(tables.table_uri(out, tables.ERRORS), ["uri", "stage", "error_type"])
    err = err_t.column("uri").to_pylist() if err_t is not None else []
    assert len(emb) == len(set(emb)), "duplicate embedding rows"
    assert len(err) == len(set(err)), "duplicate error rows"
    assert sorted(emb + err) == listed, "every listed object is exactly one row"
    if all_embedded:
        assert not err, f"valid images left as errors: {list(zip(*(err_t.column(c).to_pylist() for c in ('stage', 'error_type'))))[:5]}"


def run_in_thread(cfg: EmbedConfig) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["result"] = run_embed(cfg)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            # Only the text: the traceback would keep the aborted run's actor handles (and
            # their CPUs) alive, and the resume in this same process would wait for them.
            box["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=target, name="embed-run", daemon=True)
    t.start()
    return t, box


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def pending_markers(out: str) -> int:
    try:
        return len(storage.filesystem(out).find(storage.strip_scheme(f"{out}/_pending/embeddings")))
    except FileNotFoundError:
        return 0


RAY_INIT: dict = {}  # the kwargs of this module's ray.init, for a fresh driver on resume


def fresh_driver() -> None:
    """What rerunning the command gives: a new driver. An aborted Ray Data execution keeps
    its actors (and their CPUs) while its driver lives, so a resume inside the same driver
    would wait for CPUs forever on a 2-CPU Ray."""
    import ray

    ray.shutdown()
    ray.init(**RAY_INIT)


def finish_or_resume(t: threading.Thread, box: dict, cfg: EmbedConfig, *, timeout: float = 300) -> str:
    """Join the faulted run; if it stopped, check its message names the cause and rerun the
    same config (a new run_id, a new driver) to completion. Returns "completed" or "resumed"."""
    t.join(timeout)
    assert not t.is_alive(), f"the run neither completed nor stopped within {timeout:.0f} s"
    if "error" in box:
        msg = box["error"]
        assert len(msg) > 20, f"unclear failure: {msg!r}"
        gc.collect()
        fresh_driver()
        resumed = run_embed(EmbedConfig(**{**cfg.__dict__, "run_id": cfg.run_id + "-resume"}))
        box["resumed"] = resumed
        box["message"] = msg
        return "resumed"
    return "completed"


def pending_files(out: str) -> list[str]:
    """Every marker under <out>/_pending (embeddings and errors); the store may keep an empty
    folder entry, which is no marker."""
    try:
        return [p for p in storage.filesystem(out).find(storage.strip_scheme(f"{out}/_pending")) if p.endswith(".json")]
    except FileNotFoundError:
        return []


def assert_no_key_twice(out: str) -> None:
    """No (uri, etag) twice among the embedding rows, nor among the error rows."""
    for name in (tables.EMBEDDINGS, tables.ERRORS):
        t = live.read_live(tables.table_uri(out, name), ["uri", "etag"])
        if t is None:
            continue
        keys = list(zip(t.column("uri").to_pylist(), t.column("etag").to_pylist()))
        assert len(keys) == len(set(keys)), f"{name}: {len(keys) - len(set(keys))} (uri, etag) repeated"


def assert_settled(cfg: EmbedConfig) -> dict:
    """Run the same job once more: nothing is redone, nothing recovered, nothing pending,
    nothing duplicated. Returns that run's report."""
    again = run_embed(EmbedConfig(**{**cfg.__dict__, "run_id": cfg.run_id + "-again"}))
    assert again["counts"]["processed"] == 0, again["counts"]
    assert again["counts"]["recovered_rows"] == 0, again["counts"]
    assert pending_files(cfg.out) == [], pending_files(cfg.out)
    assert_no_key_twice(cfg.out)
    return again
