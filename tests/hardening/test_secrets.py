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
from sparse_embed.pipeline.store import live, storage, tables
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


def _strings(arr) -> list[str]:
    """Every string value in an Arrow array, through structs, lists and maps."""
    import pyarrow as pa
    import pyarrow.types as pt

    if isinstance(arr, pa.ChunkedArray):
        return [s for chunk in arr.chunks for s in _strings(chunk)]
    t = arr.type
    if pt.is_dictionary(t):
        return _strings(arr.dictionary)
    if pt.is_string(t) or pt.is_large_string(t):
        return [s for s in arr.to_pylist() if s is not None]
    if pt.is_struct(t):
        return [s for i in range(t.num_fields) for s in _strings(arr.field(i))]
    if pt.is_map(t):
        return _strings(arr.keys) + _strings(arr.items)
    if pt.is_list(t) or pt.is_large_list(t) or pt.is_fixed_size_list(t):
        return _strings(arr.flatten())
    return []


def _parquet_strings(data: bytes) -> set[str]:
    """The strings of a Parquet file, decompressed: every string value and the key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(pa.BufferReader(data))
    found = {s for col in t.columns for s in _strings(col)}
    meta = t.schema.metadata or {}
    return found | {x.decode("utf-8", "replace") for kv in meta.items() for x in kv}


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

    # Parquet pages are compressed, so their bytes cannot be grepped: every Parquet file (the
    # Delta tables' data and checkpoints, the index's ids files) is read, and every string in
    # it checked. Every other file (run reports, Delta logs, encoder.json, manifests) is text
    # or raw binary and is checked byte for byte.
    fs = storage.filesystem(out)
    written = fs.find(storage.strip_scheme(out))
    assert any("/runs/" in p for p in written) and any("/errors/" in p for p in written) and any("/index/" in p for p in written)
    needles = {"secret": secret, "access key id": object_store.access_key}
    strings: set[str] = set()
    for p in written:
        data = fs.cat_file(p)
        if p.endswith(".parquet"):
            found = _parquet_strings(data)
            strings |= found
            for what, needle in needles.items():
                assert not [v for v in found if needle in v], f"{what} in a string of {p}"
        else:
            for what, needle in needles.items():
                assert needle.encode() not in data, f"{what} in {p}"
    assert {source + k for k in objects} <= strings, "the Parquet files were read: every listed uri is among them"

    err = live.read_live(tables.table_uri(out, tables.ERRORS), ["message"])
    assert err.num_rows == 2 and all(m and secret not in m for m in err.column("message").to_pylist())

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
    with pytest.raises(PermissionError, match="Forbidden") as info:  # s3fs's mapping of the store's 403
        run_embed(EmbedConfig(source=f"{bucket}/images/", out=f"{bucket}/out", spec=SPEC, build_index=False))
    text = "".join(traceback.format_exception(info.value))
    assert wrong not in text and object_store.secret_key not in text
