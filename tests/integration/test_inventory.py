"""An S3 Inventory report (CSV and Parquet, in AWS's documented layout, written to the real
local S3 server) gives the same listing table as a live listing of the bucket."""
from __future__ import annotations

import json

import pytest

from helpers.inventory import bucket_objects as _objects, write_report as _write_report
from sparse_embed.pipeline.embed.inventory import read_manifest
from sparse_embed.pipeline.embed.listing import list_objects
from sparse_embed.pipeline.store import storage

pytestmark = pytest.mark.integration

KEYS = ([f"src/p{i % 3}/q{i % 2}/img_{i:03d}.jpg" for i in range(40)]
        + ["src/with space.jpg", "src/plus+sign.png", "src/ü/ñ#?%25.jpg", "src/notes.txt", "src/UPPER.JPG",
           "other/img.jpg", "srcfoo/img.jpg"])
@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_inventory_gives_the_live_listing(bucket, ray_local, fmt):
    storage.put_many(f"{bucket}/", {k: k.encode() * 2 for k in KEYS})
    live = list_objects(f"{bucket}/src/", parallel=True, into=f"{bucket}/out-live/listing")
    manifest = _write_report(bucket, fmt, _objects(bucket))
    from_report = list_objects(f"{bucket}/src/", into=f"{bucket}/out-inv/listing", inventory=manifest)
    assert from_report.num_rows == live.num_rows == 40 + 4  # not notes.txt, other/, srcfoo/
    assert from_report.read().sort_by("uri").equals(live.read().sort_by("uri"))

    # the same filters apply
    glob_live = list_objects(f"{bucket}/src/", glob="img_00*", parallel=True, into=f"{bucket}/out-live/listing")
    glob_report = list_objects(f"{bucket}/src/", glob="img_00*", into=f"{bucket}/out-inv/listing", inventory=manifest)
    assert glob_report.read().sort_by("uri").equals(glob_live.read().sort_by("uri")) and glob_live.num_rows == 10


def test_versioned_parquet_report_keeps_latest_versions_only(bucket, ray_local):
    import datetime

    storage.put_many(f"{bucket}/", {k: b"x" for k in KEYS})
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    old = [{"bucket": storage.strip_scheme(bucket), "key": "src/p0/q0/img_000.jpg", "size": 9, "mtime": when,
            "etag": "old", "latest": False, "marker": False},
           {"bucket": storage.strip_scheme(bucket), "key": "src/deleted.jpg", "size": 0, "mtime": when,
            "etag": "", "latest": True, "marker": True}]
    manifest = _write_report(bucket, "Parquet", _objects(bucket), extra_rows=old)
    live = list_objects(f"{bucket}/src/", parallel=True, into=f"{bucket}/out-live/listing")
    from_report = list_objects(f"{bucket}/src/", into=f"{bucket}/out-inv/listing", inventory=manifest)
    assert from_report.read().sort_by("uri").equals(live.read().sort_by("uri"))


def test_bad_manifests_are_one_clear_error(bucket):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(f"{bucket}/nope/manifest.json")
    storage.put_many(f"{bucket}/", {"orc/manifest.json": json.dumps({
        "sourceBucket": "b", "destinationBucket": "arn:aws:s3:::b", "fileFormat": "ORC",
        "fileSchema": "struct<bucket:string,key:string>", "files": []}).encode(),
        "nosize/manifest.json": json.dumps({"sourceBucket": "b", "destinationBucket": "arn:aws:s3:::b",
                                            "fileFormat": "CSV", "fileSchema": "Bucket, Key", "files": []}).encode()})
    with pytest.raises(ValueError, match="CSV or Parquet"):
        read_manifest(f"{bucket}/orc/manifest.json")
    with pytest.raises(ValueError, match="Size, LastModifiedDate and ETag"):
        read_manifest(f"{bucket}/nosize/manifest.json")


def test_inventory_of_another_bucket_is_refused(bucket, ray_local):
    storage.put_many(f"{bucket}/", {"src/a.jpg": b"x"})
    manifest = _write_report(bucket, "CSV", _objects(bucket))
    with pytest.raises(ValueError, match="give the inventory of SOURCE's bucket"):
        list_objects("s3://some-other-bucket/src/", into=f"{bucket}/out/listing", inventory=manifest)
