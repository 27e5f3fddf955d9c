"""Which failures are the object's and which are the infrastructure's.

An object failure is something about the object itself: it is no image, its format is not
decoded, it is too large, it changed or vanished between listing and fetch, or the model
rejects it. It counts toward `--max-attempts`; after that many failures at one etag the
object is given up until it changes.

An infrastructure failure says nothing about the object: credentials missing, expired or
refused, throttling that outlasted the retries, the network, memory (host or CUDA), CUDA
and driver errors. It never counts toward `--max-attempts` (its error row keeps the
object's earlier attempt count), the run exits 1 naming it, and the next run retries it.

The kind is a function of an error row's (stage, error_type, message), so every reader
(the sink, the run report, the diff) decides it the same way.
"""
from __future__ import annotations

OBJECT = "object"
INFRASTRUCTURE = "infrastructure"

# fetch: the object is gone or not what was listed. Anything else at fetch is the store,
# the network or the credentials (PermissionError covers AccessDenied, ExpiredToken,
# InvalidAccessKeyId; OSError covers SlowDown and 5xx after s3fs's retries).
_FETCH_OBJECT_TYPES = {"FileNotFoundError", "ETagMismatch", "IsADirectoryError", "TooLarge"}
# decode and embed: memory is the machine's, not the image's (the pixel guard refuses
# images that are too large before decoding, as DecompressionBomb).
_MEMORY_TYPES = {"MemoryError", "OutOfMemoryError"}
_DEVICE_WORDS = ("cuda", "cudnn", "cublas", "nccl", "out of memory", "allocate memory", "device-side", "driver")


def kind_of(stage: str | None, error_type: str | None, message: str | None) -> str:
    """OBJECT or INFRASTRUCTURE for one error row."""
    etype = error_type or ""
    text = (message or "").lower()
    if stage == "fetch":
        return OBJECT if etype in _FETCH_OBJECT_TYPES else INFRASTRUCTURE
    if etype in _MEMORY_TYPES:
        return INFRASTRUCTURE
    if stage == "embed" and any(w in text for w in _DEVICE_WORDS):
        return INFRASTRUCTURE
    return OBJECT


def attempts_after(stage: str | None, error_type: str | None, message: str | None, before: int) -> int:
    """The attempt count an error row records: one more for an object failure, unchanged
    for an infrastructure failure (so it never gives the object up)."""
    return before + 1 if kind_of(stage, error_type, message) == OBJECT else before
