"""The output lock: one writer per output prefix. Every command that writes under an
output (embed, nightly, index build/update, promotion) holds it, and every commit checks it
first (`check_before_commit`), so a run that lost its lock stops before writing anything more.

On S3 the lock is one object created with a conditional PUT (`If-None-Match: *`): the
store admits exactly one creator. The holder refreshes a heartbeat in it (`If-Match` its
own ETag); a lock whose heartbeat is older than its TTL belongs to a dead run and is taken
over with `If-Match` on the stale ETag, so two runs racing to take it over cannot both win.
Locally the same protocol uses O_EXCL creation and a rename.
"""
from __future__ import annotations

import contextlib
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


class LockLost(RuntimeError):
    """This run held the lock and no longer does (taken over, or its heartbeat failed)."""


@dataclass
class LockInfo:
    owner: str  # run id
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float
    ttl_s: float
    pid_ns: int | None = None  # inode of the holder's pid namespace (None: written by an older version)

    def expired(self, now: float) -> bool:
        return now - self.heartbeat_at > self.ttl_s

    def holder_is_gone(self) -> bool:
        """The holder ran on this host, in this pid namespace, and its process no longer
        exists (a killed driver): its lock is stale now, not only after its TTL. Another
        container with the same hostname has another pid namespace, so it is never judged."""
        if self.host != socket.gethostname() or self.pid_ns is None or self.pid_ns != _pid_namespace():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by someone else
            return False
        return False


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _s3_parts(uri: str) -> tuple[str, str]:
    bucket, _, key = storage.strip_scheme(uri).partition("/")
    return bucket, key


_CLIENTS = threading.local()


