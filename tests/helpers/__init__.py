"""Helpers shared by the tests (not test modules; pytest puts tests/ on sys.path): the one
encoder SPEC the embed-job tests use, and synthetic embeddings tables with exact ground truth."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from sparse_embed.pipeline.store import tables

# resnet10t, random init (seeded in the encoder factory): the smallest timm model that embeds
SPEC = {"model": "resnet10t", "checkpoint": None, "model_args": {}, "pool": "token", "fuse_last_two": False, "proj_dim": None}


def unit_vectors(n, d, seed):
    """(n, d) float32 rows of unit length, seeded."""
    v = np.random.default_rng(seed).standard_normal((n, d)).astype("float32")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_table(uri, vectors, ids, files, etag="e", run_id="r"):
    """An embeddings table at `uri` holding `vectors` under `ids`, in `files` appends (rows of run `run_id`)."""
    schema = tables.embeddings_schema(vectors.shape[1])
    for chunk in np.array_split(np.arange(len(ids)), files):
        t = pa.table({
            "image_id": pa.array(ids[chunk], pa.int64()), "uri": [f"s3://b/img_{i}.jpg" for i in ids[chunk]],
            "etag": [etag] * len(chunk), "size": pa.array([1] * len(chunk), pa.int64()),
            "mtime": pa.array([None] * len(chunk), pa.timestamp("us", tz="UTC")),
            "width": pa.array([1] * len(chunk), pa.int32()), "height": pa.array([1] * len(chunk), pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors[chunk].reshape(-1)), vectors.shape[1]),
            "model": ["m"] * len(chunk), "model_version": ["v"] * len(chunk), "run_id": [run_id] * len(chunk),
        })
        tables.append(uri, t, schema)


def positions_of(uri, ids):
    """[(DataFile, physical positions)] of the live rows of `ids` in the table at `uri`."""
    from sparse_embed.pipeline.store import live

    out = []
    for f in live.table_files(uri).files:
        t = live.read_file(uri, f, ["image_id"], positions=True)
        hit = np.isin(t.column("image_id").to_numpy(), np.asarray(list(ids), dtype="int64"))
        if hit.any():
            out.append((f, t.column("_row").to_numpy()[hit]))
    return out


def remove_ids(uri, ids, tag):
    """Remove the live rows of `ids` as a nightly does (one commit, the table's mechanism)."""
    from sparse_embed.pipeline.store import removal

    return removal.remove_positions(uri, positions_of(uri, ids), tag=tag)
