"""Bi-level routing attention (BRA, Zhu et al., CVPR 2023) and BiFormer's dense stage-4 attention.

BRA on a (B, H, W, C) map, for a grid of nh x nw regions:
  1. pad bottom/right with zeros so H, W divide into equal regions (the authors' ``auto_pad``);
  2. one Linear(C, 3C) gives q, k, v; region descriptors are the means of q and k per region;
  3. routing: affinity = (q_r * scale) @ k_r^T on detached tensors, hard top-k regions per
     query region (no learned parameters, no routing weights);
  4. token attention: every token of a query region attends to all tokens of its k routed
     regions, heads split after the gather, softmax scale ``dim ** -0.5`` (full channel dim,
     as in the released weights);
  5. LCE: a 5x5 depthwise conv over V laid out as the padded image, added before ``proj``;
  6. crop the padding.

Steps 1-3 and 5-6 are shared; step 4 has interchangeable kernels (``BraKernel``):
  - ``reference``: the paper's algorithm as written: gather K/V of the routed regions
    (a top-k copy), explicit matmul -> softmax -> matmul.
  - ``gather``: the same gather, but in region chunks bounded to ``GATHER_CHUNK_BYTES`` and fed
    to fused ``scaled_dot_product_attention`` (no score tensor materialised).
  - ``dense``: no gather: SDPA over all tokens with a boolean region mask from the routing;
    cheaper when regions are tiny and top-k covers a large share of them.
  - ``auto``: ``choose_bra_kernel`` picks ``gather`` or ``dense`` per call from the region shape.
All kernels compute the same function; the parity tests hold them to 1e-5 in fp32.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

BraKernel = Literal["auto", "reference", "gather", "dense"]
BRA_KERNELS: tuple[str, ...] = ("auto", "reference", "gather", "dense")

# Upper bound on the gathered K/V buffer per chunk in the ``gather`` kernel. Measured on this
# project's 2-core CPU (stage-3 shapes at 512 px, 1 thread): 2-4 MiB chunks stay in cache and run
# the kernel 5x faster than 32 MiB chunks; the 16x top-k copy never reaches the peak memory.
GATHER_CHUNK_BYTES = 2 * 2**20

# ``auto`` uses the dense masked kernel while the token count is at most this: the mask is
# N^2 bools and dense work grows as N^2, so it only pays on small maps (stage 3 at 224 px: N=196).
DENSE_MAX_TOKENS = 256


def check_bra_kernel(kernel: str) -> str:
    if kernel not in BRA_KERNELS:
        raise ValueError(f"Expected bra_kernel in {BRA_KERNELS}, got {kernel!r}")
    return kernel


def choose_bra_kernel(*, num_regions: int, topk: int, region_tokens: int) -> str:
    """Kernel that ``auto`` runs for one BRA call; pure function of the region shape.

    Dense attention scores num_regions * region_tokens keys per query, routed attention
    topk * region_tokens plus a top-k gather copy. Dense wins when top-k already covers every
    region, or when the whole map is small (tiny regions, the gather dominates).
    """
    num_tokens = num_regions * region_tokens
    if topk >= num_regions or num_tokens <= DENSE_MAX_TOKENS:
        return "dense"
    return "gather"


def _to_regions(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    B, H, W, C = x.shape
    rh, rw = H // nh, W // nw
    x = x.view(B, nh, rh, nw, rw, C).permute(0, 1, 3, 2, 4, 5)  # (B, nh, nw, rh, rw, C)
    return x.reshape(B, nh * nw, rh * rw, C)  # (B, R, T, C)


def _from_regions(x: torch.Tensor, nh: int, nw: int, rh: int, rw: int) -> torch.Tensor:
    B, _, _, C = x.shape
    x = x.view(B, nh, nw, rh, rw, C).permute(0, 1, 3, 2, 4, 5)  # (B, nh, rh, nw, rw, C)
    return x.reshape(B, nh * rh, nw * rw, C)  # (B, H, W, C)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    *lead, N, C = x.shape
    x = x.reshape(-1, N, num_heads, C // num_heads)  # (B', N, heads, head_dim)
    return x.transpose(1, 2)  # (B', heads, N, head_dim)


def _merge_heads(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return x.transpose(1, 2).reshape(shape)  # (B', N, heads, head_dim) -> shape


# The routing logits are computed in fp32 even under autocast: with bf16 logits the routed
# regions differ from fp32's (benchmarks/fidelity.py; BENCHMARKS.md, "bf16 fidelity").
# False computes them in the autocast dtype (what the fidelity benchmark compares against).
ROUTE_IN_FP32 = True


def route(q_r: torch.Tensor, k_r: torch.Tensor, *, topk: int, scale: float) -> torch.Tensor:
    """Indices (B, R, topk) of the regions each query region attends to."""
    if ROUTE_IN_FP32:
        with torch.autocast(q_r.device.type, enabled=False):
            logits = (q_r.detach().float() * scale) @ k_r.detach().float().transpose(-2, -1)  # (B, R, R)
    else:
        logits = (q_r.detach() * scale) @ k_r.detach().transpose(-2, -1)  # (B, R, R)
    return torch.topk(logits, k=topk, dim=-1).indices


def _gather_regions(kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """kv (B, R, T, D), idx (B, Rq, k) -> (B, Rq, k*T, D): a copy of K/V per routed region."""
    B, _, T, D = kv.shape
    _, Rq, k = idx.shape
    index = idx.reshape(B, Rq * k, 1, 1).expand(B, Rq * k, T, D)
    return torch.gather(kv, 1, index).view(B, Rq, k * T, D)


def _index_regions(kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Same result as ``_gather_regions`` via index_select of whole regions (contiguous row copies,
    several times faster on CPU than the element-wise ``torch.gather``)."""
    B, R, T, D = kv.shape
    _, Rq, k = idx.shape
    offset = torch.arange(B, device=idx.device).view(B, 1, 1) * R
    rows = (idx + offset).reshape(-1)  # (B*Rq*k,) flat region ids
    return kv.reshape(B * R, T * D).index_select(0, rows).view(B, Rq, k * T, D)


