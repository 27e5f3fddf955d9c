"""The embed actor with `decode="device"` (decoding on its own device: CPU here) and with a
precision from the spec: the same embeddings as the CPU decode path within a stated
tolerance, per-row decode errors, bf16 CPU autocast, fp16 refused without CUDA."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from helpers import SPEC
from sparse_embed.infra.synthetic_images import base_image
from sparse_embed.pipeline.embed.actor import EmbedActor, has_conv
from sparse_embed.pipeline.embed.decode import ResizePlan, decode_image


def _jpegs(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        base_image(rng, width=int(rng.integers(300, 700)), height=int(rng.integers(300, 700))).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rows(n: int, **cols) -> pa.Table:
    base = {"uri": [f"mem://{i}" for i in range(n)], "error_stage": [None] * n, "error_type": [None] * n,
            "error_message": [None] * n, "width": pa.nulls(n, pa.int32()), "height": pa.nulls(n, pa.int32())}
    return pa.table(base | cols)


def test_device_decode_rows_embed_like_cpu_decoded_pixels_and_bad_rows_become_decode_errors():
    actor = EmbedActor(spec=SPEC, decode="device")
    datas = _jpegs(4, seed=0)
    datas.insert(2, b"<html>not an image</html>")
    out = actor(_rows(5, data=pa.array(datas, pa.binary()))).to_pydict()
    assert out["error_stage"] == [None, None, "decode", None, None] and out["error_type"][2] == "NotAnImage"
    assert "data" not in out and "pixels" not in out
    plan = ResizePlan.from_data_config(actor.encoder.data_config)
    good = [d for i, d in enumerate(datas) if i != 2]
    decoded = [decode_image(d, plan) for d in good]
    want = actor.embed_pixels([px.tobytes() for px, _, _ in decoded])
    got = np.array([out["embedding"][i] for i in (0, 1, 3, 4)], dtype=np.float32)
    cos = (got * want).sum(axis=1)
    # The pixel tolerance of test_decode_device.py carries through the encoder as a cosine.
    assert cos.min() > 0.999, f"cosine of device-decoded to CPU-decoded embeddings {cos}"
    assert [(out["width"][i], out["height"][i]) for i in (0, 1, 3, 4)] == [(w, h) for _, w, h in decoded]
    assert out["embedding"][2] is None and out["width"][2] is None


def test_bf16_precision_autocasts_on_cpu_and_changes_model_version():
    fp32 = EmbedActor(spec=SPEC)
    bf16 = EmbedActor(spec=SPEC | {"precision": "bf16"})
    assert fp32.encoder.model_version != bf16.encoder.model_version
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (3, fp32.height, fp32.width), dtype=np.uint8).tobytes() for _ in range(3)]
    a, b = fp32.embed_pixels(pixels), bf16.embed_pixels(pixels)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)
    cos = (a * b).sum(axis=1)
    assert cos.min() > 0.98 and not np.array_equal(a, b), f"bf16 vs fp32 cosine {cos}"


def test_fp32_spec_keeps_the_model_version_it_had_before_precision_existed():
    from sparse_embed.encoders import EncoderSpec, create_encoder

    without = {k: v for k, v in SPEC.items() if k != "precision"}
    assert create_encoder(EncoderSpec.from_dict(without)).model_version == \
        create_encoder(EncoderSpec.from_dict(SPEC | {"precision": "fp32"})).model_version


def test_fp16_without_cuda_is_refused_at_actor_start():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 runs")
    with pytest.raises(ValueError, match="CUDA for --precision fp16"):
        EmbedActor(spec=SPEC | {"precision": "fp16"})


def test_unknown_precision_is_a_value_error():
    from sparse_embed.encoders import EncoderSpec

    with pytest.raises(ValueError, match="--precision"):
        EncoderSpec.from_dict(SPEC | {"precision": "int8"})


def test_channels_last_only_for_conv_models_on_cuda():
    actor = EmbedActor(spec=SPEC)  # resnet10t: convolutions, but no CUDA here
    assert has_conv(actor.model) and actor.channels_last is (actor.device.type == "cuda")
    vit = EmbedActor(spec=SPEC | {"model": "vit_tiny_patch16_224_topk"})
    assert not has_conv(vit.model) and not vit.channels_last  # one patch-embedding conv: attention only


def test_cli_precisions_match_the_encoders():
    from sparse_embed.encoders._factory import PRECISIONS
    from sparse_embed.jobs.options import PRECISIONS as CLI_PRECISIONS

    assert CLI_PRECISIONS == PRECISIONS


def test_nightly_config_takes_precision_decode_and_actor_wait():
    from sparse_embed.jobs.nightly_config import parse

    base = {"source": "s3://b/i/", "out": "s3://b/o", "model": "resnet10t"}
    cfg = parse(base | {"precision": "bf16", "decode": "auto", "actor_wait_s": 600})
    assert (cfg.precision, cfg.decode, cfg.actor_wait_s) == ("bf16", "auto", 600)
    for field, bad in (("precision", "fp64"), ("decode", "gpu"), ("actor_wait_s", -1)):
        with pytest.raises(ValueError, match=f"nightly config field '{field}'"):
            parse(base | {field: bad})


def test_search_embeds_queries_with_the_tables_precision_or_says_it_cannot(tmp_path):
    from sparse_embed.encoders import EncoderSpec, create_encoder
    from sparse_embed.pipeline.index.searcher import embed_queries

    path = tmp_path / "q.jpg"
    path.write_bytes(_jpegs(1, seed=5)[0])
    bf16_spec = EncoderSpec.from_dict(SPEC | {"precision": "bf16"})
    manifest = {"encoder": {"spec": bf16_spec.to_dict(), "model_version": create_encoder(bf16_spec).model_version}}
    got = embed_queries([str(path)], manifest)
    actor = EmbedActor(spec=bf16_spec.to_dict())
    plan = ResizePlan.from_data_config(actor.encoder.data_config)
    np.testing.assert_array_equal(got, actor.embed_pixels([decode_image(path.read_bytes(), plan)[0].tobytes()]))
    fp16 = EncoderSpec.from_dict(SPEC | {"precision": "fp16"})
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA for --precision fp16"):
            embed_queries([str(path)], {"encoder": {"spec": fp16.to_dict(), "model_version": create_encoder(fp16).model_version}})
