"""JPEG decode, resize and centre crop on the embed actor's device (`--decode device`).

JPEGs go through `torchvision.io.decode_jpeg(list, device=...)`: nvJPEG in one batched call
on CUDA, libjpeg-turbo on CPU (the same code, which is how the tests run it). EXIF
orientation, the resize of the shorter side to `plan.scale_short` (antialiased, the plan's
filter) and the centre crop are torch ops on the decoded tensor, with decode.py's geometry.

Pixels differ a little from the CPU path (decode.decode_image): PIL's bicubic is a=-0.5,
torch's a=-0.75, and the CPU path decodes large JPEGs at 1/2..1/8 scale (libjpeg's DCT
scaling) where the device path decodes in full. tests/unit/test_decode_device.py states
the tolerance it holds.

What this path does not take falls back to decode.decode_image in the same actor, one
image at a time: other formats, CMYK/YCCK JPEGs, shapes the crop would pad (extreme aspect
ratios), and any JPEG the device decoder rejects. The pixel-count bomb guard is applied to
the header's size before anything is decoded.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from sparse_embed.pipeline.embed.decode import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, DecompressionBomb, ResizePlan, decode_image

DEVICE_MODES = ("L", "RGB")  # JPEG colour modes the device path decodes; CMYK goes to the CPU decoder
# Beyond this multiple of the crop's area the resized (uncropped) image is not built on the
# device: decode.resize_and_crop resamples only the crop window there, on the CPU.
MAX_RESIZED_AREA_RATIO = 16


@dataclass(frozen=True)
class JpegHeader:
    width: int  # as stored, before EXIF orientation
    height: int
    orientation: int  # EXIF 0x0112, 1 when absent or unreadable


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The size and orientation of a JPEG this path can decode, read by Pillow's header
    parser (nothing is decoded); None for anything else (other formats, CMYK, unreadable)."""
    from PIL import Image

    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            if img.format != "JPEG" or img.mode not in DEVICE_MODES:
                return None
            try:
                orientation = int(img.getexif().get(0x0112, 1))
            except Exception:  # a corrupt EXIF block: the image as stored, as decode_image does
                orientation = 1
            return JpegHeader(width=img.size[0], height=img.size[1], orientation=orientation if 1 <= orientation <= 8 else 1)
    except Exception:  # including Pillow's own DecompressionBombError: the CPU path names it
        return None


def ends_complete(data: bytes) -> bool:
    """Whether the JPEG's end-of-image marker is among its last 64 bytes. libjpeg decodes a
    truncated file with a grey fill where Pillow (the CPU path) refuses it: truncated
    files go to the CPU path, which makes them error rows there."""
    return b"\xff\xd9" in data[-64:]


def upright_size(h: JpegHeader) -> tuple[int, int]:
    """(width, height) after EXIF orientation: 5..8 turn the image by 90 degrees."""
    return (h.height, h.width) if h.orientation in (5, 6, 7, 8) else (h.width, h.height)


def resized_size(width: int, height: int, plan: ResizePlan) -> tuple[int, int]:
    """(new_w, new_h): the shorter side to plan.scale_short, the longer one scaled by int(),
    as decode.resize_and_crop and torchvision do."""
    if width <= height:
        return max(1, plan.scale_short), max(1, int(plan.scale_short * height / width))
    return max(1, int(plan.scale_short * width / height)), max(1, plan.scale_short)


def takes(h: JpegHeader, plan: ResizePlan) -> bool:
    """Whether the device path handles this geometry: no padding, no huge intermediate."""
    new_w, new_h = resized_size(*upright_size(h), plan)
    return (new_w >= plan.width and new_h >= plan.height
            and new_w * new_h <= MAX_RESIZED_AREA_RATIO * plan.width * plan.height)


def apply_orientation(x, orientation: int):
    """(3, H, W) tensor as stored -> upright, for EXIF orientations 1..8."""
    import torch

    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-1, -2)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:  # transpose
        return x.transpose(-1, -2)
    if orientation == 6:  # rotate 90 clockwise
        return torch.rot90(x, k=-1, dims=(-2, -1))
    if orientation == 7:  # transverse
        return torch.rot90(x, k=2, dims=(-2, -1)).transpose(-1, -2)
    if orientation == 8:  # rotate 90 counter-clockwise
        return torch.rot90(x, k=1, dims=(-2, -1))
    return x


