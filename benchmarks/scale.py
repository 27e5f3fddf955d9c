"""`sparse-embed bench scale`: the metadata stages of a first run and of a nightly with 1%
changed at 10^6 and 10^7 objects, over real S3 Inventory files (CSV, gzipped) and real
Delta tables on local disk.

Per size, one process (the measured driver, with a local Ray of its own) runs, for a first
run and then a nightly: list (the inventory read by Ray tasks into the listing table),
diff (todo.build_todo: partition, per-bucket diff, ids, and the removal of changed and
deleted rows by the table's mechanism) and commit (write tasks put the todo rows as embedding files, sink.commit_files commits them).
Embedding is skipped: the write tasks put zero vectors of --dim floats, so the table's
bytes are mostly metadata columns, not vectors (~8 bytes a row; a 512-d float32 vector is 2,048).
Reported: objects/s of each stage, the driver's peak RSS (VmHWM of that process, after each stage), and
the bytes the table updates read and wrote (files added or removed between versions, and
deletion vector files). Each mechanism (`--mechanisms`) gets a table of its own:
copy-on-write rewrites the files that hold removed rows; deletion vectors write a vector
per touched file, and after the nightly one compaction (as a run makes when a file's
deleted share reaches removal.COMPACT_FRACTION, here every file with a vector) is
measured, its bytes spread over the nights until a file reaches that share.
Last, the read cost of one 8,192-row data file of a deletion-vector table with 2e4 and
with 2e6 rows deleted in its other files (`_read_cost`): a file is read with its own vector only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BUCKET = "scale-bench"
ROWS_PER_INVENTORY_FILE = 1_000_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objects", default="1000000,10000000", help="comma-separated sizes (default 1000000,10000000)")
    p.add_argument("--changed", type=float, default=0.01,
                   help="fraction changed for the nightly: half modified, a quarter new, a quarter deleted (default 0.01)")
    p.add_argument("--dim", type=int, default=8, help="floats per synthetic embedding (default 8)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    p.add_argument("--workdir", default=None, help="where the inventories and tables go (default: a temporary directory)")
    p.add_argument("--mechanisms", default="copy-on-write,deletion-vectors",
                   help="removal mechanisms to measure, comma-separated (default both)")
    p.add_argument("--read-cost", action=argparse.BooleanOptionalAction, default=True,
                   help="also time one file's read with 2e4 vs 2e6 rows deleted elsewhere (default on)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one size in this process
    p.add_argument("--mechanism", default="copy-on-write", help=argparse.SUPPRESS)  # internal: of that process


def _keys(lo: int, hi: int):
    """img/<last 3 digits>/<10 digits>.jpg for lo .. hi-1 (vectorised)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.array(np.arange(lo, hi, dtype=np.int64))
    s = pc.utf8_lpad(pc.cast(ids, pa.string()), 10, "0")
    shard = pc.utf8_slice_codeunits(s, 7, 10)
    return pc.binary_join_element_wise("img/", shard, "/", s, ".jpg", "")


