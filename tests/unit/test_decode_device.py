"""Device-path decode (pipeline/embed/decode_device.py), run here on torchvision's CPU decoder:
the same pixels as the CPU path within a stated tolerance, EXIF orientation, the header's
bomb guard, and the CPU fallback for what the device decoder does not take.

Tolerance: the two paths resample differently (PIL bicubic a=-0.5 vs torch a=-0.75) and the
CPU path decodes large JPEGs at reduced DCT scale, so pixels are compared by mean and 99th
percentile absolute difference in 0..255 levels, not bit for bit. A wrong orientation, crop
offset or channel order gives mean differences above 20 on these images.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sparse_embed.infra.synthetic_images import base_image, encode
from sparse_embed.pipeline.embed.decode import DecodeError, DecompressionBomb, NotAnImage, ResizePlan, UnsupportedFormat, decode_image
from sparse_embed.pipeline.embed.decode_device import decode_batch, read_jpeg_header, resized_size

PLAN = ResizePlan.from_data_config({"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875})
MEAN_TOL, P99_TOL = 1.5, 10  # levels of 255


def _jpeg(w: int, h: int, *, seed: int, orientation: int = 1, mode: str = "RGB") -> bytes:
    img = base_image(np.random.default_rng(seed), width=w, height=h)
    if mode != "RGB":
        img = img.convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99))


@pytest.mark.parametrize("w,h,orientation", [(640, 480, 1), (1024, 768, 6), (1920, 1080, 3), (4000, 3000, 8)])
def test_device_path_matches_cpu_decode_within_tolerance(w, h, orientation):
    data = _jpeg(w, h, seed=w, orientation=orientation)
    want, ww, wh = decode_image(data, PLAN)
    got = decode_batch([data], PLAN, device="cpu")
    assert got.ok == [0] and got.on_device == 1 and not got.errors
    assert got.sizes[0] == (ww, wh) == ((h, w) if orientation in (5, 6, 7, 8) else (w, h))
    px = got.pixels[0].numpy()
    assert px.shape == (3, 224, 224) and px.dtype == np.uint8
    mean, p99 = _diff(px, want)
    assert mean <= MEAN_TOL and p99 <= P99_TOL, f"{w}x{h} orientation {orientation}: mean {mean:.3f}, p99 {p99}"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_cpu_paths_upright_image(orientation):
    data = _jpeg(400, 300, seed=7, orientation=orientation)  # no DCT scaling at this size: near-identical
    want, *size = decode_image(data, PLAN)
    got = decode_batch([data], PLAN, device="cpu")
    assert got.on_device == 1 and list(got.sizes[0]) == size
    mean, p99 = _diff(got.pixels[0].numpy(), want)
    assert mean <= 0.5 and p99 <= 2, f"orientation {orientation}: mean {mean:.3f}, p99 {p99}"


def test_what_the_device_decoder_does_not_take_falls_back_to_the_cpu_decoder_in_order():
    rng = np.random.default_rng(3)
    png = encode(base_image(rng, width=320, height=240), "PNG")
    cmyk = _jpeg(320, 240, seed=4, mode="CMYK")
    grey = _jpeg(320, 240, seed=5, mode="L")
    wide = _jpeg(3000, 100, seed=6)  # the crop would pad: CPU path
    jpeg = _jpeg(320, 240, seed=8)
    assert read_jpeg_header(cmyk) is None and read_jpeg_header(png) is None and read_jpeg_header(grey) is not None
    datas = [png, cmyk, jpeg, grey, wide]
    got = decode_batch(datas, PLAN, device="cpu")
    assert got.ok == [0, 1, 2, 3, 4] and not got.errors
    assert got.on_device == 2  # the RGB and the greyscale JPEG
    for row, data in enumerate(datas):
        want, *size = decode_image(data, PLAN)
        assert list(got.sizes[row]) == size
        mean, p99 = _diff(got.pixels[row].numpy(), want)
        assert mean <= MEAN_TOL and p99 <= P99_TOL, f"row {row}: mean {mean:.3f}, p99 {p99}"


def test_failures_are_per_row_errors_with_their_reason_and_the_bomb_guard_reads_the_header():
    good = _jpeg(320, 240, seed=9)
    truncated_header = good[:20]
    html = b"<html><body>503 Slow Down</body></html>"
    tga = encode(base_image(np.random.default_rng(1), width=64, height=64), "TGA")
    got = decode_batch([html, good, truncated_header, tga, good], PLAN, device="cpu", max_pixels=320 * 240)
    assert got.ok == [1, 4] and got.pixels.shape == (2, 3, 224, 224)
    assert isinstance(got.errors[0], NotAnImage)
    assert isinstance(got.errors[3], UnsupportedFormat) and got.errors[3].detected == "TGA"
    assert 2 in got.errors and str(got.errors[2])  # a JPEG cut inside its header: the CPU decoder names why
    tight = decode_batch([good], PLAN, device="cpu", max_pixels=320 * 240 - 1)
    assert tight.ok == [] and isinstance(tight.errors[0], DecompressionBomb) and "320x240" in str(tight.errors[0])
    assert tight.pixels.shape == (0, 3, 224, 224)


def test_a_truncated_jpeg_is_an_error_row_as_on_the_cpu_path():
    good = _jpeg(320, 240, seed=11)
    got = decode_batch([good, good[: len(good) // 3]], PLAN, device="cpu")
    assert got.ok == [0] and got.on_device == 1
    with pytest.raises(DecodeError, match="image file is truncated") as cpu_error:
        decode_image(good[: len(good) // 3], PLAN)
    assert type(got.errors[1]) is type(cpu_error.value) and str(got.errors[1]) == str(cpu_error.value)


def test_a_corrupt_jpeg_in_a_batch_fails_alone():
    good = _jpeg(320, 240, seed=10)
    body = bytearray(good)
    cut = len(body) // 2
    corrupt = bytes(body[:cut]) + b"\xff\xd9"  # scan data cut in half
    got = decode_batch([good, corrupt, good], PLAN, device="cpu")
    assert 0 in got.ok and 2 in got.ok
    np.testing.assert_array_equal(got.pixels[got.ok.index(0)].numpy(), got.pixels[got.ok.index(2)].numpy())
    # libjpeg may decode a truncated scan with grey fill; either way the row is accounted for
    assert (1 in got.ok) != (1 in got.errors)


@pytest.mark.parametrize("w,h", [(300, 200), (200, 300), (257, 257), (4000, 3000)])
def test_resized_size_is_decode_pys_geometry(w, h):
    new_w, new_h = resized_size(w, h, PLAN)
    assert min(new_w, new_h) == PLAN.scale_short == 256
    assert max(new_w, new_h) == int(256 * max(w, h) / min(w, h))
