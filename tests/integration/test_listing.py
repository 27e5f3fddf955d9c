"""Listing: ETag/size/mtime from the real S3 server; a listing by key ranges over Ray tasks
(nested prefixes, a flat bucket) equals one recursive listing; tasks write into the
listing table, committed in one overwrite."""
from __future__ import annotations

import time

import pytest

from sparse_embed.pipeline.store import storage, tables
from sparse_embed.pipeline.embed import s3_listing
from sparse_embed.pipeline.embed.listing import DEFAULT_EXTENSIONS, list_objects, list_prefixes, listing_schema, matches
from sparse_embed.pipeline.store.vacuum import vacuum_table

pytestmark = pytest.mark.integration


def test_matches_extension_and_glob():
    assert matches("a/b/c.JPG", (".jpg",), None)
    assert not matches("a/b/c.txt", (".jpg",), None)
    assert matches("a/b/c_large.jpg", (".jpg",), "*_large.jpg") and not matches("a/b/c.jpg", (".jpg",), "*_large.jpg")


def _listed_by_tasks(source: str, table_uri: str, sizes):
    """s3_listing.list_bucket's files committed into `table_uri`; (rows sorted by uri, stats)."""
    tables.ensure_table(table_uri, listing_schema())
    files, stats = s3_listing.list_bucket(source, table_uri, DEFAULT_EXTENSIONS, None, sizes)
    tables.commit_files(table_uri, files, listing_schema(), mode="overwrite")
    return tables.read_columns(table_uri, listing_schema().names).cast(listing_schema()).sort_by("uri"), stats


def test_parallel_listing_equals_single_listing(bucket, ray_local):
    keys = [f"p{i % 5}/sub{i % 3}/img {i}.jpg" for i in range(60)] + ["root.png", "skip.txt", "ü/ñ#?%+.jpg"]
    storage.put_many(f"{bucket}/src/", {k: k.encode() for k in keys})
    single = list_objects(f"{bucket}/src/")
    parallel = list_objects(f"{bucket}/src/", parallel=True, into=f"{bucket}/out/listing")
    assert parallel.num_rows == single.num_rows == len(keys) - 1  # skip.txt is not an image
    assert parallel.read().sort_by("uri").equals(single)
    assert sorted(single.column("uri").to_pylist()) == single.column("uri").to_pylist()
    assert all(e and s > 0 for e, s in zip(single.column("etag").to_pylist(), single.column("size").to_pylist()))
    assert all(m is not None for m in single.column("mtime").to_pylist())


def test_nested_prefixes_are_discovered_and_listed_by_parallel_tasks(bucket, ray_local):
    keys = ([f"a/{d}/{e}/img_{i:03d}.jpg" for d in ("x", "y") for e in ("1", "2", "3") for i in range(40)]
            + [f"a/{d}/top_{i}.jpg" for d in ("x", "y") for i in range(5)] + [f"b/img_{i:04d}.png" for i in range(300)]
            + ["c.jpg", "a/readme.txt"])
    storage.put_many(f"{bucket}/src/", {k: b"x" * (1 + len(k)) for k in keys})
    single = list_objects(f"{bucket}/src/")
    sizes = s3_listing.Sizes(page_keys=20, pages_per_task=2, discovery_parts=8, discovery_pages=3, inline_pages=0)
    got, stats = _listed_by_tasks(f"{bucket}/src/", f"{bucket}/out/listing", sizes)
    assert got.equals(single) and got.num_rows == len(keys) - 1
    assert stats["parts_at_start"] >= 4, "prefixes were discovered below the first level"
    assert stats["tasks"] > stats["parts_at_start"], "big parts were split while listing"
    assert stats["most_keys_in_a_task"] <= 2 * 20 < len(keys), "no task listed more than its pages"


def test_flat_bucket_is_split_by_key_ranges(bucket, ray_local):
    keys = [f"img_{i:05d}.jpg" for i in range(2500)] + [f"IMG-{i}.JPG" for i in range(0, 300, 7)] + ["~z.gif", "0.png"]
    storage.put_many(f"{bucket}/", {k: k.encode() for k in keys})
    single = list_objects(f"{bucket}/")
    sizes = s3_listing.Sizes(page_keys=50, pages_per_task=2, inline_pages=0)
    got, stats = _listed_by_tasks(f"{bucket}/", f"{bucket}/out-listing/listing", sizes)
    assert got.equals(single) and got.num_rows == len(keys)
    assert stats["parts_at_start"] == 1, "a flat bucket has nothing to discover"
    assert stats["tasks"] >= 2500 // 100 and stats["most_keys_in_a_task"] <= 100


