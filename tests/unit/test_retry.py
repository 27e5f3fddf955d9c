"""The write retry policy: transient errors are retried, others raise at once."""
from __future__ import annotations

import pytest

from sparse_embed.pipeline.store.retry import RetryPolicy, is_transient, with_retries

FAST = RetryPolicy(attempts=4, base_s=0.001, max_s=0.002)


def test_transient_errors_are_retried_until_success():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("When uploading part: AWS Error NETWORK_CONNECTION during CreateMultipartUpload")
        return "ok"

    assert with_retries(flaky, what="upload", policy=FAST) == "ok" and len(calls) == 3


def test_other_errors_raise_at_once():
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("schema mismatch")

    with pytest.raises(ValueError):
        with_retries(broken, what="commit", policy=FAST)
    assert len(calls) == 1


def test_attempts_are_bounded():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionResetError("Connection reset by peer")

    with pytest.raises(ConnectionResetError):
        with_retries(down, what="upload", policy=FAST)
    assert len(calls) == FAST.attempts


@pytest.mark.parametrize("e, transient", [
    (TimeoutError(), True), (RuntimeError("503 Service Unavailable: SlowDown"), True),
    (OSError("curlCode: 56, Failure when receiving data"), True), (KeyError("x"), False), (OSError("Access Denied"), False),
])
def test_is_transient(e, transient):
    assert is_transient(e) is transient
