"""The retry policy for object-store writes and commits the clients do not retry themselves.

Ray Data does not retry a custom Datasink's write task, and deltalake does not retry a
commit whose connection was reset: both surface as OSError / RuntimeError text. Only
errors that say they are transient are retried; everything else raises at once.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION", "Connection reset", "connection reset", "SlowDown", "SLOW_DOWN", "503",
    "Service Unavailable", "SERVICE_UNAVAILABLE", "curlCode", "timed out", "Timeout", "Broken pipe",
    "Connection refused", "INTERNAL_FAILURE",
)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # total tries
    base_s: float = 0.5  # first back-off; doubles each try, with +-50 % jitter
    max_s: float = 10.0


WRITE_POLICY = RetryPolicy()


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__}: {e}"
    return any(m in text for m in TRANSIENT_MARKERS)


def with_retries(fn, *, what: str, policy: RetryPolicy = WRITE_POLICY):
    """Call fn() until it succeeds, a non-transient error is raised, or attempts run out.
    fn must be safe to repeat."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == policy.attempts or not is_transient(e):
                raise
            delay = min(policy.max_s, policy.base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            log.warning("%s failed (%s), retry %d/%d in %.1f s", what, type(e).__name__, attempt, policy.attempts - 1, delay)
            time.sleep(delay)
