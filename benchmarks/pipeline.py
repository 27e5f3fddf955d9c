"""`sparse-embed bench pipeline`: is the pipeline as fast as its encoder allows, in one run
on the same objects in the local object store?

(a) encoder only: the embed actor on in-memory uint8 pixels (all cores; on a GPU, bf16);
(b) fetch + decode only: the pipeline's decode function in one process per core;
(c) the hand-written loop people use: torch DataLoader workers fetch and decode with
    timm's transform, the main process embeds (the clip-retrieval pattern);
(d) our pipeline end to end into the Delta table (local Ray, no index).
ideal = 1 / (1/a + 1/b): decode and encode sharing the same cores.
Memory: peak RSS of the whole process tree of `sparse-embed embed` at 1x and 10x images.
Listing: one recursive listing against one Ray task per prefix, each into a listing table.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time

from sparse_embed.jobs.options import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--small", type=positive_int, default=2000, help="640x480 JPEGs (default 2000)")
    p.add_argument("--large", type=positive_int, default=500, help="2048x1536 JPEGs (default 500)")
    p.add_argument("--model", default="resnet18", help="encoder (random init; default resnet18)")
    p.add_argument("--memory-images", type=positive_int, default=300,
                   help="images of the 1x memory run; the 10x run uses ten times as many (default 300)")
    p.add_argument("--list-objects", type=positive_int, default=100_000, help="objects for the listing comparison (default 100000)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward in (a), (c) and (d) (default 32)")
    p.add_argument("--decode-batch-size", type=positive_int, default=32,
                   help="objects per decode task in (d) (default 32, the embed job's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder in (a) and (d), as `embed --compile`")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: throughput,memory,listing")
    p.add_argument("--decode", nargs="+", choices=("cpu", "device", "auto"), default=["cpu"],
                   help="decode mode(s) of the (d) runs, one run each: cpu tasks, or the embed actors (nvJPEG on a GPU)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="encoder precision in (d)")


class GpuSampler:
    """Samples GPU 0's utilisation (share of time a kernel ran, from NVML via
    torch.cuda.utilization) and memory in use (NVML: all processes, the actors included)
    every `interval_s` in a thread. Without CUDA or NVML it records nothing."""

    def __init__(self, interval_s: float = 0.2):
        import threading

        self.interval_s, self.util, self.mem = interval_s, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        import torch

        while not self._stop.is_set():
            try:
                self.util.append(torch.cuda.utilization(0))
                self.mem.append(torch.cuda.device_memory_used(0))
            except Exception:  # no CUDA, no pynvml
                return
            self._stop.wait(self.interval_s)

    def __enter__(self):
        import torch

        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> tuple[str, str]:
        """(mean utilisation, peak memory in use) as table cells; "not measured" without samples."""
        if not self.util:
            return "not measured (no CUDA/NVML)", "not measured (no CUDA/NVML)"
        return f"{sum(self.util) / len(self.util):.0f}% ({len(self.util)} samples)", f"{max(self.mem) / 2**30:.2f} GiB"


def _jpeg(rng, w: int, h: int) -> bytes:
    from sparse_embed.infra.synthetic_images import base_image

    img = base_image(rng, width=w, height=h)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def _make_objects(n_small: int, n_large: int, seed: int = 0) -> dict[str, bytes]:
    import numpy as np

    rng = np.random.default_rng(seed)
    small = [_jpeg(rng, 640, 480) for _ in range(min(n_small, 50))]  # distinct content; bytes reused beyond 50
    large = [_jpeg(rng, 2048, 1536) for _ in range(min(n_large, 20))]
    objs = {f"small/{i // 500:03d}/img_{i:06d}.jpg": small[i % len(small)] for i in range(n_small)}
    objs |= {f"large/{i // 100:03d}/img_{i:06d}.jpg": large[i % len(large)] for i in range(n_large)}
    return objs


def encoder_only(spec: dict, n: int, batch: int = 32, compile: bool = False) -> float:
    """The embed actor's own path (device, bf16 on GPU, normalisation) on in-memory uint8 pixels."""
    import numpy as np

    from sparse_embed.pipeline.embed.actor import EmbedActor

    actor = EmbedActor(spec=spec, compile_batch=batch if compile else None)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 3, actor.height, actor.width), dtype=np.uint8)
    rows = [p.tobytes() for p in pixels]
    actor.embed_pixels(rows[:4])  # warm-up
    t0, done = time.perf_counter(), 0
    while done < n:
        actor.embed_pixels(rows)
        done += batch
    return done / (time.perf_counter() - t0)


