"""Tombstones and the live view of an embeddings table (pipeline/store/live.py), on real
Delta tables on local disk: every reader sees the same live rows, a tombstone masks one
(image_id, run_id) row and never the same id written by a later run, compaction leaves
the live rows as they were."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from helpers import unit_vectors, write_table
from sparse_embed.pipeline.index.sample import sample_local
from sparse_embed.pipeline.index.searcher import vectors_for_ids
from sparse_embed.pipeline.index.snapshot import TableSnapshot, read_file
from sparse_embed.pipeline.store import live, tables

D = 8


def test_live_rows_masks_exactly_the_named_image_id_and_run_id_pairs():
    t = pa.table({"image_id": [1, 1, 2, 3], "run_id": ["a", "b", "a", "a"], "x": [10, 11, 20, 30]})
    mask = pa.table({"image_id": [1, 3, 9], "run_id": ["a", "a", "a"]})
    assert live.live_rows(t, mask).column("x").to_pylist() == [11, 20]
    assert live.live_rows(t, None).num_rows == 4


def test_tombstone_files_are_told_by_name_wherever_they_sit():
    paths = ["/t/part-r-1.parquet", "/t/tombstone-r-b00003.parquet", "/t/_staged/v2/embeddings/tombstone-x-b00000.parquet"]
    assert live.split_files(paths) == (paths[:1], paths[1:])
    assert live.tombstone_file_name("r", 3) == "tombstone-r-b00003.parquet"


def test_compaction_is_due_at_the_threshold_fraction():
    assert not live.needs_compaction(1000, 0)
    assert not live.needs_compaction(1000, 199)
    assert live.needs_compaction(1000, 200)
    assert live.needs_compaction(0, 1)
    assert live.needs_compaction(1000, 10, fraction=0.01)


def _mask(uri, ids, run_id):
    """Tombstones for the live rows of `ids`, committed in one append (as a nightly's diff does)."""
    schema = tables.embeddings_schema(D)
    stale = live.read_live(uri, ["image_id", "uri", "etag", "run_id"], filter=pc.field("image_id").isin(list(ids)))
    tables.commit_files(uri, [live.write_tombstones(uri, stale, schema, run_id, 0)], schema)


@pytest.fixture
def masked_table(tmp_path):
    """Ids 0..39 (run r); ids 5 and 7 changed by run r2 (masked, new rows); id 9 deleted."""
    uri = str(tmp_path / "embeddings")
    v = unit_vectors(40, D, seed=1)
    write_table(uri, v, np.arange(40, dtype="int64"), files=2)
    _mask(uri, [5, 7, 9], "r2")
    new = unit_vectors(2, D, seed=2)
    write_table(uri, new, np.array([5, 7], dtype="int64"), files=1, etag="e2", run_id="r2")
    return uri, v, new


def test_every_reader_sees_the_live_rows_only(masked_table):
    uri, v, new = masked_table
    live_ids = sorted(set(range(40)) - {9})
    assert live.row_counts(uri) == (42, 3)
    t = live.read_live(uri, ["image_id", "etag"])
    assert sorted(t.column("image_id").to_pylist()) == live_ids
    assert dict(zip(t.column("image_id").to_pylist(), t.column("etag").to_pylist()))[5] == "e2"

    snap = TableSnapshot(uri)
    assert snap.n == 39 and len(snap.tomb_paths) == 1 and len(snap.paths) == 3
    assert sorted(snap.read_columns(["image_id"]).column("image_id").to_pylist()) == live_ids
    from_files = pa.concat_tables([read_file(p, uri, ["image_id", "etag"], mask=snap.mask()) for p in snap.paths])
    assert sorted(from_files.column("image_id").to_pylist()) == live_ids
    assert sorted(zip(*from_files.to_pydict().values())) == sorted(zip(*t.select(["image_id", "etag"]).to_pydict().values()))

    ids, vectors = sample_local(snap, 100, seed=3)
    assert sorted(ids.tolist()) == live_ids
    got = dict(zip(ids.tolist(), vectors))
    np.testing.assert_array_equal(got[5], new[0])
    np.testing.assert_array_equal(got[8], v[8])

    vec, uris = vectors_for_ids(uri, None, [7, 8])
    np.testing.assert_array_equal(vec, np.stack([new[1], v[8]]))
    with pytest.raises(ValueError, match="unknown ids"):
        vectors_for_ids(uri, None, [9])


def test_an_id_written_again_by_a_later_run_is_not_masked_by_its_old_tombstone(masked_table):
    uri, _, _ = masked_table
    back = unit_vectors(1, D, seed=4)
    write_table(uri, back, np.array([9], dtype="int64"), files=1, etag="e", run_id="r3")  # deleted, then restored
    t = live.read_live(uri, ["image_id", "run_id"])
    assert dict(zip(t.column("image_id").to_pylist(), t.column("run_id").to_pylist()))[9] == "r3"
    assert TableSnapshot(uri).n == 40


def test_compaction_deletes_masked_rows_and_tombstones_and_keeps_the_live_view(masked_table):
    uri, _, _ = masked_table
    before = live.read_live(uri).sort_by("image_id")
    assert live.compact(uri) == 6  # 3 masked rows + 3 tombstones
    assert live.row_counts(uri) == (39, 0)
    assert not TableSnapshot(uri).tomb_paths
    raw = tables.open_table(uri).to_pyarrow_table().sort_by("image_id")
    assert raw.column("image_id").to_pylist() == before.column("image_id").to_pylist()
    assert raw.column("etag").to_pylist() == before.column("etag").to_pylist()
    assert live.compact(uri) == 0  # nothing left to compact


def test_the_compact_command_leaves_live_rows_only(masked_table, tmp_path, capsys):
    from sparse_embed.jobs.cli import main

    uri, _, _ = masked_table
    assert main(["compact", "--out", str(tmp_path)]) == 0
    assert "3 tombstones and the 3 rows they masked deleted; 39 live rows" in capsys.readouterr().out
    assert live.row_counts(uri) == (39, 0)
    assert main(["compact", "--out", str(tmp_path / "nowhere")]) == 2
    assert "No embeddings table" in capsys.readouterr().err
