"""Search a sharded index: shards cached locally, top-k merged across shards, ids mapped to URIs.

Index directories are immutable once written (a new build gets a new index_id), so the
local cache is keyed by index_id and never needs invalidating.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import storage

CACHE_DIR = Path(os.environ.get("SPARSE_EMBED_CACHE", Path.home() / ".cache" / "sparse-embed"))


def current_index_id(index_root: str) -> str:
    uri = storage.join(index_root, "CURRENT")
    try:
        return storage.read_bytes(uri).decode().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"No index at {index_root!r} (no CURRENT pointer): run `sparse-embed index build` first") from None


def _cached(uri: str, index_id: str) -> str:
    """Local path of `uri`, downloaded once into the cache."""
    if not storage.is_s3(uri):
        return storage.strip_scheme(uri)
    local = CACHE_DIR / "index" / index_id / uri.rsplit("/", 1)[-1]
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(local.suffix + f".tmp-{os.getpid()}")
        tmp.write_bytes(storage.read_bytes(uri))
        os.replace(tmp, local)
    return str(local)


@dataclass
class SearchHit:
    rank: int
    image_id: int
    score: float
    uri: str


class ShardedIndex:
    def __init__(self, manifest: dict, shards: list, uris: dict[int, str]):
        self.manifest = manifest
        self.shards = shards
        self.uris = uris

    @classmethod
    def open(cls, index_root: str, *, index_id: str | None = None) -> "ShardedIndex":
        import faiss
        import pyarrow.parquet as pq

        index_id = index_id or current_index_id(index_root)
        index_dir = storage.join(index_root, index_id)
        manifest = json.loads(storage.read_bytes(storage.join(index_dir, "manifest.json")))
        shards, uris = [], {}
        for s in manifest["shards"]:
            shards.append(faiss.read_index(_cached(storage.join(index_dir, s["file"]), index_id)))
            t = pq.read_table(_cached(storage.join(index_dir, s["ids_file"]), index_id))
            uris.update(zip(t.column("image_id").to_pylist(), t.column("uri").to_pylist()))
        return cls(manifest, shards, uris)

    def search_vectors(self, queries, k: int):
        """(Q, D) float32 -> ids (Q, k), scores (Q, k), best first; -1 pads when ntotal < k."""
        import numpy as np

        from .index_build import merge_topk

        q = np.ascontiguousarray(queries, dtype="float32")
        ids, scores = [], []
        for shard in self.shards:
            s, i = shard.search(q, k)
            ids.append(i)
            scores.append(s)
        return merge_topk(ids, scores, k)

    def hits(self, queries, k: int) -> list[list[SearchHit]]:
        ids, scores = self.search_vectors(queries, k)
        return [[SearchHit(r + 1, int(i), float(s), self.uris.get(int(i), "")) for r, (i, s) in enumerate(zip(row_i, row_s)) if i >= 0]
                for row_i, row_s in zip(ids, scores)]


def embed_queries(images: list[str], manifest: dict):
    """Embed query images (paths or URIs) exactly as the pipeline embedded the table."""
    import numpy as np

    from .decode import ResizePlan, decode_image
    from .embed_actor import EmbedActor

    encoder = manifest.get("encoder")
    if not encoder:
        raise ValueError("The index manifest records no encoder; search by vector or rebuild the index from an embed run")
    actor = EmbedActor(spec=encoder["spec"], expected_version=encoder["model_version"])  # same preprocessing, no Ray
    plan = ResizePlan.from_data_config(actor.encoder.data_config)
    pixels = [decode_image(storage.read_bytes(u), plan)[0].tobytes() for u in images]
    return np.asarray(actor.embed_pixels(pixels))
