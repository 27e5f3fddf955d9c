"""The encoder interface the jobs use: create by name, get model + data config + width + version.

Any timm model name works (random init unless a checkpoint is given: nothing is fetched
from a hub); the sparse families register themselves in timm when `encoders` is
imported. Random init is seeded, so every actor of a run builds the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .heads import POOLS

INIT_SEED = 0  # every actor must build identical random-init weights
PRECISIONS = ("fp32", "bf16", "fp16")  # the forward pass's autocast dtype; fp32: no autocast


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild the same encoder elsewhere (an actor, the search job)."""

    model: str
    checkpoint: str | None = None
    model_args: dict = field(default_factory=dict)  # timm create_model kwargs, e.g. {"compressed_grid": 5}
    pool: str = "token"
    fuse_last_two: bool = False
    proj_dim: int | None = None
    precision: str = "fp32"  # part of model_version: bf16/fp16 embeddings are other embeddings

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"Expected pool in {POOLS}, got {self.pool!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Expected --precision in {', '.join(PRECISIONS)}, got {self.precision!r}")

    def to_dict(self) -> dict:
        return {
            "model": self.model, "checkpoint": self.checkpoint, "model_args": dict(self.model_args),
            "pool": self.pool, "fuse_last_two": self.fuse_last_two, "proj_dim": self.proj_dim,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderSpec":
        return cls(**{k: d[k] for k in ("model", "checkpoint", "model_args", "pool", "fuse_last_two", "proj_dim", "precision")
                      if k in d})


@dataclass
class Encoder:
    spec: EncoderSpec
    model: object  # EmbeddingModel: (B, 3, H, W) float -> (B, dim) L2-normalised float32
    data_config: dict  # timm data config: input_size, mean, std, crop_pct, interpolation
    dim: int
    model_version: str


def versioned_config(spec: EncoderSpec) -> dict:
    """The spec fields model_version hashes: weights, not their location, count; precision
    counts when it is not fp32 (an fp32 spec hashes as it did before --precision existed,
    so fp32 tables keep their model_version)."""
    config = spec.to_dict() | {"checkpoint": None}
    if config["precision"] == "fp32":
        del config["precision"]
    return config


def create_encoder(spec: EncoderSpec | str, **overrides) -> Encoder:
    import timm
    import torch

    from ._checkpoint import load_into
    from .heads import EmbeddingModel
    from ._versioning import model_version

    if isinstance(spec, str):
        spec = EncoderSpec(model=spec, **overrides)
    if not timm.is_model(spec.model):
        close = timm.list_models(f"*{spec.model.split('_')[0]}*")[:10]
        raise ValueError(f"Expected a timm model name (e.g. {', '.join(close) or 'resnet18, vit_small_patch16_224'}), got {spec.model!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        backbone = timm.create_model(spec.model, pretrained=False, num_classes=0, **spec.model_args)
    if spec.checkpoint:
        load_into(backbone, spec.checkpoint, drop_classifier=True)
    model = EmbeddingModel(backbone, pool=spec.pool, fuse_last_two=spec.fuse_last_two, proj_dim=spec.proj_dim).eval()
    data_config = timm.data.resolve_model_data_config(backbone)
    version = model_version(versioned_config(spec), model)
    return Encoder(spec=spec, model=model, data_config=data_config, dim=model.dim, model_version=version)
