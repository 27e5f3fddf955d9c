"""The aiohttp application: the page's static files and the JSON API.

    GET  /                    the search page (static/index.html)
    GET  /api/status          the loaded index: counts, index id, model, table version, built at
    POST /api/search          by upload (multipart field `image`, or an image/* body), or by
                              image_id / uri (JSON or form); `k` 1..max_k
    GET  /api/thumb/{id}      a 256x256 JPEG of an object the index lists, read by the server

Every error is JSON {"error": "<one sentence>"} with its HTTP status (404 for an image_id or
uri the index does not list, 413 for an upload over the limit, 403 for a foreign Host or
Origin, 401 without the token, 503 with Retry-After when the decode queue is full).
Access (Host, Origin, token) is checked first, for every request (access.py). Blocking
work runs in worker threads: faiss, table and object reads in a pool, the encoder in one
thread of its own (one forward pass at a time); decoding (uncached thumbnails, uploads)
holds a slot of DecodeSlots.
"""
from __future__ import annotations

import hmac
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web  # aiohttp comes with ray[default]; importing it costs ~0.1 s, not torch's seconds

from .access import ACCESS, TOKEN_COOKIE, AccessPolicy
from .decode_slots import DecodeSlots
from .requests import DEFAULT_MAX_UPLOAD_BYTES, MAX_K, RequestError, check_upload_size, parse_image_id, search_query

log = logging.getLogger(__name__)

# The application's state (aiohttp AppKeys: typed, no name clashes)
LIVE = web.AppKey("live", object)  # LiveIndex
MAX_K_KEY = web.AppKey("max_k", int)
MAX_UPLOAD = web.AppKey("max_upload_bytes", int)
ENCODERS = web.AppKey("encoders", object)  # QueryEncoders
THUMBS = web.AppKey("thumbs", object)  # ThumbCache
MAX_OBJECT = web.AppKey("max_object", int)  # bytes a thumbnail reads of an object at most
MAX_PIXELS = web.AppKey("max_pixels", int)  # pixels a thumbnail or upload may decode to
DECODES = web.AppKey("decodes", DecodeSlots)
IO_POOL = web.AppKey("io_pool", ThreadPoolExecutor)  # faiss, table and object reads
ENCODE_POOL = web.AppKey("encode_pool", ThreadPoolExecutor)  # one thread: one forward pass at a time

STATIC_DIR = Path(__file__).resolve().parent / "static"
MULTIPART_SLACK = 64 * 1024  # bytes of form framing allowed around an upload
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _json(status: int, body: dict):
    return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, message: str):
    from sparse_embed.pipeline.embed.report import redact_text

    return _json(status, {"error": redact_text(message)})


def _middleware():
    @web.middleware
    async def errors_and_headers(request, handler):
        try:
            request.app[ACCESS].check(request)
            response = await handler(request)
        except RequestError as e:
            response = _error(e.status, str(e))
            response.headers.update(e.headers)
        except web.HTTPRequestEntityTooLarge:  # the body passed client_max_size while being read
            limit = request.app[MAX_UPLOAD]
            response = _error(413, f"The upload is over this server's limit of {limit:,} bytes ({limit / 2 ** 20:.3g} "
                                   f"MiB): send a smaller image, or start the server with a larger --max-upload-mb")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            if not request.path.startswith("/api/"):
                response = web.Response(status=e.status, text=f"{e.status} {e.reason}")
            else:
                response = _error(e.status, f"{e.status} {e.reason}: {request.method} {request.path} is not part of "
                                            f"this API (GET /api/status, POST /api/search, GET /api/thumb/IMAGE_ID)")
        except Exception as e:  # logged here with its traceback; the browser gets the type and a redacted message
            log.exception("%s %s failed", request.method, request.path)
            response = _error(500, f"The server failed on this request: {type(e).__name__}: {str(e)[:300]}")
        response.headers.update(SECURITY_HEADERS)
        return response

    return errors_and_headers


async def _run(request, pool, fn, *args):
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(request.app[pool], fn, *args)


async def _search_fields(request) -> dict:
    """The request's fields: JSON object, form (with the `image` file's bytes), or a raw image body."""
    limit = request.app[MAX_UPLOAD]
    check_upload_size(request.content_length, limit, slack=MULTIPART_SLACK)
    ctype = request.content_type
    if ctype == "application/json":
        try:
            return await request.json()
        except json.JSONDecodeError as e:
            raise RequestError(400, f"Expected a JSON object in the request body, got invalid JSON ({e})") from None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.post()
        return {key: (value.file.read() if isinstance(value, web.FileField) else value) for key, value in form.items()}
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return {"image": await request.read(), "k": request.query.get("k")}
    raise RequestError(415, f"Expected a JSON body, a form or an image body, got Content-Type {ctype!r}")


async def status(request):
    from .search import status_of

    await request.app[LIVE].current()
    return _json(200, status_of(request.app[LIVE]))


async def search(request):
    from .search import run_search

    query = search_query(await _search_fields(request), max_k=request.app[MAX_K_KEY],
                         max_upload_bytes=request.app[MAX_UPLOAD])
    loaded = await request.app[LIVE].current()  # this request's index, whatever CURRENT does meanwhile
    if query.upload is None:
        return _json(200, await _run(request, IO_POOL, run_search, loaded, query, request.app[ENCODERS]))
    async with request.app[DECODES].slot():
        return _json(200, await _run(request, ENCODE_POOL, run_search, loaded, query, request.app[ENCODERS]))


