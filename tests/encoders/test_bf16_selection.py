"""Under bf16 CPU autocast the sparse selections are computed from fp32 scores: for the same
q and k, BRA routing and top-k key selection pick what fp32 picks, where bf16 scores would
not (the flags ROUTE_IN_FP32 / SELECT_IN_FP32 switch back to autocast-dtype scores)."""
from __future__ import annotations

import pytest
import torch

from sparse_embed.encoders import bra, topk_attention


def _near_ties(seed: int, shape):
    """Inputs whose scores differ in the 3rd-4th significant digit: bf16 (8-bit mantissa) cannot tell them apart."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base + 1e-3 * torch.randn(shape, generator=g)


def test_routing_under_bf16_autocast_picks_the_fp32_regions():
    q, k = _near_ties(0, (2, 49, 64)), _near_ties(1, (2, 49, 64))
    want = bra.route(q, k, topk=4, scale=0.125)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bra.route(q, k, topk=4, scale=0.125)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_bf16_scores_would_flip_some_routing_and_the_flag_restores_them(monkeypatch):
    q, k = _near_ties(2, (4, 196, 64)), _near_ties(3, (4, 196, 64))
    want = bra.route(q, k, topk=8, scale=0.125).sort(-1).values
    monkeypatch.setattr(bra, "ROUTE_IN_FP32", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flipped = bra.route(q, k, topk=8, scale=0.125).sort(-1).values
    same = (flipped == want).all(-1).float().mean().item()
    assert same < 1.0, "bf16 routing logits agreed everywhere: this test no longer shows why fp32 scores are used"


@pytest.mark.parametrize("importance", ["cls", "key_norm"])
def test_topk_selection_under_bf16_autocast_keeps_the_fp32_keys(importance):
    attn = topk_attention.TopKAttention(dim=64, num_heads=4, keep=16, importance=importance, num_prefix_tokens=1).eval()
    q, k = _near_ties(4, (2, 4, 197, 16)), _near_ties(5, (2, 4, 197, 16))
    want = attn.select(q, k).sort(-1).values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn.select(q.bfloat16(), k.bfloat16()).sort(-1).values
    # bf16 inputs are already rounded: compare against fp32 scores of the same rounded inputs
    ref = attn.select(q.bfloat16().float(), k.bfloat16().float()).sort(-1).values
    assert torch.equal(got, ref)
    assert want.shape == got.shape
