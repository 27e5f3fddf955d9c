"""The front door: the first errors a newcomer hits are one line naming the cause and the fix,
exit 2 for bad input or configuration, 1 for a failed run, and -v adds the traceback.

Credentials are checked against the real local S3 server (`weed mini`), whose S3 API
requires signed requests with the fixture's key pair. Every check runs before any work:
no Ray is started, nothing is written under OUT.
"""
from __future__ import annotations

import logging
import os
import sys
import uuid

import pytest

from sparse_embed.jobs.cli import main
from sparse_embed.pipeline.store import storage

pytestmark = pytest.mark.integration

EXT = [".jpg,.png"]  # explicit, so the messages do not follow the default extension list
MODEL = ["--model", "resnet10t"]


def _run(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().err.splitlines()


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture
def images(tmp_path):
    """A local SOURCE holding one object that matches --ext (only its name is read)."""
    src = tmp_path / "images"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"not decoded by the checks")
    return str(src)


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No AWS_* keys and empty shared credentials and config files; the endpoint stays."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        empty = tmp_path / name.lower()
        empty.write_text("")
        monkeypatch.setenv(name, str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_the_store_requires_signed_requests(object_store, bucket):
    import s3fs

    anonymous = s3fs.S3FileSystem(anon=True, skip_instance_cache=True, use_listings_cache=False)
    with pytest.raises(PermissionError):
        anonymous.ls(storage.strip_scheme(bucket))


def test_missing_credentials(object_store, bucket, no_credentials, tmp_path, capsys):
    code, err = _run(capsys, "embed", f"{bucket}/images/", "--out", str(tmp_path / "out"), "--ext", *EXT, *MODEL)
    assert err == [
        f"sparse-embed embed: error: No AWS credentials found for SOURCE '{bucket}/images/' (endpoint "
        f"{object_store.endpoint_url}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for "
        f"temporary credentials), or AWS_PROFILE naming a profile in ~/.aws/credentials; AWS_ENDPOINT_URL sets the endpoint"]
    assert code == 2 and not _ray_running() and not (tmp_path / "out").exists()


def test_wrong_secret_for_source(object_store, bucket, monkeypatch, tmp_path, capsys):
    wrong = "wrong-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    code, err = _run(capsys, "embed", f"{bucket}/images/", "--out", str(tmp_path / "out"), "--ext", *EXT, *MODEL)
    assert err == [
        f"sparse-embed embed: error: The S3 endpoint {object_store.endpoint_url} rejected the credentials from the "
        f"environment (AWS_ACCESS_KEY_ID) for SOURCE '{bucket}/images/' (SignatureDoesNotMatch on ListObjectsV2): check "
        f"AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or AWS_PROFILE and ~/.aws/credentials), and that "
        f"AWS_ENDPOINT_URL names the store they belong to"]
    assert code == 2 and not _ray_running()


def test_unknown_access_key_for_out(object_store, bucket, images, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody-" + uuid.uuid4().hex[:8])
    code, err = _run(capsys, "embed", images, "--out", f"{bucket}/out", "--ext", *EXT, *MODEL)
    assert err == [
        f"sparse-embed embed: error: The S3 endpoint {object_store.endpoint_url} rejected the credentials from the "
        f"environment (AWS_ACCESS_KEY_ID) for --out '{bucket}/out' (InvalidAccessKeyId on ListObjectsV2): check "
        f"AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or AWS_PROFILE and ~/.aws/credentials), and that "
        f"AWS_ENDPOINT_URL names the store they belong to"]
    assert code == 2 and not _ray_running()


def test_secrets_never_printed(object_store, bucket, monkeypatch, tmp_path, capsys):
    wrong = "wrong-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    code = main(["-v", "search", "--index", f"{bucket}/index", "--image-id", "1"])
    out = capsys.readouterr()
    assert code == 2 and "Traceback" in out.err
    assert wrong not in out.err + out.out and object_store.secret_key not in out.err + out.out


def test_source_does_not_exist(tmp_path, capsys):
    missing = str(tmp_path / "does" / "not" / "exist")
    code, err = _run(capsys, "embed", missing, "--out", str(tmp_path / "out"), "--ext", *EXT, *MODEL)
    assert err == [f"sparse-embed embed: error: No images to embed: SOURCE '{missing}' does not exist (0 objects listed, "
                   f"filter --ext .jpg,.png): check SOURCE"]
    assert code == 2 and not _ray_running() and not (tmp_path / "out").exists()


def test_source_prefix_holds_nothing(object_store, bucket, tmp_path, capsys):
    code, err = _run(capsys, "embed", f"{bucket}/nothing/", "--out", str(tmp_path / "out"), "--ext", *EXT, *MODEL)
    assert err == [f"sparse-embed embed: error: No images to embed: SOURCE '{bucket}/nothing/' holds no objects "
                   f"(0 objects listed, filter --ext .jpg,.png): check SOURCE"]
    assert code == 2


def test_source_without_matching_objects(object_store, bucket, tmp_path, capsys):
    storage.put_many(f"{bucket}/docs/", {"a.txt": b"text", "photo.jpg": b"jpeg"})
    code, err = _run(capsys, "embed", f"{bucket}/docs/", "--out", str(tmp_path / "out"), "--ext", *EXT,
                     "--glob", "*_large.jpg", *MODEL)
    assert err == [f"sparse-embed embed: error: No images to embed: none of the 2 objects listed under SOURCE "
                   f"'{bucket}/docs/' matches --ext .jpg,.png --glob '*_large.jpg' (e.g. '{bucket}/docs/a.txt'): "
                   f"check --ext and --glob"]
    assert code == 2 and not _ray_running()


def test_local_source_without_matching_objects(tmp_path, capsys):
    src = tmp_path / "notes"
    src.mkdir()
    (src / "readme.txt").write_text("no images here")
    code, err = _run(capsys, "embed", str(src), "--out", str(tmp_path / "out"), "--ext", *EXT, *MODEL)
    assert err == [f"sparse-embed embed: error: No images to embed: none of the 1 objects listed under SOURCE '{src}' "
                   f"matches --ext .jpg,.png (e.g. '{src}/readme.txt'): check --ext and --glob"]
    assert code == 2


def _buckets(object_store) -> set[str]:
    return {b["Name"] for b in object_store.client().list_buckets()["Buckets"]}


def test_unknown_bucket_for_source(object_store, tmp_path, capsys):
    name = f"missing-{uuid.uuid4().hex[:8]}"
    code, err = _run(capsys, "embed", f"s3://{name}/images/", "--out", str(tmp_path / "out"), "--ext", *EXT, *MODEL)
    assert err == [f"sparse-embed embed: error: No bucket '{name}' at the S3 endpoint {object_store.endpoint_url} for "
                   f"SOURCE 's3://{name}/images/': check the bucket name and AWS_ENDPOINT_URL (sparse-embed does not create buckets)"]
    assert code == 2


def test_unknown_bucket_for_out_is_not_created(object_store, images, capsys):
    name = f"missing-{uuid.uuid4().hex[:8]}"
    code, err = _run(capsys, "embed", images, "--out", f"s3://{name}/emb", "--ext", *EXT, *MODEL)
    assert err == [f"sparse-embed embed: error: No bucket '{name}' at the S3 endpoint {object_store.endpoint_url} for "
                   f"--out 's3://{name}/emb': check the bucket name and AWS_ENDPOINT_URL (sparse-embed does not create buckets)"]
    assert code == 2 and name not in _buckets(object_store), "a write probe must not create the bucket (SeaweedFS would)"


def test_out_under_a_file(images, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "emb")
    code, err = _run(capsys, "embed", images, "--out", out, "--ext", *EXT, *MODEL)
    assert err == [f"sparse-embed embed: error: Cannot write under --out '{out}': '{tmp_path / 'afile'}' is a file, "
                   f"not a directory: choose another --out"]
    assert code == 2 and not _ray_running()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_in_a_read_only_directory(images, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = _run(capsys, "embed", images, "--out", str(ro / "emb"), "--ext", *EXT, *MODEL)
    finally:
        ro.chmod(0o755)
    assert err == [f"sparse-embed embed: error: Cannot write under --out '{ro / 'emb'}': Permission denied "
                   f"('{ro / 'emb'}'): choose another --out or make it writable"]
    assert code == 2


def test_s3_out_probe_leaves_nothing(object_store, bucket):
    storage.check_writable(f"{bucket}/emb", role="--out")
    assert storage.filesystem(bucket).find(storage.strip_scheme(bucket)) == []


def test_index_build_checks_out_first(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "index")
    code, err = _run(capsys, "index", "build", "--table", str(tmp_path / "emb" / "embeddings"), "--out", out)
    assert err == [f"sparse-embed index: error: Cannot write under --out '{out}': '{tmp_path / 'afile'}' is a file, "
                   f"not a directory: choose another --out"]
    assert code == 2 and not _ray_running()


def test_nightly_checks_source_first(tmp_path, capsys):
    import yaml

    cfg = tmp_path / "nightly.yaml"
    missing = str(tmp_path / "nowhere")
    cfg.write_text(yaml.safe_dump({"source": missing, "out": str(tmp_path / "out"), "model": "resnet10t",
                                   "extensions": [".jpg", ".png"]}))
    code, err = _run(capsys, "nightly", "--config", str(cfg))
    assert err == [f"sparse-embed nightly: error: No images to embed: source '{missing}' does not exist (0 objects listed, "
                   f"filter extensions .jpg,.png): check source"]
    assert code == 2 and not (tmp_path / "out").exists()


def test_search_before_any_index(tmp_path, capsys):
    index = str(tmp_path / "emb" / "index")
    code, err = _run(capsys, "search", "--index", index, "--image-id", "1")
    assert err == [f"sparse-embed search: error: No index at '{index}' (no CURRENT pointer): run `sparse-embed embed SOURCE "
                   f"--out OUT` (it builds OUT/index) or `sparse-embed index build --table OUT/embeddings --out OUT/index` first"]
    assert code == 2


def test_search_unknown_bucket(object_store, capsys):
    name = f"missing-{uuid.uuid4().hex[:8]}"
    code, err = _run(capsys, "search", "--index", f"s3://{name}/index", "--image-id", "1")
    assert err == [f"sparse-embed search: error: No bucket '{name}' at the S3 endpoint {object_store.endpoint_url} for "
                   f"--index 's3://{name}/index': check the bucket name and AWS_ENDPOINT_URL (sparse-embed does not create buckets)"]
    assert code == 2


def test_verbose_adds_the_traceback(tmp_path, capsys):
    index = str(tmp_path / "index")
    code, err = _run(capsys, "-v", "search", "--index", index, "--image-id", "1")
    assert code == 2 and err[0] == "Traceback (most recent call last):"
    assert err[-1].startswith(f"sparse-embed search: error: No index at '{index}'")


def test_runtime_failure_exits_1(monkeypatch, capsys):
    from sparse_embed.jobs import search

    def fail(args):
        raise RuntimeError("the cluster went away")

    monkeypatch.setattr(search, "run", fail)
    code, err = _run(capsys, "search", "--index", "/nowhere", "--image-id", "1")
    assert code == 1
    assert err == ["sparse-embed search: failed: RuntimeError: the cluster went away",
                   "(rerun the same command to resume; -v shows the traceback)"]


def test_a_ray_task_error_is_reported_as_its_cause(monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    from sparse_embed.jobs import search

    def fail(args):
        raise RayTaskError("list_prefixes", "remote traceback\nline 2", ValueError("Expected a prefix")).as_instanceof_cause()

    monkeypatch.setattr(search, "run", fail)
    code, err = _run(capsys, "search", "--index", "/nowhere", "--image-id", "1")
    assert (code, err) == (2, ["sparse-embed search: error: Expected a prefix"])


@pytest.fixture
def restore_log_levels():
    from sparse_embed.jobs.cli import QUIET_LOGGERS

    names = (*QUIET_LOGGERS, "faiss.loader", "sparse_embed")
    saved = {n: logging.getLogger(n).level for n in names} | {"": logging.getLogger().level}
    yield
    for n, level in saved.items():
        logging.getLogger(n or None).setLevel(level)


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_info_only_with_v(verbose, restore_log_levels, monkeypatch):
    import ray

    from sparse_embed.infra import ray_launcher
    from sparse_embed.jobs.cli import setup_logging

    setup_logging(verbose)
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)  # basicConfig acts once per process
    for name in ("botocore", "s3fs", "urllib3", "deltalake"):
        assert logging.getLogger(name).isEnabledFor(logging.INFO) == verbose, name
    assert logging.getLogger("sparse_embed.stages").isEnabledFor(logging.INFO)

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_launcher.ensure_ray()
    assert seen["log_to_driver"] == verbose
    assert seen["logging_level"] == (logging.INFO if verbose else logging.WARNING)
