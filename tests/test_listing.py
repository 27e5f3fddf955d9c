"""Listing: ETag/size/mtime from the real S3 server; parallel-by-prefix equals one recursive listing."""
from __future__ import annotations

import pytest

from pipeline import storage
from pipeline.listing import list_objects, matches

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