def _decode_chunk(args) -> int:
    import pyarrow as pa

    from sparse_embed.pipeline.embed.decode import fetch_decode_batch

    uris, data_config = args
    out = 0
    for i in range(0, len(uris), 32):
        out += fetch_decode_batch(pa.table({"uri": uris[i:i + 32]}), data_config=data_config).num_rows
    return out


def decode_only(uris: list[str], data_config: dict, procs: int) -> float:
    import multiprocessing as mp

    chunks = [(uris[i::procs], data_config) for i in range(procs)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs) as pool:
        n = sum(pool.map(_decode_chunk, chunks))
    return n / (time.perf_counter() - t0)


class _S3ImageDataset:
    """What a hand-written loader does: fetch with s3fs, decode with PIL, timm transform."""

    def __init__(self, uris, data_config):
        self.uris, self.data_config, self.fs, self.tf = uris, data_config, None, None

    def __len__(self):
        return len(self.uris)

    def __getitem__(self, i):
        import timm.data
        from PIL import Image

        from sparse_embed.pipeline.store import storage

        if self.fs is None:  # one client per worker process
            self.fs = storage.filesystem(self.uris[0])
            self.tf = timm.data.create_transform(**self.data_config)
        data = self.fs.cat_file(storage.strip_scheme(self.uris[i]))
        return self.tf(Image.open(io.BytesIO(data)).convert("RGB"))


