"""Removing rows from an embeddings table (pipeline/store/removal.py) on real Delta tables
on local disk, under both mechanisms: readers this project did not write (deltalake's
QueryBuilder and pyarrow scanner, polars, DuckDB) see exactly the live rows, one per
object and no null vector, or refuse a deletion-vector table; this project's own readers
(snapshot, sample, lookups by id) agree; a table of the tombstone era is converted."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from helpers import positions_of, unit_vectors, write_table
from helpers.readers import assert_live_rows
from sparse_embed.pipeline.index.sample import sample_local
from sparse_embed.pipeline.index.searcher import vectors_for_ids
from sparse_embed.pipeline.index.snapshot import TableSnapshot, read_file
from sparse_embed.pipeline.store import delta_log, live, removal, tables

D = 8
MECHANISMS = [removal.COPY_ON_WRITE, removal.DELETION_VECTORS]


def _expected(ids, etags=None):
    etags = etags or {}
    return [(int(i), f"s3://b/img_{i}.jpg", etags.get(int(i), "e")) for i in ids]


@pytest.fixture(params=MECHANISMS)
def changed_table(request, tmp_path):
    """Ids 0..39 in two files (run r); then a night: ids 5 and 7 changed (old rows removed,
    new rows of run r2 appended), id 9 deleted."""
    uri = str(tmp_path / "embeddings")
    tables.ensure_table(uri, tables.embeddings_schema(D))
    if request.param == removal.DELETION_VECTORS:
        assert delta_log.enable_deletion_vectors(uri) is not None
    v = unit_vectors(40, D, seed=1)
    write_table(uri, v, np.arange(40, dtype="int64"), files=2)
    rem = removal.remove_positions(uri, positions_of(uri, [5, 7, 9]), tag="r2")
    assert rem.rows == 3 and rem.mechanism == request.param
    new = unit_vectors(2, D, seed=2)
    write_table(uri, new, np.array([5, 7], dtype="int64"), files=1, etag="e2", run_id="r2")
    return uri, v, new, request.param


def test_every_reader_sees_the_live_rows_only(changed_table):
    uri, v, new, mech = changed_table
    live_ids = sorted(set(range(40)) - {9})
    assert_live_rows(uri, _expected(live_ids, {5: "e2", 7: "e2"}), deletion_vectors=mech == removal.DELETION_VECTORS)

    t = live.read_live(uri, ["image_id", "etag"])
    assert sorted(t.column("image_id").to_pylist()) == live_ids
    by_uri = live.read_live(uri, ["image_id"], where={"uri": ["s3://b/img_5.jpg", "s3://b/img_9.jpg"]})
    assert by_uri.column("image_id").to_pylist() == [5]  # the live row of 5 (its new one); 9 is gone
    snap = TableSnapshot(uri)
    assert snap.n == 39 and len(snap.paths) == 3 and bool(snap.dvs) == (mech == removal.DELETION_VECTORS)
    from_files = pa.concat_tables([read_file(p, uri, ["image_id", "etag"], snap.dv_of(p)) for p in snap.paths])
    assert sorted(from_files.column("image_id").to_pylist()) == live_ids
    ids, vectors = sample_local(snap, 100, seed=3)
    assert sorted(ids.tolist()) == live_ids
    got = dict(zip(ids.tolist(), vectors))
    np.testing.assert_array_equal(got[5], new[0])
    np.testing.assert_array_equal(got[8], v[8])
    vec, _ = vectors_for_ids(uri, None, [7, 8])
    np.testing.assert_array_equal(vec, np.stack([new[1], v[8]]))
    with pytest.raises(ValueError, match="unknown ids"):
        vectors_for_ids(uri, None, [9])


def test_a_second_removal_in_a_file_keeps_the_first(changed_table):
    uri, _, _, mech = changed_table
    rem = removal.remove_positions(uri, positions_of(uri, [6, 30]), tag="r3")
    assert rem.rows == 2
    live_ids = sorted(set(range(40)) - {9, 6, 30})
    assert_live_rows(uri, _expected(live_ids, {5: "e2", 7: "e2"}), deletion_vectors=mech == removal.DELETION_VECTORS)
    if mech == removal.DELETION_VECTORS:
        assert sum(f.deleted for f in live.table_files(uri).files) == 5  # 5, 7, 9 then 6, 30: unions, not replacements


def test_copy_on_write_rewrites_only_the_files_that_hold_removed_rows(tmp_path):
    uri = str(tmp_path / "embeddings")
    write_table(uri, unit_vectors(40, D, seed=1), np.arange(40, dtype="int64"), files=4)
    before = {f.path for f in live.table_files(uri).files}
    rem = removal.remove_positions(uri, positions_of(uri, [3]), tag="r2")
    after = {f.path for f in live.table_files(uri).files}
    assert rem.files_touched == rem.files_rewritten == 1 and len(before - after) == 1 and len(after - before) == 1
    assert rem.bytes_written == sum(f.size for f in live.table_files(uri).files if f.path in after - before)


def test_compaction_rewrites_files_past_the_threshold_without_vectors(changed_table):
    uri, _, _, mech = changed_table
    before = sorted(live.read_live(uri, ["image_id", "etag"]).to_pylist(), key=lambda r: r["image_id"])
    rem = removal.compact(uri, fraction=0.0)
    if mech == removal.COPY_ON_WRITE:
        assert rem.files_rewritten == 0  # nothing is ever marked deleted
        return
    assert rem.files_rewritten == 1 and rem.rows == 3  # ids 5, 7 and 9 sit in the first file
    assert live.row_counts(uri) == (39, 0)
    assert sorted(live.read_live(uri, ["image_id", "etag"]).to_pylist(), key=lambda r: r["image_id"]) == before
    assert_live_rows(uri, _expected(sorted(set(range(40)) - {9}), {5: "e2", 7: "e2"}), deletion_vectors=True)


def _tombstone_table(uri):
    """A table as the code before 2026-12 left it: ids 0..39, then ids 5 and 7 changed and
    9 deleted, masked by a tombstone file (image_id, uri, etag, run_id of the masked rows;
    null embedding and model_version)."""
    schema = tables.embeddings_schema(D)
    write_table(uri, unit_vectors(40, D, seed=1), np.arange(40, dtype="int64"), files=2)
    ids = [5, 7, 9]
    stale = {"image_id": pa.array(ids, pa.int64()), "uri": [f"s3://b/img_{i}.jpg" for i in ids], "etag": ["e"] * 3,
             "run_id": ["r"] * 3}
    tomb = pa.table({f.name: stale[f.name] if f.name in stale else pa.nulls(3, f.type) for f in schema}, schema=schema)
    rel = "tombstone-r2-b00000.parquet"
    size = tables.write_parquet_file(uri, rel, tomb)
    tables.commit_files(uri, [(rel, size, 3)], schema)
    write_table(uri, unit_vectors(2, D, seed=2), np.array([5, 7], dtype="int64"), files=1, etag="e2", run_id="r2")


def test_a_tombstone_table_is_converted_in_one_commit(tmp_path):
    from deltalake import DeltaTable

    uri = str(tmp_path / "embeddings")
    _tombstone_table(uri)
    assert DeltaTable(uri).to_pyarrow_table().num_rows == 45  # what every outside reader saw: 40 + 3 tombstones + 2
    version = tables.version_of(uri)
    rem = removal.convert_tombstones(uri, tag="conv")
    assert rem.rows == 3 and rem.version == version + 1
    assert not any(live.is_tombstone_file(p) for p in DeltaTable(uri).file_uris())
    assert_live_rows(uri, _expected(sorted(set(range(40)) - {9}), {5: "e2", 7: "e2"}), deletion_vectors=False)
    assert removal.convert_tombstones(uri, tag="again") is None


def test_the_commands_compact_and_enable_deletion_vectors(tmp_path, capsys):
    from sparse_embed.jobs.cli import main

    uri = str(tmp_path / "embeddings")
    _tombstone_table(uri)
    assert main(["enable-deletion-vectors", "--out", str(tmp_path)]) == 2
    assert "cannot be undone" in capsys.readouterr().err
    assert main(["enable-deletion-vectors", "--out", str(tmp_path), "--yes"]) == 0
    assert "deletion vectors enabled" in capsys.readouterr().out
    assert main(["compact", "--out", str(tmp_path)]) == 0  # converts the tombstones (as vectors), then rewrites
    out = capsys.readouterr().out
    assert "3 rows masked by tombstones removed (deletion-vectors)" in out and "39 live rows" in out
    assert live.row_counts(uri) == (39, 0)
    assert_live_rows(uri, _expected(sorted(set(range(40)) - {9}), {5: "e2", 7: "e2"}), deletion_vectors=True)
    assert main(["compact", "--out", str(tmp_path / "nowhere")]) == 2


def test_a_checkpoint_keeps_the_deletion_vectors(changed_table):
    """Readers replay the log from the newest checkpoint: the vectors must survive it."""
    uri, _, _, mech = changed_table
    tables.open_table(uri).create_checkpoint()
    write_table(uri, unit_vectors(1, D, seed=9), np.array([100], dtype="int64"), files=1)  # a commit after it
    assert sum(f.deleted for f in live.table_files(uri).files) == (3 if mech == removal.DELETION_VECTORS else 0)
    live_ids = sorted((set(range(40)) - {9}) | {100})
    assert_live_rows(uri, _expected(live_ids, {5: "e2", 7: "e2"}), deletion_vectors=mech == removal.DELETION_VECTORS)
