"""Thumbnails of indexed objects: bytes read by the server with its own credentials, passed
through the embed job's decode guards, centre-cropped to a square JPEG of bounded size, and
kept in a small in-memory LRU keyed by (index_id, image_id)."""
from __future__ import annotations

import io
import threading
from collections import OrderedDict

from .requests import RequestError

THUMB_SIDE = 256  # pixels; the page shows them at 160-200 CSS px, so 256 stays sharp on 1.5x screens
THUMB_QUALITY = 82
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024  # ~6000 thumbnails of ~10 KB


def thumbnail_jpeg(data: bytes, *, side: int = THUMB_SIDE) -> bytes:
    """Image bytes -> a side x side JPEG (shorter side scaled to `side`, centre crop)."""
    from PIL import Image

    from sparse_embed.pipeline.embed.decode import ALLOWED_FORMATS, DecodeError, ResizePlan, decode_image

    plan = ResizePlan(height=side, width=side, scale_short=side, interpolation="bicubic")
    try:
        pixels = decode_image(data, plan, formats=ALLOWED_FORMATS)[0]  # (3, side, side) uint8
    except DecodeError as e:
        raise RequestError(422, f"The indexed object cannot be shown as a thumbnail: {type(e).__name__}: {e}") from None
    buf = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0), "RGB").save(buf, "JPEG", quality=THUMB_QUALITY)
    return buf.getvalue()


class ThumbCache:
    """LRU of thumbnail bytes, bounded by total size."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                self._bytes -= len(self._items.pop(key))
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)

    def __len__(self) -> int:
        return len(self._items)