def _read_thumb(uri: str, max_bytes: int, max_pixels: int) -> bytes:
    from sparse_embed.pipeline.embed.decode import TooLarge, fetch_many

    from .thumbs import thumbnail_jpeg

    data = fetch_many([uri], max_bytes=max_bytes)[uri]  # reads at most max_bytes + 1 bytes
    if isinstance(data, FileNotFoundError):
        raise RequestError(404, f"The object {uri!r} is listed by the index but is gone from the store")
    if isinstance(data, TooLarge):
        raise RequestError(422, f"The object {uri!r} is too large to show: {data}")
    if isinstance(data, Exception):
        raise RequestError(502, f"The store did not return {uri!r}: {type(data).__name__}: {str(data)[:200]}")
    return thumbnail_jpeg(data, max_pixels=max_pixels)


async def thumb(request):
    image_id = parse_image_id(request.match_info["image_id"])
    loaded = await request.app[LIVE].current()
    uri, etag = loaded.index.uri_and_etag_of(image_id)  # only what the index lists is ever read
    if uri is None:
        raise RequestError(404, f"image_id {image_id} is not in index {loaded.index_id}")
    cache = request.app[THUMBS]
    body = await _run(request, IO_POOL, cache.get, uri, etag)
    if body is None:
        async with request.app[DECODES].slot():
            body = await _run(request, IO_POOL, _read_thumb, uri, request.app[MAX_OBJECT], request.app[MAX_PIXELS])
        await _run(request, IO_POOL, cache.put, uri, etag, body)
    return web.Response(body=body, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})


async def page(request):
    access = request.app[ACCESS]
    given = request.query.get("token")
    if given is not None and access.token:  # the link with the token: keep it in a cookie, drop it from the address
        if not hmac.compare_digest(given.encode(), access.token.encode()):
            raise RequestError(401, "The token in the address is not this server's: check the link you were given")
        redirect = web.HTTPSeeOther("/")
        redirect.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="Strict", path="/")
        raise redirect
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def _warm_encoder(app) -> None:
    """Build the upload encoder now, so the first upload does not wait for the model."""
    manifest = app[LIVE].loaded.manifest
    if manifest.get("encoder"):
        try:
            app[ENCODERS].for_manifest(manifest)
        except Exception:  # the first upload reports it, in words
            log.exception("building the query encoder for uploads failed")


async def _start_warming(app):
    app[ENCODE_POOL].submit(_warm_encoder, app)


async def _close_pools(app):
    for key in (IO_POOL, ENCODE_POOL):
        app[key].shutdown(wait=False, cancel_futures=True)


def build_app(live, *, max_k: int = MAX_K, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
              thumb_cache_bytes: int | None = None, thumb_cache_dir=None, io_threads: int = 8,
              max_object_bytes: int | None = None, max_pixels: int | None = None, access: AccessPolicy | None = None,
              decodes: DecodeSlots | None = None):
    """live: a LiveIndex whose load() has run. `access`: default, a server on loopback
    without a token; `thumb_cache_dir`: default <cache>/thumbs."""
    from sparse_embed.pipeline.index.searcher import CACHE_DIR

    from .query_encoder import QueryEncoders
    from .thumbs import DEFAULT_CACHE_BYTES, SERVE_MAX_OBJECT_BYTES, SERVE_MAX_PIXELS, ThumbCache

    if not 1 <= max_k <= 10_000:
        raise ValueError(f"Expected --max-k from 1 to 10000, got {max_k!r}")
    if max_upload_bytes < 1:
        raise ValueError(f"Expected an upload limit of at least 1 byte, got {max_upload_bytes!r}")
    app = web.Application(middlewares=[_middleware()], client_max_size=max_upload_bytes + MULTIPART_SLACK)
    app[LIVE] = live
    app[MAX_K_KEY] = max_k
    app[MAX_UPLOAD] = max_upload_bytes
    app[MAX_PIXELS] = max_pixels or SERVE_MAX_PIXELS
    app[ENCODERS] = QueryEncoders(max_pixels=app[MAX_PIXELS])
    app[THUMBS] = ThumbCache(thumb_cache_dir or CACHE_DIR / "thumbs", thumb_cache_bytes or DEFAULT_CACHE_BYTES)
    app[MAX_OBJECT] = max_object_bytes or SERVE_MAX_OBJECT_BYTES
    app[ACCESS] = access or AccessPolicy.for_listener("127.0.0.1")
    app[DECODES] = decodes or DecodeSlots()
    app[IO_POOL] = ThreadPoolExecutor(io_threads, thread_name_prefix="serve-io")
    app[ENCODE_POOL] = ThreadPoolExecutor(1, thread_name_prefix="serve-encode")
    app.on_startup.append(_start_warming)
    app.on_cleanup.append(_close_pools)
    app.router.add_get("/", page)
    app.router.add_get("/api/status", status)
    app.router.add_post("/api/search", search)
    app.router.add_get("/api/thumb/{image_id}", thumb)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app
