"""Search a sharded index: shards streamed into a local cache and opened memory-mapped, top-k
merged across shards, ids mapped to URIs through memory-mapped id maps (idmap.py), the
index's tuned search parameters (nprobe, efSearch) applied on open.

An index is its manifest's shards: the base shards of a build, plus the delta shards of
later updates (update.py), which may live in the directory of an earlier index_id (an
entry's "index_id"). Ids removed from the base shards since the build form the manifest's
deletion set, applied at search time through an IDSelector on the base shards only.

Index directories are immutable once written (a new build or update gets a new index_id),
so the local cache (CACHE_DIR/index/<index root's key>/<index_id>/) is keyed by the index_id
that owns each file and never needs invalidating; an update's index shares its base
shards' cached files with its parent. A long-lived searcher removes the cached index ids
its new index no longer uses (`prune_cache`), so nightly indexes do not fill the disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sparse_embed.pipeline.store import storage
from sparse_embed.pipeline.index.tune import merge_topk


CACHE_DIR = Path(os.environ.get("SPARSE_EMBED_CACHE", Path.home() / ".cache" / "sparse-embed"))
CACHE_KEEP_S = 3600.0  # prune_cache leaves an index_id touched this recently (another process may be fetching it)


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


def read_manifest(index_root: str, index_id: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(index_root, index_id, "manifest.json")))


def file_uri(index_root: str, manifest: dict, entry: dict) -> str:
    """URI of a manifest entry's file (a shard, an id map): in the directory of the index_id
    the entry names (an update's base shards stay in the build's directory), else the manifest's."""
    return storage.join(index_root, entry.get("index_id") or manifest["index_id"], entry["file"])


def shard_uris(index_root: str, manifest: dict) -> list[str]:
    """Every shard file of the index, base shards first, then delta shards."""
    return [file_uri(index_root, manifest, s) for s in manifest["shards"]]


def cache_root(index_root: str) -> Path:
    """The cache folder of one index root: index ids of different roots never meet."""
    return CACHE_DIR / "index" / hashlib.sha256(index_root.rstrip("/").encode()).hexdigest()[:16]


def referenced_ids(manifest: dict) -> set[str]:
    """The index_ids whose directories hold a file of `manifest`'s index."""
    entries = list(manifest.get("shards") or []) + id_map_entries(manifest) + [manifest.get("deleted") or {}]
    return {manifest["index_id"]} | {e["index_id"] for e in entries if e.get("index_id")}


