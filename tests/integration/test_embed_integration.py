"""The whole flow against the real local object store and a real local Ray: embed (with
corrupt objects among the images), index, search, rerun."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import SPEC
from sparse_embed.infra.synthetic_images import generate
from sparse_embed.jobs.demo import corrupt_objects, near_duplicate_recall
from sparse_embed.pipeline.store import live, storage, tables
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
from sparse_embed.pipeline.index.snapshot import vectors_of
from sparse_embed.pipeline.embed.report import summary
from sparse_embed.pipeline.index.searcher import ShardedIndex, embed_queries

pytestmark = pytest.mark.integration

RESNET18 = {**SPEC, "model": "resnet18"}  # a larger model than the other tests' resnet10t
N_BASE = 24


@pytest.fixture(scope="module")
def embedded(object_store, ray_local):
    """One embed run over N_BASE bases x 5 + 3 corrupt objects, plus odd keys."""
    bucket = object_store.create_bucket("integration")
    source, out = f"{bucket}/images/", f"{bucket}/emb"
    images = generate(N_BASE, seed=7)
    odd = {  # keys real buckets hold: spaces, unicode, %, #, ?, +
        "odd/with space.jpg": images[0].data, "odd/ünïcødé.jpg": images[0].data, "odd/100%.jpg": images[0].data,
        "odd/a#b.jpg": images[0].data, "odd/what?.jpg": images[0].data, "odd/a+b.jpg": images[0].data,
    }
    objects = {im.key: im.data for im in images} | corrupt_objects(3) | odd
    storage.put_many(source, objects)
    result = run_embed(EmbedConfig(source=source, out=out, spec=RESNET18, index_shards=3, rows_per_file=16))
    return {"source": source, "out": out, "images": images, "objects": objects, "result": result}


def _table(out, name, cols):
    return live.read_live(tables.table_uri(out, name), cols)


def test_every_listed_object_is_exactly_one_row(embedded):
    out, source = embedded["out"], embedded["source"]
    emb = _table(out, tables.EMBEDDINGS, ["uri", "image_id"])
    err = _table(out, tables.ERRORS, ["uri", "image_id", "stage", "error_type", "message"])
    listed = sorted(source + k for k in embedded["objects"])
    got = emb.column("uri").to_pylist() + err.column("uri").to_pylist()
    assert sorted(got) == listed, "each listed object must be exactly one embedding row or one error row"
    failed = {u.rsplit("/", 1)[-1]: (s, m) for u, s, m in zip(err.column("uri").to_pylist(), err.column("stage").to_pylist(),
                                                              err.column("message").to_pylist())}
    assert set(failed) == {"truncated.jpg", "not_an_image.jpg", "empty.png"}
    assert all(stage == "decode" and msg for stage, msg in failed.values()), failed
    ids = emb.column("image_id").to_pylist() + err.column("image_id").to_pylist()
    assert len(set(ids)) == len(ids) == len(listed)


def test_embeddings_are_unit_norm_float32_with_schema(embedded):
    dt = tables.open_table(tables.table_uri(embedded["out"], tables.EMBEDDINGS))
    t = dt.to_pyarrow_table()
    v = vectors_of(t.column("embedding"))
    assert v.dtype == np.float32 and v.shape == (t.num_rows, 512)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert set(t.column("model").to_pylist()) == {"resnet18"}
    assert set(t.column("model_version").to_pylist()) == {embedded["result"]["model_version"]}
    from PIL import Image
    import io

    expected = {embedded["source"] + k: Image.open(io.BytesIO(v)).size for k, v in embedded["objects"].items()
                if not k.startswith("broken/")}
    got = {u: (w, h) for u, w, h in zip(*(t.column(c).to_pylist() for c in ("uri", "width", "height")))}
    assert all(got[u] == expected[u] for u in got), "width/height are the decoded size before resizing"
    assert all(e and len(e) > 2 for e in t.column("etag").to_pylist())


def test_run_report_counts_and_no_secrets(embedded, object_store):
    out, result = embedded["out"], embedded["result"]
    doc = storage.read_bytes(f"{out}/runs/{result['run_id']}.json").decode()
    report = json.loads(doc)
    n = len(embedded["objects"])
    assert report["counts"]["listed"] == n and report["counts"]["new"] == n
    assert report["counts"]["embedded"] == n - 3 and report["counts"]["failed"] == 3
    # corrupt_objects(3): text under an image name and an empty file are no image; a truncated JPEG fails decoding
    assert report["counts"]["failed_by_reason"] == {"decode:NotAnImage": 2, "decode:DecodeError": 1}
    assert object_store.secret_key not in doc
    assert report["index_id"]
    # every actor of the pool embedded, and forward passes fill part (not more) of the stage
    busy = report["embed_busy"]
    assert len(busy["by_actor"]) == report["actor_pool"]["size"]
    assert all(0.0 < f < 1.0 for f in busy["by_actor"].values())
    assert busy["fraction"] == pytest.approx(sum(busy["by_actor"].values()) / report["actor_pool"]["size"], abs=1e-3)
    assert "embed actors busy" in summary(report)


def test_search_finds_each_variants_base(embedded):
    index = ShardedIndex.open(f"{embedded['out']}/index")
    assert len(index.manifest["shards"]) == 3 and index.manifest["recall_at_10"] == 1.0
    recall = near_duplicate_recall(index, embedded["images"], embedded["source"], embedded["out"])
    assert recall["queries"] == 4 * N_BASE
    assert recall["recall@10"] >= 0.8, recall


def test_search_by_image_embeds_like_the_pipeline(embedded):
    """A query image embedded by the search path equals its row in the table: the same
    decode, resize and encoder, fp32 on the CPU on both sides (atol 1e-5)."""
    source, out = embedded["source"], embedded["out"]
    index = ShardedIndex.open(f"{out}/index")
    uri = source + embedded["images"][5].key
    q = embed_queries([uri], index.manifest)
    t = _table(out, tables.EMBEDDINGS, ["uri", "embedding"])
    stored = vectors_of(t.column("embedding"))[t.column("uri").to_pylist().index(uri)]
    assert q.shape == (1, stored.shape[0]) and q.dtype == np.float32
    np.testing.assert_allclose(q[0], stored, rtol=0, atol=1e-5, err_msg=uri)


def test_rerun_with_nothing_changed_embeds_nothing(embedded):
    out, source = embedded["out"], embedded["source"]
    before = _table(out, tables.EMBEDDINGS, ["uri", "image_id"]).sort_by("uri")
    again = run_embed(EmbedConfig(source=source, out=out, spec=RESNET18, build_index=False))
    assert again["counts"]["embedded"] == 0
    assert again["counts"]["processed"] == 3  # only the failed objects are retried
    after = _table(out, tables.EMBEDDINGS, ["uri", "image_id"]).sort_by("uri")
    assert after.equals(before), "ids and rows are stable across runs"
    err = _table(out, tables.ERRORS, ["uri"])
    assert err.num_rows == 3, "a retried failure replaces its error row"
