"""On a CUDA machine (skipped without one; `./dev gpu-check` runs them): nvJPEG decode against
the CPU decoder within the CPU test's tolerance, bf16 and fp16 embeddings against fp32, and
the actor's speed with device decode against CPU-decoded pixels."""
from __future__ import annotations

import time

import numpy as np
import pytest

from helpers import SPEC
from sparse_embed.pipeline.embed.decode import ResizePlan, decode_image

pytestmark = pytest.mark.gpu

PLAN = ResizePlan.from_data_config({"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875})


def _jpeg(w, h, seed, orientation=1):
    import io

    from PIL import Image

    from sparse_embed.infra.synthetic_images import base_image

    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    base_image(np.random.default_rng(seed), width=w, height=h).save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def test_nvjpeg_batch_matches_the_cpu_decoder():
    from sparse_embed.pipeline.embed.decode_device import decode_batch

    datas = [_jpeg(640, 480, 1), _jpeg(1024, 768, 2, 6), _jpeg(1920, 1080, 3, 3), _jpeg(4000, 3000, 4, 8)]
    got = decode_batch(datas, PLAN, device="cuda")
    assert got.ok == [0, 1, 2, 3] and got.on_device == 4 and got.pixels.device.type == "cuda"
    for i, data in enumerate(datas):
        want, *size = decode_image(data, PLAN)
        assert list(got.sizes[i]) == size
        d = np.abs(got.pixels[i].cpu().numpy().astype(np.int16) - want.astype(np.int16))
        assert d.mean() <= 1.5 and np.percentile(d, 99) <= 10, f"image {i}: mean {d.mean():.3f}, p99 {np.percentile(d, 99)}"


@pytest.mark.parametrize("precision,min_cos", [("bf16", 0.99), ("fp16", 0.995)])
def test_half_precision_embeddings_stay_close_to_fp32_on_cuda(precision, min_cos):
    from sparse_embed.pipeline.embed.actor import EmbedActor

    spec = SPEC | {"model": "biformer_tiny"}
    fp32, half = EmbedActor(spec=spec), EmbedActor(spec=spec | {"precision": precision})
    assert fp32.device.type == "cuda" and fp32.encoder.model_version != half.encoder.model_version
    pixels = [decode_image(_jpeg(640, 480, s), PLAN)[0].tobytes() for s in range(8)]
    cos = (fp32.embed_pixels(pixels) * half.embed_pixels(pixels)).sum(axis=1)
    assert cos.min() >= min_cos, f"{precision} vs fp32 cosine {cos}"


def test_bf16_biformer_is_faster_than_fp32_on_cuda():
    import torch

    from sparse_embed.pipeline.embed.actor import EmbedActor

    spec = SPEC | {"model": "biformer_tiny"}
    x = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8, device="cuda")
    rates = {}
    for precision in ("fp32", "bf16"):
        actor = EmbedActor(spec=spec | {"precision": precision})
        actor.embed_tensor(x)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            actor.embed_tensor(x)
        rates[precision] = 5 * 64 / (time.perf_counter() - t)
    print(f"biformer_tiny 224 px, batch 64: {rates}")
    assert rates["bf16"] > 1.2 * rates["fp32"], rates
