"""A live S3 listing spread over Ray tasks that write straight into the listing table.

1. Discovery (driver): prefixes are listed one level at a time with Delimiter="/" until
   there are DISCOVERY_PARTS parts, a level has no sub-prefixes, or a level takes more
   than DISCOVERY_PAGES pages (that prefix is then listed as one flat range instead).
   Each prefix found becomes a part, and the keys directly under a prefix that also has
   sub-prefixes become a `direct` part.
2. Listing (driver, then tasks): the driver lists the first parts itself for up to
   INLINE_PAGES pages; a bucket that small needs no task (Ray workers that start cold took
   ~9 s to list 2,500 keys here, the driver 0.8 s). What is left goes to tasks: a task lists its range for up to PAGES_PER_TASK pages (1,000 keys
   each), writes the matching rows as one Parquet file of the listing table, and, when the
   range goes on, returns the rest split into ranges (key_ranges.split_rest) that the
   driver hands to new tasks. No task lists more than PAGES_PER_TASK pages.
3. The driver commits every file in one overwrite. It holds the parts in flight and one
   (path, bytes, rows) per written file: about PAGES_PER_TASK * 1,000 keys per entry.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field, replace

from sparse_embed.pipeline.embed.key_ranges import KeyRange, split_rest
from sparse_embed.pipeline.store import storage, tables

log = logging.getLogger(__name__)

PAGE_KEYS = 1000  # S3's own maximum per LIST call
PAGES_PER_TASK = 100  # 100,000 keys, ~8 s of sequential LIST calls at the ~12.7k keys/s measured here
DISCOVERY_PARTS = 256  # discovery stops descending once it has this many parts
DISCOVERY_PAGES = 10  # a level with more delimiter pages than this is listed as a flat range instead
INLINE_PAGES = 20  # the driver lists up to 20,000 keys itself (~1.6 s) before it starts any task
TASKS_PER_CPU = 4  # listing is IO-bound: tasks reserve 1/TASKS_PER_CPU of a CPU


@dataclass
class RangeListed:
    files: list = field(default_factory=list)  # (path relative to the table, bytes, rows)
    rest: list = field(default_factory=list)  # KeyRange parts still to list
    keys: int = 0  # keys listed (before the filters)
    pages: int = 0


@dataclass
class Sizes:
    """Listing granularity (tests make it small to split a small bucket)."""
    page_keys: int = PAGE_KEYS
    pages_per_task: int = PAGES_PER_TASK
    discovery_parts: int = DISCOVERY_PARTS
    discovery_pages: int = DISCOVERY_PAGES
    inline_pages: int = INLINE_PAGES


def _page_rows(contents: list, bucket: str) -> dict[str, list]:
    return {"path": [f"{bucket}/{c['Key']}" for c in contents], "etag": [str(c.get("ETag") or "").strip('"') for c in contents],
            "size": [int(c.get("Size") or 0) for c in contents], "mtime": [c.get("LastModified") for c in contents]}


async def _pages(fs, bucket: str, part: KeyRange, max_pages: int | None, page_keys: int):
    """(contents, common prefixes, whether the part is done) per page of `part`, stopping
    after `upto` and after max_pages pages; s3fs's retry policy applies to every call."""
    kw = {"Prefix": part.prefix} if part.prefix else {}
    kw["MaxKeys"] = page_keys
    if part.after is not None:
        kw["StartAfter"] = part.after
    if part.direct:
        kw["Delimiter"] = "/"
    pages = 0
    while max_pages is None or pages < max_pages:
        resp = await fs._call_s3("list_objects_v2", Bucket=bucket, **kw)
        pages += 1
        contents = resp.get("Contents", [])
        if part.upto is not None and contents and contents[-1]["Key"] > part.upto:
            yield [c for c in contents if c["Key"] <= part.upto], [], True
            return
        done = not resp.get("IsTruncated")
        yield contents, [p["Prefix"] for p in resp.get("CommonPrefixes", [])], done
        if done:
            return
        kw.pop("StartAfter", None)
        kw["ContinuationToken"] = resp["NextContinuationToken"]


