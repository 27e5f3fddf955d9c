"""tables.appended_files: the files a nightly's appends added, read from the Delta log (what an
index update reads first for its added rows)."""
import pyarrow as pa

from sparse_embed.pipeline.store import storage, tables

SCHEMA = pa.schema([("image_id", pa.int64()), ("uri", pa.string()), ("etag", pa.string())])


def _append(uri: str, name: str, ids: list[int], etag: str = "e1") -> None:
    t = pa.table({"image_id": ids, "uri": [f"s3://b/{i}.jpg" for i in ids], "etag": [etag] * len(ids)}).cast(SCHEMA)
    tables.commit_files(uri, [(name, tables.write_parquet_file(uri, name, t), t.num_rows)], SCHEMA)


def test_appends_after_a_version_are_found_and_merge_rewrites_left_out(tmp_path):
    uri = str(tmp_path / "emb")
    _append(uri, "part-day0.parquet", list(range(10)))  # v1
    indexed = tables.version_of(uri)
    # a nightly: delete two changed rows (a merge rewrites day0's file), append their new versions
    tables.delete_matching(uri, pa.table({"uri": ["s3://b/3.jpg", "s3://b/7.jpg"], "etag": ["e1", "e1"]}),
                           on=("uri", "etag"))  # v2
    _append(uri, "part-day1.parquet", [3, 7, 10], etag="e2")  # v3
    now = tables.version_of(uri)
    got = tables.appended_files(uri, indexed, now)
    assert [p.rsplit("/", 1)[-1] for p in got] == ["part-day1.parquet"]
    live = {storage.strip_scheme(f) for f in tables.open_table(uri).file_uris()}  # as TableSnapshot.paths names them
    assert set(got) <= live
    assert tables.appended_files(uri, now, now) == []


def test_an_overwrite_or_a_missing_log_entry_means_unknown(tmp_path):
    uri = str(tmp_path / "emb")
    _append(uri, "part-a.parquet", [1, 2])  # v1
    tables.overwrite(uri, pa.table({"image_id": [5], "uri": ["s3://b/5.jpg"], "etag": ["e"]}).cast(SCHEMA), SCHEMA)  # v2
    assert tables.appended_files(uri, 1, 2) is None
    assert tables.appended_files(uri, 2, 3) is None  # no such version yet
