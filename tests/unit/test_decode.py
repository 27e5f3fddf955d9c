"""Fetch + decode: the same pixels as timm's eval transform, and bad bytes as error rows."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sparse_embed.infra.synthetic_images import base_image, encode
from sparse_embed.pipeline.embed.decode import DecompressionBomb, NotAnImage, ResizePlan, decode_image, fetch_decode_batch

CFG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
       "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}


def _img(w=300, h=200, seed=0):
    return base_image(np.random.default_rng(seed), width=w, height=h)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (257, 257), (640, 120)])
def test_matches_timm_eval_transform(size):
    import timm.data
    import torch

    img = _img(*size)
    data = encode(img, "PNG")
    px, w, h = decode_image(data, ResizePlan.from_data_config(CFG))
    assert (w, h) == size and px.shape == (3, 224, 224) and px.dtype == np.uint8
    ours = (torch.from_numpy(px).float() / 255.0 - torch.tensor(CFG["mean"]).view(3, 1, 1)) / torch.tensor(CFG["std"]).view(3, 1, 1)
    ref = timm.data.create_transform(**CFG)(img)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-5, f"max abs diff to timm's transform {diff}"


def test_exif_rotated_jpeg_is_upright():
    img = Image.new("RGB", (120, 60), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 60, 60))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    plan = ResizePlan(height=64, width=64, scale_short=64, interpolation="bilinear")
    px, w, h = decode_image(buf.getvalue(), plan)
    assert (w, h) == (60, 120)  # upright size
    top, bottom = px[:, 2, 32], px[:, -3, 32]
    assert top[2] > 200 and top[0] < 60, "rotated clockwise: the blue left half is now on top"
    assert bottom[0] > 200


@pytest.mark.parametrize("data, error", [
    (b"", NotAnImage),
    (b"<html><body>503 Slow Down</body></html>", NotAnImage),
])
def test_bad_bytes_raise_named_errors(data, error):
    with pytest.raises(error):
        decode_image(data, ResizePlan.from_data_config(CFG))


def test_decompression_bomb_is_refused_before_decoding():
    big = encode(Image.new("L", (4000, 4000)), "PNG")  # small file, 16 MP declared
    with pytest.raises(DecompressionBomb, match="16000000 pixels"):
        decode_image(big, ResizePlan.from_data_config(CFG), max_pixels=10_000_000)


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    px, _, _ = decode_image(encode(img, "PNG"), ResizePlan(height=32, width=32, scale_short=32, interpolation="bilinear"))
    assert px.min() == 255


def test_batch_turns_each_bad_object_into_an_error_row(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(encode(_img(), "JPEG"))
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(encode(_img(seed=1), "JPEG")[:500])
    text = tmp_path / "text.png"
    text.write_bytes(b"hello")
    uris = [str(good), str(trunc), str(text), str(tmp_path / "gone.jpg")]
    out = fetch_decode_batch(pa.table({"uri": uris}), data_config=CFG).to_pydict()
    assert out["error_stage"] == [None, "decode", "decode", "fetch"]
    assert out["pixels"][0] is not None and len(out["pixels"][0]) == 3 * 224 * 224
    assert all(m for m in out["error_message"][1:])
    assert out["error_type"][3] == "FileNotFoundError"


def test_objects_over_the_size_cap_become_too_large_rows_without_being_read(tmp_path, monkeypatch):
    import builtins

    from sparse_embed.pipeline.embed.failures import OBJECT, kind_of

    small, big = tmp_path / "small.jpg", tmp_path / "big.jpg"
    small.write_bytes(encode(_img(), "JPEG"))
    big.write_bytes(encode(_img(seed=2), "JPEG") + b"\0" * 20_000)
    cap = len(small.read_bytes()) + 1000
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    # the listing says big.jpg is over the cap: it is not opened at all
    listed = pa.table({"uri": [str(small), str(big)], "size": [small.stat().st_size, big.stat().st_size]})
    out = fetch_decode_batch(listed, data_config=CFG, max_bytes=cap).to_pydict()
    assert (out["error_stage"], out["error_type"]) == ([None, "fetch"], [None, "TooLarge"])
    assert "over the cap" in out["error_message"][1] and "--max-object-mb" in out["error_message"][1]
    assert opened == [str(small)], "an object listed over the cap is never opened"
    # without a listed size it is read only up to the cap (+1 byte), then refused the same way
    out = fetch_decode_batch(pa.table({"uri": [str(big)]}), data_config=CFG, max_bytes=cap).to_pydict()
    assert out["error_type"] == ["TooLarge"]
    assert kind_of("fetch", "TooLarge", out["error_message"][0]) == OBJECT, "counted against the object's attempts"


def test_a_streamed_body_is_read_to_its_end_or_the_cap():
    import asyncio

    from sparse_embed.pipeline.embed.decode import _read_at_most

    class Trickle:  # a network stream: read(n) returns what has arrived, at most 7 bytes here
        def __init__(self, data):
            self.data = data

        async def read(self, n):
            out, self.data = self.data[:min(n, 7)], self.data[min(n, 7):]
            return out

    data = bytes(range(100))
    assert asyncio.run(_read_at_most(Trickle(data), 1000)) == data
    assert asyncio.run(_read_at_most(Trickle(data), 51)) == data[:51], "never more than the limit"
