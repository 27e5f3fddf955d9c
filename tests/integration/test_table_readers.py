"""The embeddings table after a changed day, read by tools this project did not write
(deltalake's QueryBuilder and pyarrow scanner, polars, DuckDB's delta_scan): each returns
exactly the live rows, one per object and no null vector, or (deletion vectors only) the
pyarrow scanner refuses the table. A local source and output (DuckDB's delta extension
reads local tables offline); the same embed job as on S3."""
from __future__ import annotations

import os

import pytest

from helpers import SPEC
from helpers.readers import assert_live_rows
from sparse_embed.infra.synthetic_images import generate
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
from sparse_embed.pipeline.store import live, tables

pytestmark = pytest.mark.integration


def _write(folder, objects):
    for key, data in objects.items():
        path = os.path.join(folder, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


@pytest.mark.parametrize("deletion_vectors", [False, True], ids=["copy-on-write", "deletion-vectors"])
def test_a_changed_day_reads_right_in_every_reader(tmp_path, ray_local, deletion_vectors):
    source, out = str(tmp_path / "images") + "/", str(tmp_path / "out")
    images = generate(16, seed=21, variants=("jpeg",), min_side=32, max_side=48)  # 32 objects
    objects = {im.key: im.data for im in images}
    keys = sorted(objects)
    objects[keys[0]] = b"not an image"  # fails (an error row), fixed the next day
    _write(source, objects)
    cfg = dict(source=source, out=out, spec=SPEC, index_shards=2, rows_per_file=8, deletion_vectors=deletion_vectors)
    first = run_embed(EmbedConfig(**cfg))
    assert first["counts"]["embedded"] == 31 and first["counts"]["failed"] == 1

    # the day: 2 overwritten, 3 deleted, 2 added, the failed one fixed
    _write(source, {keys[1]: objects[keys[20]], keys[2]: objects[keys[21]], keys[0]: images[30].data,
                    "new/a.jpg": images[5].data, "new/b.jpg": images[6].data})
    for k in keys[3:6]:
        os.remove(os.path.join(source, k))
    second = run_embed(EmbedConfig(**cfg))
    c = second["counts"]
    assert (c["changed"], c["deleted"], c["processed"], c["removed_rows"]) == (2, 3, 5, 5), c
    assert second["removal"]["mechanism"] == ("deletion-vectors" if deletion_vectors else "copy-on-write")

    emb = tables.table_uri(out, tables.EMBEDDINGS)
    t = live.read_live(emb, ["image_id", "uri", "etag"])
    expected = sorted(zip(*(t.column(c).to_pylist() for c in ("image_id", "uri", "etag"))))
    listed = sorted(os.path.join(root, f) for root, _, files in os.walk(source) for f in files)
    assert sorted(u for _, u, _ in expected) == listed, "one row per listed object: the fixed one too, no deleted one"
    assert len({i for i, _, _ in expected}) == len(expected)
    assert_live_rows(emb, expected, deletion_vectors=deletion_vectors)
    # and the public Ray reader, which applies deletion vectors where ray.data.read_delta refuses them
    from_ray = live.live_dataset(emb, ["image_id", "uri", "etag"]).take_all()
    assert sorted((r["image_id"], r["uri"], r["etag"]) for r in from_ray) == expected
