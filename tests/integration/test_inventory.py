"""An S3 Inventory report (CSV and Parquet, in AWS's documented layout, written to the real
local S3 server) gives the same listing table as a live listing of the bucket."""
from __future__ import annotations

import gzip
import io
import json
import urllib.parse

import pytest

from sparse_embed.pipeline.embed.inventory import read_manifest
from sparse_embed.pipeline.embed.listing import list_objects
from sparse_embed.pipeline.store import storage

pytestmark = pytest.mark.integration

KEYS = ([f"src/p{i % 3}/q{i % 2}/img_{i:03d}.jpg" for i in range(40)]
        + ["src/with space.jpg", "src/plus+sign.png", "src/ü/ñ#?%25.jpg", "src/notes.txt", "src/UPPER.JPG",
           "other/img.jpg", "srcfoo/img.jpg"])
CSV_SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag, StorageClass"
PARQUET_SCHEMA = ("message s3.inventory { required binary bucket (STRING); required binary key (STRING); "
                  "optional int64 size; optional int64 last_modified_date (TIMESTAMP(MILLIS,true)); "
                  "optional binary e_tag (STRING); optional binary storage_class (STRING); "
                  "optional boolean is_latest; optional boolean is_delete_marker; }")


def _objects(bucket: str) -> list[dict]:
    """Every object of the bucket as ListObjectsV2 returns it (what an inventory reports)."""
    fs = storage.filesystem(bucket)
    name = storage.strip_scheme(bucket)
    out, kw = [], {}
    while True:
        resp = fs.call_s3("list_objects_v2", Bucket=name, **kw)
        out += resp.get("Contents", [])
        if not resp.get("IsTruncated"):
            return out
        kw = {"ContinuationToken": resp["NextContinuationToken"]}


def _write_report(bucket: str, fmt: str, objects: list[dict], extra_rows: list[dict] = ()) -> str:
    """An inventory report of `objects` in two data files plus manifest.json, laid out as
    AWS writes it; returns the manifest's URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = storage.strip_scheme(bucket)
    base = f"inventory/{name}/daily"
    rows = [{"bucket": name, "key": o["Key"], "size": o["Size"], "mtime": o["LastModified"],
             "etag": o["ETag"].strip('"'), "latest": True, "marker": False} for o in objects] + list(extra_rows)
    halves = [rows[: len(rows) // 2], rows[len(rows) // 2:]]
    files = {}
    for i, half in enumerate(halves):
        if fmt == "CSV":
            lines = [",".join(f'"{v}"' for v in (r["bucket"], urllib.parse.quote_plus(r["key"]), r["size"],
                                                  r["mtime"].strftime("%Y-%m-%dT%H:%M:%S.") + f"{r['mtime'].microsecond // 1000:03d}Z",
                                                  r["etag"], "STANDARD")) for r in half]
            data, key = gzip.compress(("\n".join(lines) + "\n").encode()), f"{base}/data/part-{i}.csv.gz"
        else:
            table = pa.table({"bucket": [r["bucket"] for r in half], "key": [r["key"] for r in half],
                              "size": pa.array([r["size"] for r in half], pa.int64()),
                              "last_modified_date": pa.array([r["mtime"] for r in half], pa.timestamp("ms", tz="UTC")),
                              "e_tag": [r["etag"] for r in half], "storage_class": ["STANDARD"] * len(half),
                              "is_latest": [r["latest"] for r in half], "is_delete_marker": [r["marker"] for r in half]})
            buf = io.BytesIO()
            pq.write_table(table, buf)
            data, key = buf.getvalue(), f"{base}/data/part-{i}.parquet"
        files[key] = data
    manifest = {"sourceBucket": name, "destinationBucket": f"arn:aws:s3:::{name}", "version": "2016-11-30",
                "creationTimestamp": "1764547200000", "fileFormat": fmt,
                "fileSchema": CSV_SCHEMA if fmt == "CSV" else PARQUET_SCHEMA,
                "files": [{"key": k, "size": len(v), "MD5checksum": "0"} for k, v in files.items()]}
    files[f"{base}/2026-12-01T00-00Z/manifest.json"] = json.dumps(manifest).encode()
    storage.put_many(f"{bucket}/", files)
    return f"{bucket}/{base}/2026-12-01T00-00Z/manifest.json"


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
