"""BiFormer: published sizes, kernel parity, the authors' checkpoint layout, timm API.

Tolerances: parameter counts to 0.005 M (the published figures have two decimals); MACs to 1%
(FlopCounterMode counts matmul/conv/SDPA; the published fvcore figures also count norms, ours
are within 0.3%); kernels and checkpoint round trips to 1e-5 fp32.
"""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparse_embed import encoders  # noqa: F401  registers biformer_*
from sparse_embed.encoders import bra
from sparse_embed.encoders.biformer import BiFormer, checkpoint_filter_fn, to_authors_state_dict

VARIANTS = ["biformer_tiny", "biformer_small", pytest.param("biformer_base", marks=pytest.mark.slow)]
PUBLISHED = {  # params (M), MACs at 224 px (G): authors' README
    "biformer_tiny": (13.14, 2.22),
    "biformer_small": (25.54, 4.46),
    "biformer_base": (56.80, 9.76),
}
FAST_KERNELS = ["gather", "dense", "auto"]


def _model(name: str, **kwargs) -> BiFormer:
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so buffers matter in round trips
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _image(*size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_matches_published(name):
    params = sum(p.numel() for p in timm.create_model(name).parameters()) / 1e6
    assert abs(params - PUBLISHED[name][0]) < 0.005, f"{name}: {params:.4f} M params"


@pytest.mark.parametrize("name", VARIANTS)
def test_macs_at_224_match_published(name):
    model = timm.create_model(name, bra_kernel="reference").eval()  # routed work only, as published
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, 224, 224))
    macs = counter.get_total_flops() / 2 / 1e9  # FlopCounterMode counts 2 FLOPs per MAC
    assert abs(macs / PUBLISHED[name][1] - 1) < 0.01, f"{name}: {macs:.3f} GMACs"


@pytest.mark.parametrize(("size", "mode", "expected"), [
    (56, "fixed", (7, 8)), (56, "scaled", (7, 8)),  # stage 1 at 224 px: both modes agree
    (50, "fixed", (7, 8)), (50, "scaled", (7, 8)),  # 200 px: padded to 56
    (256, "fixed", (7, 37)), (256, "scaled", (32, 8)),  # 1024 px
    (63, "scaled", (8, 8)), (13, "scaled", (7, 2)), (4, "fixed", (7, 1)),
])
def test_region_grid(size, mode, expected):
    side = 8 if size not in (13,) else 2
    assert bra.region_grid(size, mode=mode, n_win=7, region_side=side) == expected


def test_region_grid_rejects_unknown_mode():
    with pytest.raises(ValueError, match="region_grid"):
        bra.region_grid(56, mode="adaptive", n_win=7, region_side=8)
    with pytest.raises(ValueError, match="bra_kernel"):
        timm.create_model("biformer_tiny", bra_kernel="triton")


def test_auto_kernel_rule():
    # 224 px: stage 1 and 2 route, stage 3 (49 regions of 2x2 tokens, N=196) runs dense.
    assert bra.choose_bra_kernel(num_regions=49, topk=1, region_tokens=64) == "gather"
    assert bra.choose_bra_kernel(num_regions=49, topk=4, region_tokens=16) == "gather"
    assert bra.choose_bra_kernel(num_regions=49, topk=16, region_tokens=4) == "dense"
    # 1024 px scaled: stage 3 has 1024 regions; dense would score 64x more keys.
    assert bra.choose_bra_kernel(num_regions=1024, topk=16, region_tokens=4) == "gather"
    assert bra.choose_bra_kernel(num_regions=4, topk=16, region_tokens=400) == "dense"


@pytest.mark.parametrize("mode", ["fixed", "scaled"])
@pytest.mark.parametrize("hw", [(50, 50), (63, 63), (80, 80), (56, 72), (13, 13)])
@pytest.mark.parametrize(("dim", "heads", "topk", "side"), [(64, 2, 1, 8), (128, 4, 4, 4), (256, 8, 16, 2)])
def test_bra_fast_kernels_equal_reference(mode, hw, dim, heads, topk, side):
    torch.manual_seed(0)
    attn = bra.BiLevelRoutingAttention(dim=dim, num_heads=heads, topk=topk, region_side=side).eval()
    attn.grid_mode = mode
    x = torch.randn(2, *hw, dim, generator=torch.Generator().manual_seed(2))
    outs = {}
    with torch.inference_mode():
        for kernel in ["reference", *FAST_KERNELS]:
            attn.kernel = kernel
            outs[kernel] = attn(x)
    for kernel in FAST_KERNELS:
        diff = (outs[kernel] - outs["reference"]).abs().max().item()
        assert diff < 1e-5, f"{kernel} vs reference at {hw}, {mode}: max abs diff {diff:.3g}"


