"""Stage 1: list the source prefix with its ETag, size and mtime, as an Arrow table.

s3fs's `find(detail=True)` gives `ETag`, `size` and `LastModified` per object. Local
directories get an etag made of size and mtime (there is no content hash to read cheaply).
"""
from __future__ import annotations

import fnmatch
import logging
from datetime import datetime, timezone

from . import storage

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def listing_schema():
    import pyarrow as pa

    return pa.schema([
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.timestamp("us", tz="UTC")),
    ])


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
    return glob is None or fnmatch.fnmatch(key.rsplit("/", 1)[-1], glob) or fnmatch.fnmatch(key, glob)


def _rows(found: dict, source: str, extensions, glob) -> dict[str, list]:
    rows = {"uri": [], "etag": [], "size": [], "mtime": []}
    for path in sorted(found):
        info = found[path]
        if info.get("type", "file") != "file" or not matches(path, extensions, glob):
            continue
        mtime = _mtime(info)
        rows["uri"].append(storage.with_scheme(path, source))
        rows["etag"].append(_etag(info, mtime))
        rows["size"].append(int(info.get("size") or info.get("Size") or 0))
        rows["mtime"].append(mtime)
    return rows


def list_prefix(source: str, prefix: str, extensions: tuple[str, ...], glob: str | None):
    """One recursive listing of `prefix` (a path inside `source`'s filesystem) as Arrow."""
    import pyarrow as pa

    fs = storage.filesystem(source)
    try:
        found = fs.find(prefix, detail=True, withdirs=False)
    except FileNotFoundError:
        found = {}
    except Exception as e:
        raise RuntimeError(f"Cannot list {storage.with_scheme(prefix, source)!r}: {type(e).__name__}: {e}") from e
    return pa.table(_rows(found, source, extensions, glob), schema=listing_schema())


def list_prefixes(source: str, prefixes: list[str], extensions: tuple[str, ...], glob: str | None, concurrency: int = 16):
    """Several recursive listings at once. s3fs is async inside: the listings run as
    coroutines on its loop (threads calling its sync API serialise on that loop and were
    10x slower than one listing here)."""
    import asyncio

    import pyarrow as pa

    fs = storage.filesystem(source)
    if not getattr(fs, "async_impl", False):
        parts = [list_prefix(source, p, extensions, glob) for p in prefixes]
        return pa.concat_tables(parts) if parts else pa.table(_rows({}, source, extensions, glob), schema=listing_schema())
    from fsspec.asyn import sync

    async def one(prefix, sem):
        async with sem:
            try:
                return await fs._find(prefix, detail=True, withdirs=False)
            except FileNotFoundError:
                return {}

    async def all_of():
        sem = asyncio.Semaphore(concurrency)
        return await asyncio.gather(*(one(p, sem) for p in prefixes))

    found: dict = {}
    for part in sync(fs.loop, all_of):
        found.update(part)
    return pa.table(_rows(found, source, extensions, glob), schema=listing_schema())


def list_objects(source: str, *, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS, glob: str | None = None,
                 parallel: bool = False):
    """Every object under `source` whose name matches, sorted by URI (a stable order makes
    image_id assignment reproducible). With parallel=True the first level of prefixes is
    split over Ray tasks (one per cluster CPU at most), each listing its prefixes on
    threads; objects directly under `source` are listed by the driver."""
    import pyarrow as pa

    root = storage.strip_scheme(source).rstrip("/")
    if not parallel:
        table = list_prefix(source, root, extensions, glob)
    else:
        import ray

        fs = storage.filesystem(source)
        try:
            top = fs.ls(root, detail=True)
        except FileNotFoundError:
            top = []
        files = {e["name"]: e for e in top if e.get("type") == "file"}
        dirs = sorted(e["name"] for e in top if e.get("type") == "directory")
        n_tasks = max(1, min(len(dirs), int(ray.cluster_resources().get("CPU", 1))))
        task = ray.remote(num_cpus=0.25)(list_prefixes)  # IO-bound: several per core
        parts = [pa.table(_rows(files, source, extensions, glob), schema=listing_schema())]
        parts += ray.get([task.remote(source, dirs[i::n_tasks], extensions, glob) for i in range(n_tasks) if dirs[i::n_tasks]])
        table = pa.concat_tables(parts).sort_by("uri")
    log.info("listed %d objects under %s", table.num_rows, source)
    return table
