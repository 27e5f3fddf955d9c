"""Dynamic top-k key attention: a training-free drop-in for timm ViT `Attention`.

Per layer and per head, every query attends only to the K keys that the layer's class
token attends to most (importance = the class token's own attention logits in this layer,
q_cls . k_j, O(N * head_dim) per head), plus the prefix tokens (class, registers), which
are always kept. Attention then costs O(N * K) instead of O(N^2). For the class token
itself, whose output is the ViT embedding, the kept keys are exactly its own top-K.
`importance="key_norm"` (||k_j|| per head) serves models without a class token.

`remainder=True` (off by default) adds one extra key per head standing for the N - K
dropped keys: their mean key and mean value, with logit q . k_mean * scale + log(N - K),
i.e. the dropped keys' softmax mass approximated to first order. O(N * head_dim) extra.

`reference=True` computes the same selection densely: full N x N logits with -inf on the
unselected keys. The parity test flips this flag. `sparsify(model, keep=K)` swaps the
modules in place; parameters are the same objects, so state_dict keys are unchanged and
any ViT checkpoint loads.

Registered names `vit_{tiny,small,base}_patch16_224_topk` build the timm ViT (with
`dynamic_img_size=True`) and sparsify it; `keep=` (default 256), `importance=`,
`reference=` and `remainder=` are create_model kwargs.
"""
import contextlib
import math
from typing import Literal, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models import register_model

__all__ = ['TopKAttention', 'sparsify']

Importance = Literal['cls', 'key_norm']


# The importance scores that pick the kept keys are computed in fp32 even under autocast, so
# bf16 does not change which keys are kept for the same q and k (benchmarks/fidelity.py;
# BENCHMARKS.md, "bf16 fidelity"). False: in the autocast dtype, for that comparison.
SELECT_IN_FP32 = True


