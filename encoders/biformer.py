"""BiFormer (Zhu et al., CVPR 2023) registered in timm: ``biformer_tiny``, ``_small``, ``_base``.

Same function and parameters as the authors' release (rayleizhu/BiFormer); ``checkpoint_filter_fn``
maps their checkpoint names onto this layout (timm ConvNeXt-style ``stem`` / ``stages.i.downsample``
/ ``stages.i.blocks``). Stages 1-3 use bi-level routing attention (``encoders.bra``), stage 4 dense
attention with LePE.

Any input size: each BRA layer pads its map with zeros at the bottom/right up to whole regions
and crops the output, which is the authors' ``auto_pad=True`` behaviour; the region grid is not
adapted to divisibility. The stem and downsampling convs (3x3, stride 2, padding 1) take any size.

Resolution policy, keyword ``region_grid`` (default ``"scaled"``, which the embed job uses):
  - ``"fixed"``: 7x7 regions at every size; exactly the authors' model (with ``auto_pad``).
    Regions grow with the image, so attention cost grows almost quadratically.
  - ``"scaled"``: at least 7 regions per side, more above 224 px, so that regions keep at most
    their 224-px size (8, 4, 2 tokens per side in stages 1-3) and top-k keeps the key count
    per query at most 64: near-linear cost. Identical to ``"fixed"`` at 224 px and below.
Kernel, keyword ``bra_kernel`` (default ``"auto"``): see ``encoders.bra``. Under inference
(eval, no autograd) every kernel but ``"reference"`` also runs the stages channels-last with
in-place residuals and a token-chunked MLP (same function, less memory); ``"reference"`` is the
plain model throughout, the baseline the benchmarks and the parity tests compare against.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.utils.checkpoint
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, SelectAdaptivePool2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .bra import BiLevelRoutingAttention, BraKernel, DenseAttentionLePE, check_bra_kernel

__all__ = ["BiFormer", "checkpoint_filter_fn", "to_authors_state_dict"]

RegionGrid = Literal["fixed", "scaled"]
REGION_GRIDS = ("fixed", "scaled")

# Inference runs the MLP over token chunks whose hidden activation is at most this many bytes
# (peak memory: the whole-map hidden is 12 MiB per image at stage 1, 512 px). Not tuned; with it
# the default path measured ~285 ms against 366 ms before the inference path (BENCHMARKS.md).
MLP_CHUNK_BYTES = 2**20


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BiFormerBlock(nn.Module):
    """NCHW in and out: x + dwconv3x3(x), then pre-norm attention and MLP on NHWC tokens."""

    def __init__(self, *, dim: int, attn: nn.Module, mlp_ratio: float = 3.0, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module], act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fast_inference = True  # False under bra_kernel="reference": the authors' data flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_inference(self) or not _is_channels_last(x):
            x = x + self.pos_embed(x)
            x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
            x = x + self.drop_path(self.attn(self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
            return x.permute(0, 3, 1, 2)  # (B, C, H, W)
        return self._add_residuals_(x + self.pos_embed(x))

    def forward_inplace_(self, x: torch.Tensor) -> torch.Tensor:
        """Inference only, x channels-last: the same function, computed into x itself (the caller
        gives up x). Saves one map-sized tensor per block at peak."""
        return self._add_residuals_(x.add_(self.pos_embed(x)))

    def _add_residuals_(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) channels-last, owned by this call: += attn, then += mlp by token chunks
        (the MLP is per token, so its hidden (N, mlp_ratio * C) never exists whole)."""
        x_hwc = x.permute(0, 2, 3, 1)  # (B, H, W, C), contiguous
        x_hwc.add_(self.attn(self.norm1(x_hwc)))
        tokens = x_hwc.view(-1, x_hwc.shape[-1])  # (N, C)
        step = max(1, MLP_CHUNK_BYTES // (self.mlp.fc1.out_features * tokens.element_size()))
        for start in range(0, tokens.shape[0], step):
            chunk = tokens[start:start + step]
            chunk.add_(self.mlp(self.norm2(chunk)))
        return x


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous()


def _fast_inference(m: nn.Module) -> bool:
    """Eval, no autograd, and not the reference path: the in-place, channels-last data flow."""
    return m.fast_inference and not m.training and not torch.is_grad_enabled()


class BiFormerStage(nn.Module):
    def __init__(self, *, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False
        self.fast_inference = True  # False under bra_kernel="reference": the authors' data flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in, x = x, self.downsample(x)
        if self.fast_inference:  # token ops then see contiguous (B, H, W, C) memory
            x = x.contiguous(memory_format=torch.channels_last)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            return x
        if not _fast_inference(self):
            return self.blocks(x)
        # Inference: the blocks update the stage's own tensor in place (a forward hook that keeps
        # a block's output must clone it); the caller's tensor is never written.
        blocks = iter(self.blocks)
        if x is x_in:
            x = next(blocks)(x)
        for blk in blocks:
            x = blk.forward_inplace_(x)
        return x


def _conv_bn(cin: int, cout: int, bn_layer: Callable[[int], nn.Module]) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), bn_layer(cout)]


