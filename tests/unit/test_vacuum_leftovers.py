"""What `vacuum_output` removes besides replaced table files, on a local output: files of
crashed writers (but not a pending file the next run commits), dead runs' work folders,
stale probe objects, the replaced files of a promoted model change and an abandoned
staging root; and what it keeps: everything a version within the retention names, a
staging run in progress, files it did not write."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pytest

from helpers import remove_ids, unit_vectors, write_table
from helpers.readers import assert_live_rows
from sparse_embed.pipeline.store import delta_log, live, removal, tables
from sparse_embed.pipeline.store.vacuum import PROBE_MAX_AGE_S, STAGED_DIR, vacuum_output

HOUR = 3600.0


def _touch(path: str, body: bytes = b"x", *, at: float | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(body)
    if at is not None:
        os.utime(path, (at, at))
    return path


def _files(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names}


def _expected_rows(uri: str) -> list[tuple]:
    t = live.read_live(uri, ["image_id", "uri", "etag"])
    return list(zip(*(t.column(c).to_pylist() for c in ("image_id", "uri", "etag"))))


@pytest.mark.parametrize("deletion_vectors", [False, True], ids=["copy-on-write", "deletion-vectors"])
def test_vacuum_removes_crashed_writers_files_and_keeps_pending_and_foreign_ones(tmp_path, deletion_vectors):
    out = str(tmp_path / "out")
    emb = tables.table_uri(out, tables.EMBEDDINGS)
    write_table(emb, unit_vectors(40, 4, seed=1), np.arange(40, dtype="int64"), files=4)
    if deletion_vectors:
        delta_log.enable_deletion_vectors(emb)
    remove_ids(emb, [1, 11], tag="night-1")
    remove_ids(emb, [2, 12], tag="night-2")  # a second vector replaces the first of those files
    removal.compact(emb, fraction=0.0)
    expected = _expected_rows(emb)
    crashed = _touch(f"{emb}/part-of-a-crashed-run.parquet", b"PAR1")
    pending = _touch(f"{emb}/part-pending.parquet", b"PAR1")
    _touch(f"{out}/_pending/{tables.EMBEDDINGS}/part-pending.parquet.json", json.dumps({"path": "part-pending.parquet"}).encode())
    foreign = _touch(f"{emb}/README.md", b"notes")
    dead_work = _touch(f"{out}/_work/run-7/todo/b=0/part.parquet", b"PAR1")
    later = time.time() + 10 * HOUR
    old_probe = _touch(f"{emb}/_probe-0123", b"1", at=later - 2 * PROBE_MAX_AGE_S)
    new_probe = _touch(f"{emb}/_probe-4567", b"1", at=later)
    fresh = _touch(f"{emb}/part-being-written.parquet", b"PAR1", at=later)  # newer than the cutoff

    report = vacuum_output(out, retain_hours=1, now=later)

    left = _files(emb)
    assert not os.path.exists(crashed) and not os.path.exists(dead_work) and not os.path.exists(old_probe)
    for kept in (pending, foreign, new_probe, fresh):
        assert os.path.exists(kept), kept
    tf = live.table_files(emb)
    named = {f.path for f in tf.files}
    data_left = {p for p in left if p.endswith(".parquet") and not p.startswith("_")}
    assert data_left == named | {"part-pending.parquet", "part-being-written.parquet"}
    assert not any(p.startswith("deletion_vector_") for p in left), "compaction left no file with a vector"
    assert report["tables"][tables.EMBEDDINGS]["files"] >= 5 and report["leftovers"]["files"] == 2
    assert_live_rows(emb, expected, deletion_vectors=deletion_vectors)


def test_vacuum_keeps_what_the_retention_window_names(tmp_path):
    """Versions committed after the cutoff, and the last one before it, stay readable."""
    out = str(tmp_path / "out")
    emb = tables.table_uri(out, tables.EMBEDDINGS)
    write_table(emb, unit_vectors(30, 4, seed=2), np.arange(30, dtype="int64"), files=3)
    delta_log.enable_deletion_vectors(emb)
    remove_ids(emb, [1], tag="night-1")
    before = tables.version_of(emb)
    remove_ids(emb, [2], tag="night-2")  # replaces night-1's vector
    removal.compact(emb, fraction=0.0)
    # cutoff between night-1 and night-2: night-1's version is the last one before it
    cutoff = os.path.getmtime(f"{emb}/_delta_log/{before + 1:020d}.json") - 1e-6  # night-2's commit
    vacuum_output(out, retain_hours=0, now=cutoff)
    assert vacuum_output(out, retain_hours=0, now=cutoff)["tables"][tables.EMBEDDINGS]["files"] == 0
    for v in range(before, tables.version_of(emb) + 1):
        assert live.read_live(emb, ["image_id"], version=v).num_rows > 0, v  # every file and vector is there
    assert len(live.read_live(emb, ["image_id"], version=before)) == 29
    vacuum_output(out, retain_hours=0)
    with pytest.raises(OSError):
        live.read_live(emb, ["image_id"], version=before)


def _staged_table(out: str, version: str, ids, *, seed: int) -> str:
    root = f"{tables.table_uri(out, tables.EMBEDDINGS)}/{STAGED_DIR}/{version}"
    write_table(tables.table_uri(root, tables.EMBEDDINGS), unit_vectors(len(ids), 4, seed=seed), np.asarray(ids, "int64"), files=2)
    _touch(f"{root}/encoder.json", json.dumps({"model_version": version}).encode())
    return root


def test_vacuum_of_model_changes_promoted_in_progress_and_abandoned(tmp_path):
    out = str(tmp_path / "out")
    emb = tables.table_uri(out, tables.EMBEDDINGS)
    write_table(emb, unit_vectors(10, 4, seed=3), np.arange(10, dtype="int64"), files=1)
    # a promoted model change: the active table names files under _staged/v2/embeddings
    promoted = f"{emb}/{STAGED_DIR}/v2/{tables.EMBEDDINGS}"
    t = live.read_live(emb)
    names = []
    for i in range(2):
        rel = f"{STAGED_DIR}/v2/{tables.EMBEDDINGS}/part-{i}.parquet"
        size = tables.write_parquet_file(emb, rel, t.slice(5 * i, 5))
        names.append((rel, size, 5, tables.column_stats(t.slice(5 * i, 5), removal.STATS_COLUMNS)))
    tables.commit_files(emb, names, tables.embeddings_schema(4), mode="overwrite")
    remove_ids(emb, [0], tag="night-1")  # copy-on-write: part-0 is replaced by a file at the table's root
    expected = _expected_rows(emb)
    abandoned = _staged_table(out, "v3", [1, 2], seed=4)
    later = time.time() + 10 * HOUR
    _touch(f"{out}/encoder.json", b"{}", at=later - 0.5 * HOUR)  # another model was promoted after v3's last write
    in_progress = _staged_table(out, "v4", [1, 2, 3], seed=5)
    remove_ids(tables.table_uri(in_progress, tables.EMBEDDINGS), [1], tag="staged-night")
    for d, _, files in os.walk(in_progress):
        for n in files:
            os.utime(os.path.join(d, n), (later, later))  # written within the retention

    report = vacuum_output(out, retain_hours=1, now=later)

    assert not os.path.exists(f"{promoted}/part-0.parquet") and os.path.exists(f"{promoted}/part-1.parquet")
    assert not os.path.exists(abandoned) or not _files(abandoned), _files(abandoned)
    assert report["staged"]["removed"] == ["v3"]
    staged_emb = tables.table_uri(in_progress, tables.EMBEDDINGS)
    assert os.path.exists(f"{in_progress}/encoder.json") and live.read_live(staged_emb, ["image_id"]).num_rows == 2
    assert_live_rows(emb, expected, deletion_vectors=False)
    assert pa.table(tables.open_table(emb).get_add_actions(flatten=True)).num_rows == 2
