"""Stage 3: fetch + decode on CPU tasks. A bad object becomes an error row, never a failed block.

Output pixels are uint8 (3, H, W) at the encoder's input size, with the geometry of timm's
eval transform (shorter side to floor(size / crop_pct), centre crop). The pixel values can
differ slightly from timm's: large JPEGs are decoded in draft mode (libjpeg's DCT scaling,
1/2 to 1/8) and very large images are resized from the crop box in one step. Normalisation
happens on the embed actor, so a block carries 1 byte per value instead of 4.

With `--decode device` these tasks only fetch (decode_device.fetch_batch) and the embed actor
decodes JPEGs on its device; decode_image stays its fallback for everything else.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

from sparse_embed.pipeline.store import storage

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own bomb limit: 2 x 89,478,485
ERROR_COLUMNS = ("error_stage", "error_type", "error_message")


class DecodeError(Exception):
    """A readable reason an object cannot be embedded; its class name is the error_type."""


class DecompressionBomb(DecodeError):
    pass


class NotAnImage(DecodeError):
    """No Pillow plugin recognises the bytes as an image."""


class UnsupportedFormat(DecodeError):
    """An image in a format this run does not decode (--formats; EPS never)."""

    def __init__(self, message: str, detected: str):
        super().__init__(message)
        self.detected = detected  # the format name --formats takes, e.g. "TGA"

    def __reduce__(self):  # picklable with both arguments (Ray moves exceptions between processes)
        return type(self), (str(self), self.detected)


class ETagMismatch(Exception):
    """The object changed between listing and fetch: its bytes are not the listed etag's."""


class TooLarge(Exception):
    """The object is larger than the fetch cap (--max-object-mb): it is not read."""


DEFAULT_MAX_OBJECT_MB = 256  # a fetch reads at most this much of one object (--max-object-mb)


def _too_large(n: int, max_bytes: int) -> TooLarge:
    return TooLarge(f"{'listed size ' + str(n) + ' bytes' if n > max_bytes else 'more bytes'} over the cap of "
                    f"{max_bytes / 2**20:g} MiB: not read (raise --max-object-mb to embed it)")


# The default of --formats: what a photo collection holds. Other formats are refused unless
# named there, because rarely used parsers are where decoder bugs live.
# (Pillow's JPEG opener also returns camera MPO files, as format "MPO".)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "AVIF")
FORMATS_OPTION = "--formats (nightly config: formats)"

# Pillow renders EPS by running Ghostscript on the bytes (EpsImagePlugin.load). Objects
# starting with the magic its plugin accepts ("%!PS", or the DOS EPS binary header) are
# refused before Pillow sees them, and --formats does not accept EPS.
EPS_MAGIC = (b"%!PS", b"\xc5\xd0\xd3\xc6")
GHOSTSCRIPT_FORMATS = ("EPS", "PS")


def decodable_formats() -> tuple[str, ...]:
    """The names --formats accepts: every format Pillow can open, except EPS."""
    from PIL import Image

    Image.init()
    return tuple(sorted(f for f in Image.OPEN if f not in GHOSTSCRIPT_FORMATS))


def check_formats(names) -> tuple[str, ...]:
    """Pillow format names in any case -> upper-case names, first occurrence kept.
    ValueError names the first bad one and lists what is accepted."""
    if isinstance(names, str) or not names:
        raise ValueError(f"Expected a non-empty list of Pillow format names, got {names!r}")
    accepted = decodable_formats()
    out: list[str] = []
    for name in names:
        key = name.strip().upper() if isinstance(name, str) else name
        if key in GHOSTSCRIPT_FORMATS:
            raise ValueError(f"Expected formats other than EPS/PS, got {name!r}: Pillow decodes it by running "
                             f"Ghostscript on the object's bytes, which this job never does")
        if key not in accepted:
            raise ValueError(f"Expected Pillow format names ({', '.join(accepted)}), got {name!r}")
        if key not in out:
            out.append(key)
    return tuple(out)


def _refuse_unallowed(data: bytes, allowed: tuple[str, ...]) -> DecodeError:
    """The error for bytes that no allowed plugin opened: UnsupportedFormat when another
    Pillow plugin recognises them, else NotAnImage. Image.open runs the plugins' header
    parsers only: nothing is loaded, so no decoder runs."""
    from PIL import Image

    if data.startswith(EPS_MAGIC):
        return UnsupportedFormat(f"format EPS (PostScript) is never decoded: Pillow renders it by running "
                                 f"Ghostscript on the bytes, so {FORMATS_OPTION} does not accept EPS", "EPS")
    try:
        with Image.open(io.BytesIO(data), formats=decodable_formats()) as img:
            detected = img.format
    except Image.DecompressionBombError as e:
        return DecompressionBomb(str(e))
    except Exception:  # UnidentifiedImageError, or a header parser that gave up part way
        detected = None
    # The name --formats takes: Pillow's JPEG opener reports camera files as "MPO", and
    # XVThumbImageFile.format is "XVThumb" under the registered name "XVTHUMB".
    name = {"MPO": "JPEG"}.get(detected, detected.upper()) if detected else None
    if name and name not in allowed:
        return UnsupportedFormat(f"format {detected} is not among the decoded formats {', '.join(allowed)}; "
                                 f"add {name} to {FORMATS_OPTION} to decode it", name)
    return NotAnImage(f"not a readable image of the allowed formats {', '.join(allowed)} "
                      f"(starts with {bytes(data[:8])!r})")


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
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit or float grey: scale to 8 bits first
        import numpy as np

        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = 1.0 if img.mode == "F" and a.max(initial=0) <= 1.0 else 65535.0 if a.max(initial=0) > 255 else 255.0
        return Image.fromarray((a * (255.0 / peak)).clip(0, 255).astype("uint8"), "L").convert("RGB")
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: unpremultiply first
        return to_rgb(img.convert("RGBA"))
    return img.convert("RGB")


