"""Thumbnails of indexed objects: bytes read by the server with its own credentials (at
most the object size cap), passed through the embed job's decode guards with the serving
pixel limit, centre-cropped to a square JPEG of bounded size, and kept in a cache on disk
keyed by the object's URI and ETag (a changed object gets a new thumbnail; a new index of
unchanged objects reuses the old ones), bounded by total bytes, least recently used out.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

from .requests import RequestError

THUMB_SIDE = 256  # pixels; the page shows them at 160-200 CSS px, so 256 stays sharp on 1.5x screens
THUMB_QUALITY = 82
DEFAULT_CACHE_BYTES = 1024 * 1024 * 1024  # ~100,000 thumbnails of ~10 KB
SERVE_MAX_PIXELS = 40_000_000  # a decode holds width x height x 3 bytes: 120 MB at this limit
SERVE_MAX_OBJECT_BYTES = 64 * 2 ** 20  # a thumbnail reads at most this much of an object (a 40 MP PNG is ~60 MB or less)


def thumbnail_jpeg(data: bytes, *, side: int = THUMB_SIDE, max_pixels: int = SERVE_MAX_PIXELS) -> bytes:
    """Image bytes -> a side x side JPEG (shorter side scaled to `side`, centre crop)."""
    from PIL import Image

    from sparse_embed.pipeline.embed.decode import (ALLOWED_FORMATS, DecodeError, DecompressionBomb, ResizePlan,
                                                    decode_image)

    plan = ResizePlan(height=side, width=side, scale_short=side, interpolation="bicubic")
    try:
        pixels = decode_image(data, plan, formats=ALLOWED_FORMATS, max_pixels=max_pixels)[0]  # (3, side, side) uint8
    except DecompressionBomb as e:
        raise RequestError(422, f"The indexed object has too many pixels to show ({e}); this server decodes at most "
                                f"{max_pixels:,} (--max-megapixels)") from None
    except DecodeError as e:
        raise RequestError(422, f"The indexed object cannot be shown as a thumbnail: {type(e).__name__}: {e}") from None
    buf = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0), "RGB").save(buf, "JPEG", quality=THUMB_QUALITY)
    return buf.getvalue()


class ThumbCache:
    """Thumbnail bytes in files under `root` (<sha256 of uri and etag>.jpg in 256 folders),
    at most `max_bytes` in all: a put over the bound removes the least recently read or
    written files until a tenth is free. Files are written whole (temp file, then rename),
    so a reader never sees half a thumbnail."""

    def __init__(self, root, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.root, self.max_bytes = Path(root), max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._bytes = sum(p.stat().st_size for p in self.root.glob("*/*.jpg"))

    def _path(self, uri: str, etag: str) -> Path:
        h = hashlib.sha256(f"{uri}\0{etag}".encode()).hexdigest()
        return self.root / h[:2] / f"{h}.jpg"

    def get(self, uri: str, etag: str) -> bytes | None:
        path = self._path(uri, etag)
        try:
            body = path.read_bytes()
            os.utime(path)  # recently used: pruned last
            return body
        except FileNotFoundError:
            return None

    def put(self, uri: str, etag: str, body: bytes) -> None:
        path = self._path(uri, etag)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(body)
        os.replace(tmp, path)
        with self._lock:
            self._bytes += len(body)
            if self._bytes > self.max_bytes:
                self._prune(int(self.max_bytes * 0.9))

    def _prune(self, target: int) -> None:
        files = []
        for p in self.root.glob("*/*.jpg"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= target:
                break
            p.unlink(missing_ok=True)
            total -= size
        self._bytes = total

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.jpg"))
