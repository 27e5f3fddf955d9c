"""An S3 Inventory report as the listing (`--inventory s3://.../manifest.json`).

AWS writes, per report, a manifest.json naming the source bucket, the destination bucket
(as an ARN), `fileFormat` (CSV, ORC or Parquet), `fileSchema` (the column names: for CSV a
comma-separated list, for Parquet a Parquet message type) and `files` (the data files, by key in the destination
bucket). CSV data files are gzipped, have no header, and hold the object keys URL-encoded
(a space as '+', as ListObjects' EncodingType=url does); Parquet files hold them as they
are. A report of all versions has IsLatest and IsDeleteMarker columns: only latest
versions that are not delete markers are objects.

Each data file is read by one Ray task, which keeps the keys under SOURCE's prefix that
pass the same filters as a live listing (listing.listing_rows) and writes them as one
Parquet file of the listing table; the driver reads the manifest and commits the files.
ORC reports are refused (configure the inventory as CSV or Parquet).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass

from sparse_embed.pipeline.store import storage, tables

log = logging.getLogger(__name__)

FORMATS = ("CSV", "Parquet")
# fileSchema names (CSV) and Parquet column names of the fields the listing needs
FIELDS = {"bucket": ("Bucket", "bucket"), "key": ("Key", "key"), "size": ("Size", "size"),
          "mtime": ("LastModifiedDate", "last_modified_date"), "etag": ("ETag", "e_tag"),
          "is_latest": ("IsLatest", "is_latest"), "is_delete_marker": ("IsDeleteMarker", "is_delete_marker")}
REQUIRED = ("bucket", "key", "size", "mtime", "etag")


@dataclass(frozen=True)
class Manifest:
    uri: str
    file_format: str  # CSV or Parquet
    columns: tuple[str, ...]  # fileSchema, in order
    source_bucket: str
    data_files: tuple[str, ...]  # URIs of the data files


def read_manifest(uri: str) -> Manifest:
    """The manifest at `uri`; a missing file or field, or an ORC report, is one clear error."""
    try:
        doc = json.loads(storage.read_bytes(uri))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--inventory {uri!r} does not exist: give the manifest.json of an S3 Inventory report") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--inventory {uri!r} is not JSON ({e}): give the manifest.json of an S3 Inventory report") from e
    missing = [k for k in ("sourceBucket", "destinationBucket", "fileFormat", "fileSchema", "files") if k not in doc]
    if missing:
        raise ValueError(f"--inventory {uri!r} lacks {', '.join(missing)}: give the manifest.json of an S3 Inventory report")
    fmt = {f.lower(): f for f in FORMATS}.get(str(doc["fileFormat"]).lower())
    if fmt is None:
        raise ValueError(f"Expected an inventory report in CSV or Parquet, got fileFormat {doc['fileFormat']!r} in {uri!r}: "
                         f"configure the inventory's output format as CSV or Parquet")
    columns = _schema_columns(str(doc["fileSchema"]))
    absent = [f for f in REQUIRED if not any(n in columns for n in FIELDS[f])]
    if absent:
        raise ValueError(f"The inventory {uri!r} has no {', '.join(FIELDS[f][0] for f in absent)} column: "
                         f"add Size, LastModifiedDate and ETag to the inventory's optional fields")
    return Manifest(uri, fmt, columns, str(doc["sourceBucket"]),
                    tuple(_data_file_uri(uri, str(doc["destinationBucket"]), f["key"]) for f in doc["files"]))


def _schema_columns(file_schema: str) -> tuple[str, ...]:
    """fileSchema's column names: a comma-separated list (CSV), or a Parquet message type
    ("message s3.inventory { required binary bucket (STRING); optional int64 size; ... }")."""
    import re

    if file_schema.lstrip().startswith("message"):
        return tuple(re.findall(r"(?:required|optional|repeated)\s+\w+\s+(\w+)", file_schema))
    return tuple(c.strip() for c in file_schema.split(","))


def _data_file_uri(manifest_uri: str, destination: str, key: str) -> str:
    """A data file's URI: s3://<destination bucket>/<key>; for a manifest on local disk, the
    key under the nearest directory above the manifest that holds it."""
    if storage.is_s3(manifest_uri):
        bucket = destination.rsplit(":", 1)[-1]  # arn:aws:s3:::bucket
        return f"{storage.scheme_of(manifest_uri)}://{bucket}/{key}"
    d = os.path.dirname(storage.strip_scheme(manifest_uri))
    while True:
        if os.path.exists(os.path.join(d, key)):
            return os.path.join(d, key)
        parent = os.path.dirname(d)
        if parent == d:
            raise FileNotFoundError(f"Inventory data file {key!r} named by {manifest_uri!r} is not under any directory "
                                    f"above the manifest: copy the report with its data/ files")
        d = parent


def _column(columns, field: str) -> str | None:
    return next((n for n in FIELDS[field] if n in columns), None)


def read_data_file(manifest: Manifest, path: str):
    """One data file as (bucket, key, size, mtime, etag[, is_latest, is_delete_marker]) Arrow,
    keys decoded, under the manifest's column names."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, p = storage.arrow_filesystem(path)
    wanted = [c for f, names in FIELDS.items() if (c := _column(manifest.columns, f))]
    if manifest.file_format == "Parquet":
        with fs.open_input_file(p) as src:
            return pq.read_table(src, columns=wanted)
    types = {_column(manifest.columns, "size"): pa.int64(), _column(manifest.columns, "mtime"): pa.timestamp("ms", tz="UTC")}
    types.update({c: pa.string() for c in manifest.columns if c not in types})
    with fs.open_input_stream(p, compression="gzip") as src:
        table = pacsv.read_csv(src, read_options=pacsv.ReadOptions(column_names=list(manifest.columns)),
                               convert_options=pacsv.ConvertOptions(column_types=types, include_columns=wanted,
                                                                    strings_can_be_null=False))
    key = _column(manifest.columns, "key")
    return table.set_column(table.column_names.index(key), key, _url_decoded(table.column(key)))


