"""LookupViT: registry-parametrised API tests, block semantics, the compressed-grid knob.

Inputs are small (64 px -> a 4 x 4 lookup grid, N = 16) and seeded; tolerances are stated
per test (float32).
"""
import pytest
import timm
import torch

from sparse_embed import encoders  # noqa: F401  registers lookupvit_* in timm
from sparse_embed.encoders.lookupvit import LookupBlock

VARIANTS = timm.list_models('lookupvit_*')
WIDTH = {'lookupvit_tiny_patch16': 192, 'lookupvit_small_patch16': 384, 'lookupvit_base_patch16': 768}


def _model(name, **kwargs):
    # 3 blocks keep the base variant fast on a 2-core CPU; width and heads are the variant's.
    torch.manual_seed(0)
    return timm.create_model(name, **{'depth': 3, **kwargs}).eval()


def _images(b=2, h=64, w=64, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_three_variants():
    assert VARIANTS == sorted(WIDTH)


@pytest.mark.parametrize('name', VARIANTS)
def test_forward_shapes_no_nan(name):
    m = _model(name, compressed_grid=3, num_classes=10)
    x = _images()
    with torch.no_grad():
        feats = m.forward_features(x)
        emb = m.forward_head(feats, pre_logits=True)
        logits = m(x)
    D = WIDTH[name]
    assert m.num_features == D
    assert feats.shape == (2, 9 + 16, D)  # M = 3*3 compressed tokens first, then N = 4*4 lookup tokens
    assert emb.shape == (2, D) and logits.shape == (2, 10)
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()


@pytest.mark.parametrize('name', VARIANTS)
def test_features_only_and_intermediates(name):
    m = _model(name)
    x = _images()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, indices=2)
        fm = timm.create_model(name, depth=3, features_only=True, out_indices=(-2, -1)).eval()
        maps = fm(x)
    assert final.shape == (2, 25 + 16, WIDTH[name])
    assert [t.shape for t in inter] == [(2, WIDTH[name], 4, 4)] * 2  # lookup tokens as NCHW
    assert fm.feature_info.channels() == [WIDTH[name]] * 2
    assert [t.shape for t in maps] == [(2, WIDTH[name], 4, 4)] * 2


@pytest.mark.parametrize('name', VARIANTS)
def test_grad_checkpointing_same_output_and_grads(name):
    m = _model(name, compressed_grid=2, num_classes=4).train()
    x = _images(b=1)
    out_ref = m(x)
    out_ref.sum().backward()
    g_ref = m.patch_embed.proj.weight.grad.clone()
    m.zero_grad()
    m.set_grad_checkpointing(True)
    out = m(x)
    out.sum().backward()
    assert torch.allclose(out, out_ref, atol=1e-6), (out - out_ref).abs().max()
    assert torch.allclose(m.patch_embed.proj.weight.grad, g_ref, atol=1e-5)


def test_reset_classifier_and_embedding_source():
    m = _model('lookupvit_tiny_patch16', num_classes=7)
    m.reset_classifier(0)
    x = _images()
    with torch.no_grad():
        assert m(x).shape == (2, 192)  # no classifier: averaged pooled features of both sets
        feats = m.forward_features(x, compressed_grid=3)
        emb_c = m.forward_head(feats, pre_logits=True)
        m.embed_source = 'both'
        emb_both = m.forward_head(feats, pre_logits=True)
    # 'compressed': mean of the 9 compressed tokens; 'both': average of the two set means.
    torch.testing.assert_close(emb_c, feats[:, :9].mean(1))
    torch.testing.assert_close(emb_both, 0.5 * (feats[:, :9].mean(1) + feats[:, 9:].mean(1)))
    with pytest.raises(ValueError):
        timm.create_model('lookupvit_tiny_patch16', embed_source='lookup')


def test_equal_grids_resize_is_identity():
    """compressed_grid == lookup grid: the bilinear resize is the identity, so the compressed
    tokens entering block 0 equal the lookup tokens exactly, M == N, and the cross-attention
    logits are square."""
    m = _model('lookupvit_tiny_patch16', compressed_grid=4)
    x = _images()
    with torch.no_grad():
        c, l, hw = m._embed(x, 4)
        assert hw == (4, 4)
        assert torch.equal(c, l)
        m.resize_antialias = False
        c2, _, _ = m._embed(x, 4)
        assert torch.equal(c2, l)
        feats = m.forward_features(x)
    assert feats.shape == (2, 32, 192)


