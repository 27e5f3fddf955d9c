"""Readers never write: with the local S3 server's read-only identity (Read and List, no
Write), `search`, `index build` (into a local folder) and `serve` work over an output the
embed job wrote, and not one object of the bucket is added, changed or removed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from helpers import SPEC
from helpers.faults import fill
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed

pytestmark = pytest.mark.integration


def _objects(store, bucket: str) -> dict[str, str]:
    """key -> ETag of every object in the bucket, listed with the admin identity."""
    name = bucket.split("://", 1)[1]
    found = {}
    for page in store.client().get_paginator("list_objects_v2").paginate(Bucket=name):
        found.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return found


def _cli(env, *argv):
    done = subprocess.run([sys.executable, "-m", "sparse_embed.jobs.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_reading_a_table_never_probes_the_store_with_a_write(object_store, ray_local, bucket, monkeypatch):
    """The conditional-PUT probe writes (and deletes) an object: only writers may run it."""
    from sparse_embed.pipeline.index.searcher import ShardedIndex
    from sparse_embed.pipeline.store import live, storage, tables

    source, uris = fill(bucket, 2, seed=62)
    out = f"{bucket}/emb"
    run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=1, run_id="night-0"))

    def probe(uri):
        raise AssertionError(f"a reader probed {uri} with a write")

    monkeypatch.setattr(storage, "supports_conditional_put", probe)
    emb = tables.table_uri(out, tables.EMBEDDINGS)
    assert tables.open_table(emb).version() >= 1 and live.read_live(emb, ["uri"]).num_rows == len(uris)
    index = ShardedIndex.open(f"{out}/index")
    vectors, found = index.vectors_for_ids([index.image_id_of_uri(uris[0])])
    assert found == [uris[0]] and vectors.shape[0] == 1
    with pytest.raises(AssertionError, match="a reader probed"):  # a writer still does
        tables.ensure_table(emb, tables.embeddings_schema(vectors.shape[1]))


def test_search_index_build_and_serve_work_with_a_read_only_identity_and_write_nothing(object_store, ray_local, bucket,
                                                                                        tmp_path):
    source, uris = fill(bucket, 3, seed=61)
    out = f"{bucket}/emb"
    run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=1, run_id="night-0"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")} | object_store.reader_env()
    with pytest.raises(Exception, match="AccessDenied|Forbidden|403"):  # the identity really cannot write
        object_store.client(reader=True).put_object(Bucket=bucket.split("://", 1)[1], Key="emb/_written-by-a-reader", Body=b"1")
    before = _objects(object_store, bucket)

    said = _cli(env, "search", "--index", f"{out}/index", "--image", uris[0], "-k", "2", "--json")
    assert json.loads(said.splitlines()[0])["results"][0]["uri"] == uris[0], said
    said = _cli(env, "search", "--index", f"{out}/index", "--image-id", "0", "-k", "1", "--json")
    assert json.loads(said.splitlines()[0])["results"], said
    local_index = tmp_path / "index"
    _cli(env, "index", "build", "--table", f"{out}/embeddings", "--out", str(local_index), "--shards", "1")
    assert (local_index / "CURRENT").is_file()

    proc = subprocess.Popen([sys.executable, "-m", "sparse_embed.jobs.cli", "serve", "--index", f"{out}/index", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert first.startswith("serving index "), first + proc.stderr.read()
        url = first.split(" at ", 1)[1].split()[0]
        for body in ({"uri": uris[1], "k": 2}, {"image_id": 1, "k": 2}):
            request = urllib.request.Request(f"{url}api/search", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                assert json.load(r)["results"], body
        with urllib.request.urlopen(f"{url}api/thumb/1", timeout=60) as r:
            assert r.headers["Content-Type"] == "image/jpeg"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert _objects(object_store, bucket) == before, "a reader wrote to the bucket"