def write_inventory(root: str, n: int, *, changed: float, day: int, seed: int = 0) -> str:
    """An S3 Inventory report (manifest.json + gzipped CSV files) of `n` synthetic objects
    on local disk; day 1 has `changed` of day 0 modified (half), new (a quarter) and
    deleted (a quarter). Returns the manifest's path."""
    import gzip

    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    k = int(n * changed)
    modified_mask = np.zeros(n, bool)
    deleted_mask = np.zeros(n, bool)
    if day:
        picked = rng.choice(n, k // 2 + k // 4, replace=False)
        modified_mask[picked[: k // 2]] = True
        deleted_mask[picked[k // 2:]] = True
    base = os.path.join(root, f"inventory/{BUCKET}/daily")
    files = []
    total = n + (k // 4 if day else 0)
    for part, lo in enumerate(range(0, total, ROWS_PER_INVENTORY_FILE)):
        hi = min(total, lo + ROWS_PER_INVENTORY_FILE)
        keys = _keys(lo, hi)
        idx = np.arange(lo, hi)
        old = idx[idx < n]
        etag = np.r_[np.where(modified_mask[old], "e1", "e0"), np.full(len(idx) - len(old), "e0")]
        keep = np.r_[~deleted_mask[old], np.ones(len(idx) - len(old), bool)]
        table = pa.table({"bucket": pa.array([BUCKET] * (hi - lo)), "key": keys, "size": pa.array(idx % 90_000 + 1000),
                          "last_modified": pa.array(["2026-12-01T00:00:00.000Z"] * (hi - lo)), "etag": pa.array(etag)}).filter(pa.array(keep))
        key = f"inventory/{BUCKET}/daily/data/day{day}-{part:05d}.csv.gz"
        path = os.path.join(root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with gzip.open(path, "wb", compresslevel=1) as f:
            pacsv.write_csv(table, f, write_options=pacsv.WriteOptions(include_header=False, quoting_style="all_valid"))
        files.append({"key": key, "size": os.path.getsize(path), "MD5checksum": "0"})
    manifest = os.path.join(base, f"2026-12-0{1 + day}T00-00Z", "manifest.json")
    os.makedirs(os.path.dirname(manifest), exist_ok=True)
    with open(manifest, "w") as f:
        json.dump({"sourceBucket": BUCKET, "destinationBucket": f"arn:aws:s3:::{BUCKET}", "version": "2016-11-30",
                   "fileFormat": "CSV", "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag", "files": files}, f)
    return manifest


def _table_files(uri: str) -> dict:
    """path -> bytes of the table's data files and of the deletion vector files under it."""
    from sparse_embed.pipeline.store import tables

    dt = tables.open_table(uri)
    if dt is None:
        return {}
    import pyarrow as pa

    actions = pa.table(dt.get_add_actions(flatten=True))
    files = dict(zip(actions.column("path").to_pylist(), actions.column("size_bytes").to_pylist()))
    root = uri.rstrip("/")
    for name in os.listdir(root):
        if name.startswith("deletion_vector_"):
            files[name] = os.path.getsize(os.path.join(root, name))
    return files


def _io(before: dict, after: dict) -> tuple[int, int]:
    """(bytes of files removed, bytes of files added) between two versions' file lists."""
    return (sum(s for p, s in before.items() if p not in after), sum(s for p, s in after.items() if p not in before))


def write_rows(out: str, path: str, run_id: str, dim: int) -> list:
    """Write task: the todo file's rows as embedding rows with zero vectors (no model)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparse_embed.pipeline.embed.sink import EmbeddingTableSink, file_name
    from sparse_embed.pipeline.store import tables

    todo = pq.read_table(path)
    sink = EmbeddingTableSink(out, run_id=run_id, dim=dim)
    written = []
    for lo in range(0, todo.num_rows, tables.ROWS_PER_FILE):
        t = todo.slice(lo, tables.ROWS_PER_FILE)
        n = t.num_rows
        rows = pa.table({
            "image_id": t.column("image_id"), "uri": t.column("uri"), "etag": t.column("etag"), "size": t.column("size"),
            "mtime": t.column("mtime"), "width": pa.array(np.full(n, 8, np.int32)), "height": pa.array(np.full(n, 8, np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * dim, np.float32)), dim),
            "model": pa.array(["bench"] * n), "model_version": pa.array(["bench-v1"] * n), "run_id": pa.array([run_id] * n),
        }, schema=tables.embeddings_schema(dim))
        written.append(sink._write_file(tables.EMBEDDINGS, file_name(run_id, rows), rows))
    return written


def _peak_rss() -> int:
    """This process's peak RSS so far, in bytes: VmHWM in /proc/self/status, the high-water
    mark of this program's memory. getrusage's ru_maxrss is not used where /proc exists: on
    Linux it also carries the peak of the parent that forked this process, here the one
    that generated the inventories."""
    import resource

    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _one_run(out: str, manifest: str, run_id: str, dim: int, mechanism: str) -> dict:
    import ray

    from sparse_embed.pipeline.embed import sink
    from sparse_embed.pipeline.embed.listing import list_objects
    from sparse_embed.pipeline.embed.todo import build_todo, remove_work
    from sparse_embed.pipeline.store import delta_log, live, tables

    emb = tables.table_uri(out, tables.EMBEDDINGS)
    if mechanism == "deletion-vectors" and tables.open_table(emb) is None:
        tables.ensure_table(emb, tables.embeddings_schema(dim))
        delta_log.enable_deletion_vectors(emb)
    res = {"peak_rss_after": {}}  # the peak so far after each stage: the stage that raises it is the one that set it
    t0 = time.perf_counter()
    listed = list_objects(f"s3://{BUCKET}/img/", into=tables.table_uri(out, tables.LISTING), inventory=manifest)
    res["list_s"] = time.perf_counter() - t0
    res["listed"] = listed.num_rows
    res["peak_rss_after"]["list"] = _peak_rss()
    before = _table_files(emb)
    t0 = time.perf_counter()
    todo = build_todo(out=out, root=out, listed=listed, run_id=run_id, model_version="bench-v1", max_attempts=3,
                      dim=dim)
    res["diff_s"] = time.perf_counter() - t0
    res["counts"] = todo.counts
    res["peak_rss_after"]["diff"] = _peak_rss()
    mid = _table_files(emb)
    # The diff's table update: the removal (copy-on-write rewrites or deletion vectors; it
    # reads the files it replaces: counted as read, the removed files).
    res["delete_read_bytes"], res["delete_written_bytes"] = _io(before, mid)
    res["removed"], res["compacted"], res["removal"] = todo.removed, todo.compacted, todo.removal
    res["files_before"] = len([p for p in before if not p.startswith("deletion_vector_")])
    t0 = time.perf_counter()
    task = ray.remote(num_cpus=0.5)(write_rows)
    files = [f for part in ray.get([task.remote(out, p, run_id, dim) for p in todo.paths]) for f in part]
    res["write_s"] = time.perf_counter() - t0
    res["peak_rss_after"]["write"] = _peak_rss()
    t0 = time.perf_counter()
    tables.ensure_table(emb, tables.embeddings_schema(dim))
    sink.commit_files(out, files, dim=dim)
    res["commit_s"] = time.perf_counter() - t0
    res["peak_rss_after"]["commit"] = _peak_rss()
    after = _table_files(emb)
    res["append_written_bytes"] = _io(mid, after)[1]
    res["table_bytes"] = sum(after.values())
    res["todo"] = todo.num_rows
    res["data_rows"], res["deleted_rows"] = live.row_counts(emb)
    remove_work(out, run_id)
    return res


def _compaction(out: str) -> dict:
    """A compaction of every file with a deletion vector (removal.compact, in Ray tasks):
    seconds and the bytes of files it replaced and wrote. Nothing for copy-on-write."""
    from sparse_embed.pipeline.store import removal, tables

    emb = tables.table_uri(out, tables.EMBEDDINGS)
    before = _table_files(emb)
    t0 = time.perf_counter()
    rows = removal.compact(emb, fraction=0.0).rows
    after = _table_files(emb)
    read, written = _io(before, after)
    return {"seconds": time.perf_counter() - t0, "rows_deleted": rows, "read_bytes": read, "written_bytes": written,
            "table_bytes": sum(after.values())}


def _measure_one(args) -> int:
    import ray

    n = int(args.one)
    root = os.path.join(args.workdir, f"n{n}")
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    after_init = _peak_rss()
    out = os.path.join(root, f"out-{args.mechanism}")
    first = _one_run(out, os.path.join(root, "day0.json"), "first", args.dim, args.mechanism)
    nightly = _one_run(out, os.path.join(root, "day1.json"), "nightly", args.dim, args.mechanism)
    peak = _peak_rss()
    compaction = _compaction(out)
    ray.shutdown()
    print(json.dumps({"n": n, "mechanism": args.mechanism, "first": first, "nightly": nightly, "compaction": compaction, "driver_peak_rss": peak,
                      "driver_peak_rss_after_ray_init": after_init}))
    return 0


def run(args) -> int:
    if args.one:
        return _measure_one(args)
    import shutil

    work = args.workdir or tempfile.mkdtemp(prefix="bench-scale-")
    results = []
    try:
        for n in (int(x) for x in args.objects.split(",")):
            root = os.path.join(work, f"n{n}")
            os.makedirs(root, exist_ok=True)
            t0 = time.perf_counter()
            for day in (0, 1):
                shutil.copy(write_inventory(root, n, changed=args.changed, day=day), os.path.join(root, f"day{day}.json"))
                # the copy sits in <root>, above inventory/: its data file keys resolve from there
            gen_s = time.perf_counter() - t0
            for mechanism in args.mechanisms.split(","):
                shutil.rmtree(os.path.join(root, f"out-{mechanism}"), ignore_errors=True)  # a first run needs empty tables
                cmd = [sys.executable, "-m", "sparse_embed.jobs.cli", "bench", "scale", "--one", str(n), "--workdir", work,
                       "--dim", str(args.dim), "--cpus", str(args.cpus), "--mechanism", mechanism]
                checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # Ray's workers import benchmarks.scale
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")])))
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise RuntimeError(f"bench scale --one {n} exited {done.returncode}:\n{done.stderr[-3000:]}")
                line = [l for l in done.stdout.splitlines() if l.startswith("{")][-1]
                results.append(json.loads(line) | {"generate_s": gen_s})
                shutil.rmtree(os.path.join(root, f"out-{mechanism}"), ignore_errors=True)
                print(json.dumps(results[-1]), flush=True)
                print(_table([results[-1]]), flush=True)
        if args.read_cost:
            results_read = _read_cost(os.path.join(work, "read-cost"))
            print(json.dumps(results_read), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(_summary(results))
    if args.read_cost:
        a, b = results_read
        print(f"read one 8,192-row file: {a['deleted_elsewhere']:,} rows deleted elsewhere {a['seconds'] * 1e3:.1f} ms, "
              f"{b['deleted_elsewhere']:,} {b['seconds'] * 1e3:.1f} ms: {b['seconds'] / a['seconds']:.2f}x (target <= 1.3)")
    return 0


def _read_cost(root: str, *, files: int = 250, rows: int = 8192, dim: int = 8, repeats: int = 20) -> list[dict]:
    """Seconds (median of `repeats`) to read one data file (its own vector: 16 rows) of a
    deletion-vector table of `files` x `rows` rows, with 2e4 and then 2e6 rows deleted in
    its other files."""
    import shutil

    import numpy as np
    import pyarrow as pa

    from sparse_embed.pipeline.store import delta_log, live, removal, tables

    shutil.rmtree(root, ignore_errors=True)
    uri = os.path.join(root, "embeddings")
    schema = tables.embeddings_schema(dim)
    tables.ensure_table(uri, schema)
    delta_log.enable_deletion_vectors(uri)
    entries = []
    for i in range(files):
        ids = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
        t = pa.table({"image_id": ids, "uri": pa.array([f"s3://b/{j}.jpg" for j in ids.tolist()]), "etag": pa.array(["e"] * rows),
                      "size": pa.array(np.ones(rows, np.int64)), "mtime": pa.array([None] * rows, pa.timestamp("us", tz="UTC")),
                      "width": pa.array(np.ones(rows, np.int32)), "height": pa.array(np.ones(rows, np.int32)),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * dim, np.float32)), dim),
                      "model": pa.array(["m"] * rows), "model_version": pa.array(["v"] * rows), "run_id": pa.array(["r"] * rows)},
                     schema=schema)
        rel = f"part-{i:05d}.parquet"
        entries.append((rel, tables.write_parquet_file(uri, rel, t), rows, tables.column_stats(t, ("image_id", "uri"))))
    tables.commit_files(uri, entries, schema)
    rng = np.random.default_rng(0)
    out = []
    target_path = entries[0][0]
    for step, total in enumerate((20_000, 2_000_000)):
        tf = live.table_files(uri)
        already = sum(f.deleted for f in tf.files)
        others = [f for f in tf.files if f.path != target_path]
        per = (total - already) // len(others)
        by_file = [(f, rng.choice(np.setdiff1d(np.arange(rows), live.deleted_positions(uri, f.dv)), per, replace=False))
                   for f in others]
        if step == 0:
            target = next(f for f in tf.files if f.path == target_path)
            by_file.append((target, np.arange(16)))
        removal.remove_positions(uri, by_file, tag=f"cost{step}", files_per_task=10**6)
        f = next(f for f in live.table_files(uri).files if f.path == target_path)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            live.read_file(uri, f, ["image_id", "embedding"])
            times.append(time.perf_counter() - t0)
        deleted = sum(x.deleted for x in live.table_files(uri).files) - f.deleted
        out.append({"deleted_elsewhere": int(deleted), "seconds": float(np.median(times))})
    shutil.rmtree(root, ignore_errors=True)
    return out


def _table(results: list[dict]) -> str:
    lines = ["| objects | mechanism | run | list obj/s | diff obj/s | write+commit obj/s (rows) | metadata s | removal: read / written | append written | table bytes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name in ("first", "nightly"):
            x = r[name]
            meta = x["list_s"] + x["diff_s"] + x["commit_s"]
            lines.append(f"| {r['n']:,} | {r.get('mechanism', 'copy-on-write')} | {name} | {x['listed'] / x['list_s']:,.0f} | {x['listed'] / x['diff_s']:,.0f} | "
                         f"{x['todo'] / max(x['write_s'] + x['commit_s'], 1e-9):,.0f} ({x['todo']:,}) | {meta:.1f} | "
                         f"{x['delete_read_bytes'] / 2**20:,.1f} / {x['delete_written_bytes'] / 2**20:,.1f} MiB | "
                         f"{x['append_written_bytes'] / 2**20:,.1f} MiB | {x['table_bytes'] / 2**20:,.1f} MiB |")
        lines.append(f"| {r['n']:,} | {r.get('mechanism', 'copy-on-write')} | driver peak RSS | {r['driver_peak_rss'] / 2**20:,.0f} MiB | | | | | | |")
    return "\n".join(lines)


def _summary(results: list[dict]) -> str:
    out = ["", _table(results), ""]
    by_mech: dict = {}
    for r in results:
        by_mech.setdefault(r.get("mechanism", "copy-on-write"), []).append(r)
    for mech, rs in by_mech.items():
        if len(rs) >= 2:
            a, b = rs[0], rs[-1]
            out.append(f"{mech}: driver peak RSS {b['n']:,} / {a['n']:,}: {b['driver_peak_rss'] / a['driver_peak_rss']:.2f} "
                       f"(target <= 1.3)")
    for r in results:
        f, n, c = r["first"], r["nightly"], r["compaction"]
        mech = r.get("mechanism", "copy-on-write")
        written = n["delete_written_bytes"] + n["append_written_bytes"]
        rem = n.get("removal") or {}
        touched = rem.get("files_touched", 0) / max(n.get("files_before", 1), 1)
        meta = lambda x: x["list_s"] + x["diff_s"] + x["commit_s"]  # noqa: E731
        line = (f"{r['n']:,} {mech}: nightly wrote {written / max(f['table_bytes'], 1):.1%} of the table's bytes "
                f"(removal of {n['removed']:,} rows: {rem.get('files_touched', 0):,} files touched = {touched:.0%} of the "
                f"files, {n['delete_written_bytes'] / 2**20:,.1f} MiB written, {n['delete_read_bytes'] / 2**20:,.1f} MiB of "
                f"files replaced); nightly metadata stages {meta(n) / meta(f):.1%} of the first run's")
        if mech == "deletion-vectors":
            nights = nights_per_compaction(n["data_rows"], n["removed"])
            amortised = written + c["written_bytes"] / nights
            line += (f"; a compaction every {nights:.0f} nights ({c['written_bytes'] / 2**20:,.1f} MiB, {c['seconds']:.1f} s) "
                     f"makes {amortised / max(f['table_bytes'], 1):.1%} a night on average (target <= 5%)")
        out.append(line)
    return "\n".join(out)


def nights_per_compaction(data_rows: int, removed_per_night: int) -> float:
    """Nights of `removed_per_night` (spread at random) until a file's deleted share
    reaches removal.COMPACT_FRACTION, as files do on average."""
    from sparse_embed.pipeline.store import removal

    return max(1.0, removal.COMPACT_FRACTION * data_rows / max(removed_per_night, 1))
