"""Object failures count toward --max-attempts; infrastructure failures never give an object up."""
from __future__ import annotations

import pytest

from sparse_embed.pipeline.embed.failures import INFRASTRUCTURE, OBJECT, attempts_after, kind_of


@pytest.mark.parametrize("stage, etype, message, kind", [
    ("decode", "NotAnImage", "no image format recognised", OBJECT),
    ("decode", "UnsupportedFormat", "TGA is not decoded", OBJECT),
    ("decode", "DecompressionBomb", "too many pixels", OBJECT),
    ("decode", "OSError", "broken data stream", OBJECT),
    ("fetch", "ETagMismatch", "changed after listing", OBJECT),
    ("fetch", "FileNotFoundError", "NoSuchKey", OBJECT),
    ("embed", "ValueError", "input has the wrong shape", OBJECT),
    ("fetch", "PermissionError", "ExpiredToken: the provided token has expired", INFRASTRUCTURE),
    ("fetch", "PermissionError", "Access Denied", INFRASTRUCTURE),
    ("fetch", "OSError", "SlowDown: reduce your request rate", INFRASTRUCTURE),
    ("fetch", "ConnectionError", "Connection reset by peer", INFRASTRUCTURE),
    ("fetch", "TimeoutError", "", INFRASTRUCTURE),
    ("decode", "MemoryError", "", INFRASTRUCTURE),
    ("embed", "OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB", INFRASTRUCTURE),
    ("embed", "RuntimeError", "CUDA error: an illegal memory access was encountered", INFRASTRUCTURE),
    ("embed", "RuntimeError", "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes. "
                               "Error code 12 (Cannot allocate memory)", INFRASTRUCTURE),
])
def test_kind_of_each_failure(stage, etype, message, kind):
    assert kind_of(stage, etype, message) == kind


def test_only_object_failures_add_an_attempt():
    assert attempts_after("decode", "NotAnImage", "x", 0) == 1
    assert attempts_after("decode", "NotAnImage", "x", 2) == 3
    assert attempts_after("fetch", "PermissionError", "ExpiredToken", 0) == 0
    assert attempts_after("fetch", "PermissionError", "ExpiredToken", 2) == 2
