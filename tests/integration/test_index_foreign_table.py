"""`index build`, `index update` and `search` on a table another tool wrote: only image_id
and embedding (list<float32>, as Delta stores arrays), no uri, etag or model columns."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from helpers import unit_vectors
from sparse_embed.jobs.cli import main
from sparse_embed.pipeline.index.searcher import ShardedIndex
from sparse_embed.pipeline.store import tables

pytestmark = pytest.mark.integration


def _append(uri, ids, vectors, *, columns=("image_id", "embedding")):
    data = {"image_id": pa.array(ids, pa.int64()),
            "embedding": pa.array(list(vectors), pa.list_(pa.float32())),
            "label": pa.array([f"x{i}" for i in ids])}
    t = pa.table({c: data[c] for c in columns})
    tables.append(uri, t, t.schema)


def test_build_update_and_search_a_table_with_only_ids_and_embeddings(ray_local, bucket, capsys):
    table, root = f"{bucket}/other/embeddings", f"{bucket}/other/index"
    vectors = unit_vectors(300, 16, seed=11)
    _append(table, np.arange(300), vectors[:300])
    assert main(["index", "build", "--table", table, "--out", root, "--shards", "2"]) == 0
    assert "300 vectors" in capsys.readouterr().out

    # Search by id: no uri column, so the query and the hits are named by image_id.
    assert main(["search", "--index", root, "--image-id", "7", "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "query image_id 7"
    assert out[1].split() == ["1", "1.0000", "image_id", "7"]
    assert main(["search", "--index", root, "--image-id", "7", "-k", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["results"][0]["image_id"] == 7 and doc["results"][0]["uri"] is None

    # An update without etags compares ids: 50 new rows are added, nothing else changes.
    more = unit_vectors(50, 16, seed=12)
    _append(table, np.arange(300, 350), more)
    assert main(["index", "update", "--table", table, "--out", root]) == 0
    index = ShardedIndex.open(root)
    assert index.ntotal == 350 and index.manifest["update"] == {**index.manifest["update"], "added": 50, "removed": 0}
    ids, scores = index.search_vectors(more[:5], 1)
    assert ids[:, 0].tolist() == [300, 301, 302, 303, 304]


def test_a_table_without_embeddings_is_named_in_one_line(ray_local, bucket, capsys):
    table = f"{bucket}/labels/embeddings"
    _append(table, np.arange(10), unit_vectors(10, 4, seed=1), columns=("image_id", "label"))
    assert main(["index", "build", "--table", table, "--out", f"{bucket}/labels/index"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0] == (f"sparse-embed index: error: Table {table!r} has no 'embedding' column: an index needs image_id "
                      f"(int64) and embedding (list of float32); it has image_id, label")