def prune_cache(index_root: str, keep: set[str], *, min_age_s: float | None = None, now: float | None = None) -> list[str]:
    """Remove the cached files of `index_root`'s index ids outside `keep` that nothing has
    written for `min_age_s` (CACHE_KEEP_S). Files a process still has memory-mapped stay
    readable by it until it closes them (an unlinked file lives on while mapped). Returns
    the removed ids."""
    base = cache_root(index_root)
    now = time.time() if now is None else now
    min_age_s = CACHE_KEEP_S if min_age_s is None else min_age_s
    removed = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if not d.is_dir() or d.name in keep:
            continue
        newest = max([f.stat().st_mtime for f in d.iterdir()] + [d.stat().st_mtime])
        if now - newest >= min_age_s:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def _cached(uri: str, index_root: str, index_id: str) -> str:
    """Local path of `uri`: the file itself when local, else a copy in the cache, downloaded
    once by streaming (s3fs reads it in blocks; the whole file is never in memory)."""
    if not storage.is_s3(uri):
        return storage.strip_scheme(uri)
    local = cache_root(index_root) / index_id / uri.rsplit("/", 1)[-1]
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(local.suffix + f".tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            storage.filesystem(uri).get_file(storage.strip_scheme(uri), str(tmp))
            os.replace(tmp, local)
        finally:
            if tmp.exists():
                tmp.unlink()
    return str(local)


def open_shard(path: str, *, mmap: bool = True):
    """A shard file as a faiss index: memory-mapped and read-only (flat codes and IVF lists
    stay in the page cache, not in this process's heap), or read fully (mmap False)."""
    import faiss

    if not mmap:
        return faiss.read_index(path)
    base = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(path, base | faiss.IO_FLAG_MMAP_IFC)  # flat codes mapped too
    except RuntimeError:  # IVF: its lists are mapped by IO_FLAG_MMAP; faiss refuses IFC there
        return faiss.read_index(path, base)


def _id_map_path(index_root: str, manifest: dict, entry: dict) -> str:
    """Local path of an id map run: a written .arrow run, or one made once in the cache from
    an ids Parquet file of an index written before id maps (sorted within that file)."""
    owner = entry.get("index_id") or manifest["index_id"]
    uri = file_uri(index_root, manifest, entry)
    if entry["file"].endswith(".arrow"):
        return _cached(uri, index_root, owner)
    import pyarrow.parquet as pq

    from sparse_embed.pipeline.index.idmap import write_id_map

    local = cache_root(index_root) / owner / (entry["file"].rsplit(".", 1)[0] + ".arrow")
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        t = pq.read_table(_cached(uri, index_root, owner))
        names = t.column_names
        write_id_map(str(local), t.column("image_id"), t.column("uri") if "uri" in names else None,
                     t.column("etag") if "etag" in names else None)
    return str(local)


def id_map_entries(manifest: dict) -> list[dict]:
    """The manifest's id map runs, oldest first: "id_maps" entries, else its ids files."""
    if manifest.get("id_maps") is not None:
        return manifest["id_maps"]
    files = manifest.get("ids_files") or [s["ids_file"] for s in manifest["shards"] if "ids_file" in s]
    return [{"file": f} for f in files]


def read_deleted(index_root: str, manifest: dict):
    """The deletion set (sorted int64 ids removed from the base shards), empty when none."""
    import numpy as np

    entry = manifest.get("deleted")
    if not entry or not entry.get("count"):
        return np.zeros(0, dtype="int64")
    path = _cached(file_uri(index_root, manifest, entry), index_root, entry.get("index_id") or manifest["index_id"])
    return np.load(path)


@dataclass
class SearchHit:
    rank: int
    image_id: int
    score: float
    uri: str | None  # None when the indexed table has no uri column


class ShardedIndex:
    """The shards of one index (a shard set, or one merged file, plus delta shards), searched together."""

    def __init__(self, manifest: dict, shards: list, id_maps, deleted=None, delta: list[bool] | None = None):
        import numpy as np

        self.manifest = manifest
        self.shards = shards
        self.id_maps = id_maps  # idmap.IdMapSet
        self.deleted = np.zeros(0, dtype="int64") if deleted is None else deleted  # sorted; hidden in base shards
        self.delta = delta or [False] * len(shards)  # which shards are an update's delta (no deletion set)
        self._selector = None
        if len(self.deleted):
            import faiss

            self._selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.deleted))
        self.set_search_params(manifest.get("search_params") or {})

    @classmethod
    def open(cls, index_root: str, *, index_id: str | None = None, mmap: bool = True) -> "ShardedIndex":
        """Stream the index's files into the cache (S3) and open them memory-mapped (or read
        fully with mmap=False); opening reads no vector into this process's heap."""
        from sparse_embed.pipeline.index.idmap import IdMap, IdMapSet

        index_id = index_id or current_index_id(index_root)
        manifest = read_manifest(index_root, index_id)
        shards = [open_shard(_cached(file_uri(index_root, manifest, s), index_root, s.get("index_id") or index_id), mmap=mmap)
                  for s in manifest["shards"]]
        entries = id_map_entries(manifest)
        runs = [IdMap(_id_map_path(index_root, manifest, e)) for e in entries]
        first_live = next((i for i, e in enumerate(entries) if e.get("delta")), len(entries))
        deleted = read_deleted(index_root, manifest)
        return cls(manifest, shards, IdMapSet(runs, deleted, first_live), deleted,
                   [bool(s.get("delta")) for s in manifest["shards"]])

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
        self._params = [None if (d or self._selector is None) else _selector_params(s, self._selector)
                        for s, d in zip(self.shards, self.delta)]

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards) - len(self.deleted))

    def search_vectors(self, queries, k: int, *, batch_size: int = 4096):
        """(Q, D) float32 -> ids (Q, k), scores (Q, k), best first; -1 pads when ntotal < k.
        Queries go to faiss in batches of `batch_size` (one call per shard per batch); the
        deletion set hides removed ids in the base shards."""
        import numpy as np

        q = np.ascontiguousarray(queries, dtype="float32")
        if not self.shards:  # the index of an empty table version
            return np.full((len(q), k), -1, dtype="int64"), np.full((len(q), k), -np.inf, dtype="float32")
        out_ids, out_scores = [], []
        for start in range(0, max(1, len(q)), batch_size):
            batch = q[start:start + batch_size]
            ids, scores = [], []
            for shard, params in zip(self.shards, self._params):
                s, i = shard.search(batch, k, params=params) if params is not None else shard.search(batch, k)
                ids.append(i)
                scores.append(s)
            bi, bs = merge_topk(ids, scores, k)
            out_ids.append(bi)
            out_scores.append(bs)
        return np.concatenate(out_ids), np.concatenate(out_scores)

    def uri_of(self, image_id: int) -> str | None:
        return self.id_maps.lookup([int(image_id)])[0]

    def uri_and_etag_of(self, image_id: int) -> tuple[str | None, str | None]:
        """(uri, etag) the index holds for `image_id`; (None, None) when it does not list it."""
        uri = self.uri_of(image_id)
        return (uri, self.id_maps.lookup([int(image_id)], "etag")[0]) if uri is not None else (None, None)

    def uris_of(self, image_ids) -> list:
        """uri per id (None for ids the index does not hold), one vectorised lookup."""
        return self.id_maps.lookup(image_ids)

    def live_ids(self):
        """Sorted image_ids of every vector the index serves (reads every id map: small indexes, tests)."""
        return self.id_maps.live_table().column("image_id").to_numpy()

    @property
    def uris(self) -> dict[int, str]:
        """image_id -> uri for every vector (builds a dict: for small indexes and tests)."""
        t = self.id_maps.live_table()
        return dict(zip(t.column("image_id").to_pylist(), t.column("uri").to_pylist()))

    def hits(self, queries, k: int) -> list[list[SearchHit]]:
        ids, scores = self.search_vectors(queries, k)
        uris = self.uris_of(ids.reshape(-1)) if ids.size else []
        per_row = [uris[r * k:(r + 1) * k] for r in range(len(ids))]
        return [[SearchHit(r + 1, int(i), float(s), u) for r, (i, s, u) in enumerate(zip(row_i, row_s, row_u)) if i >= 0]
                for row_i, row_s, row_u in zip(ids, scores, per_row)]

    def image_id_of_uri(self, uri: str) -> int | None:
        """The id of an indexed URI, from the index's own id map (no table is read)."""
        return self.id_maps.id_of_uri(uri)

    def vectors_for_ids(self, image_ids: list[int]):
        """The vectors the index was built from, for `image_ids`: (vectors (n, D) in the order
        asked, uris). Read from the table's current version (file statistics prune on
        image_id): a row whose etag is the one the index holds has the vector the index was
        built from, so serving never needs the indexed version's files, which a vacuum may
        have removed. Rows changed or deleted since are read at the indexed version while it
        is readable. Raises ValueError naming ids neither has."""
        wanted = [int(i) for i in image_ids]
        version = self.manifest.get("table_version")
        etags = self.id_maps.lookup(wanted, "etag")
        if version is None or any(e is None for e in etags):  # a table without etags: its indexed version only
            return vectors_for_ids(self.manifest["table"], version, wanted)
        return _vectors_by_etag(self.manifest["table"], version, wanted, etags, self.manifest["index_id"])


