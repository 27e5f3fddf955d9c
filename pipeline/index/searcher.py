"""Search a sharded index: shards cached locally, top-k merged across shards, ids mapped to URIs,
the index's tuned search parameters (nprobe, efSearch) applied on open.

Index directories are immutable once written (a new build gets a new index_id), so the
local cache is keyed by index_id and never needs invalidating.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sparse_embed.pipeline.store import storage
from sparse_embed.pipeline.index.tune import merge_topk

CACHE_DIR = Path(os.environ.get("SPARSE_EMBED_CACHE", Path.home() / ".cache" / "sparse-embed"))


def current_index_id(index_root: str) -> str:
    uri = storage.join(index_root, "CURRENT")
    try:
        return storage.read_bytes(uri).decode().strip()
    except FileNotFoundError as e:
        clear = storage.explain(e, index_root, role="--index")  # an unknown bucket is no missing index
        if clear is not None:
            raise clear from e
        raise FileNotFoundError(f"No index at {index_root!r} (no CURRENT pointer): run `sparse-embed embed SOURCE --out OUT` "
                                f"(it builds OUT/index) or `sparse-embed index build --table OUT/embeddings --out OUT/index` first") from None


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
    uri: str | None  # None when the indexed table has no uri column


class ShardedIndex:
    """The shards of one index (a shard set, or one merged file), searched together."""

    def __init__(self, manifest: dict, shards: list, ids, uris):
        self.manifest = manifest
        self.shards = shards
        self._ids = ids  # (n,) int64, sorted
        self._uris = uris  # pyarrow string array aligned with _ids
        self.set_search_params(manifest.get("search_params") or {})

    @classmethod
    def open(cls, index_root: str, *, index_id: str | None = None) -> "ShardedIndex":
        import faiss
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        index_id = index_id or current_index_id(index_root)
        index_dir = storage.join(index_root, index_id)
        manifest = json.loads(storage.read_bytes(storage.join(index_dir, "manifest.json")))
        shards = [faiss.read_index(_cached(storage.join(index_dir, s["file"]), index_id)) for s in manifest["shards"]]
        ids_files = manifest.get("ids_files") or [s["ids_file"] for s in manifest["shards"]]
        parts = [pq.read_table(_cached(storage.join(index_dir, f), index_id), columns=["image_id", "uri"]) for f in ids_files]
        t = pa.concat_tables(parts) if parts else pa.table({"image_id": pa.array([], pa.int64()), "uri": pa.array([], pa.string())})
        ids = t.column("image_id").to_numpy().astype("int64")
        order = np.argsort(ids, kind="stable")
        return cls(manifest, shards, ids[order], t.column("uri").combine_chunks().take(order))

    def set_search_params(self, params: dict) -> None:
        """nprobe / quantizer_efSearch on every IVF shard (flat shards have none)."""
        import faiss

        ps = faiss.ParameterSpace()
        for shard in self.shards:
            if faiss.try_extract_index_ivf(shard) is None:
                continue
            for name, value in params.items():
                ps.set_index_parameter(shard, name, value)
        self.search_params = dict(params)

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    def search_vectors(self, queries, k: int, *, batch_size: int = 4096):
        """(Q, D) float32 -> ids (Q, k), scores (Q, k), best first; -1 pads when ntotal < k.
        Queries go to faiss in batches of `batch_size` (one call per shard per batch)."""
        import numpy as np

        q = np.ascontiguousarray(queries, dtype="float32")
        if not self.shards:  # the index of an empty table version
            return np.full((len(q), k), -1, dtype="int64"), np.full((len(q), k), -np.inf, dtype="float32")
        out_ids, out_scores = [], []
        for start in range(0, max(1, len(q)), batch_size):
            batch = q[start:start + batch_size]
            ids, scores = [], []
            for shard in self.shards:
                s, i = shard.search(batch, k)
                ids.append(i)
                scores.append(s)
            bi, bs = merge_topk(ids, scores, k)
            out_ids.append(bi)
            out_scores.append(bs)
        return np.concatenate(out_ids), np.concatenate(out_scores)

    def uri_of(self, image_id: int) -> str:
        import numpy as np

        pos = int(np.searchsorted(self._ids, image_id))
        return self._uris[pos].as_py() if pos < len(self._ids) and self._ids[pos] == image_id else None

    @property
    def uris(self) -> dict[int, str]:
        """image_id -> uri for every vector (builds a dict: for small indexes and tests)."""
        return dict(zip(self._ids.tolist(), self._uris.to_pylist()))

    def hits(self, queries, k: int) -> list[list[SearchHit]]:
        ids, scores = self.search_vectors(queries, k)
        return [[SearchHit(r + 1, int(i), float(s), self.uri_of(int(i))) for r, (i, s) in enumerate(zip(row_i, row_s)) if i >= 0]
                for row_i, row_s in zip(ids, scores)]

    def vectors_for_ids(self, image_ids: list[int]):
        """The table rows the index was built from, for `image_ids`: (vectors (n, D) in the
        order asked, uris). Raises ValueError naming ids the table version lacks."""
        return vectors_for_ids(self.manifest["table"], self.manifest.get("table_version"), image_ids)


def vectors_for_ids(table_uri: str, version: int | None, image_ids: list[int]):
    import numpy as np
    import pyarrow.compute as pc

    from sparse_embed.pipeline.store import tables
    from sparse_embed.pipeline.index.snapshot import vectors_of

    dt = tables.open_table(table_uri, version)
    if dt is None:
        raise FileNotFoundError(f"No embeddings table at {table_uri!r} (version {version})")
    wanted = [int(i) for i in image_ids]
    has_uri = "uri" in [f.name for f in dt.schema().fields]
    t = dt.to_pyarrow_dataset().to_table(columns=["image_id", "embedding"] + (["uri"] if has_uri else []),
                                         filter=pc.field("image_id").isin(wanted))
    have = t.column("image_id").to_pylist()
    missing = sorted(set(wanted) - set(have))
    if missing:
        raise ValueError(f"Expected --image-id values present in table {table_uri} v{dt.version()}, "
                         f"got unknown ids {missing[:10]}")
    pos = {i: r for r, i in enumerate(have)}
    rows = [pos[i] for i in wanted]
    vectors = vectors_of(t.column("embedding"))[rows]
    uris = [t.column("uri")[r].as_py() for r in rows] if has_uri else [None] * len(rows)
    return np.ascontiguousarray(vectors, dtype="float32"), uris


def embed_queries(images: list[str], manifest: dict):
    """Embed query images (paths or URIs) with the encoder spec the index records, through the
    pipeline's decode and resize (on this machine's CPU, in fp32)."""
    import numpy as np

    from sparse_embed.pipeline.embed.decode import ResizePlan
    from sparse_embed.pipeline.embed.actor import EmbedActor

    encoder = manifest.get("encoder")
    if not encoder:
        raise ValueError("The index manifest records no encoder; search by vector or rebuild the index from an embed run")
    actor = EmbedActor(spec=encoder["spec"], expected_version=encoder["model_version"])  # same preprocessing, no Ray
    plan = ResizePlan.from_data_config(actor.encoder.data_config)
    pixels = [_query_pixels(u, plan) for u in images]
    return np.asarray(actor.embed_pixels(pixels))


def _query_pixels(uri: str, plan) -> bytes:
    """decode_image with the embed job's guards and default formats; a refusal is a ValueError naming the query."""
    from sparse_embed.pipeline.embed.decode import ALLOWED_FORMATS, DecodeError, UnsupportedFormat, decode_image

    try:
        return decode_image(storage.read_bytes(uri), plan)[0].tobytes()
    except UnsupportedFormat as e:
        raise ValueError(f"Expected a query image in one of {', '.join(ALLOWED_FORMATS)}, got {e.detected} "
                         f"in {uri!r}") from None
    except DecodeError as e:
        raise ValueError(f"Expected a decodable query image, got {uri!r}: {type(e).__name__}: {e}") from None
