"""Hardening, hostile files: nothing the job writes escapes the output prefix whatever the
input keys are; the local object store (the demo's and the tests') listens on loopback only.

A checkpoint carrying a pickle payload is refused without running it: that test lives
beside the checkpoint loader, tests/encoders/test_encoder_interface.py::test_pickle_payload_is_refused_without_running.
"""
from __future__ import annotations

import os
import socket

import pytest

from helpers import SPEC
from sparse_embed.infra.synthetic_images import base_image, encode
from sparse_embed.pipeline.store import storage
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed

pytestmark = pytest.mark.integration


# Names that path logic gets wrong: dot runs, encoded separators, backslashes, a newline,
# a leading dash, and a directory named like a parent reference.
HOSTILE_NAMES = ["..jpg", "...jpg", "a..b.jpg", "..%2F..%2Fescape.jpg", "%2e%2e/x.jpg", "..\\..\\win.jpg",
                 "new\nline.jpg", "-rf.jpg", " lead space.jpg", "..a/..b.jpg", "sub/.hidden.jpg"]


def _jpeg(seed: int = 0) -> bytes:
    import numpy as np

    return encode(base_image(np.random.default_rng(seed), width=40, height=32), "JPEG")


def _tree(root: str) -> dict[str, float]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(root) for f in fs}


def test_local_source_and_output_write_nothing_outside_out(tmp_path, ray_local):
    root = tmp_path / "root"
    src, out, sentinel = root / "src", root / "out", root / "sentinel"
    for d in (src, out, sentinel):
        d.mkdir(parents=True)
    (sentinel / "keep.jpg").write_bytes(b"sentinel")
    for i, name in enumerate(HOSTILE_NAMES):
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(i))
    before = _tree(str(tmp_path))
    parent_before = sorted(os.listdir(tmp_path.parent))
    result = run_embed(EmbedConfig(source=str(src), out=str(out), spec=SPEC, index_shards=1))
    assert result["counts"]["listed"] == len(HOSTILE_NAMES) and result["counts"]["embedded"] == len(HOSTILE_NAMES)
    after = _tree(str(tmp_path))
    changed = {p for p in after if before.get(p) != after[p]}
    outside = sorted(p for p in changed if not p.startswith(str(out) + os.sep))
    assert not outside, f"written outside --out: {outside}"
    assert all(before[p] == after.get(p) for p in before), "an input or the sentinel was changed or removed"
    assert sorted(os.listdir(tmp_path.parent)) == parent_before


def _all_keys(object_store) -> set[str]:
    c = object_store.client()
    keys = set()
    for b in c.list_buckets()["Buckets"]:
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            keys |= {f"{b['Name']}/{o['Key']}" for o in page.get("Contents", [])}
    return keys


def test_s3_source_and_output_write_nothing_outside_out(object_store, ray_local, bucket):
    """SeaweedFS refuses `..` segments, also between backslashes (real S3 accepts them), so S3
    gets every other hostile name; the `..` logic is covered by the local test above."""
    source, out = f"{bucket}/src/", f"{bucket}/out"
    names = [n for n in HOSTILE_NAMES if ".." not in n.replace("\\", "/").split("/")] + ["%2e%2e%2f%2e%2e%2fx.jpg", "a/%2F/b.jpg"]
    storage.put_many(source, {n: _jpeg(i) for i, n in enumerate(names)})
    before = _all_keys(object_store)
    result = run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=1))
    assert result["counts"]["listed"] == len(names) and result["counts"]["failed"] == 0
    new = _all_keys(object_store) - before
    assert new and all(k.startswith(storage.strip_scheme(out) + "/") for k in new), sorted(new)[:10]


def _listening(pid: int) -> list[tuple[str, int]]:
    """(local address, port) of every TCP socket in LISTEN state owned by `pid`, from
    /proc (no psutil)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            addr, port = local.split(":")
            raw = bytes.fromhex(addr)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                ip = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
            found.append((ip, int(port, 16)))
    return found


def _non_loopback_ip() -> str | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.254.254.254", 9))  # UDP connect sends nothing; it picks the outbound address
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") else ip


def test_object_store_listens_on_loopback_only(object_store):
    """The fixture's store is the demo's (`jobs/demo.py` and `sparse-embed store` start the same
    LocalObjectStore): every socket weed mini listens on is bound to loopback, and its S3
    port refuses a connection on this machine's non-loopback address."""
    pid = object_store._proc.pid
    pids = [pid] + [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pid and int(p) != pid]
    socks = [s for p in pids for s in _listening(p)]
    s3_port = int(object_store.endpoint_url.rsplit(":", 1)[1])
    assert any(port == s3_port for _, port in socks), socks
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _ in socks), f"listening beyond loopback: {socks}"
    ip = _non_loopback_ip()
    if ip:
        with pytest.raises(OSError):
            socket.create_connection((ip, s3_port), timeout=2).close()


def _pgid(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None

