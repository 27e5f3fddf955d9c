"""A loopback HTTP proxy in front of the object store that injects the faults S3 clients meet
in production: `503 SlowDown`, connections reset mid-request, and stalls.

    with FaultProxy(store.endpoint_url, FaultPlan(slowdown=0.1, reset=0.05, stall=0.05, seed=1)) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url   # every client now goes through it

Facts the design rests on:
- Every request gets its own upstream connection with `Connection: close`, and every
  response is marked `Connection: close` too, so one decision is made per request (clients
  reconnect for the next one). SigV4 signs the Host header the client sent; the proxy
  forwards it unchanged, so signatures still verify upstream.
- Decisions come from one seeded `random.Random`, in arrival order (which concurrency makes
  only as reproducible as the request order is).
- Bounded: after `max_faults` injected faults (per plan) every request passes; after `lifetime_s` the
  proxy stops accepting by itself (a forgotten proxy cannot outlive a test run by long).
- 1xx interim responses (`Expect: 100-continue`) are passed through before the final one.
"""
from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  # bytes of request/response head we are willing to buffer
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>")
DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
               b"<Message>Access Denied</Message><RequestId>fault-proxy</RequestId></Error>")


@dataclass
class FaultPlan:
    """Fractions of requests (in [0, 1], summing to at most 1) that get each fault."""

    slowdown: float = 0.0  # answered `503 SlowDown` without reaching the store
    reset: float = 0.0  # connection reset (RST) after the request head arrived
    stall: float = 0.0  # held stall_s before being forwarded
    stall_s: float = 2.0  # below the clients' read timeouts: a slow store, not a dead one
    max_faults: int | None = 200  # None: unbounded
    seed: int = 0
    deny_get: tuple = ()  # GETs whose path holds one of these strings get 403 AccessDenied (revoked credentials)
    # "METHOD path-part" rules: the first matching request reaches the store, then its
    # response is lost (the client's connection is reset), as when a network drops it
    drop_response: tuple = ()
    only: tuple = ()  # random faults only for requests whose path holds one of these (empty: every request)

    def __post_init__(self):
        for name in ("slowdown", "reset", "stall"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Expected {name} in [0, 1], got {getattr(self, name)!r}")
        if self.slowdown + self.reset + self.stall > 1.0:
            raise ValueError(f"Expected slowdown + reset + stall <= 1, got {self.slowdown + self.reset + self.stall!r}")
        if self.stall_s < 0:
            raise ValueError(f"Expected stall_s >= 0, got {self.stall_s!r}")


def _read_head(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes] | None:
    """(head including the blank line, bytes after it), or None on EOF before a full head."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            return None
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _with_close(head: bytes) -> bytes:
    """The head with Connection/Keep-Alive headers replaced by `Connection: close`."""
    lines = head[:-4].split(b"\r\n")
    kept = [ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower() not in (b"connection", b"keep-alive", b"proxy-connection")]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


def _header(head: bytes, name: bytes) -> bytes | None:
    for ln in head.split(b"\r\n")[1:]:
        k, _, v = ln.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer sees ECONNRESET, not a clean EOF."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


@dataclass
class FaultProxy:
    upstream: str  # http://host:port of the object store
    plan: FaultPlan = field(default_factory=FaultPlan)
    lifetime_s: float = 900.0
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    counts: dict = field(default_factory=lambda: {"requests": 0, "passed": 0, "slowdown": 0, "reset": 0, "stall": 0})
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _server: socket.socket | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _rng: random.Random = field(default=None, init=False, repr=False)
    _plan_faults: int = field(default=0, init=False, repr=False)
    _dropped: set = field(default_factory=set, init=False, repr=False)  # drop_response rules already used

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set_plan(self, plan: FaultPlan) -> None:
        """Switch faults on or off while running; reseeds the decisions."""
        with self._lock:
            self.plan = plan
            self._rng = random.Random(plan.seed)
            self._plan_faults = 0
            self._dropped = set()

    def faults(self) -> int:
        return self.counts["slowdown"] + self.counts["reset"] + self.counts["stall"]

    def start(self) -> "FaultProxy":
        split = urlsplit(self.upstream if "://" in self.upstream else f"http://{self.upstream}")
        self._up = (split.hostname, split.port or 80)
        self._rng = random.Random(self.plan.seed)
        self._plan_faults = 0  # faults injected under the current plan (max_faults bounds it)
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((self.host, self.port))
        self.port = self._server.getsockname()[1]
        self._server.listen(256)
        self._server.settimeout(0.2)
        self._deadline = time.monotonic() + self.lifetime_s
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()
        log.info("fault proxy %s -> %s:%d, plan %s", self.url, *self._up, self.plan)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        log.info("fault proxy %s stopped: %s", self.url, self.counts)

    def _decide(self) -> str:
        with self._lock:
            self.counts["requests"] += 1
            p = self.plan
            r = self._rng.random()
            if p.max_faults is not None and self._plan_faults >= p.max_faults:
                kind = "passed"
            elif r < p.slowdown:
                kind = "slowdown"
            elif r < p.slowdown + p.reset:
                kind = "reset"
            elif r < p.slowdown + p.reset + p.stall:
                kind = "stall"
            else:
                kind = "passed"
            self.counts[kind] += 1
            self._plan_faults += kind != "passed"
            return kind

    def _handle(self, client: socket.socket) -> None:
        client.settimeout(60)
        upstream = None
        try:
            got = _read_head(client)
            if got is None:
                return
            head, rest = got
            method, _, path = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            if method == "GET" and any(k in path for k in self.plan.deny_get):
                with self._lock:
                    self.counts["denied"] = self.counts.get("denied", 0) + 1
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
                               + f"Content-Length: {len(DENIED_BODY)}\r\n".encode() + b"Connection: close\r\n\r\n"
                               + DENIED_BODY)
                return
            rule = next((r for r in self.plan.drop_response if r.split(" ", 1)[0] == method and r.split(" ", 1)[1] in path
                         and r not in self._dropped), None)
            if rule is not None:
                with self._lock:
                    self._dropped.add(rule)
                    self.counts["dropped_response"] = self.counts.get("dropped_response", 0) + 1
                self._forward_and_drop(client, head, rest)
                return
            kind = self._decide() if not self.plan.only or any(k in path for k in self.plan.only) else "passed"
            if kind == "reset":
                _reset(client)
                return
            if kind == "slowdown":
                self._slowdown(client, head, rest)
                return
            if kind == "stall":
                self._stop.wait(self.plan.stall_s)
            upstream = socket.create_connection(self._up, timeout=60)
            upstream.sendall(_with_close(head) + rest)
            pump = threading.Thread(target=self._copy, args=(client, upstream), daemon=True)
            pump.start()
            self._relay_response(upstream, client)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    def _forward_and_drop(self, client: socket.socket, head: bytes, rest: bytes) -> None:
        """The request reaches the store whole and is answered; the client gets a reset."""
        length = int(_header(head, b"content-length") or 0)
        while len(rest) < length:
            chunk = client.recv(65536)
            if not chunk:
                break
            rest += chunk
        with socket.create_connection(self._up, timeout=60) as upstream:
            upstream.sendall(_with_close(head) + rest)
            while upstream.recv(65536):  # the store's whole answer, then nothing of it passed on
                pass
        _reset(client)

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        """Request body, client -> store, until either side closes."""
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                dst.sendall(chunk)
        except OSError:
            pass

    @staticmethod
    def _relay_response(upstream: socket.socket, client: socket.socket) -> None:
        buf = b""
        while True:  # 1xx interim heads pass as they are; the final head gets Connection: close
            got = _read_head(upstream, buf)
            if got is None:
                return
            head, buf = got
            status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b"000"
            if status.startswith(b"1"):
                client.sendall(head)
                continue
            client.sendall(_with_close(head) + buf)
            break
        while True:
            chunk = upstream.recv(65536)
            if not chunk:
                return
            client.sendall(chunk)

    @staticmethod
    def _slowdown(client: socket.socket, head: bytes, rest: bytes) -> None:
        """503 SlowDown, as S3 sends it. A declared body is drained first (up to 16 MiB, while
        it keeps arriving) so the client reads the answer instead of a broken pipe; a client
        that sent `Expect: 100-continue` waits for us, so it is answered at once (as S3 does)."""
        length = _header(head, b"content-length")
        expect = (_header(head, b"expect") or b"").lower() == b"100-continue"
        todo = min(int(length), 16 << 20) - len(rest) if length and length.isdigit() and not expect else 0
        client.settimeout(1.0)
        try:
            while todo > 0:
                chunk = client.recv(min(65536, todo))
                if not chunk:
                    break
                todo -= len(chunk)
        except socket.timeout:
            pass
        client.settimeout(60)
        body = b"" if head.startswith(b"HEAD ") else SLOWDOWN_BODY
        client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                       b"x-amz-request-id: fault-proxy\r\nRetry-After: 0\r\n"
                       + f"Content-Length: {len(SLOWDOWN_BODY)}\r\n".encode() + b"Connection: close\r\n\r\n" + body)
