"""Checkpoint loading from any fsspec URI: safetensors, or torch files with weights_only=True.

A torch file that needs arbitrary unpickling is refused (unpickling can run code); the
opt-in `sparse-embed convert-checkpoint --trust-pickle SRC DST` turns a file the user
trusts into safetensors once.
"""
from __future__ import annotations

import io
import os
import sys

CONVERT_HINT = (
    "convert a file you trust once with `sparse-embed convert-checkpoint --trust-pickle {src} OUT.safetensors` "
    "and pass OUT.safetensors"
)
# Wrappers seen around state dicts in released checkpoints ({"model": sd, "epoch": ...}).
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")


class CheckpointError(ValueError):
    pass


def _read(uri: str) -> bytes:
    """The bytes at any fsspec URI (s3:// reads the standard AWS_* environment through s3fs)."""
    import fsspec

    with fsspec.open(uri, "rb") as f:
        return f.read()


def _write(uri: str, data: bytes) -> None:
    """One PUT on an object store (atomic there); locally, write aside and rename."""
    import fsspec

    if "://" in uri and not uri.startswith("file://"):
        with fsspec.open(uri, "wb") as f:
            f.write(data)
        return
    path = os.path.abspath(uri.removeprefix("file://"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_state_dict(uri: str) -> dict:
    """Tensors of a checkpoint at `uri`, unwrapped from a {"model": ...} style wrapper."""
    import torch

    data = _read(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        state = load(data)
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError for anything beyond tensors and containers
            if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
                raise CheckpointError(
                    f"Refusing to unpickle {uri!r}: it holds objects beyond tensors, and loading those can run code; "
                    + CONVERT_HINT.format(src=uri)
                ) from None
            raise CheckpointError(f"Cannot read checkpoint {uri!r}: {type(e).__name__}: {e}") from e
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"Expected a state dict of tensors in {uri!r}, got {type(state).__name__}")
    return state


def filter_for_model(state: dict, model) -> dict:
    """Apply the model family's `checkpoint_filter_fn` (timm convention) when it has one."""
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    return filter_fn(state, model) if filter_fn is not None else state


def load_into(model, uri: str, *, drop_classifier: bool) -> None:
    """Load `uri` into `model` strictly; with drop_classifier the checkpoint's classifier
    weights are dropped (embedding models have no classifier)."""
    state = filter_for_model(load_state_dict(uri), model)
    if drop_classifier:
        classifier = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
        names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
        state = {k: v for k, v in state.items() if not any(k == n or k.startswith(n + ".") for n in names)}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"Checkpoint {uri!r} does not fit {type(model).__name__}: "
            f"missing {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )


def convert_to_safetensors(src: str, dst: str) -> int:
    """Unpickle `src` (the caller has opted in to trusting it) and write its tensors as
    safetensors to `dst`. Returns the tensor count."""
    import torch
    from safetensors.torch import save

    obj = torch.load(io.BytesIO(_read(src)), map_location="cpu", weights_only=False)
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    tensors = {k: v.contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"No tensors found in {src!r}")
    _write(dst, save(tensors))
    return len(tensors)
