"""The Delta log entries deltalake (delta-rs 1.6) cannot write or does not show, written
and read here per the Delta protocol (PROTOCOL.md of delta-io/delta):

- "Deletion Vectors" / "Table Features": the protocol upgrade to reader 3 / writer 7 with
  `deletionVectors` (one commit: protocol + metaData with delta.enableDeletionVectors).
  deltalake's `alter.set_table_properties` also adds a `variantType` feature, which other
  readers need not support, so the upgrade is written here.
- "Add File and Remove File": commits of remove + add actions (a copy-on-write rewrite, or
  a file's new deletion vector). deltalake's write transactions only append or overwrite.
- "Creation of New Log Entries": a commit is `_delta_log/<version>.json`, written only if
  absent (S3: If-None-Match; locally: an exclusive create); a second writer of the same
  version fails. Every caller also holds the output lock and checks it first.
- "Action Reconciliation": the deletion vector of each live file, replayed from the newest
  checkpoint at or below a version and the JSON commits after it (deltalake's
  `get_add_actions` does not carry the descriptor).
"""
from __future__ import annotations

import json
import time
from urllib.parse import quote, unquote

from sparse_embed.pipeline.store import storage
from sparse_embed.pipeline.store.lock import check_before_commit

FEATURE = "deletionVectors"
ENABLE_KEY = "delta.enableDeletionVectors"


class CommitConflict(RuntimeError):
    """Another writer committed this version first."""


def log_uri(table_uri: str, name: str = "") -> str:
    return storage.join(table_uri, "_delta_log", name) if name else storage.join(table_uri, "_delta_log")


def commit_name(version: int) -> str:
    return f"{version:020d}.json"


def uses_deletion_vectors(dt) -> bool:
    """Whether the table's protocol names deletion vectors (readers must apply them)."""
    p = dt.protocol()
    return FEATURE in (p.reader_features or [])


def _put_if_absent(uri: str, body: bytes) -> None:
    """Write `uri` only if no object has its name ("Creation of New Log Entries")."""
    import os

    if storage.is_s3(uri):
        import boto3

        bucket, _, key = storage.strip_scheme(uri).partition("/")
        try:
            boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
        except Exception as e:  # noqa: BLE001 - only the precondition's refusal is a conflict
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise CommitConflict(f"{uri} already exists: another writer committed this version") from e
            raise
        return
    path = storage.strip_scheme(uri)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # fails if the name exists: an exclusive create of the whole body at once
    except FileExistsError as e:
        raise CommitConflict(f"{uri} already exists: another writer committed this version") from e
    finally:
        os.unlink(tmp)


def commit(table_uri: str, read_version: int, actions: list[dict], *, operation: str, parameters: dict | None = None) -> int:
    """Write version read_version + 1 of the table from `actions` (add/remove/protocol/
    metaData dicts), with a commitInfo; under the output lock. Returns the new version."""
    check_before_commit(table_uri)
    info = {"commitInfo": {"timestamp": int(time.time() * 1000), "operation": operation,
                           "operationParameters": parameters or {}, "readVersion": read_version,
                           "isBlindAppend": False, "engineInfo": "sparse-embed"}}
    body = "\n".join(json.dumps(a, separators=(",", ":")) for a in [info, *actions]) + "\n"
    version = read_version + 1
    _put_if_absent(log_uri(table_uri, commit_name(version)), body.encode())
    return version


def enable_deletion_vectors(table_uri: str) -> int | None:
    """Upgrade the table's protocol to deletion vectors ("Deletion Vectors", "Table
    Features"); cannot be undone. Returns the new version, None when it already has them."""
    from sparse_embed.pipeline.store import tables

    dt = tables.open_table(table_uri)
    if dt is None:
        raise FileNotFoundError(f"No Delta table at {table_uri!r}")
    if uses_deletion_vectors(dt):
        return None
    p, m = dt.protocol(), dt.metadata()
    readers = sorted(set(p.reader_features or []) | {FEATURE})
    writers = sorted(set(p.writer_features or []) | {FEATURE} | _legacy_writer_features(p.min_writer_version))
    protocol = {"protocol": {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": readers,
                             "writerFeatures": writers}}
    metadata = {"metaData": {"id": m.id, "name": m.name, "description": m.description,
                             "format": {"provider": "parquet", "options": {}}, "schemaString": dt.schema().to_json(),
                             "partitionColumns": list(m.partition_columns), "createdTime": m.created_time,
                             "configuration": dict(m.configuration) | {ENABLE_KEY: "true"}}}
    return commit(table_uri, dt.version(), [protocol, metadata], operation="ADD FEATURE",
                  parameters={"name": json.dumps([FEATURE])})


