"""LookupViT (Koner et al., ECCV 2024), registered in timm.

Two token sets per image: N lookup tokens (the 16x16 patch grid) and M compressed tokens
(a bilinear resize of the lookup grid to ``compressed_grid`` x ``compressed_grid``). Each
block runs the expensive ViT block on the M compressed tokens only; the N lookup tokens
see only linear-cost operations (K/V projections, one output projection, a D/2 MLP), so a
block costs about 4*N*D^2 + 14*M*D^2 MACs instead of ViT's 12*N*D^2 + 2*N^2*D.

No official code or weights exist; this is our implementation of the paper's description
(the ECCV 2024 paper's design). The compressed grid has no parameters of its own, so it can be
changed at inference (``set_compressed_grid`` or ``forward_features(x, compressed_grid=g)``)
and sampled per batch in training (``train_grids``, FlexiViT style).
"""
from functools import partial
from typing import List, Literal, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed_nhwc, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block

__all__ = ['LookupViT', 'LookupBlock']

EmbedSource = Literal['compressed', 'both']


def _check_grid(grid) -> int:
    # The embed CLI may hand over "5" as a string (--model-arg compressed_grid=5).
    if isinstance(grid, str) and grid.strip().isdigit():
        grid = int(grid)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"Expected compressed_grid to be an int >= 1, got {grid!r}")
    return grid


