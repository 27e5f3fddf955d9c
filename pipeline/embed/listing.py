"""Stage 1: list the source prefix with its ETag, size and mtime, into the listing table.

s3fs gives `ETag`, `size` and `LastModified` per object. Local directories get an etag
made of size and mtime (there is no content hash to read cheaply).

On S3 a parallel listing is split into key ranges listed by Ray tasks that write straight
into the listing table (s3_listing.py); a listing can also come from an S3 Inventory
report (inventory.py). Either way the driver gets back the table's version and row count,
not the rows. Local directories are listed by the driver, or by first-level directory in
Ray tasks. Each file of the listing table is sorted by uri; the table as a whole is not.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sparse_embed.pipeline.embed.listing_rows import (  # noqa: F401  (re-exported: the listing's public names)
    DEFAULT_EXTENSIONS, _etag, _mtime, glob_matches, listing_rows, listing_schema, matches)
from sparse_embed.pipeline.store import storage, tables

log = logging.getLogger(__name__)

LISTING_ROWS_PER_FILE = 1_000_000  # ~100 bytes a row in memory: a part is ~100 MiB before it is written
# Replaced listings (and parts of a listing that crashed before its commit) are deleted after
# this long: each run's listing is a full copy, which a nightly would otherwise keep forever.
LISTING_RETENTION_HOURS = 24


@dataclass(frozen=True)
class Listed:
    """A committed listing: where it is and how many rows it has."""
    table_uri: str
    version: int
    num_rows: int

    def read(self):
        """The listing's rows as Arrow, in no particular order."""
        return tables.read_columns(self.table_uri, listing_schema().names, version=self.version).cast(listing_schema())


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


def _table(found: dict, source: str, extensions, glob):
    import pyarrow as pa

    return pa.table(_rows(found, source, extensions, glob), schema=listing_schema())


def list_prefix(source: str, prefix: str, extensions: tuple[str, ...], glob: str | None):
    """One recursive listing of `prefix` (a path inside `source`'s filesystem) as Arrow."""
    fs = storage.filesystem(source)
    try:
        found = fs.find(prefix, detail=True, withdirs=False)
    except FileNotFoundError:
        found = {}
    except Exception as e:
        raise RuntimeError(f"Cannot list {storage.with_scheme(prefix, source)!r}: {type(e).__name__}: {e}") from e
    return _table(found, source, extensions, glob)


async def _s3_pages(fs, prefix: str):
    """One recursive listing of the directory `prefix` on s3fs, a page (<= 1,000 objects,
    as {path: info}) at a time; s3fs's retry policy applies to every call (check_source)."""
    bucket, key, _ = fs.split_path(prefix)
    kw = {"Prefix": key.rstrip("/") + "/"} if key else {}
    while True:
        resp = await fs._call_s3("list_objects_v2", Bucket=bucket, **kw)
        yield {f"{bucket}/{c['Key']}": {"type": "file", "ETag": c.get("ETag"), "size": c.get("Size"),
                                         "LastModified": c.get("LastModified")} for c in resp.get("Contents", [])}
        if not resp.get("IsTruncated"):
            return
        kw["ContinuationToken"] = resp["NextContinuationToken"]


class _PartWriter:
    """Listing rows -> Parquet parts (each sorted by uri) in the listing table's directory,
    or, with no table, Arrow tables kept in memory."""

    def __init__(self, table_uri: str | None, source: str, extensions, glob, rows_per_file: int = LISTING_ROWS_PER_FILE):
        self.table_uri, self.source, self.extensions, self.glob = table_uri, source, extensions, glob
        self.rows_per_file = rows_per_file
        self.tag = uuid.uuid4().hex[:12]
        self.buffer: list = []
        self.buffered = 0
        self.parts: list = []  # (path, bytes, rows) per written part; Arrow tables without a table

    def add(self, found: dict) -> None:
        """Add one listing page ({path: info}, unfiltered)."""
        self.add_table(_table(found, self.source, self.extensions, self.glob))

    def add_table(self, part) -> None:
        import pyarrow as pa

        if part.num_rows:
            self.buffer.append(part)
            self.buffered += part.num_rows
        while self.buffered >= self.rows_per_file:  # parts of exactly rows_per_file, the rest waits
            rows = pa.concat_tables(self.buffer)
            rest = rows.slice(self.rows_per_file)
            self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
            self._put(rows.slice(0, self.rows_per_file))

    def flush(self) -> None:
        import pyarrow as pa

        if self.buffered:
            rows = pa.concat_tables(self.buffer)
            self.buffer, self.buffered = [], 0
            self._put(rows)

    def _put(self, rows) -> None:
        table = rows.sort_by("uri")
        if self.table_uri is None:
            self.parts.append(table)
            return
        rel = f"part-{self.tag}-{len(self.parts):05d}.parquet"
        self.parts.append((rel, tables.write_parquet_file(self.table_uri, rel, table), table.num_rows))