def _legacy_writer_features(min_writer: int) -> set:
    """The features a writer version below 7 implies ("Table Features": a table moving to
    writer 7 lists them): 2 appendOnly + invariants, 3 + checkConstraints, 4 + changeDataFeed
    and generatedColumns, 5 + columnMapping, 6 + identityColumns. This project's tables use
    none of them, but a table upgraded keeps what its old version promised."""
    levels = [(2, {"appendOnly", "invariants"}), (3, {"checkConstraints"}), (4, {"changeDataFeed", "generatedColumns"}),
              (5, {"columnMapping"}), (6, {"identityColumns"})]
    return {f for level, feats in levels if min_writer >= level and min_writer < 7 for f in feats}


def deletion_vectors(table_uri: str, version: int, live_paths) -> dict:
    """{path relative to the table (decoded): deletion vector descriptor} of the files of
    `live_paths` (relative, decoded) that have one at `version` ("Action Reconciliation")."""
    import pyarrow.parquet as pq

    fs = storage.filesystem(table_uri)
    base = storage.strip_scheme(log_uri(table_uri))
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
    checkpoints = sorted({int(n.split(".")[0]) for n in names if ".checkpoint." in n and n.endswith(".parquet")
                          and int(n.split(".")[0]) <= version})
    dvs: dict = {}
    start = 0
    if checkpoints:
        cp = checkpoints[-1]
        start = cp + 1
        afs, _ = storage.arrow_filesystem(table_uri)
        for n in sorted(n for n in names if n.startswith(f"{cp:020d}.checkpoint") and n.endswith(".parquet")):
            with afs.open_input_file(f"{base}/{n}") as f:
                pf = pq.ParquetFile(f)
                add_type = pf.schema_arrow.field("add").type
                if "deletionVector" not in [add_type.field(i).name for i in range(add_type.num_fields)]:
                    continue
                for row in pf.read(columns=["add"]).column("add").to_pylist():
                    if row and row.get("deletionVector"):
                        dvs[unquote(row["path"])] = {k: v for k, v in row["deletionVector"].items() if v is not None}
    for v in range(start, version + 1):
        try:
            body = storage.read_bytes(log_uri(table_uri, commit_name(v)))
        except FileNotFoundError:
            continue  # before a checkpoint's span, or cleaned up: the checkpoint holds its state
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            a = json.loads(line)
            if "remove" in a:
                dvs.pop(unquote(a["remove"]["path"]), None)
            elif "add" in a:
                path = unquote(a["add"]["path"])
                if a["add"].get("deletionVector"):
                    dvs[path] = a["add"]["deletionVector"]
                else:
                    dvs.pop(path, None)
    live = set(live_paths)
    return {p: d for p, d in dvs.items() if p in live}


def add_action(path: str, size: int, stats: dict, *, dv: dict | None = None, modification_time: int | None = None) -> dict:
    """An add action for the file `path` (relative to the table, not encoded)."""
    a = {"path": quote(path, safe="/=:"), "partitionValues": {}, "size": int(size),
         "modificationTime": int(modification_time if modification_time is not None else time.time() * 1000),
         "dataChange": True, "stats": json.dumps(stats, default=str)}
    if dv is not None:
        a["deletionVector"] = dv
    return {"add": a}


def remove_action(path: str, size: int, *, dv: dict | None = None) -> dict:
    r = {"path": quote(path, safe="/=:"), "deletionTimestamp": int(time.time() * 1000), "dataChange": True,
         "extendedFileMetadata": True, "partitionValues": {}, "size": int(size)}
    if dv is not None:
        r["deletionVector"] = dv
    return {"remove": r}
