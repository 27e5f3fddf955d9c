"""Hardening, secrets: the store's credentials never appear in logs (driver and Ray's log
files), run reports, error rows, anything else the job writes under --out, or the
messages of exceptions it raises."""
from __future__ import annotations

import logging
import os
import traceback

import pytest

from helpers import SPEC
from sparse_embed.infra.synthetic_images import generate
from sparse_embed.pipeline.store import storage, tables
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def own_ray(object_store):
    """No Ray running: the job starts its local Ray itself (infra.ray_launcher.ensure_ray),
    as the CLI does, so the test sees what that path hands to Ray."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


def _ray_log_files() -> list[str]:
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    return [os.path.join(d, f) for d, _, fs in os.walk(logs) for f in fs]


def test_secret_never_written_or_logged(object_store, own_ray, caplog, capfd):
    secret = object_store.secret_key
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret, "the job runs with the secret in its environment"
    bucket = object_store.create_bucket("secrets")
    source, out = f"{bucket}/images/", f"{bucket}/out"
    objects = {im.key: im.data for im in generate(3, seed=31, variants=("jpeg",), min_side=32, max_side=48)}
    objects["broken/html.jpg"] = b"<html>403 Forbidden</html>"
    objects["broken/deleted.jpg"] = b"x"
    storage.put_many(source, objects)
    caplog.set_level(logging.DEBUG)  # botocore, s3fs and ours, at their most talkative
    from sparse_embed.pipeline.embed import listing

    original = listing.list_objects

    def list_then_delete(*a, **kw):  # a fetch error row too
        listed = original(*a, **kw)
        storage.filesystem(source).rm_file(storage.strip_scheme(source + "broken/deleted.jpg"))
        return listed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(listing, "list_objects", list_then_delete)
        result = run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=1))
    assert result["counts"]["failed"] == 2

    captured = capfd.readouterr()
    logs = caplog.text + captured.out + captured.err
    assert len(caplog.records) > 10
    assert secret not in logs, "secret in the driver's logs or output"

    fs = storage.filesystem(out)
    written = [p for p in fs.find(storage.strip_scheme(out))]
    assert any("/runs/" in p for p in written) and any("/errors/" in p for p in written) and any("/index/" in p for p in written)
    for p in written:
        data = fs.cat_file(p)
        assert secret.encode() not in data, f"secret in {p}"
        assert object_store.access_key.encode() not in data, f"access key id in {p}"

    err = tables.read_columns(tables.table_uri(out, tables.ERRORS), ["message", "error_type"])
    assert err.num_rows == 2 and all(secret not in m for m in err.column("message").to_pylist())

    leaked = []
    for path in _ray_log_files():
        try:
            with open(path, "rb") as f:
                if secret.encode() in f.read():
                    leaked.append(os.path.basename(path))
        except OSError:
            continue
    assert not leaked, f"secret in Ray's log files: {leaked}"


def test_exception_messages_carry_no_secret(object_store, bucket, monkeypatch):
    """A wrong secret: the job stops (at listing), and neither its exception text nor its
    traceback shows the credential."""
    wrong = "wrong-secret-" + "7f3a9c" * 4
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(Exception) as info:
        run_embed(EmbedConfig(source=f"{bucket}/images/", out=f"{bucket}/out", spec=SPEC, build_index=False))
    text = "".join(traceback.format_exception(info.value))
    assert wrong not in text and object_store.secret_key not in text
    assert "SignatureDoesNotMatch" in text or "Access" in text or "Forbidden" in text, text[-500:]
