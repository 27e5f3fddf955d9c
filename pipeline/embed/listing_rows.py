"""Listing rows: the listing table's schema, the filters (extensions, glob) and the
(uri, etag, size, mtime) rows every listing path produces: the driver's, the key-range
tasks' (s3_listing.py) and the inventory tasks' (inventory.py), so all give the same table.
"""
from __future__ import annotations

import fnmatch
from datetime import datetime, timezone

from sparse_embed.pipeline.store import storage

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def listing_schema():
    import pyarrow as pa

    return pa.schema([
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.timestamp("us", tz="UTC")),
    ])


def listing_rows(found, source: str, extensions: tuple[str, ...], glob: str | None):
    """(path, etag, size, mtime) rows, path as `bucket/key` -> listing rows (uri, etag, size,
    mtime) of the paths that match, sorted by uri. Vectorised for the extensions; a glob is
    matched per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    paths = found.column("path")
    keep = None
    if extensions:
        lower = pc.utf8_lower(paths)
        for ext in extensions:
            hit = pc.ends_with(lower, ext.lower())
            keep = hit if keep is None else pc.or_(keep, hit)
    if glob is not None:
        by_glob = pa.array([glob_matches(p, glob) for p in paths.to_pylist()], pa.bool_())
        keep = by_glob if keep is None else pc.and_(keep, by_glob)
    rows = found.filter(keep) if keep is not None else found
    uri = rows.column("path")
    if storage.is_s3(source):
        uri = pc.binary_join_element_wise(pa.scalar(f"{storage.scheme_of(source)}://"), uri, "")
    table = pa.table({"uri": uri, "etag": rows.column("etag"), "size": rows.column("size"),
                      "mtime": rows.column("mtime")}).cast(listing_schema())
    return table.sort_by("uri")


def glob_matches(path: str, glob: str) -> bool:
    return fnmatch.fnmatch(path.rsplit("/", 1)[-1], glob) or fnmatch.fnmatch(path, glob)


def _mtime(info: dict) -> datetime | None:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(float(value), tz=timezone.utc)


def _etag(info: dict, mtime: datetime | None) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    return f"{info.get('size')}-{int(mtime.timestamp() * 1e6) if mtime else 0}"


def matches(key: str, extensions: tuple[str, ...], glob: str | None) -> bool:
    if extensions and not key.lower().endswith(tuple(e.lower() for e in extensions)):
        return False
    return glob is None or glob_matches(key, glob)
