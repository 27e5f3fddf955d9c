"""Removing rows from a Delta table the way every Delta reader sees: one way to remove, two
mechanisms, chosen per table by its protocol.

- copy-on-write (the default): each data file holding removed rows is rewritten without
  them (zstd, as the sink writes); the commit removes the old file and adds the rewrite.
  Every Delta reader is then right, including pyarrow-dataset readers.
- deletion vectors (a table created with `--deletion-vectors`, or upgraded with
  `sparse-embed enable-deletion-vectors`): each such file keeps its bytes and gets a new
  deletion vector, the union of its old one and the rows removed now; the commit removes
  the file's old add action and adds it again with the new vector (numRecords physical,
  tightBounds false). A file whose rows are all removed is only removed.

The work runs in Ray tasks, one per group of files, each returning its files' actions;
the driver commits them all in one commit (delta_log.commit, under the output lock), so
no table version shows half a removal. A task's outputs are named from the run and the
file, so a retried task rewrites the same objects. Files a killed run wrote but never
committed are never named by the log: no reader sees them.

Compaction (`compact`) rewrites the files of a deletion-vector table whose deleted share
reaches COMPACT_FRACTION, dropping their vectors.
"""
from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, field

from sparse_embed.pipeline.store import delta_log, live, storage

log = logging.getLogger(__name__)

COPY_ON_WRITE, DELETION_VECTORS = "copy-on-write", "deletion-vectors"
COMPACT_FRACTION = 0.2  # deleted / physical rows of a file at which compaction rewrites it
STATS_COLUMNS = ("image_id", "uri")  # min/max in every add action, as the sink writes them


@dataclass
class Removal:
    """What one removal commit did (the run report's figures)."""

    mechanism: str
    rows: int = 0  # rows removed
    files_touched: int = 0  # data files whose rows changed
    files_rewritten: int = 0  # copy-on-write rewrites (and compactions)
    bytes_written: int = 0  # rewritten files and deletion vector files
    version: int | None = None  # the commit's table version; None when nothing was removed
    actions: list = field(default_factory=list, repr=False)


def mechanism_of(dt) -> str:
    return DELETION_VECTORS if delta_log.uses_deletion_vectors(dt) else COPY_ON_WRITE


def list_layout(table):
    """`table` with a fixed-size-list embedding column as a plain list: the Delta schema
    says array<float>, and polars refuses a file whose type differs from it."""
    import pyarrow as pa

    if "embedding" in table.column_names and pa.types.is_fixed_size_list(table.schema.field("embedding").type):
        i = table.column_names.index("embedding")
        table = table.set_column(i, "embedding", table.column(i).cast(pa.list_(pa.float32())))
    return table


def _stats(table, rows: int, *, tight: bool = True, like: dict | None = None) -> dict:
    from sparse_embed.pipeline.store import tables

    s = {"numRecords": rows}
    if like is not None:  # a deletion vector keeps the file's bounds (wide: some rows are gone)
        s |= {"minValues": dict(like.get("min", {})), "maxValues": dict(like.get("max", {})), "tightBounds": False}
        return s
    s |= tables.column_stats(table, STATS_COLUMNS)
    if not tight:
        s["tightBounds"] = False
    return s


def _rewrite_name(tag: str, path: str) -> str:
    return f"part-{tag}-rw-{hashlib.sha256(path.encode()).hexdigest()[:24]}.parquet"