def _block_by_definition(blk: LookupBlock, c, l):
    """The four steps of a LookupViT block written directly from the paper's description."""
    h, hd = blk.num_heads, blk.head_dim
    B, M, D = c.shape
    N = l.shape[1]
    q = blk.q(blk.norm_q(c)).view(B, M, h, hd)
    k, v = blk.kv(blk.norm_kv(l)).view(B, N, 2, h, hd).unbind(2)
    logits = torch.einsum('bmhd,bnhd->bhmn', q, k) * hd ** -0.5  # (B, h, M, N)
    c = c + blk.proj_c(torch.einsum('bhmn,bnhd->bmhd', logits.softmax(-1), v).reshape(B, M, D))
    c = blk.block(c)
    vc = blk.v_c(blk.norm_v(c)).view(B, M, h, hd)
    a_l = logits.softmax(dim=2)  # softmax over the compressed axis m of the same logits
    l = l + blk.proj_l(torch.einsum('bhmn,bmhd->bnhd', a_l, vc).reshape(B, N, D))
    l = l + blk.mlp(blk.norm_mlp(l))
    return c, l


@pytest.mark.parametrize('grid', [4, 3])  # M == N and M != N
def test_block_matches_definition(grid):
    m = _model('lookupvit_tiny_patch16')
    with torch.no_grad():
        c, l, _ = m._embed(_images(), grid)
        blk = m.blocks[0]
        got = blk(c, l)
        want = _block_by_definition(blk, c, l)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), f'max diff {(g - w).abs().max():.3g}'


def test_grid_change_needs_no_new_weights():
    m3 = _model('lookupvit_tiny_patch16', compressed_grid=3)
    m10 = _model('lookupvit_tiny_patch16', compressed_grid=10)
    sd3, sd10 = m3.state_dict(), m10.state_dict()
    assert {k: v.shape for k, v in sd3.items()} == {k: v.shape for k, v in sd10.items()}
    m10.load_state_dict(sd3, strict=True)
    x = _images(b=1, h=96, w=80)  # 6 x 5 lookup grid, N = 30
    with torch.no_grad():
        for g in (3, 5, 7, 10):
            m3.set_compressed_grid(g)
            feats = m3.forward_features(x)
            assert feats.shape == (1, g * g + 30, 192)
            assert torch.isfinite(m3.forward_head(feats, pre_logits=True)).all()
            # forward-time override gives the same result as the model default
            torch.testing.assert_close(m10.forward_features(x, compressed_grid=g), feats)


def test_any_input_size():
    m = _model('lookupvit_tiny_patch16')
    with torch.no_grad():
        feats = m.forward_features(_images(b=1, h=72, w=40))  # padded to 80 x 48 -> 5 x 3 grid
    assert feats.shape == (1, 25 + 15, 192)


def test_train_grids_sampled_per_batch_seeded():
    def grids(seed):
        m = timm.create_model('lookupvit_tiny_patch16', depth=1, train_grids=(2, 3, 4), grid_seed=seed).train()
        x = _images(b=1)
        seen = []
        with torch.no_grad():
            for _ in range(8):
                seen.append(m.forward_features(x).shape[1] - 16)
            m.eval()
            eval_m = m.forward_features(x).shape[1] - 16
        return seen, eval_m

    seen_a, eval_a = grids(0)
    seen_b, _ = grids(0)
    assert seen_a == seen_b  # same seed, same sequence
    assert set(seen_a) <= {4, 9, 16} and len(set(seen_a)) > 1
    assert eval_a == 25  # eval mode uses compressed_grid (default 5)


def test_grid_validation():
    assert timm.create_model('lookupvit_tiny_patch16', depth=1, compressed_grid='3').compressed_grid == 3
    for bad in (0, -1, 2.5, 'x'):
        with pytest.raises(ValueError):
            timm.create_model('lookupvit_tiny_patch16', depth=1, compressed_grid=bad)


def test_create_encoder_embedding():
    enc = encoders.create_encoder(encoders.EncoderSpec(model='lookupvit_tiny_patch16', model_args={'compressed_grid': 3}))
    assert enc.dim == 192
    with torch.no_grad():
        emb = enc.model(_images())
    assert emb.shape == (2, 192)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_checkpoint_with_both_heads_loads_into_embedding_encoder(tmp_path):
    """A classification checkpoint (both heads) loads into the headless embedding model:
    pretrained_cfg names head_c and head_l as the classifier, so both are dropped."""
    from safetensors.torch import save_file

    src = _model('lookupvit_tiny_patch16', depth=12, num_classes=10)
    path = tmp_path / 'lookupvit_tiny.safetensors'
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = encoders.create_encoder(encoders.EncoderSpec(model='lookupvit_tiny_patch16', checkpoint=str(path)))
    x = _images()
    with torch.no_grad():
        want = torch.nn.functional.normalize(src.forward_head(src.forward_features(x), pre_logits=True), dim=-1)
        got = enc.model(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