class BiFormer(nn.Module):
    def __init__(
            self,
            *,
            depths: tuple[int, ...] = (2, 2, 8, 2),
            dims: tuple[int, ...] = (64, 128, 256, 512),
            num_heads: tuple[int, ...] = (2, 4, 8, 8),
            topks: tuple[int, ...] = (1, 4, 16, -1),  # -1: dense attention in that stage
            n_win: int = 7,
            region_sides: tuple[int, ...] = (8, 4, 2, 1),  # tokens per region side at 224 px
            region_grid: RegionGrid = "scaled",
            bra_kernel: BraKernel = "auto",
            mlp_ratio: float = 3.0,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            bn_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
            act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        if not len(depths) == len(dims) == len(num_heads) == len(topks) == len(region_sides):
            raise ValueError(f"Expected per-stage tuples of one length, got depths={depths!r}, "
                             f"dims={dims!r}, num_heads={num_heads!r}, topks={topks!r}")
        self.num_classes = num_classes
        self.global_pool_type = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.stem = nn.Sequential(  # indices match the authors' downsample_layers.0
            nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1), bn_layer(dims[0] // 2), act_layer(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1), bn_layer(dims[0]),
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, self.feature_info, cur = [], [], 0
        for i, (depth, dim, heads, topk) in enumerate(zip(depths, dims, num_heads, topks)):
            down = nn.Identity() if i == 0 else nn.Sequential(*_conv_bn(dims[i - 1], dim, bn_layer))
            blocks = []
            for j in range(depth):
                if topk > 0:
                    attn = BiLevelRoutingAttention(dim=dim, num_heads=heads, topk=topk, n_win=n_win,
                                                   region_side=region_sides[i])
                else:
                    attn = DenseAttentionLePE(dim=dim, num_heads=heads)
                blocks.append(BiFormerBlock(dim=dim, attn=attn, mlp_ratio=mlp_ratio, drop_path=dpr[cur + j],
                                            norm_layer=norm_layer, act_layer=act_layer))
            cur += depth
            stages.append(BiFormerStage(downsample=down, blocks=blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = bn_layer(dims[-1])  # BatchNorm2d after stage 4, as released
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.set_attention_mode(region_grid=region_grid, bra_kernel=bra_kernel)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_attention_mode(self, *, region_grid: Optional[RegionGrid] = None,
                           bra_kernel: Optional[BraKernel] = None) -> None:
        """Switch the resolution policy and/or attention kernel of every attention layer.
        ``bra_kernel="reference"`` also runs the blocks as the authors wrote them (NCHW,
        out-of-place residuals, whole-map MLP): the plain model, the baseline and parity oracle."""
        if region_grid is not None and region_grid not in REGION_GRIDS:
            raise ValueError(f"Expected region_grid in {REGION_GRIDS}, got {region_grid!r}")
        if bra_kernel is not None:
            check_bra_kernel(bra_kernel)
            self.bra_kernel = bra_kernel
        if region_grid is not None:
            self.region_grid = region_grid
        for m in self.modules():
            if isinstance(m, BiLevelRoutingAttention):
                m.grid_mode, m.kernel = self.region_grid, self.bra_kernel
            elif isinstance(m, DenseAttentionLePE):
                m.kernel = self.bra_kernel
            elif isinstance(m, (BiFormerStage, BiFormerBlock)):
                m.fast_inference = self.bra_kernel != "reference"

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool_type = global_pool
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        device = self.stem[0].weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, list[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """timm's signature. Stage outputs are NCHW; ``norm`` applies the final BatchNorm to the
        last stage's intermediate only (it is sized for that stage)."""
        if output_fmt != "NCHW":
            raise ValueError(f"Expected output_fmt 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(self._stem_input(x))
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if max_index < 3:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < 3:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, num_features, ceil(H/32), ceil(W/32)), after the final BatchNorm."""
        return self.norm(self.stages(self.stem(self._stem_input(x))))

    def _stem_input(self, x: torch.Tensor) -> torch.Tensor:
        # The fast path runs channels-last from the stem on; the reference path keeps NCHW.
        return x.contiguous(memory_format=torch.channels_last) if self.stages[0].fast_inference else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))  # (B, num_features)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Authors' name -> ours (after stripping a "module." prefix); applied in order, first match wins.
_AUTHORS_TO_OURS = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
)
_SUFFIXES = ((".attn.qkv.qkv.", ".attn.qkv."), (".attn.wo.", ".attn.proj."),
             (".mlp.0.", ".mlp.fc1."), (".mlp.3.", ".mlp.fc2."))


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a released BiFormer checkpoint (optionally wrapped as {"model": state_dict}) onto ours.

    Already-converted state dicts pass through. ``head.*`` is dropped when the model has no
    classifier (num_classes=0), as for embedding extraction.
    """
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        for pattern, repl in _AUTHORS_TO_OURS:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        for theirs, ours in _SUFFIXES:
            k = k.replace(theirs, ours)
        if k.startswith("head.") and isinstance(getattr(model, "head", None), nn.Identity):
            continue
        out[k] = v
    return out


def to_authors_state_dict(state_dict: dict[str, torch.Tensor], *,
                          bra_stages: tuple[int, ...] = (0, 1, 2)) -> dict[str, torch.Tensor]:
    """Inverse of ``checkpoint_filter_fn``: our names -> the released checkpoints' names."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            k = f"stages.{m.group(1)}.{m.group(2)}." + k[m.end():]
            k = k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.3.")
            if int(m.group(1)) in bra_stages:  # the dense stage keeps attn.qkv / attn.proj
                k = k.replace(".attn.qkv.", ".attn.qkv.qkv.").replace(".attn.proj.", ".attn.wo.")
        out[k] = v
    return out


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    return build_model_with_cfg(
        BiFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        # crop_pct 0.9 and bicubic: the timm ViT _cfg the authors' model file registers with
        "crop_pct": 0.9, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "head", "license": "mit",
        "paper_ids": "arXiv:2303.08810", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(),
    "biformer_small.in1k": _cfg(),
    "biformer_base.in1k": _cfg(),
})


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    model_args = dict(depths=(2, 2, 8, 2), dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 8))
    return _create_biformer("biformer_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    model_args = dict(depths=(4, 4, 18, 4), dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 8))
    return _create_biformer("biformer_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    model_args = dict(depths=(4, 4, 18, 4), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 8))
    return _create_biformer("biformer_base", pretrained=pretrained, **dict(model_args, **kwargs))