def remove_in_file(table_uri: str, f: live.DataFile, positions, *, tag: str, mechanism: str) -> dict:
    """The actions that remove the rows at physical `positions` (int64) of data file `f`
    (with those its deletion vector already marks), and what was written. Safe to repeat:
    its outputs are named from `tag` (the run) and the file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparse_embed.pipeline.store import deletion_vectors as dvf
    from sparse_embed.pipeline.store import tables

    old = live.deleted_positions(table_uri, f.dv)
    gone = np.union1d(old, np.asarray(positions, dtype=np.int64))
    gone = gone[(gone >= 0) & (gone < f.rows)]
    out = {"actions": [delta_log.remove_action(f.path, f.size, dv=f.dv)], "rows": int(len(gone) - len(old)),
           "bytes": 0, "rewritten": 0}
    if len(gone) >= f.rows:  # nothing of it stays live
        return out
    if mechanism == DELETION_VECTORS:
        data = dvf.serialize(gone)
        u = uuid.uuid5(uuid.NAMESPACE_URL, f"{table_uri}/{f.path}#{tag}")
        body = dvf.file_bytes(data)
        storage.write_bytes_atomic(storage.join(table_uri, f"deletion_vector_{u}.bin"), body)
        dv = dvf.descriptor(dvf.z85_encode(u.bytes), len(data), len(gone))
        out["actions"].append(delta_log.add_action(f.path, f.size, _stats(None, f.rows, like=f.stats), dv=dv))
        out["bytes"] = len(body)
        return out
    fs, root = storage.arrow_filesystem(table_uri)
    with fs.open_input_file(f"{root.rstrip('/')}/{f.path}") as src:
        t = tables.plain_strings(pq.read_table(src))
    keep = np.ones(t.num_rows, dtype=bool)
    keep[gone] = False
    t = list_layout(t.filter(pa.array(keep)))
    rel = _rewrite_name(tag, f.path)
    size = tables.write_parquet_file(table_uri, rel, t)
    out["actions"].append(delta_log.add_action(rel, size, _stats(t, t.num_rows)))
    out["bytes"], out["rewritten"] = size, 1
    return out


def removal_task(table_uri: str, files: list, positions: list, tag: str, mechanism: str, out: str | None = None,
                 owner: str | None = None) -> dict:
    """Ray task body: remove_in_file for each (file, positions); checks first that the run
    `owner` still holds `out`'s lock. Returns the actions and summed figures."""
    if out is not None:
        from sparse_embed.pipeline.store.lock import verify_owner

        verify_owner(out, owner)
    total = {"actions": [], "rows": 0, "bytes": 0, "rewritten": 0, "touched": 0}
    for f, pos in zip(files, positions):
        r = remove_in_file(table_uri, f, pos, tag=tag, mechanism=mechanism)
        total["actions"] += r["actions"]
        for k in ("rows", "bytes", "rewritten"):
            total[k] += r[k]
        total["touched"] += 1
    return total


def commit_removal(table_uri: str, read_version: int, results: list[dict], mechanism: str, *, operation: str,
                   extra: list | None = None) -> Removal:
    """One commit of the tasks' actions (and `extra` actions); a Removal of the figures."""
    rem = Removal(mechanism)
    actions = [a for r in results for a in r["actions"]] + list(extra or [])
    for r in results:
        rem.rows += r["rows"]
        rem.bytes_written += r["bytes"]
        rem.files_rewritten += r["rewritten"]
        rem.files_touched += r["touched"]
    if actions:
        rem.version = delta_log.commit(table_uri, read_version, actions, operation=operation,
                                       parameters={"mechanism": mechanism})
    log.info("[remove] committed v%s: %d rows from %d files of %s (%s), %d bytes written", rem.version, rem.rows,
             rem.files_touched, table_uri, mechanism, rem.bytes_written)
    return rem


def remove_positions(table_uri: str, by_file: list, *, tag: str, operation: str = "DELETE", extra: list | None = None,
                     files_per_task: int = 8, out: str | None = None, owner: str | None = None) -> Removal:
    """Remove the rows at [(DataFile, positions)] from the table's latest version, in Ray
    tasks of `files_per_task` files when Ray is up (else here), in one commit."""
    from sparse_embed.pipeline.store import tables

    dt = tables.open_table(table_uri)
    mech = mechanism_of(dt)
    items = list(by_file)
    groups = [items[i: i + files_per_task] for i in range(0, len(items), files_per_task)]
    results = _run(table_uri, groups, tag, mech, out, owner)
    return commit_removal(table_uri, dt.version(), results, mech, operation=operation, extra=extra)


