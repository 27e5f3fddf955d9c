"""A search request against one loaded index (blocking; the app runs it in a worker thread):
the query vector from an upload, an image_id or a URI the index lists, then top-k hits.
An image_id or URI the index does not list is a 404."""
from __future__ import annotations

import os
import time

from .requests import RequestError, SearchQuery


def image_id_of_uri(index, uri: str) -> int | None:
    """The image_id of `uri` among the index's rows (None if absent), from its id map."""
    return index.image_id_of_uri(uri)


def _query_vector(loaded, query: SearchQuery, encoders):
    """(1, D) float32 and a description of the query for the response."""
    index = loaded.index
    if query.upload is not None:
        return encoders.for_manifest(loaded.manifest).embed(query.upload), {"kind": "upload", "bytes": len(query.upload)}
    image_id = query.image_id
    if image_id is None:
        image_id = image_id_of_uri(index, query.uri)
        if image_id is None or index.uri_of(image_id) != query.uri:
            raise RequestError(404, f"The uri {query.uri!r} is not in index {loaded.index_id}: search by an indexed "
                                    f"object's URI, an image_id, or upload the image")
    uri = index.uri_of(image_id)
    if uri is None:
        raise RequestError(404, f"image_id {image_id} is not in index {loaded.index_id}: use an image_id from a result")
    try:
        vectors, _ = index.vectors_for_ids([image_id])
    except ValueError:
        raise RequestError(404, f"image_id {image_id} is not in the table version index {loaded.index_id} was built "
                                f"from: use an image_id from a result") from None
    return vectors, {"kind": "image_id", "image_id": image_id, "uri": uri}


def run_search(loaded, query: SearchQuery, encoders) -> dict:
    t0 = time.perf_counter()
    vectors, described = _query_vector(loaded, query, encoders)
    hits = loaded.index.hits(vectors, query.k)[0]
    manifest = loaded.manifest
    return {
        "index_id": loaded.index_id,
        "model": manifest.get("model"),
        "model_version": manifest.get("model_version"),
        "table_version": manifest.get("table_version"),
        "k": query.k,
        "query": described,
        "results": [{"rank": h.rank, "image_id": h.image_id, "uri": h.uri, "score": round(h.score, 6)} for h in hits],
        "seconds": round(time.perf_counter() - t0, 4),
    }


def status_of(live) -> dict:
    """What /api/status reports: the loaded index and whether the last CURRENT check held."""
    loaded = live.loaded
    manifest = loaded.manifest
    return {
        "index_id": loaded.index_id,
        "ntotal": int(loaded.index.ntotal),
        "shards": len(manifest.get("shards") or []),
        "factory": manifest.get("factory"),
        "dim": manifest.get("dim"),
        "model": manifest.get("model"),
        "model_version": manifest.get("model_version"),
        "can_embed_uploads": bool(manifest.get("encoder")),
        "table": manifest.get("table"),
        "table_version": manifest.get("table_version"),
        "built_at": (manifest.get("build") or {}).get("created_at"),
        "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(loaded.opened_at)),
        "check_every_s": live.check_every_s,
        "reload_error": live.reload_error,
        "worker_pid": os.getpid(),  # which process of `serve --workers N` answered
    }