def routed_attention_reference(q, kv, idx, *, num_heads: int, scale: float) -> torch.Tensor:
    """q (B, R, T, C), kv (B, R, T, 2C), idx (B, R, topk) -> (B, R, T, C). The paper's algorithm,
    unfused: element-wise gather of K/V per routed region, matmul, softmax, matmul."""
    B, R, T, C = q.shape
    kv_sel = _gather_regions(kv, idx)  # (B, R, topk*T, 2C)
    k_sel, v_sel = kv_sel.split(C, dim=-1)
    qh = _split_heads(q, num_heads)  # (B*R, heads, T, hd)
    kh = _split_heads(k_sel, num_heads)  # (B*R, heads, topk*T, hd)
    vh = _split_heads(v_sel, num_heads)
    attn = (qh * scale) @ kh.transpose(-2, -1)  # (B*R, heads, T, topk*T)
    attn = attn.softmax(dim=-1)
    return _merge_heads(attn @ vh, (B, R, T, C))


def routed_attention_gather(q, kv, idx, *, num_heads: int, scale: float,
                            chunk_bytes: int = GATHER_CHUNK_BYTES) -> torch.Tensor:
    """Same function as the reference: whole-region index_select in bounded region chunks,
    fused SDPA per chunk."""
    B, R, T, C = q.shape
    topk = idx.shape[-1]
    per_region = B * topk * T * 2 * C * kv.element_size()
    step = max(1, min(R, chunk_bytes // per_region))
    if step == R:
        return _gathered_sdpa(q, kv, idx, num_heads=num_heads, scale=scale)
    out = q.new_empty(B, R, T, C)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        out[:, r0:r1] = _gathered_sdpa(q[:, r0:r1], kv, idx[:, r0:r1], num_heads=num_heads, scale=scale)
    return out


def _gathered_sdpa(q, kv, idx, *, num_heads: int, scale: float) -> torch.Tensor:
    """q (B, rc, T, C) over the routed regions idx (B, rc, topk) of kv (B, R, T, 2C)."""
    B, rc, T, C = q.shape
    k_sel, v_sel = _index_regions(kv, idx).split(C, dim=-1)  # each (B, rc, topk*T, C)
    o = F.scaled_dot_product_attention(
        _split_heads(q, num_heads),  # (B*rc, heads, T, hd)
        _split_heads(k_sel, num_heads),  # (B*rc, heads, topk*T, hd)
        _split_heads(v_sel, num_heads),
        scale=scale,
    )
    return _merge_heads(o, (B, rc, T, C))


def routed_attention_dense(q, kv, idx, *, num_heads: int, scale: float) -> torch.Tensor:
    """Same function as the reference: dense SDPA over all tokens, masked to routed regions."""
    B, R, T, C = q.shape
    k, v = kv.split(C, dim=-1)
    allowed = torch.zeros(B, R, R, dtype=torch.bool, device=q.device)
    allowed.scatter_(2, idx, True)  # (B, R query regions, R key regions)
    mask = allowed[:, :, None, :, None].expand(B, R, T, R, T).reshape(B, 1, R * T, R * T)
    o = F.scaled_dot_product_attention(
        _split_heads(q.reshape(B, R * T, C), num_heads),  # (B, heads, R*T, hd)
        _split_heads(k.reshape(B, R * T, C), num_heads),
        _split_heads(v.reshape(B, R * T, C), num_heads),
        attn_mask=mask,
        scale=scale,
    )
    return _merge_heads(o, (B, R, T, C))


_ROUTED_KERNELS = {
    "reference": routed_attention_reference,
    "gather": routed_attention_gather,
    "dense": routed_attention_dense,
}


def region_grid(size: int, *, mode: str, n_win: int, region_side: int) -> tuple[int, int]:
    """(regions along the axis, tokens per region along the axis) for a stage map of ``size``.

    fixed:  n_win regions at every size (the authors' model); regions grow with the input.
    scaled: at least n_win regions, more once ``size`` exceeds n_win * region_side, so regions
            keep at most the side they have at 224 px and the cost stays near-linear.
    The padded size is n * r >= size (padding below n tokens per axis).
    """
    if mode == "fixed":
        n = n_win
    elif mode == "scaled":
        n = max(n_win, math.ceil(size / region_side))
    else:
        raise ValueError(f"Expected region_grid in ('fixed', 'scaled'), got {mode!r}")
    return n, math.ceil(size / n)


class BiLevelRoutingAttention(nn.Module):
    """BRA over a (B, H, W, C) map; the grid mode and kernel are set by the owning model."""

    def __init__(self, *, dim: int, num_heads: int, topk: int, n_win: int = 7,
                 region_side: int = 8, lce_kernel: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Expected dim divisible by num_heads, got {dim!r} and {num_heads!r}")
        self.num_heads = num_heads
        self.topk = topk
        self.n_win = n_win
        self.region_side = region_side  # tokens per region side at 224 px (used by "scaled")
        self.scale = dim ** -0.5  # full channel dim, as the released weights were trained
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lepe = nn.Conv2d(dim, dim, lce_kernel, padding=lce_kernel // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.grid_mode = "scaled"
        self.kernel = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        nh, rh = region_grid(H, mode=self.grid_mode, n_win=self.n_win, region_side=self.region_side)
        nw, rw = region_grid(W, mode=self.grid_mode, n_win=self.n_win, region_side=self.region_side)
        pad_h, pad_w = nh * rh - H, nw * rw - W
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # zeros bottom/right: (B, Hp, Wp, C)
        R, T = nh * nw, rh * rw
        topk = min(self.topk, R)
        kernel = self.kernel
        if kernel == "auto":
            kernel = choose_bra_kernel(num_regions=R, topk=topk, region_tokens=T)
        if kernel == "reference":
            out = self._forward_reference(x, nh, nw, topk)
        else:
            out = self._forward_fast(x, nh, nw, topk, kernel)
        if pad_h or pad_w:
            out = out[:, :H, :W].contiguous()
        return out

    def _forward_reference(self, x: torch.Tensor, nh: int, nw: int, topk: int) -> torch.Tensor:
        """The authors' data flow: qkv on the image layout, regions cut from q, k, v."""
        B, Hp, Wp, C = x.shape
        qkv = self.qkv(x)  # (B, Hp, Wp, 3C)
        lce = self.lepe(qkv[..., 2 * C:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, Hp, Wp, C)
        q = _to_regions(qkv[..., :C], nh, nw)  # (B, R, T, C)
        kv = _to_regions(qkv[..., C:], nh, nw)  # (B, R, T, 2C)
        idx = route(q.mean(dim=2), kv[..., :C].mean(dim=2), topk=topk, scale=self.scale)  # (B, R, topk)
        out = routed_attention_reference(q, kv, idx, num_heads=self.num_heads, scale=self.scale)
        out = _from_regions(out, nh, nw, Hp // nh, Wp // nw) + lce  # (B, Hp, Wp, C)
        return self.proj(out)

    def _forward_fast(self, x: torch.Tensor, nh: int, nw: int, topk: int, kernel: str) -> torch.Tensor:
        """Fewer copies: cut regions from x (C channels, not 3C), q and kv from two GEMMs on the
        region layout (contiguous, no slicing copies), LCE in channels-last, added in place.
        Each intermediate is dropped as soon as it is used (peak memory at stage 1)."""
        B, Hp, Wp, C = x.shape
        rh, rw = Hp // nh, Wp // nw
        xr = _to_regions(x, nh, nw)  # (B, R, T, C)
        q = F.linear(xr, self.qkv.weight[:C], self.qkv.bias[:C])  # (B, R, T, C)
        kv = F.linear(xr, self.qkv.weight[C:], self.qkv.bias[C:])  # (B, R, T, 2C)
        del xr
        idx = route(q.mean(dim=2), kv[..., :C].mean(dim=2), topk=topk, scale=self.scale)  # (B, R, topk)
        out = _ROUTED_KERNELS[kernel](q, kv, idx, num_heads=self.num_heads, scale=self.scale)  # (B, R, T, C)
        del q
        v_img = _from_regions(kv[..., C:], nh, nw, rh, rw)  # (B, Hp, Wp, C), contiguous
        del kv
        lce = self.lepe(v_img.permute(0, 3, 1, 2))  # (B, C, Hp, Wp) view of channels-last memory
        del v_img
        lce = lce.permute(0, 2, 3, 1)  # (B, Hp, Wp, C)
        if not lce.is_contiguous():  # conv did not keep channels-last
            lce = lce.contiguous()
        lce.view(B, nh, rh, nw, rw, C).add_(out.view(B, nh, nw, rh, rw, C).permute(0, 1, 3, 2, 4, 5))
        return self.proj(lce)  # (B, Hp, Wp, C)


class DenseAttentionLePE(nn.Module):
    """BiFormer stage-4 attention over a (B, H, W, C) map: dense MHSA, scale head_dim ** -0.5,
    qkv without bias, plus LePE (a depthwise conv over the attention's input x) before proj."""

    def __init__(self, *, dim: int, num_heads: int = 8, lepe_kernel: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Expected dim divisible by num_heads, got {dim!r} and {num_heads!r}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim)
        self.kernel = "auto"  # "reference": explicit matmul/softmax; anything else: SDPA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        lepe = self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if self.kernel == "reference":
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, H, W, C) + lepe  # (B, H, W, C)
        return self.proj(out)