def _selector_params(shard, selector):
    """faiss search parameters that carry `selector` and the shard's own current settings
    (parameters passed to search replace the index's nprobe/efSearch, so they are copied)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(shard)
    if ivf is None:
        return faiss.SearchParameters(sel=selector)
    params = faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nprobe))
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        params.quantizer_params = faiss.SearchParametersHNSW(efSearch=int(quantizer.hnsw.efSearch))
    if isinstance(shard, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=params)
    return params


def _vectors_by_etag(table_uri: str, version: int, wanted: list[int], etags: list[str], index_id: str):
    """ShardedIndex.vectors_for_ids for an index that holds each id's etag."""
    import numpy as np

    from sparse_embed.pipeline.store import live
    from sparse_embed.pipeline.index.snapshot import vectors_of

    t = live.read_live(table_uri, ["image_id", "etag", "embedding", "uri"], where={"image_id": wanted})
    expect = dict(zip(wanted, etags))
    found = {i: r for r, (i, e) in enumerate(zip(t.column("image_id").to_pylist(), t.column("etag").to_pylist()))
             if expect.get(i) == e}  # the row the index was built from: same etag, same vector
    stale = sorted(set(wanted) - set(found))
    old = None
    if stale:
        try:
            old_vectors, old_uris = vectors_for_ids(table_uri, version, stale)
        except ValueError:  # ids the indexed version lacks: the caller's 404, as before
            raise
        except Exception as e:  # noqa: BLE001 - the indexed version's files are gone (vacuumed)
            raise ValueError(f"image_ids {stale[:10]} changed or deleted since index {index_id} was built from "
                             f"{table_uri} v{version}, whose files are vacuumed ({type(e).__name__}): search the "
                             f"current index") from None
        old = {i: (old_vectors[k], old_uris[k]) for k, i in enumerate(stale)}
    current = vectors_of(t.column("embedding")) if t.num_rows else None
    vectors = np.stack([current[found[i]] if i in found else old[i][0] for i in wanted]).astype("float32")
    uris = [t.column("uri")[found[i]].as_py() if i in found else old[i][1] for i in wanted]
    return vectors, uris


def vectors_for_ids(table_uri: str, version: int | None, image_ids: list[int]):
    import numpy as np

    from sparse_embed.pipeline.store import live, tables
    from sparse_embed.pipeline.index.snapshot import vectors_of

    dt = tables.open_table(table_uri, version)
    if dt is None:
        raise FileNotFoundError(f"No embeddings table at {table_uri!r} (version {version})")
    wanted = [int(i) for i in image_ids]
    has_uri = "uri" in [f.name for f in dt.schema().fields]
    t = live.read_live(table_uri, ["image_id", "embedding"] + (["uri"] if has_uri else []), version=dt.version(),
                       where={"image_id": wanted})  # files whose image_id bounds can hold them
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
