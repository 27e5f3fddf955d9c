"""Retrieval embedding head over any timm backbone.

pool:
- "token": the backbone's own pooling, `forward_head(forward_features(x), pre_logits=True)`
  (class token for ViTs, global average for CNNs and BiFormer).
- "avg" / "gem": pooled over the last feature map from `forward_intermediates`, which timm
  returns as NCHW for every family. GeM clamps features to eps first, so negative
  activations (BatchNorm outputs) count as eps.
fuse_last_two: pool the last two stages' maps and concatenate them (a local-global
descriptor); needs "avg" or "gem".
proj_dim: a fixed projection to proj_dim (seeded random signs unless a checkpoint
sets `proj.weight`): reduces index size while keeping inner products.
The output is always L2-normalised float32.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Pool = Literal["token", "avg", "gem"]
POOLS = ("token", "avg", "gem")


def gem(x: torch.Tensor, *, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over H, W of a (B, C, H, W) map -> (B, C)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class EmbeddingModel(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        *,
        pool: Pool = "token",
        fuse_last_two: bool = False,
        proj_dim: int | None = None,
        gem_p: float = 3.0,
        proj_seed: int = 0,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"Expected pool in {POOLS}, got {pool!r}")
        if fuse_last_two and pool == "token":
            raise ValueError("Expected pool='avg' or 'gem' with fuse_last_two=True, got pool='token'")
        self.backbone = backbone
        self.pool = pool
        self.fuse_last_two = fuse_last_two
        self.gem_p = gem_p
        width = self._pooled_width()
        self.proj = None
        if proj_dim is not None:
            if not 0 < proj_dim <= width:
                raise ValueError(f"Expected 0 < proj_dim <= {width}, got {proj_dim!r}")
            # Random signs / sqrt(proj_dim) (Achlioptas): preserves inner products in
            # expectation and, unlike a QR, is bitwise identical on every machine and thread
            # count, so driver and actors agree on model_version.
            gen = torch.Generator().manual_seed(proj_seed)
            signs = torch.randint(0, 2, (proj_dim, width), generator=gen).float() * 2 - 1  # (proj_dim, width)
            self.proj = nn.Linear(width, proj_dim, bias=False)
            with torch.no_grad():
                self.proj.weight.copy_(signs / proj_dim ** 0.5)
        self.dim = proj_dim or width

    def _pooled_width(self) -> int:
        if self.pool == "token":
            return self.backbone.num_features
        info = getattr(self.backbone, "feature_info", None)
        if self.fuse_last_two:
            if not info or len(info) < 2:
                raise ValueError(f"{type(self.backbone).__name__} has fewer than two feature stages to fuse")
            return int(info[-1]["num_chs"] + info[-2]["num_chs"])
        return int(info[-1]["num_chs"]) if info else self.backbone.num_features

    def _pool_map(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, p=self.gem_p) if self.pool == "gem" else x.mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "token":
            feats = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        else:
            n = 2 if self.fuse_last_two else 1
            maps = self.backbone.forward_intermediates(x, indices=n, intermediates_only=True)  # n x (B, C, H, W)
            feats = torch.cat([self._pool_map(m) for m in maps], dim=1)
        if feats.ndim != 2:
            raise ValueError(f"Expected pooled features of shape (B, D), got {tuple(feats.shape)}")
        if self.proj is not None:
            feats = self.proj(feats)
        return F.normalize(feats.float(), dim=-1)
