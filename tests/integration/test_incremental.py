"""Incremental re-embedding against the real local object store: nothing changed, a day of
changes equals a fresh full run, a killed driver resumes exactly once, a model change
starts a new version. Each test builds its own day 0 in its own bucket (no test sees
another's changes), so N and the images are kept small."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import SPEC
from helpers.faults import assert_settled
from sparse_embed.infra.synthetic_images import generate
from sparse_embed.pipeline.store import live, storage, tables
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed, staging_root
from sparse_embed.pipeline.index.snapshot import vectors_of
from sparse_embed.pipeline.index.searcher import ShardedIndex, current_index_id

pytestmark = pytest.mark.integration

N = 24  # objects of day 0: 12 bases + 12 JPEG variants


def _objects(seed: int, n_base: int, *, min_side: int = 32, max_side: int = 48) -> dict[str, bytes]:
    images = generate(n_base, seed=seed, variants=("jpeg",), min_side=min_side, max_side=max_side)
    return {im.key: im.data for im in images}


def _rows(out: str) -> dict[str, tuple]:
    t = live.read_live(tables.table_uri(out, tables.EMBEDDINGS))
    v = vectors_of(t.column("embedding"))
    cols = [t.column(c).to_pylist() for c in ("uri", "etag", "size", "width", "height", "model_version", "image_id")]
    return {u: (e, s, w, h, mv, i, v[k]) for k, (u, e, s, w, h, mv, i) in enumerate(zip(*cols))}


def _assert_exactly_once(source: str, out: str):
    fs = storage.filesystem(source)
    listed = sorted(storage.with_scheme(p, source) for p in fs.find(storage.strip_scheme(source)))
    emb = live.read_live(tables.table_uri(out, tables.EMBEDDINGS), ["uri"]).column("uri").to_pylist()
    err = live.read_live(tables.table_uri(out, tables.ERRORS), ["uri"]).column("uri").to_pylist()
    assert len(emb) == len(set(emb)), "duplicate embedding rows"
    assert sorted(emb + err) == listed, "every listed object is exactly one row"


@pytest.fixture
def day0(bucket, ray_local):
    """Day 0 in a fresh bucket for each test: N objects, embedded and indexed once."""
    source, out = f"{bucket}/images/", f"{bucket}/emb"
    objects = _objects(seed=11, n_base=N // 2)
    storage.put_many(source, objects)
    first = run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=2, rows_per_file=16))
    return {"bucket": bucket, "source": source, "out": out, "objects": objects, "first": first}


def test_rerun_with_nothing_changed_embeds_nothing(day0):
    again = run_embed(EmbedConfig(source=day0["source"], out=day0["out"], spec=SPEC))
    assert again["counts"]["processed"] == 0 and again["counts"]["unchanged"] == N
    assert again["index_id"] is None, "no change, no new index"
    assert current_index_id(f"{day0['out']}/index") == day0["first"]["index_id"]


def test_a_day_of_changes_equals_a_fresh_full_run(day0):
    source, out, bucket = day0["source"], day0["out"], day0["bucket"]
    before = _rows(out)
    keys = sorted(day0["objects"])
    added = {f"new/img_{i}.jpg": d for i, d in enumerate(_objects(seed=12, n_base=1).values())}  # 2
    changed_key, deleted_key = keys[5], keys[10]  # 1 each
    storage.put_many(source, added | {changed_key: day0["objects"][keys[15]]})
    storage.filesystem(source).rm_file(storage.strip_scheme(source + deleted_key))

    emb_uri = tables.table_uri(out, tables.EMBEDDINGS)
    files_before = set(tables.open_table(emb_uri).file_uris())
    inc = run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=2, rows_per_file=16))
    c = inc["counts"]
    assert (c["new"], c["changed"], c["deleted"], c["processed"]) == (2, 1, 1, 3), c
    # copy-on-write: only the files holding the changed and deleted rows were rewritten
    files_after = set(tables.open_table(emb_uri).file_uris())
    r = inc["removal"]
    assert c["removed_rows"] == 2 and r["mechanism"] == "copy-on-write" and 1 <= r["files_touched"] <= 2
    assert len(files_before - files_after) == r["files_touched"] and r["files_rewritten"] <= r["files_touched"]
    assert live.row_counts(emb_uri) == (N + 1, 0)
    assert ShardedIndex.open(f"{out}/index").manifest["update"]["added_rows"]["read_from"] == "log"

    fresh_out = f"{bucket}/fresh"
    run_embed(EmbedConfig(source=source, out=fresh_out, spec=SPEC, index_shards=2, rows_per_file=16))
    a, b = _rows(out), _rows(fresh_out)
    assert sorted(a) == sorted(b) and source + deleted_key not in a
    for uri in a:
        assert a[uri][:5] == b[uri][:5], uri
        np.testing.assert_allclose(a[uri][6], b[uri][6], rtol=0, atol=1e-6, err_msg=uri)
    assert a[source + changed_key][5] == before[source + changed_key][5], "a changed object keeps its image_id"
    assert all(a[u][5] == before[u][5] for u in before if u in a)

    ia, ib = ShardedIndex.open(f"{out}/index"), ShardedIndex.open(f"{fresh_out}/index")
    assert ia.manifest["ntotal"] == ib.manifest["ntotal"] == len(a)
    q = np.stack([a[u][6] for u in sorted(a)[:20]])
    ha, hb = ia.hits(q, 5), ib.hits(q, 5)
    # Both are exact top-5 over the same vectors: every hit scores what its current vector
    # scores (no stale vector of a changed or deleted object), ranks score alike, and hits
    # differ only where two scores tie within float error.
    for qi, (ra, rb) in enumerate(zip(ha, hb)):
        detail = f"query {qi}: updated {[(h.uri, h.score) for h in ra]} fresh {[(h.uri, h.score) for h in rb]}"
        for h in ra + rb:
            assert abs(h.score - float(q[qi] @ a[h.uri][6])) <= 1e-5, detail
        np.testing.assert_allclose([h.score for h in ra], [h.score for h in rb], rtol=0, atol=1e-5, err_msg=detail)
        assert all(x.uri == y.uri or abs(x.score - y.score) <= 1e-5 for x, y in zip(ra, rb)), detail
    assert source + deleted_key not in ia.uris.values()


def test_a_deletion_vector_table_marks_rows_then_compacts_at_the_threshold(day0, monkeypatch):
    from sparse_embed.pipeline.store import delta_log, removal

    source, out = day0["source"], day0["out"]
    emb_uri = tables.table_uri(out, tables.EMBEDDINGS)
    assert delta_log.enable_deletion_vectors(emb_uri) is not None  # as `sparse-embed enable-deletion-vectors`
    files_before = {f.path: f.size for f in live.table_files(emb_uri).files}
    keys = sorted(day0["objects"])
    storage.put_many(source, {keys[3]: day0["objects"][keys[4]]})  # changed
    storage.filesystem(source).rm_file(storage.strip_scheme(source + keys[7]))  # deleted
    monkeypatch.setattr(removal, "COMPACT_FRACTION", 1.01)  # never: the vectors stay (the driver decides)
    marked = run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=2, rows_per_file=16))
    assert marked["counts"]["processed"] == 1 and live.row_counts(emb_uri) == (N + 1, 2)
    assert (marked["counts"]["removed_rows"], marked["counts"]["compacted_rows"]) == (2, 0)
    assert marked["removal"]["mechanism"] == "deletion-vectors" and marked["removal"]["files_rewritten"] == 0
    assert all(files_before.get(f.path, f.size) == f.size for f in live.table_files(emb_uri).files), "no file rewritten"
    _assert_exactly_once(source, out)
    monkeypatch.setattr(removal, "COMPACT_FRACTION", 0.01)  # every file with a vector is due
    storage.filesystem(source).rm_file(storage.strip_scheme(source + keys[9]))
    compacted = run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=2, rows_per_file=16))
    assert compacted["counts"]["deleted"] == 1
    assert (compacted["counts"]["removed_rows"], compacted["counts"]["compacted_rows"]) == (1, 3)
    assert live.row_counts(emb_uri) == (N - 2, 0), "the compaction dropped every deleted row"
    _assert_exactly_once(source, out)
    index = ShardedIndex.open(f"{out}/index")
    assert index.manifest["ntotal"] == N - 2 and source + keys[9] not in index.uris.values()
    again = run_embed(EmbedConfig(source=source, out=out, spec=SPEC))
    assert again["counts"]["processed"] == 0 and again["index_id"] is None
    assert live.row_counts(emb_uri) == (N - 2, 0)


@pytest.mark.slow  # > 40 s on 2 cores; ./dev test -m slow
def test_driver_killed_mid_embed_resumes_exactly_once(bucket, ray_local):
    """The CLI's driver and its Ray SIGKILLed after its first written files: the rerun
    commits the killed run's finished files (recovered_rows) and embeds exactly the rest,
    and a third run finds nothing to do."""
    source, out = f"{bucket}/images/", f"{bucket}/emb"
    objects = _objects(seed=13, n_base=40, min_side=48, max_side=96)  # 80: the run lasts long enough to be killed
    storage.put_many(source, objects)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "sparse_embed.jobs.cli", "embed", source, "--out", out, "--model", "resnet10t",
           "--decode-batch-size", "4", "--batch-size", "4", "--rows-per-file", "4", "--no-index"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    fs = storage.filesystem(out)
    pending = storage.strip_scheme(f"{out}/_pending/embeddings")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(fs.ls(pending)) >= 2:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, as a dead machine would
    proc.wait()
    emb = live.read_live(tables.table_uri(out, tables.EMBEDDINGS), ["uri"])
    assert emb is None or emb.num_rows == 0, "nothing is visible before the run commits"

    cfg = EmbedConfig(source=source, out=out, spec=SPEC, build_index=False)
    resumed = run_embed(cfg)
    c = resumed["counts"]
    assert c["recovered_rows"] > 0, "finished work of the killed run is kept"
    assert c["processed"] + c["recovered_rows"] == len(objects), c
    _assert_exactly_once(source, out)
    assert_settled(cfg)


def test_model_change_starts_a_new_version_and_keeps_the_old_queryable(day0):
    source, out = day0["source"], day0["out"]
    old_id = current_index_id(f"{out}/index")
    old_version = tables.version_of(tables.table_uri(out, tables.EMBEDDINGS))
    old_model = ShardedIndex.open(f"{out}/index").manifest["model_version"]
    spec = SPEC | {"proj_dim": 128}  # same backbone, another head: another model_version
    result = run_embed(EmbedConfig(source=source, out=out, spec=spec, index_shards=2, rows_per_file=16))
    assert result["promoted_model_version"] == result["model_version"] != old_model
    new = ShardedIndex.open(f"{out}/index")
    assert new.manifest["model_version"] == result["model_version"] and new.manifest["dim"] == 128
    t = live.read_live(tables.table_uri(out, tables.EMBEDDINGS))
    assert set(t.column("model_version").to_pylist()) == {result["model_version"]}, "never mixed"
    old_t = live.read_live(tables.table_uri(out, tables.EMBEDDINGS), version=old_version)
    assert set(old_t.column("model_version").to_pylist()) == {old_model}, "the old version stays readable"
    old_index = ShardedIndex.open(f"{out}/index", index_id=old_id)
    assert old_index.manifest["model_version"] == old_model and old_index.manifest["ntotal"] > 0
    staged = storage.strip_scheme(staging_root(out, result["model_version"]))
    left = {p for p in storage.filesystem(out).find(staged) if not p.endswith("/")}  # SeaweedFS may keep folder entries
    active = {storage.strip_scheme(f) for f in tables.open_table(tables.table_uri(out, tables.EMBEDDINGS)).file_uris()}
    assert active and left == active, "promotion names the staged files (nothing copied) and leaves nothing else staged"


def test_a_run_that_dies_after_its_deletion_commit_is_completed_by_the_next(day0, monkeypatch):
    """The diff commits the removal before anything is embedded: a run dying between its
    deletion commit and its data commit leaves the changed object without a row (the
    window README states) and the deleted one gone; the next run embeds it, removes nothing."""
    from sparse_embed.pipeline.embed import run as run_mod

    source, out = day0["source"], day0["out"]
    emb_uri = tables.table_uri(out, tables.EMBEDDINGS)
    keys = sorted(day0["objects"])
    storage.put_many(source, {keys[2]: day0["objects"][keys[3]]})  # changed
    storage.filesystem(source).rm_file(storage.strip_scheme(source + keys[6]))  # deleted

    def die(*args, **kwargs):
        raise RuntimeError("driver died in the embed stage")

    monkeypatch.setattr(run_mod, "_embed_todo", die)
    with pytest.raises(RuntimeError, match="driver died"):
        run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=2, rows_per_file=16))
    assert live.row_counts(emb_uri) == (N - 2, 0)
    assert source + keys[2] not in live.read_live(emb_uri, ["uri"]).column("uri").to_pylist()
    monkeypatch.undo()

    rerun = run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=2, rows_per_file=16))
    assert rerun["counts"]["processed"] == 1 and rerun["counts"]["removed_rows"] == 0, rerun["counts"]
    assert live.row_counts(emb_uri) == (N - 1, 0), "nothing removed twice"
    _assert_exactly_once(source, out)
    index = ShardedIndex.open(f"{out}/index")
    assert index.manifest["ntotal"] == N - 1 and index.manifest["table_version"] == tables.version_of(emb_uri)
    settled = run_embed(EmbedConfig(source=source, out=out, spec=SPEC))
    assert settled["counts"]["processed"] == 0 and settled["index_id"] is None