def _run(table_uri: str, groups: list, tag: str, mech: str, out, owner) -> list[dict]:
    import ray

    if not groups:
        return []
    if not ray.is_initialized():
        return [removal_task(table_uri, [f for f, _ in g], [p for _, p in g], tag, mech, out, owner) for g in groups]
    task = ray.remote(num_cpus=0.5)(removal_task)
    return ray.get([task.remote(table_uri, [f for f, _ in g], [p for _, p in g], tag, mech, out, owner) for g in groups])


def compact(table_uri: str, *, fraction: float | None = None, tag: str | None = None, out: str | None = None,
            owner: str | None = None) -> Removal:
    """Rewrite the files of a deletion-vector table whose deleted share reaches `fraction`
    (COMPACT_FRACTION; 0 rewrites every file with a vector) without their deleted rows, in
    one commit. A copy-on-write table has nothing to compact."""
    import numpy as np

    from sparse_embed.pipeline.store import tables

    fraction = COMPACT_FRACTION if fraction is None else fraction
    dt = tables.open_table(table_uri)
    if dt is None:
        return Removal(COPY_ON_WRITE)
    tf = live.table_files(table_uri, dt=dt)
    due = [f for f in tf.files if f.deleted and f.deleted >= fraction * max(f.rows, 1)]
    if not due:
        return Removal(mechanism_of(dt))
    tag = tag or f"compact-{uuid.uuid4().hex[:8]}"
    log.info("[compact] start: %d files of %s", len(due), table_uri)
    groups = [[(f, np.zeros(0, np.int64)) for f in due[i: i + 8]] for i in range(0, len(due), 8)]
    results = _run(table_uri, groups, tag, COPY_ON_WRITE, out, owner)
    rem = commit_removal(table_uri, dt.version(), results, DELETION_VECTORS if tf.deletion_vectors else COPY_ON_WRITE,
                         operation="OPTIMIZE")
    rem.rows = sum(f.deleted for f in due)  # rows the rewrites dropped (already deleted before)
    return rem


def convert_tombstones(table_uri: str, *, tag: str, out: str | None = None, owner: str | None = None) -> Removal | None:
    """A table written before 2026-12 masks rows with tombstone files (rows whose
    (image_id, run_id) a tombstone names). Removes those rows with the table's mechanism
    and the tombstone files in the same commit. None when the table has no tombstones."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sparse_embed.pipeline.store import tables

    dt = tables.open_table(table_uri)
    if dt is None:
        return None
    actions = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    root = storage.strip_scheme(table_uri).rstrip("/")
    tombs = [(live.relative_to_table(a["path"], root), a["size_bytes"]) for a in actions if live.is_tombstone_file(a["path"])]
    if not tombs:
        return None
    fs, _ = storage.arrow_filesystem(table_uri)
    keys = pa.concat_tables([pq.read_table(f"{root}/{p}", columns=["image_id", "run_id"], filesystem=fs) for p, _ in tombs])
    keys = pa.table({"image_id": keys.column("image_id").cast(pa.int64()), "run_id": keys.column("run_id").cast(pa.string())})
    by_file = []
    for f in live.table_files(table_uri, dt=dt).files:
        t = live.read_file(table_uri, f, ["image_id", "run_id"], positions=True)
        t = pa.table({"image_id": t.column("image_id").cast(pa.int64()), "run_id": t.column("run_id").cast(pa.string()),
                      "_row": t.column("_row")})
        hit = t.join(keys, ["image_id", "run_id"], join_type="left semi").column("_row")
        if len(hit):
            by_file.append((f, np.sort(pc.unique(hit).to_numpy()).astype(np.int64)))
    extra = [delta_log.remove_action(p, s) for p, s in tombs]
    log.info("converting %s: %d tombstone files mask rows in %d data files", table_uri, len(tombs), len(by_file))
    return remove_positions(table_uri, by_file, tag=tag, operation="DELETE", extra=extra, out=out, owner=owner)