class TopKAttention(nn.Module):
    """Multi-head self-attention over the K most important keys (per head)."""

    def __init__(
            self,
            *,
            dim: int,
            num_heads: int,
            keep: int,
            num_prefix_tokens: int = 1,
            importance: Importance = 'cls',
            reference: bool = False,
            remainder: bool = False,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            norm_layer: Optional[type] = None,
    ) -> None:
        super().__init__()
        if keep < 1:
            raise ValueError(f"Expected keep >= 1, got {keep!r}")
        if importance not in ('cls', 'key_norm'):
            raise ValueError(f"Expected importance in ('cls', 'key_norm'), got {importance!r}")
        if importance == 'cls' and num_prefix_tokens < 1:
            raise ValueError("Expected a class token (num_prefix_tokens >= 1) with importance='cls', got 0")
        if dim % num_heads:
            raise ValueError(f"Expected dim divisible by num_heads, got dim={dim!r}, num_heads={num_heads!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = dim
        self.scale = self.head_dim ** -0.5
        self.keep = keep
        self.num_prefix_tokens = num_prefix_tokens
        self.importance = importance
        self.reference = reference
        self.remainder = remainder
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.)
        self.norm = nn.Identity()
        self.gate = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.)

    @classmethod
    def from_attention(
            cls, attn: Attention, *, keep: int, num_prefix_tokens: int = 1,
            importance: Importance = 'cls', reference: bool = False, remainder: bool = False,
    ) -> 'TopKAttention':
        """Wrap a timm `Attention`, sharing its submodules (same parameters, same names)."""
        dim = attn.qkv.in_features
        new = cls(dim=dim, num_heads=attn.num_heads, keep=keep, num_prefix_tokens=num_prefix_tokens,
                  importance=importance, reference=reference, remainder=remainder)
        new.head_dim, new.attn_dim, new.scale = attn.head_dim, attn.attn_dim, attn.scale
        for name in ('qkv', 'q_norm', 'k_norm', 'attn_drop', 'norm', 'proj', 'proj_drop'):
            setattr(new, name, getattr(attn, name))
        new.gate = getattr(attn, 'gate', None)
        return new

    def extra_repr(self) -> str:
        return (f'keep={self.keep}, importance={self.importance!r}, reference={self.reference}, '
                f'remainder={self.remainder}')

    def select(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Indices (B, heads, K) of the kept keys; prefix tokens always kept."""
        N = k.shape[-2]
        fp32 = torch.autocast(k.device.type, enabled=False) if SELECT_IN_FP32 else contextlib.nullcontext()
        if SELECT_IN_FP32:  # the scores in fp32 even under autocast (see SELECT_IN_FP32)
            q, k = q.float(), k.float()
        with fp32:
            if self.importance == 'cls':
                score = (q[:, :, :1] * self.scale @ k.transpose(-2, -1)).squeeze(-2)  # (B, heads, N)
            else:
                score = k.norm(dim=-1)  # (B, heads, N)
        if self.num_prefix_tokens:
            score = score.clone()
            score[..., :self.num_prefix_tokens] = float('inf')
        return score.topk(min(self.keep, N), dim=-1, sorted=False).indices

    def forward(
            self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("TopKAttention supports neither attn_mask nor is_causal")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        idx = self.select(q, k)  # (B, heads, K)
        K = idx.shape[-1]
        drop = self.attn_drop.p if self.training else 0.
        gather_idx = idx.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)  # (B, heads, K, head_dim)
        k_sel, v_sel = k.gather(2, gather_idx), v.gather(2, gather_idx)  # (B, heads, K, head_dim)
        rem = None
        if self.remainder and K < N:
            k_rem = (k.sum(2, keepdim=True) - k_sel.sum(2, keepdim=True)) / (N - K)  # (B, heads, 1, head_dim)
            v_rem = (v.sum(2, keepdim=True) - v_sel.sum(2, keepdim=True)) / (N - K)  # (B, heads, 1, head_dim)
            rem = (k_rem, v_rem, math.log(N - K))
        if self.reference:
            bias = torch.full((B, self.num_heads, N), float('-inf'), dtype=q.dtype, device=q.device)
            bias = bias.scatter(-1, idx, 0.).unsqueeze(-2)  # (B, heads, 1, N): 0 kept, -inf dropped
            logits = (q * self.scale) @ k.transpose(-2, -1) + bias  # (B, heads, N, N)
            if rem is not None:
                rem_logit = (q * self.scale) @ rem[0].transpose(-2, -1) + rem[2]  # (B, heads, N, 1)
                logits, v = torch.cat([logits, rem_logit], dim=-1), torch.cat([v, rem[1]], dim=2)
            x = self.attn_drop(logits.softmax(dim=-1)) @ v
        elif rem is None:
            x = F.scaled_dot_product_attention(q, k_sel, v_sel, dropout_p=drop, scale=self.scale)
        else:
            k_sel, v_sel = torch.cat([k_sel, rem[0]], dim=2), torch.cat([v_sel, rem[1]], dim=2)  # (B, heads, K+1, hd)
            bias = torch.zeros(1, K + 1, dtype=q.dtype, device=q.device)  # (1, K+1), broadcast over queries
            bias[:, -1] = rem[2]  # log(N - K): the remainder key stands for N - K keys
            x = F.scaled_dot_product_attention(q, k_sel, v_sel, attn_mask=bias, dropout_p=drop, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, N, attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def sparsify(
        model: nn.Module, *, keep: int, importance: Importance = 'cls', reference: bool = False,
        remainder: bool = False,
) -> nn.Module:
    """Replace every timm `Attention` in `model` by `TopKAttention` in place; returns `model`.

    Weights are unchanged. Calling it again on a sparsified model updates keep/importance/
    reference/remainder of the existing `TopKAttention` modules.
    """
    num_prefix = getattr(model, 'num_prefix_tokens', 0)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TopKAttention):
                child.keep, child.importance, child.reference, child.remainder = keep, importance, reference, remainder
                swapped += 1
            elif type(child) is Attention:
                setattr(parent, name, TopKAttention.from_attention(
                    child, keep=keep, num_prefix_tokens=num_prefix, importance=importance, reference=reference,
                    remainder=remainder))
                swapped += 1
    if not swapped:
        raise ValueError(f"Expected a model with timm Attention modules, got {type(model).__name__} with none")
    return model


def _create_topk_vit(base: str, pretrained: bool = False, **kwargs) -> nn.Module:
    keep = kwargs.pop('keep', 256)
    importance = kwargs.pop('importance', 'cls')
    reference = kwargs.pop('reference', False)
    remainder = kwargs.pop('remainder', False)
    for k in ('pretrained_cfg', 'pretrained_cfg_overlay'):
        kwargs.pop(k, None)  # the base ViT's own pretrained cfg applies
    kwargs.setdefault('dynamic_img_size', True)
    model = timm.create_model(base, pretrained=pretrained, **kwargs)
    return sparsify(model, keep=int(keep), importance=importance, reference=reference, remainder=remainder)


@register_model
def vit_tiny_patch16_224_topk(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create_topk_vit('vit_tiny_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def vit_small_patch16_224_topk(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create_topk_vit('vit_small_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def vit_base_patch16_224_topk(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create_topk_vit('vit_base_patch16_224', pretrained=pretrained, **kwargs)