def resize_and_crop_tensor(x, plan: ResizePlan):
    """uint8 (3, H, W) upright -> uint8 (3, plan.height, plan.width) on the same device."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    new_w, new_h = resized_size(x.shape[-1], x.shape[-2], plan)
    mode = {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}.get(
        plan.interpolation, InterpolationMode.BICUBIC)
    if (new_w, new_h) != (x.shape[-1], x.shape[-2]):
        x = F.resize(x, [new_h, new_w], interpolation=mode, antialias=True)
    top = int(round((new_h - plan.height) / 2.0))
    left = int(round((new_w - plan.width) / 2.0))
    return x[:, top:top + plan.height, left:left + plan.width]


@dataclass
class DecodedBatch:
    pixels: object  # uint8 tensor (n_ok, 3, H, W) on the device, rows in `ok` order
    ok: list[int]  # indices into the input of the rows in `pixels`
    sizes: dict  # index -> (upright width, upright height), for every decoded row
    errors: dict  # index -> DecodeError (or another exception) of the rows that failed
    on_device: int  # how many rows the device decoder decoded (the rest: the CPU fallback)


def decode_batch(datas: list[bytes], plan: ResizePlan, *, device, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] = ALLOWED_FORMATS) -> DecodedBatch:
    """Encoded objects -> DecodedBatch. JPEGs this path takes are decoded on `device` in one
    call (one at a time if that call fails, so one bad JPEG does not fail the rest); the
    others go through decode.decode_image on the CPU. Failures never raise: they come
    back in `errors`, keyed by index."""
    import warnings

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 warns on every call that its decoders will move to TorchCodec.
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    device = torch.device(device)
    frames: dict[int, object] = {}
    sizes: dict[int, tuple[int, int]] = {}
    errors: dict[int, Exception] = {}
    jpegs: list[tuple[int, JpegHeader]] = []
    cpu: list[int] = []
    for i, data in enumerate(datas):
        h = read_jpeg_header(data) if "JPEG" in formats else None
        if h is None or not takes(h, plan) or not ends_complete(data):
            cpu.append(i)
        elif h.width * h.height > max_pixels:  # the guard, from the header, before any decode
            errors[i] = DecompressionBomb(f"{h.width}x{h.height} = {h.width * h.height} pixels exceeds the limit of {max_pixels}")
        else:
            jpegs.append((i, h))
    decoded: dict[int, object] = {}
    if jpegs:
        inputs = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i, _ in jpegs]
        try:
            decoded = dict(zip((i for i, _ in jpegs), decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device)))
        except Exception:  # one bad image fails the batched call: decode each on its own
            for (i, _), t in zip(jpegs, inputs):
                try:
                    decoded[i] = decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
                except Exception:
                    cpu.append(i)
    on_device = 0
    for i, h in jpegs:
        if i not in decoded:
            continue
        x = decoded[i]
        if tuple(x.shape[-2:]) != (h.height, h.width):  # a decoder that disagrees with the header: trust neither
            cpu.append(i)
            continue
        frames[i] = resize_and_crop_tensor(apply_orientation(x, h.orientation), plan)
        sizes[i] = upright_size(h)
        on_device += 1
    for i in sorted(cpu):
        try:
            arr, w, hh = decode_image(bytes(datas[i]), plan, max_pixels=max_pixels, formats=formats)
        except Exception as e:  # DecodeError and any other decoder failure: this row's error
            errors[i] = e
            continue
        frames[i] = torch.from_numpy(arr).to(device)
        sizes[i] = (w, hh)
    ok = sorted(frames)
    pixels = (torch.stack([frames[i] for i in ok]) if ok
              else torch.empty((0, 3, plan.height, plan.width), dtype=torch.uint8, device=device))
    return DecodedBatch(pixels=pixels, ok=ok, sizes=sizes, errors=errors, on_device=on_device)


def fetch_batch(batch, *, max_bytes: int | None = None):
    """Ray Data map_batches function for `--decode device`: listing rows -> the same rows with
    the object's bytes in `data` (width and height still null) and the error columns set for
    the objects that could not be fetched (fetch:TooLarge over `max_bytes`, default
    decode.DEFAULT_MAX_OBJECT_MB). The embed actor decodes `data`."""
    import pyarrow as pa

    from sparse_embed.pipeline.embed.decode import DEFAULT_MAX_OBJECT_MB, fetch_many
    from sparse_embed.pipeline.embed.report import redact_text

    uris = batch.column("uri").to_pylist()
    cols = set(batch.column_names)
    fetched = fetch_many(uris, batch.column("etag").to_pylist() if "etag" in cols else None,
                         batch.column("size").to_pylist() if "size" in cols else None,
                         max_bytes=max_bytes or DEFAULT_MAX_OBJECT_MB * 2**20)
    datas, stages, types, messages = [], [], [], []
    for uri in uris:
        got = fetched[uri]
        if isinstance(got, Exception):
            datas.append(None)
            stages.append("fetch")
            types.append(type(got).__name__)
            messages.append(redact_text(str(got) or type(got).__name__)[:1000])
        else:
            datas.append(bytes(got))
            stages.append(None)
            types.append(None)
            messages.append(None)
    n = batch.num_rows
    return (batch
            .append_column("width", pa.nulls(n, pa.int32()))
            .append_column("height", pa.nulls(n, pa.int32()))
            .append_column("data", pa.array(datas, pa.binary()))
            .append_column("error_stage", pa.array(stages, pa.string()))
            .append_column("error_type", pa.array(types, pa.string()))
            .append_column("error_message", pa.array(messages, pa.string())))


__all__ = ["DecodedBatch", "JpegHeader", "decode_batch", "fetch_batch", "read_jpeg_header"]