def _s3_client():
    """This thread's S3 client (the heartbeat thread has its own: boto3's default session
    is not safe to share between threads). Endpoint and credentials from AWS_*."""
    clients = _CLIENTS.__dict__.setdefault("by_endpoint", {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint not in clients:
        import boto3

        from botocore.config import Config

        # few attempts per call: beat() retries a failed heartbeat itself, up to half the TTL
        clients[endpoint] = boto3.session.Session().client("s3", config=Config(retries={"mode": "standard", "max_attempts": 3}))
    return clients[endpoint]


def _precondition_failed(e: Exception) -> bool:
    code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code", "")
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
        self._state = threading.Lock()  # a check() never compares while a heartbeat replaces _etag
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.out = out
        self.lost = False  # set if a heartbeat found the lock taken over
        self.failure: str | None = None  # why the heartbeat stopped (an S3 error, a takeover)

    def _body(self, acquired_at: float) -> bytes:
        now = time.time()
        return json.dumps(LockInfo(self.owner, socket.gethostname(), os.getpid(), acquired_at, now, self.ttl_s,
                                   _pid_namespace()).__dict__).encode()

    # -- storage primitives: create-if-absent, replace-if-unchanged, read, delete-if-unchanged
    def _ours(self, body: bytes) -> bool:
        """After a 412: whether the stored lock is exactly `body`, i.e. our own write landed
        and a retry of it (botocore retries a request whose response was lost) was refused.
        Records its ETag."""
        got = self._get_s3()
        if got is None or got[0] != body:
            return False
        self._etag = got[1]
        return True

    def _get_s3(self) -> tuple[bytes, str] | None:
        """(body, ETag) of the lock object on S3; None when there is none."""
        bucket, key = _s3_parts(self.uri)
        try:
            obj = _s3_client().get_object(Bucket=bucket, Key=key)
        except Exception as e:
            if "NoSuchKey" in str(e) or "404" in str(e):
                return None
            raise
        return obj["Body"].read(), obj["ETag"]

    def _create(self, body: bytes) -> bool:
        if storage.is_s3(self.uri):
            bucket, key = _s3_parts(self.uri)
            try:
                self._etag = _s3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
                return True
            except Exception as e:
                if _precondition_failed(e):
                    return self._ours(body)
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
                if _precondition_failed(e):
                    return self._ours(body)
                if "NoSuchKey" in str(e):
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
            got = self._get_s3()
            return None if got is None else (LockInfo(**json.loads(got[0])), got[1])
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
    def acquire(self, *, wait_s: float = 0.0) -> "OutputLock":
        """Take the lock; while another live run holds it, retry for up to `wait_s` seconds,
        then raise LockHeld naming the holder."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._acquire_once()
            except LockHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def _acquire_once(self) -> "OutputLock":
        now = time.time()
        if not self._create(self._body(now)):
            held = self.read()
            if held is not None:
                info, etag = held
                gone = info.holder_is_gone()
                if not gone and not info.expired(time.time()):
                    raise LockHeld(
                        f"{self.out} is locked by run {info.owner} (host {info.host}, pid {info.pid}) since "
                        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(info.acquired_at))}: wait for it to "
                        f"finish, or pass --wait SECONDS (a dead run's lock expires {info.ttl_s:.0f} s after its "
                        f"last heartbeat)"
                    )
                log.warning("taking over the stale lock of run %s (%s)", info.owner,
                            "its process is gone" if gone else f"no heartbeat for {now - info.heartbeat_at:.0f} s")
                if not self._replace(self._body(now), etag):
                    raise LockHeld(f"{self.uri}: another run took over the stale lock first")
            elif not self._create(self._body(now)):
                raise LockHeld(f"{self.uri}: another run took the lock first")
        self._acquired_at = now
        self._thread = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3) and self.beat():
            pass

    def beat(self) -> bool:
        """One heartbeat (the thread calls it every ttl/3). An error (the store, the
        credentials) is retried with backoff until half the TTL has passed since the last
        heartbeat that landed; a refused refresh (taken over), or errors past that, are
        recorded and end the heartbeat: the run then stops at its next check. Returns
        whether the lock is still held."""
        give_up = time.monotonic() + self.ttl_s / 6  # called ttl/3 after the last beat: ttl/2 in all
        delay = 0.5
        while True:
            with self._state:
                try:
                    ok = self._replace(self._body(self._acquired_at), self._etag)
                    error = None
                except Exception as e:  # noqa: BLE001 - retried, then raised by check()
                    ok, error = False, f"heartbeat failed: {type(e).__name__}: {e}"
                if error is None:
                    if not ok:
                        self.lost = True
                        self.failure = "taken over by another run"
                        log.error("lock %s was taken over by another run", self.uri)
                    return ok
                if time.monotonic() >= give_up or self._stop.is_set():
                    self.failure = error
                    log.error("lock %s: %s", self.uri, error)
                    return False
            log.warning("lock %s: %s; retrying", self.uri, error)
            self._stop.wait(min(delay, max(0.0, give_up - time.monotonic())))
            delay = min(delay * 2, 10.0)

    def check(self) -> None:
        """Raise LockLost unless this run still holds the lock: its heartbeat is alive and
        the stored lock is still ours (one GET, never during a heartbeat's refresh)."""
        with self._state:
            if self.failure is None:
                held = self.read()
                if held is None or held[0].owner != self.owner or held[1] != self._etag:
                    self.lost = True
                    self.failure = "taken over by another run" if held is not None else "the lock object is gone"
            failure = self.failure
        if failure is not None:
            raise LockLost(f"{self.out}: this run ({self.owner}) lost the output lock ({failure}); it stopped "
                           f"before its next commit: rerun the command to resume")

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


# The locks this process holds, by output prefix: commits under a prefix check its lock.
_HELD: dict[str, OutputLock] = {}
_HELD_GUARD = threading.Lock()


def _key(uri: str) -> str:
    return storage.strip_scheme(uri).rstrip("/") + "/"


def held_lock_for(uri: str) -> OutputLock | None:
    """The lock this process holds on an output prefix containing `uri`, if any."""
    k = _key(uri)
    with _HELD_GUARD:
        return next((lock for out, lock in _HELD.items() if k.startswith(out)), None)


def check_before_commit(uri: str) -> None:
    """Called by every commit under an output: raises LockLost if the run holding that
    output's lock lost it. Writes outside any held output (tests' fixtures, a table another
    tool owns) are not checked."""
    lock = held_lock_for(uri)
    if lock is not None:
        lock.check()


def owner_for_tasks(out: str) -> str | None:
    """The owner of the lock this process holds on `out` after checking it (None when it
    holds none): a Ray task that commits under `out` passes it to verify_owner."""
    lock = held_lock_for(out)
    if lock is not None:
        lock.check()
    return None if lock is None else lock.owner


def verify_owner(out: str, owner: str | None) -> None:
    """check_before_commit for a commit made in another process (a Ray task) on behalf of
    the run `owner` (owner_for_tasks): one GET; LockLost unless `out`'s stored lock is still
    that run's and its heartbeat is fresh. No check for owner None (no lock held)."""
    if owner is None:
        return
    held = OutputLock(out, owner=owner).read()
    if held is None or held[0].owner != owner or held[0].expired(time.time()):
        why = "the lock object is gone" if held is None else (
            "taken over by another run" if held[0].owner != owner else "its heartbeat is stale")
        raise LockLost(f"{out}: this run ({owner}) lost the output lock ({why}); it stopped before its next commit: "
                       f"rerun the command to resume")


@contextlib.contextmanager
def output_lock(out: str, *, owner: str, ttl_s: float = 600.0, wait_s: float = 0.0):
    """Hold the lock on `out` for the block. Re-entrant within a process: a nested writer
    (the embed run's index stage) runs under the lock its caller already holds."""
    existing = held_lock_for(out)
    if existing is not None:
        existing.check()
        yield existing
        return
    lock = OutputLock(out, owner=owner, ttl_s=ttl_s).acquire(wait_s=wait_s)
    with _HELD_GUARD:
        _HELD[_key(out)] = lock
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            _HELD.pop(_key(out), None)
        lock.release()


def lock_root_of_index(index_root: str) -> str:
    """The output an index root belongs to: `<out>/index` is locked as `<out>` (the embed
    job's layout, so embed and index writers exclude each other); any other index root is
    its own output."""
    root = index_root.rstrip("/")
    return root.rsplit("/", 1)[0] if root.endswith("/index") else root