def test_the_driver_lists_the_first_pages_and_tasks_the_rest(bucket, ray_local):
    keys = [f"p{i % 3}/img_{i:04d}.jpg" for i in range(600)] + ["top.jpg"]
    storage.put_many(f"{bucket}/src/", {k: b"x" for k in keys})
    single = list_objects(f"{bucket}/src/")
    small, small_stats = _listed_by_tasks(f"{bucket}/src/", f"{bucket}/out/small", s3_listing.Sizes(page_keys=50))
    assert small.equals(single) and small_stats["tasks"] == 0, "a bucket within the driver's pages starts no task"
    sizes = s3_listing.Sizes(page_keys=50, pages_per_task=2, inline_pages=3)
    got, stats = _listed_by_tasks(f"{bucket}/src/", f"{bucket}/out/split", sizes)
    assert got.equals(single) and got.num_rows == len(keys)
    assert stats["pages_in_driver"] >= 3 and stats["tasks"] >= 2, "the rest went to tasks"


def test_missing_prefix_lists_nothing(bucket, ray_local):
    assert list_objects(f"{bucket}/nothing-here/").num_rows == 0
    assert list_objects(f"{bucket}/nothing-here/", parallel=True, into=f"{bucket}/out/listing").num_rows == 0


def test_one_object_as_source(bucket, ray_local):
    storage.put_many(f"{bucket}/src/", {"one.jpg": b"x", "one.jpg.txt": b"y"})
    listed = list_objects(f"{bucket}/src/one.jpg", parallel=True, into=f"{bucket}/out/listing")
    assert listed.read().column("uri").to_pylist() == [f"{bucket}/src/one.jpg"]


def test_parallel_listing_streams_into_the_listing_table(bucket, ray_local):
    keys = [f"p{i % 4}/img_{i:03d}.jpg" for i in range(40)] + ["top.jpg"]
    storage.put_many(f"{bucket}/src/", {k: b"x" * (1 + i) for i, k in enumerate(keys)})
    single = list_objects(f"{bucket}/src/")
    table_uri = f"{bucket}/out/listing"
    streamed = list_objects(f"{bucket}/src/", parallel=True, into=table_uri)
    stored = tables.read_columns(table_uri, listing_schema().names).cast(listing_schema()).sort_by("uri")
    assert stored.equals(single) and streamed.num_rows == single.num_rows
    first_version = tables.version_of(table_uri)
    assert streamed.version == first_version

    # the next listing replaces the rows in one commit; the old listing stays readable
    storage.filesystem(bucket).rm_file(storage.strip_scheme(f"{bucket}/src/p0/img_000.jpg"))
    again = list_objects(f"{bucket}/src/", parallel=True, into=table_uri)
    assert again.num_rows == single.num_rows - 1
    assert tables.version_of(table_uri) == first_version + 1
    assert tables.read_columns(table_uri, ["uri"]).num_rows == again.num_rows
    assert tables.read_columns(table_uri, ["uri"], version=first_version).num_rows == single.num_rows


def test_a_local_listing_task_writes_sorted_parts_of_bounded_size(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "big" / "d").mkdir(parents=True)
    for i in range(2100):
        (tmp_path / "big" / "d" / f"img_{i:05d}.jpg").write_bytes(b"x")
    (tmp_path / "big" / "d" / "notes.txt").write_bytes(b"x")
    table_uri = str(tmp_path / "out" / "listing")
    tables.ensure_table(table_uri, listing_schema())
    parts = list_prefixes(str(tmp_path / "big"), [str(tmp_path / "big" / "d")], DEFAULT_EXTENSIONS, None, table_uri,
                          rows_per_file=700)
    assert [rows for _, _, rows in parts] == [700, 700, 700]
    assert tables.read_columns(table_uri, ["uri"]).num_rows == 0, "parts stay invisible until the driver commits"
    tables.commit_files(table_uri, parts, listing_schema(), mode="overwrite")
    uris = tables.read_columns(table_uri, ["uri"]).column("uri").to_pylist()
    assert sorted(uris) == [str(tmp_path / "big" / "d" / f"img_{i:05d}.jpg") for i in range(2100)]
    for rel, size, rows in parts:
        part = pq.read_table(f"{table_uri}/{rel}").column("uri").to_pylist()
        assert part == sorted(part) and len(part) == rows


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
    assert vacuum_table(uri, cutoff=time.time() - 24 * 3600)["files"] == 0, "younger than the retention: kept"
    assert vacuum_table(uri, cutoff=time.time())["files"] == 2
    on_disk = {f for f in os.listdir(uri) if f.endswith(".parquet")}
    assert on_disk == {p.rsplit("/", 1)[-1] for p in tables.open_table(uri).file_uris()}
    assert tables.read_columns(uri, ["uri"]).num_rows == 3
