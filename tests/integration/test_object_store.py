"""The local object store: credentials enforced, restart keeps the endpoint (loopback-only
listening is checked in tests/hardening/test_hardening_hostile.py)."""
from __future__ import annotations

import socket

import pytest

from sparse_embed.infra.object_store import LocalObjectStore

pytestmark = pytest.mark.integration


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
