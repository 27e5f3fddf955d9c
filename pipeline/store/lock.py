"""A lock on an output prefix, so two nightly runs never write the same tables at once.

On S3 the lock is one object created with a conditional PUT (`If-None-Match: *`): the
store admits exactly one creator. The holder refreshes a heartbeat in it (`If-Match` its
own ETag); a lock whose heartbeat is older than its TTL belongs to a dead run and is taken
over with `If-Match` on the stale ETag, so two runs racing to take it over cannot both win.
Locally the same protocol uses O_EXCL creation and a rename.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from sparse_embed.pipeline.store import storage

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another live run holds the lock."""


@dataclass
class LockInfo:
    owner: str  # run id
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float
    ttl_s: float

    def expired(self, now: float) -> bool:
        return now - self.heartbeat_at > self.ttl_s


def _s3_parts(uri: str) -> tuple[str, str]:
    bucket, _, key = storage.strip_scheme(uri).partition("/")
    return bucket, key


def _s3_client():
    import boto3

    return boto3.client("s3")  # endpoint and credentials from the AWS_* environment


def _precondition_failed(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412")


class OutputLock:
    """Context manager: `with OutputLock(out, owner=run_id, ttl_s=600): ...`."""

    def __init__(self, out: str, *, owner: str, ttl_s: float = 600.0):
        if ttl_s <= 0:
            raise ValueError(f"Expected lock ttl > 0 seconds, got {ttl_s!r}")
        self.uri = storage.join(out, "_lock.json")
        self.owner = owner
        self.ttl_s = ttl_s
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # set if a heartbeat found the lock taken over

    def _body(self, acquired_at: float) -> bytes:
        now = time.time()
        return json.dumps(LockInfo(self.owner, socket.gethostname(), os.getpid(), acquired_at, now, self.ttl_s).__dict__).encode()

    # -- storage primitives: create-if-absent, replace-if-unchanged, read, delete-if-unchanged
    def _create(self, body: bytes) -> bool:
        if storage.is_s3(self.uri):
            bucket, key = _s3_parts(self.uri)
            try:
                self._etag = _s3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
                return True
            except Exception as e:
                if _precondition_failed(e):
                    return False
                raise
        path = storage.strip_scheme(self.uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        self._etag = str(os.stat(path).st_mtime_ns)
        return True

    def _replace(self, body: bytes, etag: str) -> bool:
        if storage.is_s3(self.uri):
            bucket, key = _s3_parts(self.uri)
            try:
                self._etag = _s3_client().put_object(Bucket=bucket, Key=key, Body=body, IfMatch=etag)["ETag"]
                return True
            except Exception as e:
                if _precondition_failed(e) or "NoSuchKey" in str(e):
                    return False
                raise
        path = storage.strip_scheme(self.uri)
        try:
            if str(os.stat(path).st_mtime_ns) != etag:
                return False
        except FileNotFoundError:
            return False
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, path)  # local: a small window between the check and the rename
        self._etag = str(os.stat(path).st_mtime_ns)
        return True

    def read(self) -> tuple[LockInfo, str] | None:
        if storage.is_s3(self.uri):
            bucket, key = _s3_parts(self.uri)
            try:
                obj = _s3_client().get_object(Bucket=bucket, Key=key)
            except Exception as e:
                if "NoSuchKey" in str(e) or "404" in str(e):
                    return None
                raise
            return LockInfo(**json.loads(obj["Body"].read())), obj["ETag"]
        path = storage.strip_scheme(self.uri)
        try:
            with open(path, "rb") as f:
                info = LockInfo(**json.loads(f.read()))
            return info, str(os.stat(path).st_mtime_ns)
        except FileNotFoundError:
            return None

    def _delete(self) -> None:
        if storage.is_s3(self.uri):
            bucket, key = _s3_parts(self.uri)
            try:
                _s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
            except Exception as e:  # taken over after we stalled: not ours to delete
                log.warning("lock %s not released: %s", self.uri, type(e).__name__)
            return
        cur = self.read()
        if cur is not None and cur[1] == self._etag:
            os.remove(storage.strip_scheme(self.uri))

    # -- protocol
    def acquire(self) -> "OutputLock":
        now = time.time()
        if not self._create(self._body(now)):
            held = self.read()
            if held is not None:
                info, etag = held
                if not info.expired(time.time()):
                    raise LockHeld(
                        f"{self.uri} is held by run {info.owner} (host {info.host}, pid {info.pid}) since "
                        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(info.acquired_at))}; it expires "
                        f"{info.ttl_s:.0f} s after its last heartbeat unless renewed"
                    )
                log.warning("taking over the stale lock of run %s (no heartbeat for %.0f s)", info.owner, now - info.heartbeat_at)
                if not self._replace(self._body(now), etag):
                    raise LockHeld(f"{self.uri}: another run took over the stale lock first")
            elif not self._create(self._body(now)):
                raise LockHeld(f"{self.uri}: another run took the lock first")
        self._acquired_at = now
        self._thread = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if not self._replace(self._body(self._acquired_at), self._etag):
                self.lost = True
                log.error("lock %s was taken over by another run", self.uri)
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if not self.lost:
            self._delete()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
