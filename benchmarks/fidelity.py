"""bf16 against fp32, per encoder family: embedding cosine and how often the sparse selection agrees.

For each model, the embed actor (EmbedActor, the pipeline's own preprocessing and forward)
embeds the same seeded synthetic photos with `precision` fp32 and bf16 (torch.autocast on
the actor's device: CPU here, CUDA where there is one). While it runs, the selections are
recorded: BiFormer's region routing (encoders.bra.route, per query region) and top-k
attention's kept keys (TopKAttention.select, per head). LookupViT has no hard selection
(its lookup tokens attend to all compressed tokens), so only its cosine is reported.

Each bf16 pass runs twice: with the selection scores in fp32 (what the encoders do) and in
the autocast dtype (encoders.bra.ROUTE_IN_FP32 / topk_attention.SELECT_IN_FP32 off).

Agreement is per selection row (one query region, or one head of one image): "same set" is
the share of rows whose selected index sets are equal; "overlap" the mean |A & B| / k. Both
passes see their own activations, so a flip early in the network can move later choices.

    sparse-embed bench fidelity --images 8
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time

# family -> (timm name, create-model keywords). top-k keeps 64 of ViT-S's 197 tokens at 224 px
# (its default keep=256 keeps every token there, which would make agreement trivially 1).
MODELS = {"biformer": ("biformer_tiny", {}), "topk": ("vit_small_patch16_224_topk", {"keep": 64}),
          "lookupvit": ("lookupvit_small_patch16", {})}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--families", nargs="+", choices=sorted(MODELS), default=sorted(MODELS), help="encoder families")
    p.add_argument("--images", type=int, default=8, help="seeded synthetic photos per model (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the photos (weights: the encoders' fixed init seed)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


@contextlib.contextmanager
def recording_selections():
    """Records every routing/top-k selection made inside the block: yields a list that fills
    with (kind, indices as a CPU tensor)."""
    from sparse_embed.encoders import bra, topk_attention

    got: list = []
    route, select = bra.route, topk_attention.TopKAttention.select

    def route_rec(*a, **kw):
        idx = route(*a, **kw)
        got.append(("route", idx.detach().cpu()))
        return idx

    def select_rec(self, *a, **kw):
        idx = select(self, *a, **kw)
        got.append(("topk", idx.detach().cpu()))
        return idx

    bra.route, topk_attention.TopKAttention.select = route_rec, select_rec
    try:
        yield got
    finally:
        bra.route, topk_attention.TopKAttention.select = route, select


def selection_agreement(a: list, b: list) -> tuple[float, float, int] | None:
    """(share of rows with the same selected set, mean overlap |A & B| / k, rows compared)
    over two recordings of the same calls; None when nothing was selected."""
    import torch

    if not a:
        return None
    if len(a) != len(b):
        raise ValueError(f"Expected recordings of the same calls, got {len(a)} and {len(b)}")
    same = overlap = rows = 0
    for (_, x), (_, y) in zip(a, b):
        x = x.reshape(-1, x.shape[-1]).sort(dim=-1).values  # (rows, k)
        y = y.reshape(-1, y.shape[-1]).sort(dim=-1).values
        same += int((x == y).all(dim=-1).sum())
        k = x.shape[-1]
        hits = (x.unsqueeze(-1) == y.unsqueeze(-2)).any(dim=-1).sum(dim=-1)  # (rows,)
        overlap += float((hits.float() / k).sum())
        rows += x.shape[0]
    return same / rows, overlap / rows, rows


def photos(n: int, seed: int, plan) -> list[bytes]:
    """n seeded synthetic JPEG photos (640x480 and 480x640), decoded as the pipeline does."""
    import numpy as np

    from sparse_embed.infra.synthetic_images import base_image
    from sparse_embed.pipeline.embed.decode import decode_image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (640, 480) if i % 2 == 0 else (480, 640)
        buf = io.BytesIO()
        base_image(rng, width=w, height=h).save(buf, "JPEG", quality=90)
        out.append(decode_image(buf.getvalue(), plan)[0].tobytes())
    return out


def measure(family: str, model: str, model_args: dict, n_images: int, seed: int) -> dict:
    import numpy as np

    from sparse_embed.pipeline.embed.actor import EmbedActor
    from sparse_embed.pipeline.embed.decode import ResizePlan

    spec = {"model": model, "pool": "token", "model_args": dict(model_args)}
    fp32 = EmbedActor(spec=spec)
    bf16 = EmbedActor(spec=spec | {"precision": "bf16"})
    pixels = photos(n_images, seed, ResizePlan.from_data_config(fp32.encoder.data_config))
    t = time.perf_counter()
    with recording_selections() as sel32:
        a = fp32.embed_pixels(pixels)
    t32 = time.perf_counter() - t
    out = {"family": family, "model": model, "device": str(fp32.device), "images": n_images, "fp32_s": t32}
    for scores in ("fp32", "bf16"):  # the shipped fp32 selection scores, then scores in the autocast dtype
        t = time.perf_counter()
        with selection_scores_in_fp32(scores == "fp32"), recording_selections() as sel16:
            b = bf16.embed_pixels(pixels)
        cos = (a * b).sum(axis=1)
        agree = selection_agreement(sel32, sel16)
        out[scores] = {"cos_min": float(cos.min()), "cos_mean": float(np.mean(cos)),
                       "same_set": None if agree is None else agree[0], "overlap": None if agree is None else agree[1],
                       "rows": 0 if agree is None else agree[2], "bf16_s": time.perf_counter() - t}
    return out


@contextlib.contextmanager
def selection_scores_in_fp32(on: bool):
    """Sets encoders.bra.ROUTE_IN_FP32 and topk_attention.SELECT_IN_FP32 inside the block."""
    from sparse_embed.encoders import bra, topk_attention

    before = bra.ROUTE_IN_FP32, topk_attention.SELECT_IN_FP32
    bra.ROUTE_IN_FP32 = topk_attention.SELECT_IN_FP32 = on
    try:
        yield
    finally:
        bra.ROUTE_IN_FP32, topk_attention.SELECT_IN_FP32 = before


def run(args) -> int:
    import platform

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"bf16 vs fp32 on {dev}; torch {torch.__version__}; {args.images} photos, seed {args.seed}; random-init weights")
    print("| family | model | selection scores | cos min | cos mean | same set | overlap | rows | fp32 s | bf16 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in args.families:
        model, model_args = MODELS[family]
        r = measure(family, model, model_args, args.images, args.seed)
        for scores in ("fp32", "bf16"):
            m = r[scores]
            same = "n/a" if m["same_set"] is None else f"{m['same_set']:.4f}"
            ov = "n/a" if m["overlap"] is None else f"{m['overlap']:.4f}"
            print(f"| {family} | {r['model']}{''.join(f' {k}={v}' for k, v in model_args.items())} | {scores} | {m['cos_min']:.5f} | {m['cos_mean']:.5f} | {same} | {ov} | "
                  f"{m['rows']} | {r['fp32_s']:.2f} | {m['bf16_s']:.2f} |", flush=True)
    return 0
