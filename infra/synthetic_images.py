"""Seeded synthetic images and near-duplicate variants, for the demo, tests and benchmarks.

A base image is a colour gradient with random ellipses, rectangles and polygons and a
little noise. Its variants are the edits near-duplicate search must see through:
a crop (80-92 % of each side, resized back), a downscale to 40-60 %, a JPEG re-encode
at quality 25-45, and a brightness change of x0.75-0.85 or x1.15-1.25.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

VARIANT_KINDS = ("crop", "resize", "jpeg", "brightness")


@dataclass(frozen=True)
class SyntheticImage:
    key: str  # object key relative to the bucket prefix
    data: bytes  # encoded file
    base_key: str  # the key of the base image it derives from (itself for a base)
    kind: str  # "base" or one of VARIANT_KINDS


def base_image(rng: np.random.Generator, *, width: int, height: int):
    from PIL import Image, ImageDraw

    c0, c1 = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0.0, 1.0, width)[None, :, None] * rng.uniform(0.3, 1.0) + np.linspace(0.0, 1.0, height)[:, None, None] * rng.uniform(0.0, 0.7)
    t = np.clip(t, 0, 1)
    pixels = (c0 * (1 - t) + c1 * t).astype(np.uint8)  # (H, W, 3)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 10))):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x0, x1 = sorted(rng.integers(0, width, size=2))
        y0, y1 = sorted(rng.integers(0, height, size=2))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse([x0, y0, x1 + 8, y1 + 8], fill=colour)
        elif shape == 1:
            draw.rectangle([x0, y0, x1 + 8, y1 + 8], fill=colour)
        else:
            pts = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(int(rng.integers(3, 6)))]
            draw.polygon(pts, fill=colour)
    noise = rng.normal(0.0, 6.0, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8), "RGB")


def variant(img, kind: str, rng: np.random.Generator):
    from PIL import Image, ImageEnhance

    w, h = img.size
    if kind == "crop":
        fw, fh = rng.uniform(0.80, 0.92, size=2)
        cw, ch = int(w * fw), int(h * fh)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
    if kind == "resize":
        f = rng.uniform(0.4, 0.6)
        return img.resize((max(16, int(w * f)), max(16, int(h * f))), Image.BILINEAR)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(25, 46)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "brightness":
        f = rng.choice([rng.uniform(0.75, 0.85), rng.uniform(1.15, 1.25)])
        return ImageEnhance.Brightness(img).enhance(float(f))
    raise ValueError(f"Expected kind in {VARIANT_KINDS}, got {kind!r}")


def encode(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def generate(n_base: int, *, seed: int = 0, variants: tuple[str, ...] = VARIANT_KINDS,
             min_side: int = 192, max_side: int = 384) -> list[SyntheticImage]:
    """`n_base` bases (JPEG and PNG alternately) under base/, each with one variant per
    kind under variants/<kind>/."""
    from PIL import Image  # noqa: F401  (fail early with a clear ImportError)

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_base):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        img = base_image(rng, width=w, height=h)
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        base_key = f"base/img_{i:05d}.{ext}"
        out.append(SyntheticImage(base_key, encode(img, fmt), base_key, "base"))
        for kind in variants:
            out.append(SyntheticImage(f"variants/{kind}/img_{i:05d}.jpg", encode(variant(img, kind, rng), "JPEG"), base_key, kind))
    return out
