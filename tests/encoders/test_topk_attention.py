"""Dynamic top-k attention: parity with dense timm ViT at K = N, fast vs reference at K < N,
selection semantics, registry-parametrised API tests. Small seeded inputs, float32."""
import pytest
import timm
import torch

from sparse_embed import encoders
from sparse_embed.encoders.topk_attention import TopKAttention

VARIANTS = timm.list_models('vit_*_patch16_224_topk')
ATOL = 1e-5


def _images(b=2, h=64, w=64, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _dense_and_topk(name, **topk_kwargs):
    # 4 blocks keep the base variant fast on a 2-core CPU; width and heads are the variant's.
    base = name.removesuffix('_topk')
    torch.manual_seed(0)
    dense = timm.create_model(base, depth=4, dynamic_img_size=True, num_classes=10).eval()
    sparse = timm.create_model(name, depth=4, num_classes=10, **topk_kwargs).eval()
    sparse.load_state_dict(dense.state_dict(), strict=True)
    return dense, sparse


def _outputs(m, x):
    with torch.no_grad():
        feats = m.forward_features(x)
        return m.forward_head(feats, pre_logits=True), m.forward_head(feats), feats


def test_registry_lists_three_variants():
    assert VARIANTS == ['vit_base_patch16_224_topk', 'vit_small_patch16_224_topk', 'vit_tiny_patch16_224_topk']


@pytest.mark.parametrize('name', VARIANTS)
def test_forward_no_nan_and_features(name):
    _, m = _dense_and_topk(name, keep=8)  # 64 px: N = 1 + 16 tokens, 8 kept
    x = _images()
    emb, logits, feats = _outputs(m, x)
    assert emb.shape == (2, m.num_features) and logits.shape == (2, 10)
    assert feats.shape == (2, 17, m.num_features)
    assert torch.isfinite(feats).all()
    with torch.no_grad():
        maps = m.forward_intermediates(x, indices=1, intermediates_only=True)
    assert maps[0].shape == (2, m.num_features, 4, 4)
    assert all(isinstance(b.attn, TopKAttention) for b in m.blocks)


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('reference', [False, True])
def test_keep_all_equals_dense(name, reference):
    dense, sparse = _dense_and_topk(name, keep=17, reference=reference)  # K = N = 17 at 64 px
    x = _images()
    for d, s in zip(_outputs(dense, x), _outputs(sparse, x)):
        diff = (d - s).abs().max().item()
        assert diff <= ATOL, f'top-k with K = N differs from dense timm ViT by {diff:.3g}'


@pytest.mark.parametrize('keep', [1, 5, 16, 30])
@pytest.mark.parametrize('importance', ['cls', 'key_norm'])
@pytest.mark.parametrize('remainder', [False, True])
def test_fast_matches_reference(keep, importance, remainder):
    _, m = _dense_and_topk('vit_small_patch16_224_topk', keep=keep, importance=importance, remainder=remainder)
    x = _images(h=96, w=80)  # N = 1 + 30
    fast = _outputs(m, x)
    encoders.sparsify(m, keep=keep, importance=importance, reference=True, remainder=remainder)
    ref = _outputs(m, x)
    for f, r in zip(fast, ref):
        diff = (f - r).abs().max().item()
        assert diff <= ATOL, f'fast vs reference top-k (K={keep}) max diff {diff:.3g}'


def test_keep_one_attends_only_to_class_token():
    """K = 1 keeps only the (always kept) class token, so every query's output is proj(v_cls)."""
    torch.manual_seed(0)
    attn = TopKAttention(dim=32, num_heads=4, keep=1, qkv_bias=True)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = attn(x)
        v_cls = attn.qkv(x[:, :1])[..., 64:]  # (B, 1, dim): the V part of qkv for the class token
        want = attn.proj(v_cls).expand_as(out)
    assert torch.allclose(out, want, atol=ATOL), (out - want).abs().max()


def test_selection_keeps_class_token_and_top_scores():
    torch.manual_seed(0)
    attn = TopKAttention(dim=32, num_heads=2, keep=4)
    q, k = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    idx = attn.select(q, k)
    assert idx.shape == (1, 2, 4)
    scores = (q[:, :, :1] @ k.transpose(-2, -1)).squeeze(-2)  # (1, 2, 10)
    for h in range(2):
        chosen = set(idx[0, h].tolist())
        assert 0 in chosen
        assert chosen - {0} == set(scores[0, h, 1:].topk(3).indices.add(1).tolist())


def test_sparsify_keeps_weights():
    torch.manual_seed(0)
    m = timm.create_model('vit_tiny_patch16_224', dynamic_img_size=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    qkv = m.blocks[0].attn.qkv
    assert encoders.sparsify(m, keep=4) is m
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.blocks[0].attn.qkv is qkv  # the same module object, not a copy


def test_no_class_token_needs_key_norm():
    torch.manual_seed(0)
    m = timm.create_model('vit_tiny_patch16_224', class_token=False, global_pool='avg', dynamic_img_size=True).eval()
    with pytest.raises(ValueError):
        encoders.sparsify(m, keep=4)
    encoders.sparsify(m, keep=4, importance='key_norm')
    emb, _, _ = _outputs(m, _images())
    assert torch.isfinite(emb).all()


def test_grad_checkpointing_and_backward():
    _, m = _dense_and_topk('vit_tiny_patch16_224_topk', keep=6)
    m.train().set_grad_checkpointing(True)
    m(_images(b=1)).sum().backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None


def test_create_encoder_by_name():
    enc = encoders.create_encoder(encoders.EncoderSpec(model='vit_tiny_patch16_224_topk', model_args={'keep': 8}))
    with torch.no_grad():
        emb = enc.model(_images())
    assert emb.shape == (2, 192)
    assert enc.model.backbone.blocks[0].attn.keep == 8


def test_keep_all_equals_dense_full_depth():
    """All 12 blocks of ViT-Ti at 96 px (N = 37): rounding does not accumulate past 1e-5."""
    torch.manual_seed(0)
    dense = timm.create_model('vit_tiny_patch16_224', dynamic_img_size=True).eval()
    sparse = timm.create_model('vit_tiny_patch16_224_topk', keep=37).eval()
    sparse.load_state_dict(dense.state_dict(), strict=True)
    x = _images(h=96, w=96)
    for d, s in zip(_outputs(dense, x), _outputs(sparse, x)):
        diff = (d - s).abs().max().item()
        assert diff <= ATOL, f'top-k with K = N differs from dense timm ViT by {diff:.3g}'


@pytest.mark.parametrize('reference', [False, True])
def test_remainder_with_one_dropped_key_is_exact(reference):
    """K = N - 1 with remainder: the remainder key is the one dropped key (mean of one) with
    logit bias log(1) = 0, so attention equals dense attention."""
    dense, sparse = _dense_and_topk('vit_tiny_patch16_224_topk', keep=16, remainder=True, reference=reference)
    x = _images()  # N = 17
    for d, s in zip(_outputs(dense, x), _outputs(sparse, x)):
        diff = (d - s).abs().max().item()
        assert diff <= ATOL, f'remainder with one dropped key differs from dense by {diff:.3g}'