def list_prefixes(source: str, prefixes: list[str], extensions: tuple[str, ...], glob: str | None,
                  table_uri: str | None = None, rows_per_file: int = LISTING_ROWS_PER_FILE) -> list:
    """Recursive listings of `prefixes` (local directories of `source`). With `table_uri`,
    written as uncommitted parts of that listing table, returned as (path, bytes, rows);
    without, returned as Arrow tables. (S3 sources are listed by key range: s3_listing.py.)"""
    writer = _PartWriter(table_uri, source, extensions, glob, rows_per_file)
    for p in prefixes:
        writer.add_table(list_prefix(source, p, extensions, glob))
    writer.flush()
    return writer.parts


def list_objects(source: str, *, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS, glob: str | None = None,
                 parallel: bool = False, into: str | None = None, inventory: str | None = None):
    """Every object under `source` whose name matches.

    Without `into`: the rows as Arrow sorted by uri, listed by the driver (small sources,
    tests). With `into` (a listing table's URI): the listing replaces that table's rows in
    one commit and a `Listed` comes back; with parallel=True, Ray tasks list and write the
    rows (S3: key ranges, s3_listing.py; local: first-level directories). With `inventory`
    (an S3 Inventory manifest.json), Ray tasks read the report instead (inventory.py)."""
    root = storage.strip_scheme(source).rstrip("/")
    if inventory is not None:
        if into is None:
            raise ValueError("Expected a listing table to write an inventory listing into")
        from sparse_embed.pipeline.embed.inventory import list_inventory

        tables.ensure_table(into, listing_schema())
        version = tables.commit_files(into, list_inventory(inventory, source, into, extensions, glob), listing_schema(),
                                      mode="overwrite")
        listed = Listed(into, version, tables.count_rows(into, version))
        log.info("listed %d objects under %s from the inventory %s", listed.num_rows, source, inventory)
        return listed
    if into is None:
        table = list_prefix(source, root, extensions, glob)
        log.info("listed %d objects under %s", table.num_rows, source)
        return table.sort_by("uri")
    if not parallel:
        version = tables.overwrite(into, list_prefix(source, root, extensions, glob), listing_schema())
    else:
        tables.ensure_table(into, listing_schema())
        if storage.is_s3(source):
            from sparse_embed.pipeline.embed import s3_listing

            files, _ = s3_listing.list_bucket(source, into, extensions, glob)
            if not files:
                files = _single_object(source, root, into, extensions, glob)
        else:
            files = _list_local_parallel(source, root, into, extensions, glob)
        version = tables.commit_files(into, files, listing_schema(), mode="overwrite")
    listed = Listed(into, version, tables.count_rows(into, version))
    log.info("listed %d objects under %s", listed.num_rows, source)
    return listed


def _single_object(source: str, root: str, into: str, extensions, glob) -> list:
    """SOURCE may name one object rather than a prefix: its listing file, if it matches."""
    fs = storage.filesystem(source)
    try:
        info = fs.info(root)
    except FileNotFoundError:
        return []
    if info.get("type") != "file":
        return []
    writer = _PartWriter(into, source, extensions, glob)
    writer.add({root: info})
    writer.flush()
    return writer.parts


