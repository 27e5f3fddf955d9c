"""The encoder interface: create by name, seeded init, model_version, heads, checkpoints."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from sparse_embed.encoders import EncoderSpec, create_encoder
from sparse_embed.encoders._checkpoint import CheckpointError, convert_to_safetensors, load_state_dict


def test_random_init_is_identical_across_builds():
    a, b = create_encoder("resnet18"), create_encoder("resnet18")
    assert a.model_version == b.model_version
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(a.model(x), b.model(x), rtol=0, atol=0)


@pytest.mark.parametrize("spec", [
    EncoderSpec("resnet18"), EncoderSpec("resnet18", pool="gem"), EncoderSpec("resnet18", pool="avg", fuse_last_two=True),
    EncoderSpec("vit_tiny_patch16_224"), EncoderSpec("resnet18", proj_dim=64),
])
def test_embeddings_are_unit_norm_with_declared_width(spec):
    enc = create_encoder(spec)
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    if spec.model.startswith("vit"):
        x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        e = enc.model(x)
    assert e.shape == (3, enc.dim) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    assert enc.dim == {"resnet18": 512, "vit_tiny_patch16_224": 192}[spec.model] * (1 if not spec.fuse_last_two else 1.5) \
        if not spec.proj_dim else enc.dim == 64


def test_model_version_tracks_weights_and_config(tmp_path):
    base = create_encoder("resnet18")
    state = {k: v.clone() for k, v in base.model.backbone.state_dict().items()}
    state["conv1.weight"][0, 0, 0, 0] += 1.0
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    tuned = create_encoder(EncoderSpec("resnet18", checkpoint=str(path)))
    assert tuned.model_version != base.model_version
    assert create_encoder(EncoderSpec("resnet18", pool="gem")).model_version != base.model_version
    torch.testing.assert_close(tuned.model.backbone.conv1.weight, state["conv1.weight"])


def test_torch_checkpoint_with_wrapper_and_classifier_loads(tmp_path):
    base = create_encoder("resnet18")
    state = dict(base.model.backbone.state_dict())
    state["fc.weight"] = torch.zeros(10, 512)  # a classifier the embedding model drops
    state["fc.bias"] = torch.zeros(10)
    path = tmp_path / "w.pth"
    torch.save({"model": state, "epoch": 3}, path)
    enc = create_encoder(EncoderSpec("resnet18", checkpoint=str(path)))
    assert enc.model_version == base.model_version  # same weights, same version, wherever they came from


def test_pickle_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(1)}, "x": Payload()}, f)
    with pytest.raises(CheckpointError, match="convert-checkpoint --trust-pickle"):
        load_state_dict(str(path))
    assert not marker.exists(), "the payload must not run"


def test_convert_checkpoint_round_trip(tmp_path):
    import argparse

    src, dst = tmp_path / "a.pth", tmp_path / "a.safetensors"
    # Training scripts often save their argparse Namespace beside the weights; weights_only refuses it.
    torch.save({"model": {"w": torch.arange(4.0)}, "args": argparse.Namespace(lr=0.1)}, src)
    with pytest.raises(CheckpointError, match="Refusing to unpickle"):
        load_state_dict(str(src))
    assert convert_to_safetensors(str(src), str(dst)) == 1
    torch.testing.assert_close(load_state_dict(str(dst))["w"], torch.arange(4.0))


def test_wrong_checkpoint_names_missing_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"not.a.key": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="missing"):
        create_encoder(EncoderSpec("resnet18", checkpoint=str(path)))
