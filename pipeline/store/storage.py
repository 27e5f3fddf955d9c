"""Object-store access for every stage: one place that turns a URI into a filesystem.

Endpoints and credentials come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, profiles), which boto3, s3fs,
pyarrow and deltalake all read; nothing here replaces them. Local paths and file://
URIs work everywhere an s3:// URI does.
"""
from __future__ import annotations

import os
import posixpath
from urllib.parse import urlsplit

S3_SCHEMES = ("s3", "s3a")


def scheme_of(uri: str) -> str:
    return urlsplit(uri).scheme if "://" in uri else "file"


def is_s3(uri: str) -> bool:
    return scheme_of(uri) in S3_SCHEMES


def join(base: str, *parts: str) -> str:
    """Join URI path parts with `/`, keeping the scheme and bucket of `base`."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def strip_scheme(uri: str) -> str:
    """`s3://b/k` -> `b/k`; local paths are made absolute."""
    if is_s3(uri):
        return uri.split("://", 1)[1]
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(uri)


def with_scheme(path: str, like: str) -> str:
    """The inverse of strip_scheme for a path listed under the URI `like`."""
    return f"{scheme_of(like)}://{path}" if is_s3(like) else path


def filesystem(uri: str):
    """An fsspec filesystem for `uri` (s3fs for s3://), configured from the environment."""
    import fsspec

    if is_s3(uri):
        # s3fs reads AWS_ENDPOINT_URL through botocore; listings must not be cached
        # across stages of one run, since objects change between listing and fetch.
        return fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True)
    return fsspec.filesystem("file")


def arrow_filesystem(uri: str):
    """A pyarrow filesystem plus the path inside it, for Parquet reads and writes."""
    import pyarrow.fs as pafs

    if is_s3(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            split = urlsplit(endpoint)
            kwargs["endpoint_override"] = split.netloc
            kwargs["scheme"] = split.scheme or "https"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), strip_scheme(uri)
    return pafs.LocalFileSystem(), strip_scheme(uri)


def delta_storage_options(uri: str) -> dict[str, str] | None:
    """deltalake storage options: the environment already carries credentials; these only
    add what deltalake cannot infer. Only one driver commits per output prefix (the
    nightly takes a lock), so S3's lack of atomic rename is safe to accept."""
    if not is_s3(uri):
        return None
    opts = {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and endpoint.startswith("http://"):
        opts["AWS_ALLOW_HTTP"] = "true"
    return opts


def read_bytes(uri: str) -> bytes:
    return filesystem(uri).cat_file(strip_scheme(uri))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Object stores make a single PUT atomic; locally, write aside and rename."""
    fs = filesystem(uri)
    path = strip_scheme(uri)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def exists(uri: str) -> bool:
    return filesystem(uri).exists(strip_scheme(uri))


def put_many(prefix: str, objects: dict[str, bytes]) -> list[str]:
    """Write `objects` (key relative to `prefix` -> bytes); s3fs sends them concurrently.
    Returns their URIs."""
    fs = filesystem(prefix)
    root = strip_scheme(prefix).rstrip("/")
    if not is_s3(prefix):
        for key in objects:
            os.makedirs(posixpath.dirname(f"{root}/{key}"), exist_ok=True)
    fs.pipe({f"{root}/{k}": v for k, v in objects.items()})
    return [join(prefix, k) for k in objects]
