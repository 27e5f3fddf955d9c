"""An S3 Inventory report written as AWS lays it out (manifest.json and data files), for
the tests that read a listing from an inventory."""
from __future__ import annotations

import gzip
import io
import json
import urllib.parse

from sparse_embed.pipeline.store import storage

CSV_SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag, StorageClass"
PARQUET_SCHEMA = ("message s3.inventory { required binary bucket (STRING); required binary key (STRING); "
                  "optional int64 size; optional int64 last_modified_date (TIMESTAMP(MILLIS,true)); "
                  "optional binary e_tag (STRING); optional binary storage_class (STRING); "
                  "optional boolean is_latest; optional boolean is_delete_marker; }")


def bucket_objects(bucket: str) -> list[dict]:
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


def write_report(bucket: str, fmt: str, objects: list[dict], extra_rows: list[dict] = ()) -> str:
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