def list_range(source: str, part: KeyRange, table_uri: str, extensions: tuple[str, ...], glob: str | None,
               sizes: Sizes = Sizes()) -> RangeListed:
    """One listing task: up to sizes.pages_per_task pages of `part`, written as one
    uncommitted Parquet file of the listing table (none when no key matches)."""
    import pyarrow as pa
    from fsspec.asyn import sync

    from sparse_embed.pipeline.embed.listing_rows import listing_rows

    fs = storage.filesystem(source)
    bucket = storage.strip_scheme(source).split("/", 1)[0]
    out = RangeListed()
    rows = {"path": [], "etag": [], "size": [], "mtime": []}
    edge = {"first": None, "last": None, "done": False}

    async def run():
        async for contents, _, done in _pages(fs, bucket, part, None if part.direct else sizes.pages_per_task,
                                               sizes.page_keys):
            out.pages += 1
            out.keys += len(contents)
            for k, v in _page_rows(contents, bucket).items():
                rows[k].extend(v)
            if contents:
                edge["first"] = edge["first"] or contents[0]["Key"]
                edge["last"] = contents[-1]["Key"]
            edge["done"] = done

    try:
        sync(fs.loop, run)  # a `direct` part (at most DISCOVERY_PAGES pages) is listed whole
    except Exception as e:
        raise RuntimeError(f"Cannot list {source!r} (keys under {part.prefix!r} after {part.after!r}): "
                           f"{type(e).__name__}: {e}") from e
    if not edge["done"] and edge["last"] is not None:
        out.rest = split_rest(part, edge["first"], edge["last"])
    table = listing_rows(pa.table({"path": pa.array(rows["path"], pa.string()), "etag": pa.array(rows["etag"], pa.string()),
                                   "size": pa.array(rows["size"], pa.int64()),
                                   "mtime": pa.array(rows["mtime"], pa.timestamp("us", tz="UTC"))}),
                         source, extensions, glob)
    if table.num_rows:
        rel = f"part-{uuid.uuid4().hex}.parquet"
        out.files.append((rel, tables.write_parquet_file(table_uri, rel, table), table.num_rows))
    return out


def discover(source: str, sizes: Sizes = Sizes()) -> list[KeyRange]:
    """Parts covering every key under `source` (see the module docstring, step 1)."""
    from fsspec.asyn import sync

    fs = storage.filesystem(source)
    bucket, _, key = storage.strip_scheme(source).rstrip("/").partition("/")
    root = key + "/" if key else ""
    done: list[KeyRange] = []
    level = [root]
    while level and len(done) + len(level) < sizes.discovery_parts:
        nxt: list[str] = []
        for prefix in level:
            subs, has_files, whole = sync(fs.loop, _one_level, fs, bucket, prefix, sizes)
            if not whole:  # too many entries to page through here: a flat range that splits itself
                done.append(KeyRange(prefix))
                continue
            if has_files:
                done.append(KeyRange(prefix, direct=True))
            nxt.extend(subs)
        level = nxt
    return done + [KeyRange(p) for p in level]


async def _one_level(fs, bucket: str, prefix: str, sizes: Sizes) -> tuple[list[str], bool, bool]:
    """(sub-prefixes, whether keys sit directly under `prefix`, whether the level was read
    whole within sizes.discovery_pages pages)."""
    subs, has_files = [], False
    async for contents, prefixes, done in _pages(fs, bucket, KeyRange(prefix, direct=True), sizes.discovery_pages,
                                                 sizes.page_keys):
        subs.extend(prefixes)
        has_files = has_files or bool(contents)
        if done:
            return subs, has_files, True
    return subs, has_files, False


def list_bucket(source: str, table_uri: str, extensions: tuple[str, ...], glob: str | None,
                sizes: Sizes = Sizes()) -> tuple[list, dict]:
    """Every matching key under `source` written as uncommitted files of the listing table
    by the driver and Ray tasks; returns ((path, bytes, rows) per file, {"tasks",
    "parts_at_start", "most_keys_in_a_task", "pages_in_driver"})."""
    import ray

    parts = discover(source, sizes)
    stats = {"tasks": 0, "parts_at_start": len(parts), "most_keys_in_a_task": 0, "pages_in_driver": 0}
    files = []
    while parts and stats["pages_in_driver"] < sizes.inline_pages:  # step 2: small buckets start no task
        budget = replace(sizes, pages_per_task=sizes.inline_pages - stats["pages_in_driver"])
        result = list_range(source, parts.pop(), table_uri, extensions, glob, budget)
        stats["pages_in_driver"] += result.pages
        files.extend(result.files)
        parts.extend(result.rest)
    task = ray.remote(num_cpus=1 / TASKS_PER_CPU)(list_range)
    in_flight = max(1, int(ray.cluster_resources().get("CPU", 1)) * TASKS_PER_CPU)
    pending = []
    while parts or pending:
        while parts and len(pending) < in_flight:
            pending.append(task.remote(source, parts.pop(), table_uri, extensions, glob, sizes))
            stats["tasks"] += 1
        ready, pending = ray.wait(pending, num_returns=1)
        for result in ray.get(ready):
            files.extend(result.files)
            parts.extend(result.rest)
            stats["most_keys_in_a_task"] = max(stats["most_keys_in_a_task"], result.keys)
    log.info("listed %s: %s, %d files", source, stats, len(files))
    return files, stats
