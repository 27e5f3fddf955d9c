"""Stage 3: fetch + decode on CPU tasks. A bad object becomes an error row, never a failed block.

Output pixels are uint8 (3, H, W) at the encoder's input size, resized and centre-cropped
exactly as timm's eval transform does (shorter side to floor(size / crop_pct), centre
crop); normalisation happens on the embed actor, so a block carries 1 byte per value
instead of 4.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

from . import storage

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own bomb limit: 2 x 89,478,485
ERROR_COLUMNS = ("error_stage", "error_type", "error_message")


class DecodeError(Exception):
    """A readable reason an object cannot be embedded; its class name is the error_type."""


class DecompressionBomb(DecodeError):
    pass


class NotAnImage(DecodeError):
    pass


@dataclass(frozen=True)
class ResizePlan:
    """What timm's eval transform does, as numbers (from the encoder's data config)."""

    height: int
    width: int
    scale_short: int  # shorter side after the resize, before the centre crop
    interpolation: str  # "bicubic" | "bilinear" | "nearest"

    @classmethod
    def from_data_config(cls, cfg: dict) -> "ResizePlan":
        _, h, w = cfg["input_size"]
        crop_pct = cfg.get("crop_pct") or 1.0
        if h == w:
            scale = math.floor(h / crop_pct)
        else:  # timm scales the tuple; the shorter side decides
            scale = math.floor(min(h, w) / crop_pct)
        return cls(height=h, width=w, scale_short=scale, interpolation=cfg.get("interpolation", "bicubic"))


def _resample(name: str):
    from PIL import Image

    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS}.get(name, Image.BICUBIC)


def to_rgb(img):
    """RGB with transparency composited onto white (dropping alpha would expose whatever
    colour transparent pixels happen to hold)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits first
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if a.max() > 255 else 255.0
        return Image.fromarray((a * (255.0 / peak)).clip(0, 255).astype("uint8"), "L").convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, plan: ResizePlan, *, max_pixels: int = DEFAULT_MAX_PIXELS):
    """bytes -> (uint8 array (3, H, W), original width, original height)."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise NotAnImage("empty object (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise NotAnImage(f"not a readable image: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise DecompressionBomb(f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    if orientation in (5, 6, 7, 8):  # rotated 90/270: the upright size swaps sides
        width, height = height, width
    if img.format == "JPEG":
        # Draft mode decodes at 1/2, 1/4 or 1/8 scale, never below the requested size.
        short_target = plan.scale_short
        ratio = short_target / max(1, min(width, height))
        img.draft("RGB", (max(1, math.ceil(img.size[0] * ratio)), max(1, math.ceil(img.size[1] * ratio))))
    try:
        img.seek(0)  # first frame of animations and multi-page files
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    except (OSError, SyntaxError, ValueError) as e:  # truncated data surfaces here, at load time
        raise DecodeError(f"{type(e).__name__}: {e}") from None
    img = resize_and_crop(img, plan)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)), width, height


def resize_and_crop(img, plan: ResizePlan):
    """Shorter side to plan.scale_short (the longer side scaled by int(), as torchvision
    does), then a centre crop to (plan.height, plan.width), as torchvision rounds it."""
    w, h = img.size
    if w <= h:
        new_w, new_h = plan.scale_short, int(plan.scale_short * h / w)
    else:
        new_w, new_h = int(plan.scale_short * w / h), plan.scale_short
    if (new_w, new_h) != (w, h):
        img = img.resize((max(1, new_w), max(1, new_h)), _resample(plan.interpolation))
    w, h = img.size
    if w < plan.width or h < plan.height:  # torchvision pads with zeros; only hit for extreme aspect ratios
        from PIL import Image

        canvas = Image.new("RGB", (max(w, plan.width), max(h, plan.height)))
        canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - plan.height) / 2.0))
    left = int(round((w - plan.width) / 2.0))
    return img.crop((left, top, left + plan.width, top + plan.height))


def fetch_many(uris: list[str]) -> dict[str, bytes | Exception]:
    """Concurrent reads (s3fs issues them together); failures come back as exceptions."""
    if not uris:
        return {}
    fs = storage.filesystem(uris[0])
    paths = [storage.strip_scheme(u) for u in uris]
    got = fs.cat(paths, on_error="return")
    if not isinstance(got, dict):  # a single path returns bare bytes
        got = {paths[0]: got}
    return {u: got.get(p, FileNotFoundError(p)) for u, p in zip(uris, paths)}


def fetch_decode_batch(batch, *, data_config: dict, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Ray Data map_batches function: pyarrow batch of listing rows -> the same rows with
    width, height, pixels (uint8 bytes) and the three error columns."""
    import pyarrow as pa

    plan = ResizePlan.from_data_config(data_config)
    uris = batch.column("uri").to_pylist()
    fetched = fetch_many(uris)
    widths, heights, pixels, stages, types, messages = [], [], [], [], [], []
    for uri in uris:
        data = fetched[uri]
        px = w = h = stage = etype = msg = None
        if isinstance(data, Exception):
            stage, etype, msg = "fetch", type(data).__name__, str(data) or type(data).__name__
        else:
            try:
                arr, w, h = decode_image(bytes(data), plan, max_pixels=max_pixels)
                px = arr.tobytes()
            except DecodeError as e:
                stage, etype, msg = "decode", type(e).__name__, str(e)
            except Exception as e:  # any other decoder failure is still this object's, not the block's
                stage, etype, msg = "decode", type(e).__name__, str(e) or repr(e)
        widths.append(w)
        heights.append(h)
        pixels.append(px)
        stages.append(stage)
        types.append(etype)
        messages.append(msg[:1000] if msg else None)
    return (batch
            .append_column("width", pa.array(widths, pa.int32()))
            .append_column("height", pa.array(heights, pa.int32()))
            .append_column("pixels", pa.array(pixels, pa.binary()))
            .append_column("error_stage", pa.array(stages, pa.string()))
            .append_column("error_type", pa.array(types, pa.string()))
            .append_column("error_message", pa.array(messages, pa.string())))
