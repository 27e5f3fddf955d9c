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


ARROW_S3_ATTEMPTS = 10  # tries of one pyarrow S3 request (throttling, 5xx, resets)


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
        # pyarrow's default is 3 attempts: three 503 SlowDowns in a row then fail a diff or
        # read task; the standard strategy backs off between attempts (as deltalake's 10 retries)
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=ARROW_S3_ATTEMPTS)
        return pafs.S3FileSystem(**kwargs), strip_scheme(uri)
    return pafs.LocalFileSystem(), strip_scheme(uri)


def delta_storage_options(uri: str, *, write: bool) -> dict[str, str] | None:
    """deltalake storage options: the environment already carries credentials; these only
    add what deltalake cannot infer. Delta commits are safe on S3 only if a commit can be
    written "if absent": where the store honours conditional writes (If-None-Match; AWS S3
    since 2024-08, MinIO, SeaweedFS), deltalake uses them (`conditional_put: etag`) and two
    writers can never overwrite each other's commit. Elsewhere it falls back to an unsafe
    rename, which is safe only because every writer holds the output lock. Finding out
    takes a probe write, so only a writer (`write`) asks: a reader's options name neither,
    it needs no write permission and writes nothing (and deltalake refuses a commit
    through a table opened that way)."""
    if not is_s3(uri):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    opts = {}
    if write:
        opts = {"conditional_put": "etag"} if supports_conditional_put(uri) else {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"}
    if endpoint and endpoint.startswith("http://"):
        opts["AWS_ALLOW_HTTP"] = "true"
    return opts


_CONDITIONAL_PUT: dict[tuple, bool] = {}


def supports_conditional_put(uri: str) -> bool:
    """Whether the store refuses a second PUT of one key with If-None-Match: * (tried once
    per endpoint and bucket in a process: one probe object written twice, then deleted)."""
    import uuid

    import boto3

    bucket, _, prefix = strip_scheme(uri).partition("/")
    key = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"), bucket)
    if key not in _CONDITIONAL_PUT:
        client = boto3.client("s3")
        probe = f"{prefix.rstrip('/')}/_probe-{uuid.uuid4().hex}".lstrip("/")
        try:
            client.put_object(Bucket=bucket, Key=probe, Body=b"1", IfNoneMatch="*")
        except Exception:  # noqa: BLE001 - cannot write here (a reader): the commit options do not matter
            return False
        try:
            client.put_object(Bucket=bucket, Key=probe, Body=b"2", IfNoneMatch="*")
            _CONDITIONAL_PUT[key] = False  # overwritten: the store ignores the header
        except Exception as e:  # noqa: BLE001 - only a refusal of the precondition counts
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            _CONDITIONAL_PUT[key] = code in ("PreconditionFailed", "412", "ConditionalRequestConflict")
        finally:
            try:
                client.delete_object(Bucket=bucket, Key=probe)
            except Exception:  # noqa: BLE001 - a leftover 1-byte probe is harmless
                pass
    return _CONDITIONAL_PUT[key]


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


# -- storage errors a person can fix: one line naming the URI, the endpoint and the fix ----------

# What boto3, s3fs, pyarrow and deltalake read, named in every credentials message.
SET_CREDENTIALS = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
                   "credentials), or AWS_PROFILE naming a profile in ~/.aws/credentials; AWS_ENDPOINT_URL sets the endpoint")
CHECK_CREDENTIALS = ("check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or AWS_PROFILE and "
                     "~/.aws/credentials), and that AWS_ENDPOINT_URL names the store they belong to")
# S3 error codes: the endpoint refused the credentials themselves...
_REJECTED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
             "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
# ...or accepted them but refuses the operation (a HEAD request's 403 has no body, so no code: either).
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}
_CREDENTIAL_SOURCES = {"env": "the environment (AWS_ACCESS_KEY_ID)", "shared-credentials-file": "~/.aws/credentials",
                       "config-file": "~/.aws/config"}


class StorageError(Exception):
    """Base of the errors `explain` makes; the CLI prints their message as it is."""


class CredentialsError(StorageError, PermissionError):
    """No credentials, credentials the endpoint rejected, or credentials without access."""


class BucketNotFound(StorageError, FileNotFoundError):
    pass


class NotWritable(StorageError, PermissionError):
    pass


def endpoint_url() -> str:
    """The S3 endpoint botocore resolves from the environment and profiles (no request is made;
    dummy keys keep it from searching for credentials)."""
    try:
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", aws_access_key_id="-", aws_secret_access_key="-").meta.endpoint_url
    except Exception:  # a broken profile: report what the environment says
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"


