"""`sparse-embed bench incremental`: what a nightly run with 1% changed costs against a
full run over the same bucket, each a fresh CLI process (Ray start-up included), on the
local object store, in one run."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from sparse_embed.jobs.options import fraction, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=positive_int, default=10_000, help="objects in the bucket (default 10000)")
    p.add_argument("--changed", type=fraction, default=0.01,
                   help="fraction changed before the nightly run: half modified, a quarter added, a quarter deleted (default 0.01)")
    p.add_argument("--model", default="resnet18", help="encoder for both runs (default resnet18, random init)")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated images (default 0)")


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def run(args) -> int:
    import yaml

    from sparse_embed.infra.object_store import LocalObjectStore
    from sparse_embed.infra.synthetic_images import generate
    from sparse_embed.pipeline.store import storage

    store = LocalObjectStore().start()
    os.environ.update(store.aws_env())
    os.environ.pop("RAY_ADDRESS", None)
    try:
        source = store.create_bucket("bench") + "/images/"
        out = "s3://bench/emb"
        n_base = args.images // 2
        objects = {im.key: im.data for im in generate(n_base, seed=args.seed, variants=("jpeg",), min_side=96, max_side=160)}
        storage.put_many(source, objects)
        cli = [sys.executable, "-m", "sparse_embed.jobs.cli"]
        full_s = _timed(cli + ["embed", source, "--out", out, "--model", args.model])

        n_changed = max(4, int(len(objects) * args.changed))
        keys = sorted(objects)
        modified = keys[: n_changed // 2]
        deleted = keys[n_changed // 2: n_changed // 2 + n_changed // 4]
        extra = generate(n_changed // 4 + 1, seed=args.seed + 1, variants=(), min_side=96, max_side=160)
        storage.put_many(source, {k: objects[keys[-1 - i]] for i, k in enumerate(modified)}
                         | {f"added/{im.key}": im.data for im in extra[: n_changed - len(modified) - len(deleted)]})
        fs = storage.filesystem(source)
        for k in deleted:
            fs.rm_file(storage.strip_scheme(source + k))
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump({"source": source, "out": out, "model": args.model}, f)
        nightly_s = _timed(cli + ["nightly", "--config", f.name])
        again_s = _timed(cli + ["nightly", "--config", f.name])
    finally:
        store.stop()
    print(f"| run | objects processed | wall s | / full run |")
    print(f"|---|---|---|---|")
    print(f"| full embed + index | {len(objects)} | {full_s:.1f} | 1.00 |")
    print(f"| nightly, {args.changed:.0%} changed | {n_changed} | {nightly_s:.1f} | {nightly_s / full_s:.3f} |")
    print(f"| nightly, nothing changed | 0 | {again_s:.1f} | {again_s / full_s:.3f} |")
    return 0