def test_gather_kernel_chunking_equals_reference():
    g = torch.Generator().manual_seed(3)
    q, kv = torch.randn(2, 49, 16, 64, generator=g), torch.randn(2, 49, 16, 128, generator=g)
    idx = torch.randint(0, 49, (2, 49, 4), generator=g)
    ref = bra.routed_attention_reference(q, kv, idx, num_heads=2, scale=0.125)
    for chunk_bytes in (1, 40_000, 2**30):  # 1 region per chunk, several, one chunk
        out = bra.routed_attention_gather(q, kv, idx, num_heads=2, scale=0.125, chunk_bytes=chunk_bytes)
        diff = (out - ref).abs().max().item()
        assert diff < 1e-5, f"chunk_bytes={chunk_bytes}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("mode", ["fixed", "scaled"])
@pytest.mark.parametrize("size", [(200, 200), (250, 250), (320, 320), (224, 288)])
def test_model_fast_kernels_equal_reference(mode, size):
    """Every attention layer of the model, fed the reference run's own activations at this input
    size, gives the reference layer's output with each fast kernel. Layer by layer because
    end to end, a rounding-level difference upstream can flip a routing near-tie downstream (a
    random-init model has top-k margins down to 1e-8), which changes the function legitimately."""
    model = _model("biformer_tiny", region_grid=mode)
    layers = [m for m in model.modules() if isinstance(m, (bra.BiLevelRoutingAttention, bra.DenseAttentionLePE))]
    captured = []
    hooks = [m.register_forward_hook(lambda m, args, out: captured.append((m, args[0], out))) for m in layers]
    model.set_attention_mode(bra_kernel="reference")
    with torch.inference_mode():
        model.forward_features(_image(*size, batch=1))
    for h in hooks:
        h.remove()
    assert len(captured) == len(layers) == 14
    with torch.inference_mode():
        for kernel in FAST_KERNELS:
            model.set_attention_mode(bra_kernel=kernel)
            for i, (layer, x, ref) in enumerate(captured):
                diff = (layer(x) - ref).abs().max().item()
                assert diff < 1e-5, f"{kernel} vs reference, layer {i} at {size}, {mode}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("size", [(224, 224), (250, 250)])