class LookupBlock(nn.Module):
    """One LookupViT block: gather (C <- L), ViT block on C, scatter (L <- C), narrow MLP on L."""

    def __init__(
            self,
            *,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            lookup_mlp_ratio: float = 0.5,
            qkv_bias: bool = True,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            act_layer: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Expected dim divisible by num_heads, got dim={dim!r}, num_heads={num_heads!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        # (1) cross-attention, queries from compressed tokens, keys/values from lookup tokens
        self.norm_q = norm_layer(dim)
        self.norm_kv = norm_layer(dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj_c = nn.Linear(dim, dim)
        self.drop_path_c = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # (2) full ViT block on the compressed tokens
        self.block = Block(
            dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            drop_path=drop_path, norm_layer=norm_layer, act_layer=act_layer,
        )
        # (3) reverse update of lookup tokens, values from compressed tokens
        self.norm_v = norm_layer(dim)
        self.v_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_l = nn.Linear(dim, dim)
        self.drop_path_l = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # (4) narrow MLP on the lookup tokens (hidden D/2 by default)
        self.norm_mlp = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * lookup_mlp_ratio), act_layer=act_layer)
        self.drop_path_mlp = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = x.shape
        return x.transpose(1, 2).reshape(B, T, -1)  # (B, T, D)

    def forward(self, c: torch.Tensor, l: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # c: (B, M, D) compressed tokens; l: (B, N, D) lookup tokens
        B, N, D = l.shape
        q = self._heads(self.q(self.norm_q(c)))  # (B, heads, M, head_dim)
        kv = self.kv(self.norm_kv(l)).reshape(B, N, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, M, N)

        c = c + self.drop_path_c(self.proj_c(self._merge(logits.softmax(dim=-1) @ v)))
        c = self.block(c)

        v_c = self._heads(self.v_c(self.norm_v(c)))  # (B, heads, M, head_dim)
        attn_l = logits.transpose(-2, -1).softmax(dim=-1)  # (B, heads, N, M): softmax over compressed axis
        l = l + self.drop_path_l(self.proj_l(self._merge(attn_l @ v_c)))
        l = l + self.drop_path_mlp(self.mlp(self.norm_mlp(l)))
        return c, l


class LookupViT(nn.Module):
    """LookupViT with a timm model API.

    ``forward_features`` returns (B, M + N, D): the M compressed tokens first, then the N
    lookup tokens, each set with its own final norm. ``forward_head`` splits them with the
    M of the latest ``forward_features`` call (or ``num_compressed=``).
    """

    def __init__(
            self,
            *,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            lookup_mlp_ratio: float = 0.5,
            qkv_bias: bool = True,
            compressed_grid: int = 5,
            train_grids: Sequence[int] = (),
            grid_seed: int = 0,
            resize_antialias: bool = True,
            embed_source: EmbedSource = 'compressed',
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            act_layer: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if global_pool != 'avg':
            raise ValueError(f"Expected global_pool='avg' (mean over each token set), got {global_pool!r}")
        if embed_source not in ('compressed', 'both'):
            raise ValueError(f"Expected embed_source in ('compressed', 'both'), got {embed_source!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.embed_source = embed_source
        self.compressed_grid = _check_grid(compressed_grid)
        self.train_grids = tuple(_check_grid(g) for g in train_grids)
        # Seeded so that multi-resolution training is reproducible; the state is not in state_dict.
        self._grid_generator = torch.Generator().manual_seed(grid_seed)
        self.resize_antialias = resize_antialias
        self.grad_checkpointing = False
        self._last_num_compressed = self.compressed_grid ** 2

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            output_fmt='NHWC', strict_img_size=False, dynamic_img_pad=True,
        )
        # Learned position embedding for the pretraining grid; resampled (bicubic) to other grids.
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.patch_embed.grid_size, embed_dim))  # (1, H, W, D)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            LookupBlock(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, lookup_mlp_ratio=lookup_mlp_ratio,
                qkv_bias=qkv_bias, drop_path=dpr[i], norm_layer=norm_layer, act_layer=act_layer,
            )
            for i in range(depth)
        ])
        reduction = patch_size
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm_c = norm_layer(embed_dim)
        self.norm_l = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head_c = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_l = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        trunc_normal_(self.pos_embed, std=.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm API --------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm_[cl]', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head_c

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool != 'avg':
            raise ValueError(f"Expected global_pool='avg' or None, got {global_pool!r}")
        self.num_classes = num_classes
        self.head_c = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_l = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def set_compressed_grid(self, grid: int) -> None:
        """Default compressed grid for inference; needs no new weights."""
        self.compressed_grid = _check_grid(grid)

    # --- forward -----------------------------------------------------------------------
    def _resolve_grid(self, grid: Optional[int]) -> int:
        if grid is not None:
            return _check_grid(grid)
        if self.training and self.train_grids:
            i = int(torch.randint(len(self.train_grids), (1,), generator=self._grid_generator))
            return self.train_grids[i]
        return self.compressed_grid

    def _embed(self, x: torch.Tensor, grid: int) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
        # PatchEmbed's NHWC output is a permuted view of the conv output; without .contiguous()
        # every later LayerNorm and Linear on the lookup tokens copies it (measured ~2x slower).
        x = self.patch_embed(x).contiguous()  # (B, H, W, D)
        B, H, W, D = x.shape
        x = x + resample_abs_pos_embed_nhwc(self.pos_embed, [H, W])
        x = self.pos_drop(x)
        # Bilinear resize of the lookup grid; at grid == H == W it is the identity.
        c = F.interpolate(
            x.permute(0, 3, 1, 2), size=(grid, grid), mode='bilinear',
            align_corners=False, antialias=self.resize_antialias,
        )  # (B, D, g, g)
        c = c.flatten(2).transpose(1, 2).contiguous()  # (B, M, D)
        l = x.reshape(B, H * W, D)  # (B, N, D)
        return c, l, (H, W)

    def _run_block(self, blk: nn.Module, c: torch.Tensor, l: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, c, l)
        return blk(c, l)

    def forward_features(self, x: torch.Tensor, compressed_grid: Optional[int] = None) -> torch.Tensor:
        grid = self._resolve_grid(compressed_grid)
        c, l, _ = self._embed(x, grid)
        for blk in self.blocks:
            c, l = self._run_block(blk, c, l)
        self._last_num_compressed = c.shape[1]
        return torch.cat([self.norm_c(c), self.norm_l(l)], dim=1)  # (B, M + N, D)

    def forward_head(
            self, x: torch.Tensor, pre_logits: bool = False, num_compressed: Optional[int] = None,
    ) -> torch.Tensor:
        M = self._last_num_compressed if num_compressed is None else num_compressed
        pooled_c = self.head_drop(x[:, :M].mean(dim=1))  # (B, D)
        pooled_l = self.head_drop(x[:, M:].mean(dim=1))  # (B, D)
        if pre_logits:
            return pooled_c if self.embed_source == 'compressed' else 0.5 * (pooled_c + pooled_l)
        # Both heads are trained; inference averages their logits.
        return 0.5 * (self.head_c(pooled_c) + self.head_l(pooled_l))

    def forward(self, x: torch.Tensor, compressed_grid: Optional[int] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, compressed_grid=compressed_grid))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            compressed_grid: Optional[int] = None,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Intermediates are the lookup tokens after the chosen blocks (the spatial token set)."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"Expected output_fmt in ('NCHW', 'NLC'), got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        grid = self._resolve_grid(compressed_grid)
        c, l, (H, W) = self._embed(x, grid)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            c, l = self._run_block(blk, c, l)
            if i in take_indices:
                y = self.norm_l(l) if norm else l
                if output_fmt == 'NCHW':
                    y = y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, H, W)
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        self._last_num_compressed = c.shape[1]
        return torch.cat([self.norm_c(c), self.norm_l(l)], dim=1), intermediates

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm_c, self.norm_l = nn.Identity(), nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        # No released weights; ViT (augreg) normalisation so ViT-trained pipelines match.
        'mean': IMAGENET_INCEPTION_MEAN, 'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.proj', 'classifier': ('head_c', 'head_l'), 'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'lookupvit_tiny_patch16': _cfg(),
    'lookupvit_small_patch16': _cfg(),
    'lookupvit_base_patch16': _cfg(),
})


def _create_lookupvit(variant: str, pretrained: bool = False, **kwargs) -> LookupViT:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        LookupViT, variant, pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def lookupvit_tiny_patch16(pretrained: bool = False, **kwargs) -> LookupViT:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_lookupvit('lookupvit_tiny_patch16', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lookupvit_small_patch16(pretrained: bool = False, **kwargs) -> LookupViT:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_lookupvit('lookupvit_small_patch16', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lookupvit_base_patch16(pretrained: bool = False, **kwargs) -> LookupViT:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_lookupvit('lookupvit_base_patch16', pretrained=pretrained, **dict(model_args, **kwargs))
