"""The local object store: loopback only, credentials enforced, restart keeps the endpoint."""
from __future__ import annotations

import socket

import pytest

from infra.object_store import LocalObjectStore

pytestmark = pytest.mark.integration


def _listening_ports(pid: int) -> set[tuple[str, int]]:
    """(address, port) of TCP sockets in LISTEN state owned by `pid`, from /proc."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                addr, port = local.split(":")
                out.add((addr, int(port, 16)))
    return out


def test_listens_on_loopback_only(object_store):
    ports = _listening_ports(object_store.pid)
    assert ports, "weed mini should listen on some ports"
    # 0100007F is 127.0.0.1 in /proc's little-endian hex
    assert all(addr == "0100007F" for addr, _ in ports), f"non-loopback listeners: {ports}"


def test_wrong_credentials_are_refused(object_store):
    import boto3
    from botocore.exceptions import ClientError

    bad = boto3.client("s3", endpoint_url=object_store.endpoint_url, aws_access_key_id=object_store.access_key,
                       aws_secret_access_key="wrong", region_name="us-east-1")
    with pytest.raises(ClientError):
        bad.list_buckets()


def test_restart_keeps_endpoint_and_data(tmp_path):
    with LocalObjectStore(data_dir=str(tmp_path / "s3")) as store:
        store.create_bucket("keep")
        store.client().put_object(Bucket="keep", Key="a.txt", Body=b"hello")
        endpoint = store.endpoint_url
        store.restart()
        assert store.endpoint_url == endpoint
        assert store.client().get_object(Bucket="keep", Key="a.txt")["Body"].read() == b"hello"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))) != 0, "stopped store no longer answers"