def test_inference_path_equals_training_layout(size):
    """Under inference_mode the stages run channels-last with in-place residuals and a chunked
    MLP; the function is the one autograd sees, and the caller's tensor is left alone."""
    model = _model("biformer_tiny")
    x = _image(*size, batch=2)
    x_before = x.clone()
    with torch.no_grad():
        stem = model.stem(x.contiguous(memory_format=torch.channels_last))
    assert stem.permute(0, 2, 3, 1).is_contiguous()  # so stage 0 gets the caller's tensor as is
    stem_before = stem.clone()
    with torch.inference_mode():
        fast = model.forward_features(x)
        stage0 = model.stages[0](stem)  # stem output is channels-last: the stage must not write it
    slow = model.forward_features(x.clone().requires_grad_(True)).detach()
    assert (fast - slow).abs().max().item() < 1e-5
    assert torch.equal(x, x_before) and torch.equal(stem, stem_before)
    assert stage0.shape == (2, 64, *[(s + 3) // 4 for s in size])
    block, nchw = model.stages[1].blocks[0], torch.randn(2, 128, 9, 11, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        direct = block(nchw)  # a block called on an NCHW tensor takes the out-of-place path
    assert (direct - block(nchw.clone().requires_grad_(True)).detach()).abs().max().item() < 1e-5
    model.set_attention_mode(bra_kernel="reference")  # the plain model: baseline and oracle
    assert not any(getattr(m, "fast_inference", False) for m in model.modules())
    model.set_attention_mode(bra_kernel="auto")
    assert all(blk.fast_inference for stage in model.stages for blk in stage.blocks)


def test_modes_agree_at_224_and_differ_above():
    model = _model("biformer_tiny")
    with torch.inference_mode():
        for size, same in [(224, True), (448, False)]:
            x = _image(size, size, batch=1)
            out = {m: (model.set_attention_mode(region_grid=m), model(x))[1] for m in ("fixed", "scaled")}
            assert torch.equal(out["fixed"], out["scaled"]) is same, size


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [(64, 64), (33, 97)])
def test_forward_any_size(name, size):
    model = _model(name)
    with torch.inference_mode():
        feats = model.forward_features(_image(*size))
        logits = model.forward_head(feats)
    assert feats.shape == (2, model.num_features, -(-size[0] // 32), -(-size[1] // 32))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


def test_authors_names_and_shapes():
    sd = to_authors_state_dict(timm.create_model("biformer_tiny").state_dict())
    expected = {  # the authors' released configs
        "downsample_layers.0.0.weight": (32, 3, 3, 3), "downsample_layers.0.3.weight": (64, 32, 3, 3),
        "downsample_layers.0.4.num_batches_tracked": (), "downsample_layers.2.0.weight": (256, 128, 3, 3),
        "stages.0.1.pos_embed.weight": (64, 1, 3, 3), "stages.0.0.attn.lepe.weight": (64, 1, 5, 5),
        "stages.1.0.attn.qkv.qkv.weight": (384, 128), "stages.1.0.attn.qkv.qkv.bias": (384,),
        "stages.2.7.attn.wo.weight": (256, 256), "stages.2.7.mlp.0.weight": (768, 256),
        "stages.2.7.mlp.3.weight": (256, 768), "stages.3.1.attn.qkv.weight": (1536, 512),
        "stages.3.1.attn.proj.bias": (512,), "stages.3.1.attn.lepe.weight": (512, 1, 5, 5),
        "norm.running_var": (512,), "head.weight": (1000, 512),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "stages.3.0.attn.qkv.bias" not in sd
    assert all(k.split(".")[0] in {"downsample_layers", "stages", "norm", "head"} for k in sd)


@pytest.mark.parametrize("name", VARIANTS)
def test_authors_checkpoint_round_trip(name, tmp_path):
    from safetensors.torch import load_file, save_file

    from sparse_embed.encoders._checkpoint import load_into

    model = _model(name)
    x = _image(64, 80)
    with torch.inference_mode():
        before = model(x)
    theirs = to_authors_state_dict(model.state_dict())
    torch.save({"model": theirs, "epoch": 300}, tmp_path / "theirs.pth")
    save_file({k: v.contiguous() for k, v in theirs.items()}, tmp_path / "theirs.safetensors")
    loaded = {
        "pth": torch.load(tmp_path / "theirs.pth", map_location="cpu", weights_only=True),
        "safetensors": load_file(tmp_path / "theirs.safetensors"),
    }
    for fmt, state in loaded.items():
        fresh = timm.create_model(name).eval()
        fresh.load_state_dict(checkpoint_filter_fn(state, fresh), strict=True)
        with torch.inference_mode():
            diff = (fresh(x) - before).abs().max().item()
        assert diff < 1e-5, f"{fmt}: max abs diff {diff:.3g}"
    # the project's loader (fsspec URI, weights_only, family filter), embedding model without head
    headless = timm.create_model(name, num_classes=0).eval()
    load_into(headless, str(tmp_path / "theirs.pth"), drop_classifier=True)
    with torch.inference_mode():
        diff = (headless(x) - model.forward_head(model.forward_features(x), pre_logits=True)).abs().max().item()
    assert diff < 1e-5, f"load_into: max abs diff {diff:.3g}"


def test_features_only_and_intermediates():
    model = _model("biformer_tiny")
    feat = timm.create_model("biformer_tiny", features_only=True).eval()
    body = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "norm."))}
    feat.model.load_state_dict(body, strict=True)  # FeatureGetterNet wraps the model, head and final norm pruned
    assert feat.feature_info.channels() == [64, 128, 256, 512]
    assert feat.feature_info.reduction() == [4, 8, 16, 32]
    x = _image(200, 200)
    with torch.inference_mode():
        maps = feat(x)
        final, inter = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        ref = model.forward_features(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 50, 50), (128, 25, 25), (256, 13, 13), (512, 7, 7)]
    assert torch.equal(final, ref)
    for a, b in zip(maps, inter):
        assert (a - b).abs().max().item() < 1e-5
    assert len(last_two) == 2 and torch.equal(last_two[1], inter[3])


def test_classifier_api():
    model = _model("biformer_tiny")
    x = _image(64, 64)
    assert model.num_features == 512 and model.get_classifier() is model.head
    with torch.inference_mode():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(10)
        assert model(x).shape == (2, 10)
        model.reset_classifier(0)
        out = model(x)
    assert out.shape == (2, 512) and torch.allclose(out, pre)
    model.reset_classifier(0, global_pool="max")
    with torch.inference_mode():
        assert model(x).shape == (2, 512)


@pytest.mark.parametrize("kernel", ["reference", "auto"])
def test_grad_checkpointing_matches(kernel):
    x = _image(64, 64)
    results = []
    for enable in (False, True):
        model = _model("biformer_tiny", bra_kernel=kernel)
        model.set_grad_checkpointing(enable)
        out = model(x)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.detach(), grads))
    (out0, g0), (out1, g1) = results
    assert (out0 - out1).abs().max().item() < 1e-6
    worst = max((g0[n] - g1[n]).abs().max().item() for n in g0)
    assert worst < 1e-6, f"grad max abs diff {worst:.3g}"
