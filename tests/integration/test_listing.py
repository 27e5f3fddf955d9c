"""Listing: ETag/size/mtime from the real S3 server; parallel-by-prefix equals one recursive
listing; parallel tasks stream into the listing table in parts, committed in one overwrite."""
from __future__ import annotations

import pytest

from sparse_embed.pipeline.store import storage, tables
from sparse_embed.pipeline.embed.listing import DEFAULT_EXTENSIONS, list_objects, list_prefixes, listing_schema, matches

pytestmark = pytest.mark.integration


def test_matches_extension_and_glob():
    assert matches("a/b/c.JPG", (".jpg",), None)
    assert not matches("a/b/c.txt", (".jpg",), None)
    assert matches("a/b/c_large.jpg", (".jpg",), "*_large.jpg") and not matches("a/b/c.jpg", (".jpg",), "*_large.jpg")


def test_parallel_listing_equals_single_listing(bucket, ray_local):
    keys = [f"p{i % 5}/sub{i % 3}/img {i}.jpg" for i in range(60)] + ["root.png", "skip.txt", "ü/ñ#?%+.jpg"]
    storage.put_many(f"{bucket}/src/", {k: k.encode() for k in keys})
    single = list_objects(f"{bucket}/src/")
    parallel = list_objects(f"{bucket}/src/", parallel=True)
    assert single.equals(parallel)
    assert single.num_rows == len(keys) - 1  # skip.txt is not an image
    assert sorted(single.column("uri").to_pylist()) == single.column("uri").to_pylist()
    assert all(e and s > 0 for e, s in zip(single.column("etag").to_pylist(), single.column("size").to_pylist()))
    assert all(m is not None for m in single.column("mtime").to_pylist())


def test_missing_prefix_lists_nothing(bucket, ray_local):
    assert list_objects(f"{bucket}/nothing-here/").num_rows == 0
    assert list_objects(f"{bucket}/nothing-here/", parallel=True).num_rows == 0


def test_parallel_listing_streams_into_the_listing_table(bucket, ray_local):
    keys = [f"p{i % 4}/img_{i:03d}.jpg" for i in range(40)] + ["top.jpg"]
    storage.put_many(f"{bucket}/src/", {k: b"x" * (1 + i) for i, k in enumerate(keys)})
    single = list_objects(f"{bucket}/src/")
    table_uri = f"{bucket}/out/listing"
    streamed = list_objects(f"{bucket}/src/", parallel=True, into=table_uri)
    assert streamed.equals(single)
    stored = tables.read_columns(table_uri, listing_schema().names).cast(listing_schema()).sort_by("uri")
    assert stored.equals(single)
    first_version = tables.version_of(table_uri)

    # the next listing replaces the rows in one commit; the old listing stays readable
    storage.filesystem(bucket).rm_file(storage.strip_scheme(f"{bucket}/src/p0/img_000.jpg"))
    again = list_objects(f"{bucket}/src/", parallel=True, into=table_uri)
    assert again.num_rows == single.num_rows - 1
    assert tables.version_of(table_uri) == first_version + 1
    assert tables.read_columns(table_uri, ["uri"]).num_rows == again.num_rows
    assert tables.read_columns(table_uri, ["uri"], version=first_version).num_rows == single.num_rows


def test_a_listing_task_writes_sorted_parts_of_bounded_size(bucket):
    # 2,100 objects under one prefix: three S3 pages of at most 1,000 keys
    storage.put_many(f"{bucket}/big/", {f"d/img_{i:05d}.jpg": b"x" for i in range(2100)} | {"d/notes.txt": b"x"})
    table_uri = f"{bucket}/out/listing"
    tables.ensure_table(table_uri, listing_schema())
    root = storage.strip_scheme(f"{bucket}/big")
    parts = list_prefixes(f"{bucket}/big/", [f"{root}/d"], DEFAULT_EXTENSIONS, None, table_uri, rows_per_file=700)
    assert [rows for _, _, rows in parts] == [700, 700, 700]
    assert tables.read_columns(table_uri, ["uri"]).num_rows == 0, "parts stay invisible until the driver commits"
    tables.commit_files(table_uri, parts, listing_schema(), mode="overwrite")
    uris = tables.read_columns(table_uri, ["uri"]).column("uri").to_pylist()
    assert sorted(uris) == [f"{bucket}/big/d/img_{i:05d}.jpg" for i in range(2100)]
    fs, base = storage.arrow_filesystem(table_uri)
    import pyarrow.parquet as pq

    for rel, size, rows in parts:
        part = pq.read_table(f"{base}/{rel}", filesystem=fs).column("uri").to_pylist()
        assert part == sorted(part) and len(part) == rows and fs.get_file_info(f"{base}/{rel}").size == size


def test_vacuum_keeps_only_the_files_the_current_listing_needs(tmp_path):
    import os

    import pyarrow as pa

    def rows(n):
        return pa.table({"uri": [f"s3://b/{i}.jpg" for i in range(n)], "etag": ["e"] * n, "size": [1] * n,
                         "mtime": pa.array([0] * n, pa.timestamp("us", tz="UTC"))}, schema=listing_schema())

    uri = str(tmp_path / "listing")
    tables.overwrite(uri, rows(5), listing_schema())
    tables.overwrite(uri, rows(3), listing_schema())
    tables.write_parquet_file(uri, "part-of-a-crashed-listing.parquet", rows(4))
    assert tables.vacuum(uri, retention_hours=24) == 0, "younger than the retention: kept"
    assert tables.vacuum(uri, retention_hours=0) == 2
    on_disk = {f for f in os.listdir(uri) if f.endswith(".parquet")}
    assert on_disk == {p.rsplit("/", 1)[-1] for p in tables.open_table(uri).file_uris()}
    assert tables.read_columns(uri, ["uri"]).num_rows == 3
