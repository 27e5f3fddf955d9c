"""Options shared by several commands, and their parsing into typed values."""
from __future__ import annotations

import argparse
import json


def model_arg(text: str) -> tuple[str, object]:
    """`key=value` -> (key, value), value parsed as JSON when it is (5, 0.5, true), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _float_in(text: str, ok, expected: str) -> float:
    """Parse a float option; `ok(value)` decides, `expected` names what is accepted."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def fraction(text: str) -> float:
    return _float_in(text, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def recall_target(text: str) -> float:
    return _float_in(text, lambda v: 0.0 < v <= 1.0, "a recall in (0, 1], e.g. 0.95")


def non_negative_float(text: str) -> float:
    return _float_in(text, lambda v: v >= 0.0, "a number >= 0, e.g. 0.5")


def positive_float(text: str) -> float:
    return _float_in(text, lambda v: v > 0.0, "a number > 0, e.g. 0.75")


def pillow_formats(text: str) -> tuple[str, ...]:
    """`JPEG,png,TGA` -> ("JPEG", "PNG", "TGA"), checked against Pillow's registered formats."""
    from sparse_embed.pipeline.embed.decode import check_formats

    try:
        return check_formats([f for f in text.split(",") if f.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{str(e)[:1].lower()}{str(e)[1:]}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# Mirrors encoders.heads.POOLS (a test keeps them equal): importing encoders loads torch,
# which would make `--help` slow.
POOLS = ("token", "avg", "gem")
# Mirrors encoders._factory.PRECISIONS (a test keeps them equal), for the same reason.
PRECISIONS = ("fp32", "bf16", "fp16")


def add_encoder_arguments(p: argparse.ArgumentParser, *, default_model: str | None = None) -> None:
    g = p.add_argument_group("encoder")
    g.add_argument("--model", required=default_model is None, default=default_model,
                   help="encoder name: any timm model (random init unless --checkpoint) or one of ours, "
                        "e.g. biformer_tiny, lookupvit_small_patch16" + (f" (default {default_model})" if default_model else ""))
    g.add_argument("--checkpoint", default=None,
                   help="weights from any fsspec URI: .safetensors, or a torch file loadable with weights_only=True")
    g.add_argument("--model-arg", dest="model_args", action="append", type=model_arg, default=[], metavar="KEY=VALUE",
                   help="extra timm create_model keyword, repeatable (e.g. compressed_grid=5)")
    g.add_argument("--pool", choices=POOLS, default="token",
                   help="embedding pooling: the model's own pre-logits (token), or average/GeM over the last feature map")
    g.add_argument("--fuse-last-two", action="store_true", help="concatenate pooled features of the last two stages (needs --pool avg|gem)")
    g.add_argument("--proj-dim", type=positive_int, default=None, help="project embeddings to this width (seeded random-sign projection, scaled by 1/sqrt(dim): keeps inner products in expectation)")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="forward-pass precision (autocast dtype; default fp32). Part of model_version, so a table never "
                        "mixes precisions; fp16 needs CUDA, bf16 runs on CPU too (search embeds queries the same way)")


def encoder_spec(args) -> dict:
    from sparse_embed.encoders import EncoderSpec

    return EncoderSpec(model=args.model, checkpoint=args.checkpoint, model_args=dict(args.model_args),
                       pool=args.pool, fuse_last_two=args.fuse_last_two, proj_dim=args.proj_dim,
                       precision=getattr(args, "precision", "fp32")).to_dict()


def add_lock_arguments(p: argparse.ArgumentParser) -> None:
    """--wait for every command that writes under an output (it holds the output lock)."""
    p.add_argument("--wait", type=non_negative_float, default=0.0, metavar="SECONDS",
                   help="when another run holds the output lock, wait up to this long for it (default 0: exit 3 at once)")