def _list_local_parallel(source: str, root: str, into: str, extensions, glob) -> list:
    """First-level directories over Ray tasks, files directly under `root` by the driver."""
    import ray

    fs = storage.filesystem(source)
    try:
        top = fs.ls(root, detail=True)
    except FileNotFoundError:
        top = []
    files = {e["name"]: e for e in top if e.get("type") == "file"}
    dirs = sorted(e["name"] for e in top if e.get("type") == "directory")
    n_tasks = max(1, min(len(dirs), int(ray.cluster_resources().get("CPU", 1))))
    task = ray.remote(num_cpus=0.25)(list_prefixes)
    here = _PartWriter(into, source, extensions, glob)
    here.add(files)
    here.flush()
    return here.parts + [p for ps in ray.get([task.remote(source, dirs[i::n_tasks], extensions, glob, into)
                                              for i in range(n_tasks) if dirs[i::n_tasks]]) for p in ps]


CHECK_MAX_KEYS = 100_000  # keys check_source reads looking for a match; past that, the job's own listing decides


def check_source(source: str, extensions: tuple[str, ...], glob: str | None, *, role: str = "SOURCE",
                 flags: tuple[str, str] = ("--ext", "--glob"), allow_empty: bool = False) -> None:
    """Fail before any work when `source` does not exist or holds no object that `matches`,
    naming `role` and the filter (`flags`: the option names). Reads listing pages until the
    first match; storage errors (credentials, unknown bucket) are explained. With
    `allow_empty`, an empty source passes (a run then deletes every row of the table)."""
    root = storage.strip_scheme(source).rstrip("/")
    try:
        scan = _scan_s3 if storage.is_s3(source) else _scan_local
        listed, example, found, missing = scan(source, root, extensions, glob)
    except Exception as e:
        clear = storage.explain(e, source, role=role)
        if clear is None:
            raise
        raise clear from e
    if found or listed >= CHECK_MAX_KEYS or allow_empty:
        return
    spec = f"{flags[0]} {','.join(extensions) or '(any)'}" + (f" {flags[1]} {glob!r}" if glob else "")
    if not listed:
        raise FileNotFoundError(f"No images to embed: {role} {source!r} {'does not exist' if missing else 'holds no objects'} "
                                f"(0 objects listed, filter {spec}): check {role}")
    raise FileNotFoundError(f"No images to embed: none of the {listed} objects listed under {role} {source!r} matches "
                            f"{spec} (e.g. {example!r}): check {flags[0]} and {flags[1]}")


def _scan_local(source: str, root: str, extensions, glob) -> tuple[int, str | None, bool, bool]:
    """(objects listed, an example path, whether one matches, whether `root` is missing)."""
    import os

    if os.path.isfile(root):
        return 1, root, matches(root, extensions, glob), False
    if not os.path.isdir(root):
        return 0, None, False, True
    listed, example = 0, None
    for d, _, names in os.walk(root):
        for name in names:
            path = os.path.join(d, name)
            listed += 1
            example = example or path
            if matches(path, extensions, glob):
                return listed, path, True, False
            if listed >= CHECK_MAX_KEYS:
                return listed, example, False, False
    return listed, example, False, False


def _scan_s3(source: str, root: str, extensions, glob) -> tuple[int, str | None, bool, bool]:
    from fsspec.asyn import sync

    fs = storage.filesystem(source)

    async def scan():
        listed, example = 0, None
        pages = _s3_pages(fs, root)
        try:
            async for page in pages:
                for path in page:
                    listed += 1
                    example = example or storage.with_scheme(path, source)
                    if matches(path, extensions, glob):
                        return listed, storage.with_scheme(path, source), True, False
                if listed >= CHECK_MAX_KEYS:
                    break
        finally:
            await pages.aclose()
        return listed, example, False, False

    result = sync(fs.loop, scan)
    if not result[0] and "/" in root:  # SOURCE may name one object
        try:
            info = fs.info(root)
        except FileNotFoundError:
            return result
        if info.get("type") == "file":
            return 1, source, matches(root, extensions, glob), False
    return result
