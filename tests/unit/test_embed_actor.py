"""The embed actor outside Ray: eager and torch.compile paths give the same embeddings, and a
model that cannot compile fails the actor at start with the flag named."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import SPEC
from sparse_embed.pipeline.embed.actor import EmbedActor



def _pixels(actor: EmbedActor, n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (3, actor.height, actor.width), dtype=np.uint8).tobytes() for _ in range(n)]


def test_eager_actor_embeds_each_image_independently_of_its_batch():
    actor = EmbedActor(spec=SPEC)
    pixels = _pixels(actor, 5, seed=0)
    together = actor.embed_pixels(pixels)
    alone = np.concatenate([actor.embed_pixels([p]) for p in pixels])
    assert together.shape == (5, actor.encoder.dim) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_compiled_actor_embeds_like_the_eager_one_at_any_batch_size():
    eager = EmbedActor(spec=SPEC)
    compiled = EmbedActor(spec=SPEC, compile_batch=4)
    for n, seed in ((4, 1), (3, 2), (9, 3)):  # exact, padded, split into chunks and padded
        pixels = _pixels(eager, n, seed)
        got, want = compiled.embed_pixels(pixels), eager.embed_pixels(pixels)
        assert got.shape == want.shape == (n, eager.encoder.dim)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_model_that_cannot_compile_fails_the_actor_at_start(monkeypatch):
    import torch

    def broken_compile(model, **kw):
        def forward(x):
            raise RuntimeError("inductor: unsupported operator")
        return forward

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(RuntimeError, match=r"--compile: torch.compile failed on resnet10t: RuntimeError: inductor"):
        EmbedActor(spec=SPEC, compile_batch=4)