def _credentials_source() -> str:
    try:
        import botocore.session

        method = botocore.session.get_session().get_credentials().method
    except Exception:
        return "the credential chain"
    return _CREDENTIAL_SOURCES.get(method, method)


def _causes(e: BaseException):
    """`e`, then what caused it: chained exceptions, and the remote error of a Ray task."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        ray_cause = getattr(e, "cause", None)
        e = e.__cause__ or (ray_cause if isinstance(ray_cause, BaseException) else None) or \
            (None if e.__suppress_context__ else e.__context__)


def explain(e: BaseException, uri: str | None = None, *, role: str = "") -> Exception | None:
    """The one-line error for a storage failure (missing or rejected credentials, access denied,
    unknown bucket, unreachable endpoint) found in `e` or its causes, naming `role uri` when
    given (e.g. role "--out"); None when `e` is none of these or already explained."""
    import botocore.exceptions as bx

    if isinstance(e, StorageError):
        return None
    what = f" for {role + ' ' if role else ''}{uri!r}" if uri else ""
    for cause in _causes(e):
        if isinstance(cause, StorageError):
            return None
        if isinstance(cause, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return CredentialsError(f"No AWS credentials found{what} (endpoint {endpoint_url()}): {SET_CREDENTIALS}")
        if isinstance(cause, bx.ProfileNotFound):
            return CredentialsError(f"AWS_PROFILE {cause.kwargs.get('profile')!r} is in neither ~/.aws/credentials nor "
                                    f"~/.aws/config{what}: name a profile there, or unset AWS_PROFILE and set "
                                    f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if isinstance(cause, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
            return ConnectionError(f"Cannot reach the S3 endpoint {endpoint_url()}{what}: check AWS_ENDPOINT_URL and the network")
        if isinstance(cause, bx.ClientError):
            code = str(cause.response.get("Error", {}).get("Code", ""))
            op = cause.operation_name
            if code in _REJECTED:
                return CredentialsError(f"The S3 endpoint {endpoint_url()} rejected the credentials from {_credentials_source()}"
                                        f"{what} ({code} on {op}): {CHECK_CREDENTIALS}")
            if code in _DENIED:
                return CredentialsError(f"The S3 endpoint {endpoint_url()} denied {op}{what} ({code}): the credentials from "
                                        f"{_credentials_source()} are wrong or may not access it; {CHECK_CREDENTIALS}")
            if code == "NoSuchBucket":
                bucket = strip_scheme(uri).split("/", 1)[0] if uri and is_s3(uri) else cause.response.get("Error", {}).get("BucketName")
                return BucketNotFound(f"No bucket {bucket!r} at the S3 endpoint {endpoint_url()}{what}: check the bucket "
                                      f"name and AWS_ENDPOINT_URL (sparse-embed does not create buckets)")
    return None


def _raise_explained(e: Exception, uri: str, role: str):
    """Re-raise `e` (being handled) explained when `explain` knows it, else as it is."""
    clear = explain(e, uri, role=role)
    if clear is None:
        raise e
    raise clear from e


def _s3_bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = strip_scheme(uri).partition("/")
    return bucket, key.strip("/")


def check_readable(uri: str, *, role: str) -> None:
    """On S3, one listing request under `uri`: fails (explained) on missing or rejected
    credentials, no access or an unknown bucket. Local paths are the caller's business."""
    if not is_s3(uri):
        return
    bucket, key = _s3_bucket_key(uri)
    try:
        filesystem(uri).call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
    except Exception as e:
        _raise_explained(e, uri, role)


def check_writable(uri: str, *, role: str = "--out") -> None:
    """Write and delete a probe object under `uri`, so that an output prefix that cannot be
    written fails before any work starts. Local directories are created as the job would."""
    import uuid

    probe = join(uri, f".sparse-embed-probe-{uuid.uuid4().hex[:12]}")
    if is_s3(uri):
        # The listing first: SeaweedFS creates a missing bucket on PUT (S3 refuses with NoSuchBucket).
        check_readable(uri, role=role)
        fs = filesystem(uri)
        try:
            fs.pipe_file(strip_scheme(probe), b"")
            fs.rm_file(strip_scheme(probe))
        except Exception as e:
            _raise_explained(e, uri, role)
        return
    path = strip_scheme(uri)
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotWritable(f"Cannot write under {role} {uri!r}: {parent!r} is a file, not a directory: choose another {role}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(strip_scheme(probe), "wb"):
            pass
        os.remove(strip_scheme(probe))
    except OSError as e:
        raise NotWritable(f"Cannot write under {role} {uri!r}: {e.strerror} ({e.filename!r}): choose another {role} "
                          f"or make it writable") from e
