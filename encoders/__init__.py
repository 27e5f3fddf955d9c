"""Sparse-attention vision encoders registered in timm, embedding heads, checkpoint loading.

Importing this package registers every family in timm, so
`timm.create_model("biformer_tiny")` works after `import encoders`. It imports torch:
the CLI imports it only inside the commands that need a model.
"""
from ._factory import Encoder, EncoderSpec, create_encoder

__all__ = ["Encoder", "EncoderSpec", "create_encoder"]
from . import biformer  # noqa: F401  registers biformer_* in timm
from . import lookupvit, topk_attention  # noqa: F401  registers lookupvit_* and vit_*_patch16_224_topk in timm
from .topk_attention import sparsify  # noqa: E402
__all__ += ["sparsify"]
