"""The sink's commits: bounded chunks, min/max of image_id and uri in every add action (so a
lookup by id skips files), markers deleted in bulk, repeats add nothing."""
from __future__ import annotations

import glob

import numpy as np
import pyarrow as pa

from sparse_embed.pipeline.embed import sink
from sparse_embed.pipeline.store import tables

DIM = 4


def _rows(ids):
    n = len(ids)
    vectors = np.random.default_rng(1).standard_normal((n, DIM)).astype("float32")
    return pa.table({
        "image_id": pa.array(ids, pa.int64()), "uri": [f"s3://b/{i:04d}.jpg" for i in ids], "etag": ["e"] * n,
        "size": pa.array([1] * n, pa.int64()), "mtime": pa.array([None] * n, pa.timestamp("us", tz="UTC")),
        "width": pa.array([8] * n, pa.int32()), "height": pa.array([8] * n, pa.int32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
        "model": ["m"] * n, "model_version": ["mv"] * n, "run_id": ["r"] * n,
    }, schema=tables.embeddings_schema(DIM))


def test_commits_are_chunked_carry_min_max_and_clear_markers(tmp_path, monkeypatch):
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    out = str(tmp_path / "out")
    s = sink.EmbeddingTableSink(out, run_id="r", dim=DIM)
    s.on_write_start()
    blocks = [list(range(k * 10, k * 10 + 10)) for k in range(5)]
    files = [s._write_file(tables.EMBEDDINGS, sink.file_name("r", _rows(ids)), _rows(ids)) for ids in blocks]
    assert len(glob.glob(f"{out}/_pending/**/*.json", recursive=True)) == 5
    monkeypatch.setattr(sink, "COMMIT_FILES", 2)
    before = tables.version_of(f"{out}/embeddings")
    versions, committed = sink.commit_files(out, files, dim=DIM)
    assert committed == 50 and versions[tables.EMBEDDINGS] == before + 3, "5 files in commits of at most 2"
    assert glob.glob(f"{out}/_pending/**/*.json", recursive=True) == []

    actions = pa.table(DeltaTable(f"{out}/embeddings").get_add_actions(flatten=True))
    by_min = sorted(zip(actions.column("min.image_id").to_pylist(), actions.column("max.image_id").to_pylist()))
    assert by_min == [(ids[0], ids[-1]) for ids in blocks]
    assert sorted(actions.column("min.uri").to_pylist()) == [f"s3://b/{ids[0]:04d}.jpg" for ids in blocks]
    # a lookup by id reads only the file whose [min, max] holds it
    dt = DeltaTable(f"{out}/embeddings")
    assert len(dt.file_uris(partition_filters=None)) == 5
    ds = dt.to_pyarrow_dataset()
    assert len(list(ds.get_fragments(filter=pc.field("image_id") == 23))) == 1, "the other 4 files are skipped by stats"
    assert len(list(ds.get_fragments(filter=pc.field("uri") == "s3://b/0023.jpg"))) == 1
    hit = ds.to_table(filter=pc.field("image_id") == 23, columns=["uri"])
    assert hit.column("uri").to_pylist() == ["s3://b/0023.jpg"]

    again = sink.commit_files(out, files, dim=DIM)
    assert again == ({tables.EMBEDDINGS: before + 3, tables.ERRORS: tables.version_of(f"{out}/errors")}, 0)


def test_a_large_commit_is_followed_by_a_checkpoint(tmp_path, monkeypatch):
    import os

    uri = str(tmp_path / "t")
    schema = tables.image_ids_schema()
    parts = []
    for k in range(3):
        rows = pa.table({"uri": [f"u{k}"], "image_id": pa.array([k], pa.int64()), "run_id": ["r"]}, schema=schema)
        parts.append((f"p{k}.parquet", tables.write_parquet_file(uri, f"p{k}.parquet", rows), 1))
    monkeypatch.setattr(tables, "CHECKPOINT_AFTER_FILES", 3)
    tables.ensure_table(uri, schema)
    version = tables.commit_files(uri, parts, schema)
    assert os.path.exists(f"{uri}/_delta_log/{version:020d}.checkpoint.parquet")
    assert tables.count_rows(uri) == 3