def _url_decoded(keys):
    """URL-decode the keys that hold '%' or '+' (the others are left as they are)."""
    import urllib.parse

    import pyarrow as pa
    import pyarrow.compute as pc

    keys = keys.combine_chunks()
    encoded = pc.or_(pc.match_substring(keys, "%"), pc.match_substring(keys, "+"))
    if not pc.any(encoded).as_py():
        return keys
    return pa.array([urllib.parse.unquote_plus(k) if e else k for k, e in zip(keys.to_pylist(), encoded.to_pylist())],
                    pa.string())


def list_data_file(manifest: Manifest, path: str, source: str, table_uri: str, extensions, glob) -> list:
    """One task: the objects of data file `path` under SOURCE that pass the filters, as one
    uncommitted file of the listing table; returns [(path, bytes, rows)] (empty when none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from sparse_embed.pipeline.embed.listing_rows import listing_rows

    bucket, _, key_prefix = storage.strip_scheme(source).partition("/")
    key_prefix = key_prefix.rstrip("/") + "/" if key_prefix else ""
    raw = read_data_file(manifest, path)
    col = lambda f: raw.column(_column(manifest.columns, f))  # noqa: E731
    keep = pc.and_(pc.equal(col("bucket"), bucket), pc.starts_with(col("key"), key_prefix))
    if _column(manifest.columns, "is_latest"):
        keep = pc.and_(keep, _truthy(col("is_latest")))
    if _column(manifest.columns, "is_delete_marker"):
        keep = pc.and_(keep, pc.invert(_truthy(col("is_delete_marker"))))
    raw = raw.filter(keep)
    found = pa.table({
        "path": pc.binary_join_element_wise(raw.column(_column(manifest.columns, "bucket")),
                                            raw.column(_column(manifest.columns, "key")), "/"),
        "etag": pc.utf8_trim(raw.column(_column(manifest.columns, "etag")).cast(pa.string()), '"'),
        "size": raw.column(_column(manifest.columns, "size")).cast(pa.int64()),
        "mtime": raw.column(_column(manifest.columns, "mtime")).cast(pa.timestamp("us", tz="UTC")),
    })
    rows = listing_rows(found, source, extensions, glob)
    if not rows.num_rows:
        return []
    rel = f"part-{uuid.uuid4().hex}.parquet"
    return [(rel, tables.write_parquet_file(table_uri, rel, rows), rows.num_rows)]


def _truthy(column):
    """A boolean column, or the strings 'true'/'false' of a CSV report, as booleans."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_boolean(column.type):
        return pc.fill_null(column, False)
    return pc.equal(pc.utf8_lower(column.cast(pa.string())), "true")


def list_inventory(manifest_uri: str, source: str, table_uri: str, extensions, glob) -> list:
    """Every object of the report under `source` that passes the filters, written as
    uncommitted files of the listing table by one Ray task per data file."""
    import ray

    manifest = read_manifest(manifest_uri)
    bucket = storage.strip_scheme(source).split("/", 1)[0]
    if not storage.is_s3(source) or manifest.source_bucket != bucket:
        raise ValueError(f"The inventory {manifest_uri!r} lists bucket {manifest.source_bucket!r}, not SOURCE {source!r}: "
                         f"give the inventory of SOURCE's bucket")
    task = ray.remote(num_cpus=0.5)(list_data_file)  # reads and parses: half a CPU each
    parts = ray.get([task.remote(manifest, p, source, table_uri, extensions, glob) for p in manifest.data_files])
    files = [f for part in parts for f in part]
    log.info("inventory %s: %d data files -> %d listing files", manifest_uri, len(manifest.data_files), len(files))
    return files