def decode_image(data: bytes, plan: ResizePlan, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] = ALLOWED_FORMATS):
    """bytes -> (uint8 array (3, H, W), original width, original height). `formats`: the
    Pillow formats decoded, as check_formats returns them (upper case, no EPS)."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise NotAnImage("empty object (0 bytes)")
    if data.startswith(EPS_MAGIC):  # before any plugin: EPS is never opened
        raise _refuse_unallowed(data, formats)
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        raise _refuse_unallowed(data, formats) from None
    except Image.DecompressionBombError as e:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
        raise DecompressionBomb(str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a header that parses partly
        raise DecodeError(f"{type(e).__name__}: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise DecompressionBomb(f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    if width < 1 or height < 1:
        raise DecodeError(f"declared size {width}x{height}")
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block: decode the image as stored
        orientation = 1
    if orientation in (5, 6, 7, 8):  # rotated 90/270: the upright size swaps sides
        width, height = height, width
    if img.format in ("JPEG", "MPO"):
        # Draft mode decodes at 1/2, 1/4 or 1/8 scale, never below the requested size.
        short_target = plan.scale_short
        ratio = short_target / max(1, min(width, height))
        img.draft("RGB", (max(1, math.ceil(img.size[0] * ratio)), max(1, math.ceil(img.size[1] * ratio))))
    try:
        img.seek(0)  # first frame of animations and multi-page files
        img.load()  # truncated data surfaces here, not later in a resize
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        img = resize_and_crop(img, plan)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from None
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)), width, height


def resize_and_crop(img, plan: ResizePlan):
    """Shorter side to plan.scale_short (the longer side scaled by int(), as torchvision
    does), then a centre crop to (plan.height, plan.width), as torchvision rounds it.

    Beyond about 16x the crop's area, only the crop window is resampled (Pillow's `box`:
    identical to resize-then-crop on 6000x300 and 300x6000 checks, but not bit-exact at
    every size, so the timm-parity path is kept below that), so a 20000x1 image costs a
    224x224 resize, not a 4.5e6x224 one (3 GB)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = plan.scale_short, int(plan.scale_short * h / w)
    else:
        new_w, new_h = int(plan.scale_short * w / h), plan.scale_short
    new_w, new_h = max(1, new_w), max(1, new_h)
    if new_w < plan.width or new_h < plan.height:  # torchvision pads with zeros; only hit for extreme aspect ratios
        from PIL import Image

        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), _resample(plan.interpolation))
        canvas = Image.new("RGB", (max(new_w, plan.width), max(new_h, plan.height)))
        canvas.paste(img, ((canvas.width - new_w) // 2, (canvas.height - new_h) // 2))
        img, (new_w, new_h) = canvas, canvas.size
        w, h = new_w, new_h
    top = int(round((new_h - plan.height) / 2.0))
    left = int(round((new_w - plan.width) / 2.0))
    if (new_w, new_h) == (w, h):
        return img.crop((left, top, left + plan.width, top + plan.height))
    if new_w * new_h <= 16 * plan.width * plan.height:  # timm's resize (PIL, same filter), then crop
        img = img.resize((new_w, new_h), _resample(plan.interpolation))
        return img.crop((left, top, left + plan.width, top + plan.height))
    sx, sy = w / new_w, h / new_h  # source pixels per resized pixel
    box = (left * sx, top * sy, (left + plan.width) * sx, (top + plan.height) * sy)
    return img.resize((plan.width, plan.height), _resample(plan.interpolation), box=box)


def _check_etag(uri: str, listed: str | None, got: str | None, size: int | None, n: int) -> Exception | None:
    if listed is not None and got is not None and got != listed:
        return ETagMismatch(f"listed etag {listed}, fetched etag {got}: changed after listing")
    if size is not None and n != size:
        return ETagMismatch(f"listed size {size}, fetched {n} bytes: changed after listing")
    return None


async def _read_at_most(body, limit: int) -> bytes:
    """The body's bytes up to `limit` (a read(n) of the stream returns what has arrived,
    up to n: it is called until the end or the limit)."""
    chunks, n = [], 0
    while n < limit:
        chunk = await body.read(min(limit - n, 8 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)


def _fetch_s3(fs, uris, etags, sizes, max_bytes: int) -> dict[str, bytes | Exception]:
    """One GET per object with If-Match on the listed etag; the response's own ETag is
    checked too (for servers that ignore If-Match). s3fs's retry policy applies (SlowDown,
    timeouts, dropped connections: up to fs.retries attempts with backoff). An object
    listed over `max_bytes` is not requested, and no more than max_bytes + 1 bytes of a
    response are read."""
    import asyncio

    from fsspec.asyn import sync
    from s3fs.core import _error_wrapper

    async def one(uri, etag, size):
        if size is not None and size > max_bytes:
            return _too_large(size, max_bytes)
        bucket, key, _ = fs.split_path(storage.strip_scheme(uri))

        async def call_and_read():
            kw = {"IfMatch": f'"{etag}"'} if etag else {}
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
            try:
                return await _read_at_most(resp["Body"], max_bytes + 1), resp.get("ETag")
            finally:
                resp["Body"].close()

        try:
            data, got = await _error_wrapper(call_and_read, retries=fs.retries)
        except Exception as e:
            text = str(e).lower()
            if etag and ("precondition" in text or "pre-condition" in text or " 412" in text):  # s3fs turns a 412 into OSError(EINVAL)
                return ETagMismatch(f"listed etag {etag}: the object no longer has it (changed after listing)")
            return e
        if len(data) > max_bytes:
            return _too_large(len(data), max_bytes)
        return _check_etag(uri, etag, got.strip('"') if got else None, size, len(data)) or data

    async def all_():
        limit = asyncio.Semaphore(32)

        async def bounded(*a):
            async with limit:
                return await one(*a)

        return await asyncio.gather(*(bounded(u, e, s) for u, e, s in zip(uris, etags, sizes)))

    return dict(zip(uris, sync(fs.loop, all_)))


def _fetch_local(uris, etags, sizes, max_bytes: int) -> dict[str, bytes | Exception]:
    """Read, then stat: the listing's local etag is size-mtime, so a file replaced after
    listing shows a different one. Objects over `max_bytes` (listed or found) are not read."""
    import os

    from sparse_embed.pipeline.embed.listing import _etag, _mtime

    out = {}
    for uri, etag, size in zip(uris, etags, sizes):
        path = storage.strip_scheme(uri)
        if size is not None and size > max_bytes:
            out[uri] = _too_large(size, max_bytes)
            continue
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
                st = os.fstat(f.fileno())
        except Exception as e:
            out[uri] = e
            continue
        if len(data) > max_bytes:
            out[uri] = _too_large(len(data), max_bytes)
            continue
        got = _etag({"size": st.st_size}, _mtime({"mtime": st.st_mtime})) if etag else None
        out[uri] = _check_etag(uri, etag, got, size, len(data)) or data
    return out


def fetch_many(uris: list[str], etags: list[str | None] | None = None,
               sizes: list[int | None] | None = None, *,
               max_bytes: int = DEFAULT_MAX_OBJECT_MB * 2**20) -> dict[str, bytes | Exception]:
    """Concurrent reads; failures come back as exceptions. With the listed etags (and
    sizes), an object that changed after listing comes back as ETagMismatch: its bytes
    must not be recorded under the listed etag. The next run lists the new etag and
    embeds it. An object over `max_bytes` comes back as TooLarge, never read whole."""
    if not uris:
        return {}
    etags = list(etags) if etags is not None else [None] * len(uris)
    sizes = list(sizes) if sizes is not None else [None] * len(uris)
    if storage.is_s3(uris[0]):
        return _fetch_s3(storage.filesystem(uris[0]), uris, etags, sizes, max_bytes)
    return _fetch_local(uris, etags, sizes, max_bytes)


def fetch_decode_batch(batch, *, data_config: dict, max_pixels: int = DEFAULT_MAX_PIXELS,
                       formats: tuple[str, ...] | None = None, max_bytes: int = DEFAULT_MAX_OBJECT_MB * 2**20):
    """Ray Data map_batches function: pyarrow batch of listing rows -> the same rows with
    width, height, pixels (uint8 bytes) and the three error columns. `formats`: Pillow
    format names to decode (None: ALLOWED_FORMATS); a bad name fails the batch. Objects
    over `max_bytes` become fetch:TooLarge rows without being read."""
    import pyarrow as pa

    from sparse_embed.pipeline.embed.report import redact_text

    allowed = ALLOWED_FORMATS if formats is None else check_formats(formats)
    plan = ResizePlan.from_data_config(data_config)
    uris = batch.column("uri").to_pylist()
    cols = set(batch.column_names)
    fetched = fetch_many(uris, batch.column("etag").to_pylist() if "etag" in cols else None,
                         batch.column("size").to_pylist() if "size" in cols else None, max_bytes=max_bytes)
    widths, heights, pixels, stages, types, messages = [], [], [], [], [], []
    for uri in uris:
        data = fetched[uri]
        px = w = h = stage = etype = msg = None
        if isinstance(data, Exception):
            stage, etype, msg = "fetch", type(data).__name__, redact_text(str(data) or type(data).__name__)
        else:
            try:
                arr, w, h = decode_image(bytes(data), plan, max_pixels=max_pixels, formats=allowed)
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
