"""`sparse-embed bench storage`: what the embeddings table stores over simulated nights,
with and without vacuum, and how long a table with many versions takes to open, with
and without a checkpoint.

Nights: two deletion-vector tables of --rows rows (--dim float32 vectors, files of
tables.ROWS_PER_FILE rows) get the same seeded nights: --changed of the rows, half
modified (removed and appended again), a quarter deleted, a quarter new, removed by
removal.remove_positions and compacted by removal.compact as a run does (a file is
rewritten when a fifth of it is deleted). After each night one table is vacuumed with
a retention of --retain-nights nights (store/vacuum.vacuum_table; the nights are
seconds long, so the cutoff is the end of the night --retain-nights before), the other
never. Reported per night: bytes of data and deletion-vector files against the live
version's, and the log's bytes.
Open: a table with --versions commits of one small file each (written as removal commits
are, without loading the table), opened (DeltaTable and the list of live files with their
deletion vectors, as every reader here does) from its log alone and after vacuum_table's
checkpoint, median of 5 opens, on the local S3 server.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from sparse_embed.jobs.options import fraction, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=positive_int, default=1_000_000, help="rows of the table (default 1000000)")
    p.add_argument("--dim", type=positive_int, default=64,
                   help="floats per vector (default 64: the bytes scale with it, the ratios do not)")
    p.add_argument("--nights", type=positive_int, default=60, help="simulated nights (default 60)")
    p.add_argument("--changed", type=fraction, default=0.01, help="fraction changed a night (default 0.01)")
    p.add_argument("--retain-nights", type=positive_int, default=7, help="the vacuum's retention in nights (default 7: 168 h)")
    p.add_argument("--versions", type=positive_int, default=1000, help="commits of the table opened (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the changes and vectors (default 0)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: nights, open")
    p.add_argument("--workdir", default=None, help="where the tables go (default: a temporary directory)")


def _rows(ids, dim: int, rng):
    import numpy as np
    import pyarrow as pa

    n = len(ids)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    return pa.table({
        "image_id": pa.array(ids, pa.int64()), "uri": pa.array([f"s3://b/img/{i:010d}.jpg" for i in ids]),
        "etag": pa.array(["e"] * n), "size": pa.array(np.ones(n, np.int64)),
        "mtime": pa.array([None] * n, pa.timestamp("us", tz="UTC")),
        "width": pa.array(np.ones(n, np.int32)), "height": pa.array(np.ones(n, np.int32)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        "model": pa.array(["m"] * n), "model_version": pa.array(["v"] * n), "run_id": pa.array(["r"] * n)})


def _append(uri: str, table, dim: int, tag: str) -> None:
    from sparse_embed.pipeline.store import removal, tables

    files = []
    for i in range(0, table.num_rows, tables.ROWS_PER_FILE):
        part = table.slice(i, tables.ROWS_PER_FILE)
        rel = f"part-{tag}-{i // tables.ROWS_PER_FILE:05d}.parquet"
        size = tables.write_parquet_file(uri, rel, part)
        files.append((rel, size, part.num_rows, tables.column_stats(part, removal.STATS_COLUMNS)))
    tables.commit_files(uri, files, tables.embeddings_schema(dim))


def _remove(uri: str, ids, tag: str) -> None:
    import numpy as np

    from sparse_embed.pipeline.store import live, removal

    doomed = np.sort(ids)
    by_file = []
    for f in live.table_files(uri).files:
        t = live.read_file(uri, f, ["image_id"], positions=True)
        hit = np.isin(t.column("image_id").to_numpy(), doomed, assume_unique=True)
        if hit.any():
            by_file.append((f, t.column("_row").to_numpy()[hit]))
    removal.remove_positions(uri, by_file, tag=tag)


def _sizes(uri: str) -> tuple[int, int, int]:
    """(bytes of data and vector files under the table, bytes of its log, bytes the live version needs)."""
    from sparse_embed.pipeline.store import deletion_vectors, live

    stored = log_bytes = 0
    for d, _, names in os.walk(uri):
        for n in names:
            size = os.path.getsize(os.path.join(d, n))
            if "_delta_log" in d:
                log_bytes += size
            else:
                stored += size
    files = live.table_files(uri).files
    vectors = {deletion_vectors.relative_path(f.dv["pathOrInlineDv"]) for f in files if f.dv and f.dv.get("storageType") == "u"}
    return stored, log_bytes, sum(f.size for f in files) + sum(os.path.getsize(f"{uri}/{p}") for p in vectors)


def _nights(args, workdir: str) -> None:
    import numpy as np

    from sparse_embed.pipeline.store import delta_log, removal
    from sparse_embed.pipeline.store.vacuum import vacuum_table

    rng = np.random.default_rng(args.seed)
    uris = {"never": f"{workdir}/never/embeddings", "vacuum": f"{workdir}/vacuum/embeddings"}
    first = _rows(np.arange(args.rows), args.dim, rng)
    for uri in uris.values():
        _append(uri, first, args.dim, "night-0")
        delta_log.enable_deletion_vectors(uri)
    live_ids, next_id = np.arange(args.rows), args.rows
    ends, compactions, lines = [time.time()], 0, []
    t0 = time.perf_counter()
    for night in range(1, args.nights + 1):
        k = int(args.rows * args.changed)
        pick = rng.choice(len(live_ids), k // 2 + k // 4, replace=False)
        removed = live_ids[pick]
        modified, new = removed[: k // 2], np.arange(next_id, next_id + k // 4)
        next_id += len(new)
        live_ids = np.concatenate([np.delete(live_ids, pick), modified, new])
        added = _rows(np.concatenate([modified, new]), args.dim, rng)
        for name, uri in uris.items():
            _remove(uri, removed, f"night-{night}")
            _append(uri, added, args.dim, f"night-{night}")
            done = removal.compact(uri, tag=f"compact-{night}")
            compactions += bool(done.version is not None and name == "never")
            if name == "vacuum":
                cutoff = ends[night - args.retain_nights] if night >= args.retain_nights else 0.0
                vacuum_table(uri, cutoff=cutoff)
        ends.append(time.time())
        if night in (1, args.nights) or night % 10 == 0 or done.version is not None:
            never, never_log, live_bytes = _sizes(uris["never"])
            vac, vac_log, _ = _sizes(uris["vacuum"])
            lines.append(f"| {night}{' (compaction)' if done.version is not None else ''} | {live_bytes / 1e6:,.1f} | "
                         f"{never / 1e6:,.1f} ({never / live_bytes:.2f}x) | {vac / 1e6:,.1f} ({vac / live_bytes:.2f}x) | "
                         f"{never_log / 1e3:,.0f} / {vac_log / 1e3:,.0f} |")
    print(f"Nights: {args.rows:,} rows x {args.dim} floats, {args.changed:.0%} changed a night, deletion vectors, "
          f"compaction at a fifth deleted; vacuum retention {args.retain_nights} nights; {compactions} compactions; "
          f"{time.perf_counter() - t0:.0f} s")
    print("| night | live MB | stored, never vacuumed | stored, vacuumed each night | log KB (never / vacuumed) |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))


def _open(uri: str) -> float:
    from sparse_embed.pipeline.store import live

    t0 = time.perf_counter()
    live.table_files(uri)
    return time.perf_counter() - t0


def _open_time(args, workdir: str) -> None:
    import numpy as np

    from sparse_embed.infra.object_store import LocalObjectStore
    from sparse_embed.pipeline.store import delta_log, removal, storage, tables
    from sparse_embed.pipeline.store.vacuum import vacuum_table

    store = LocalObjectStore(data_dir=os.path.join(workdir, "s3")).start()
    os.environ.update(store.aws_env())
    try:
        uri = store.create_bucket("open-bench") + "/emb/embeddings"
        rng = np.random.default_rng(args.seed)
        t0 = time.perf_counter()
        version = tables.ensure_table(uri, tables.embeddings_schema(8)).version()
        for v in range(args.versions):  # one add action a commit, written as the removal commits are (no table load)
            part = _rows(np.arange(v * 4, v * 4 + 4), 8, rng)
            rel = f"part-{v:05d}.parquet"
            size = tables.write_parquet_file(uri, rel, part)
            stats = {"numRecords": 4} | tables.column_stats(part, removal.STATS_COLUMNS)
            version = delta_log.commit(uri, version, [delta_log.add_action(rel, size, stats)], operation="WRITE",
                                       parameters={"mode": "Append"})
        write_s = time.perf_counter() - t0
        fs = storage.filesystem(uri)
        log = storage.strip_scheme(delta_log.log_uri(uri))
        made = [p for p in fs.ls(log, refresh=True) if ".checkpoint." in p or p.endswith("_last_checkpoint")]
        for p in made:  # the log alone: every commit is read
            fs.rm_file(p)
        fs.invalidate_cache()
        plain = [_open(uri) for _ in range(5)]
        vacuum_table(uri, cutoff=0.0)  # a checkpoint at the latest version (nothing is old enough to remove)
        fs.invalidate_cache()
        checkpointed = [_open(uri) for _ in range(5)]
    finally:
        store.stop()
    a, b = statistics.median(plain), statistics.median(checkpointed)
    print(f"Open: {args.versions} commits of one file each, on the local S3 server ({write_s:.0f} s to write; "
          f"{len(made)} checkpoint files the writes made were removed first)")
    print("| log | open + live files, median of 5 | / with checkpoint |")
    print("|---|---|---|")
    print(f"| {args.versions} commits, no checkpoint | {a * 1000:,.0f} ms | {a / b:.1f}x |")
    print(f"| checkpoint at the latest version | {b * 1000:,.0f} ms | 1.0x |")


def run(args) -> int:
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"nights", "open"}
    if unknown:
        raise ValueError(f"Unknown --skip part(s) {sorted(unknown)}: use nights, open")
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        if "nights" not in skip:
            _nights(args, workdir)
        if "open" not in skip:
            _open_time(args, workdir)
    return 0
