"""The encoder benchmark's one `Case` type (a timm model plus its keyword arguments) and the
case builders that `sparse-embed bench encoders --suites ...` selects from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

DEFAULT_LABEL = "biformer_tiny scaled/auto"  # the embed job's default BiFormer configuration


@dataclass(frozen=True)
class Case:
    label: str
    model: str  # timm name
    kwargs: dict[str, Any] = field(default_factory=dict)
    img_size_kwarg: bool = False  # pass img_size=<size> (ViT/Swin position tables are sized at build)
    max_pixels_per_batch: Optional[int] = None  # skip above size*size*batch (with the reason below)
    skip_reason: str = ""

    def skip(self, size: int, batch: int) -> Optional[str]:
        if self.max_pixels_per_batch is not None and size * size * batch > self.max_pixels_per_batch:
            return self.skip_reason
        return None

    def build(self, size: int):
        import timm

        from sparse_embed import encoders  # noqa: F401  registers the project's families in timm

        kwargs = dict(self.kwargs, img_size=size) if self.img_size_kwarg else dict(self.kwargs)
        return timm.create_model(self.model, pretrained=False, **kwargs).eval()


def biformer_cases() -> list[Case]:
    bf = "biformer_tiny"
    return [
        Case(DEFAULT_LABEL, bf, dict(region_grid="scaled", bra_kernel="auto")),
        Case("biformer_tiny scaled/gather", bf, dict(region_grid="scaled", bra_kernel="gather")),
        Case("biformer_tiny scaled/dense", bf, dict(region_grid="scaled", bra_kernel="dense"),
             max_pixels_per_batch=512 * 512,
             skip_reason="dense kernel above 512x512 px per batch: N^2 mask and scores (N=16384 at 512 px)"),
        Case("biformer_tiny scaled/reference", bf, dict(region_grid="scaled", bra_kernel="reference")),
        Case("biformer_tiny fixed/auto", bf, dict(region_grid="fixed", bra_kernel="auto")),
        Case("biformer_tiny fixed/reference", bf, dict(region_grid="fixed", bra_kernel="reference")),
    ]


def baseline_cases() -> list[Case]:
    return [
        Case("vit_small_patch16_224", "vit_small_patch16_224", img_size_kwarg=True),
        Case("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", img_size_kwarg=True),
        Case("convnext_tiny", "convnext_tiny"),
    ]


def lookupvit_encoder_cases() -> list[Case]:
    cases = []
    for v in ('tiny', 'small'):
        cases.append(Case(f'lookupvit_{v}_patch16 M=25', f'lookupvit_{v}_patch16', dict(compressed_grid=5)))
        cases.append(Case(f'vit_{v}_patch16 dense', f'vit_{v}_patch16_224', dict(dynamic_img_size=True)))
    return cases


def topk_encoder_cases() -> list[Case]:
    return [
        Case('vit_small_patch16 topk K=256', 'vit_small_patch16_224_topk', dict(keep=256)),
        Case('vit_small_patch16 topk K=256 +remainder', 'vit_small_patch16_224_topk', dict(keep=256, remainder=True)),
        Case('vit_small_patch16 dense (top-k baseline)', 'vit_small_patch16_224', dict(dynamic_img_size=True)),
    ]


SUITES: dict[str, Callable[[], list[Case]]] = {
    "biformer": biformer_cases,
    "baselines": baseline_cases,
    "lookupvit": lookupvit_encoder_cases,
    "topk": topk_encoder_cases,
}