def dataloader_loop(uris: list[str], spec: dict, workers: int, batch: int = 32) -> float:
    """On a GPU: pinned batches, non-blocking copies, bf16 autocast, channels_last, as the actor does."""
    import contextlib

    import torch

    from sparse_embed.encoders import EncoderSpec, create_encoder

    enc = create_encoder(EncoderSpec.from_dict(spec))
    cuda = torch.cuda.is_available()
    model = enc.model.to("cuda", memory_format=torch.channels_last) if cuda else enc.model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    loader = torch.utils.data.DataLoader(_S3ImageDataset(uris, enc.data_config), batch_size=batch, num_workers=workers,
                                         multiprocessing_context="spawn", persistent_workers=False, pin_memory=cuda)
    t0, n = time.perf_counter(), 0
    with torch.inference_mode(), autocast:
        for x in loader:
            if cuda:
                x = x.to("cuda", non_blocking=True).contiguous(memory_format=torch.channels_last)
            model(x).float().cpu()
            n += len(x)
    return n / (time.perf_counter() - t0)


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(parts[1]), int(parts[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def peak_rss_of_embed(source: str, out: str, model: str) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sparse_embed.jobs.cli", "embed", source, "--out", out, "--model", model, "--no-index"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.25)
    if proc.returncode != 0:
        raise RuntimeError(f"embed exited {proc.returncode}")
    return time.perf_counter() - t0, peak


def run(args) -> int:
    from sparse_embed.infra.object_store import LocalObjectStore
    from sparse_embed.pipeline.store import storage
    from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
    from sparse_embed.pipeline.embed.listing import list_objects

    skip = set(filter(None, args.skip.split(",")))
    spec = {"model": args.model, "checkpoint": None, "model_args": {}, "pool": "token", "fuse_last_two": False, "proj_dim": None,
            "precision": args.precision}  # (a) and (d) run at --precision; (c) autocasts bf16 on CUDA itself
    procs = os.cpu_count() or 1
    rows: list[tuple[str, str]] = []
    store = LocalObjectStore().start()
    os.environ.update(store.aws_env())
    os.environ.pop("RAY_ADDRESS", None)
    try:
        bucket = store.create_bucket("bench")
        if "throughput" not in skip:
            import ray

            from sparse_embed.encoders import EncoderSpec, create_encoder

            source = f"{bucket}/images/"
            uris = storage.put_many(source, _make_objects(args.small, args.large))
            data_config = create_encoder(EncoderSpec.from_dict(spec)).data_config
            a = encoder_only(spec, len(uris), batch=args.batch_size, compile=args.compile)
            b = decode_only(uris, data_config, procs)
            c = dataloader_loop(uris, spec, procs, batch=args.batch_size)
            ideal = 1 / (1 / a + 1 / b)
            rows += [("(a) encoder only, images/s", f"{a:.1f}"), ("(b) fetch+decode only, images/s", f"{b:.1f}"),
                     ("ideal 1/(1/a+1/b), images/s", f"{ideal:.1f}"), ("(c) DataLoader loop, images/s", f"{c:.1f}")]
            for mode in args.decode:  # one (d) run per decode mode, each into its own output
                ray.init(num_cpus=procs, include_dashboard=False, runtime_env={"env_vars": store.aws_env()})
                with GpuSampler() as gpu:
                    result = run_embed(EmbedConfig(source=source, out=f"{bucket}/out-{mode}", spec=spec,
                                                   build_index=False, embed_batch_size=args.batch_size,
                                                   decode_batch_size=args.decode_batch_size, compile=args.compile, decode=mode))
                ray.shutdown()
                t = result["timings_s"]
                d = result["counts"]["processed"] / (t["list"] + t["fetch+decode+embed+write"])
                util, peak = gpu.summary()
                tag = f"(d, --decode {mode})"
                rows += [(f"{tag} pipeline end to end, images/s", f"{d:.1f}"),
                         (f"{tag} embed stage images/s", f"{result['counts']['processed'] / t['fetch+decode+embed+write']:.1f}"),
                         (f"{tag} listing, s", f"{t['list']:.1f}"),
                         (f"{tag} fetch+decode+embed+write stage, s", f"{t['fetch+decode+embed+write']:.1f}"),
                         (f"{tag} embed actors busy (forward time), share of the stage", f"{result['embed_busy']['fraction']:.2f}"),
                         (f"{tag} GPU utilisation sampled during the run", util),
                         (f"{tag} peak GPU memory in use", peak),
                         (f"{tag} d / ideal", f"{d / ideal:.2f}"), (f"{tag} d / c", f"{d / c:.2f}")]
        if "memory" not in skip:
            objs = _make_objects(args.memory_images, 0, seed=1)
            storage.put_many(f"{bucket}/mem1/", objs)
            storage.put_many(f"{bucket}/mem10/", {f"{r}/{k}": v for r in range(10) for k, v in objs.items()})
            t1, m1 = peak_rss_of_embed(f"{bucket}/mem1/", f"{bucket}/mem1-out", args.model)
            t10, m10 = peak_rss_of_embed(f"{bucket}/mem10/", f"{bucket}/mem10-out", args.model)
            rows += [(f"peak RSS, {len(objs)} images", f"{m1 / 2**20:.0f} MiB ({t1:.0f} s)"),
                     (f"peak RSS, {10 * len(objs)} images", f"{m10 / 2**20:.0f} MiB ({t10:.0f} s)"),
                     ("peak RSS 10x / 1x", f"{m10 / m1:.2f}")]
        if "listing" not in skip:
            import ray

            n = args.list_objects
            storage.put_many(f"{bucket}/many/", {f"p{i % 100:03d}/obj_{i:07d}.jpg": b"x" for i in range(n)})
            t0 = time.perf_counter()
            single = list_objects(f"{bucket}/many/", into=f"{bucket}/listing-single").num_rows
            t_single = time.perf_counter() - t0
            ray.init(num_cpus=procs, include_dashboard=False, runtime_env={"env_vars": store.aws_env()})
            timed = []
            for _ in range(2):  # cold: Ray starts the listing workers; warm: a job's later stages reuse them
                t0 = time.perf_counter()
                parallel = list_objects(f"{bucket}/many/", parallel=True, into=f"{bucket}/listing-parallel").num_rows
                timed.append(time.perf_counter() - t0)
                assert single == parallel == n
            ray.shutdown()
            t_cold, t_par = timed
            rows += [(f"list {n} objects, one recursive listing", f"{t_single:.1f} s"),
                     (f"list {n} objects, Ray tasks over 100 prefixes, workers started", f"{t_par:.1f} s"),
                     (f"list {n} objects, Ray tasks over 100 prefixes, first call (starts workers)", f"{t_cold:.1f} s"),
                     ("single / parallel (workers started)", f"{t_single / t_par:.2f}"),
                     ("single / parallel (first call)", f"{t_single / t_cold:.2f}")]
    finally:
        store.stop()
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0
