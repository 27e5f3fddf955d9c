"""`sparse-embed bench encoders`: images/s and peak memory of encoders at several input sizes.

Method (recorded in BENCHMARKS.md):
- All models random-init (seed 0), eval, under ``torch.inference_mode``; fp32 on the CPU with
  ``--threads`` intra-op threads, or, where CUDA is available, on the GPU under bf16 autocast
  (timed with a synchronize); one input tensor per (size, batch), seeded.
- Throughput: per (size, batch), one fresh process builds every case, warms each up with one
  batch-1 forward, then runs rounds, each timing one forward of every case in turn (interleaved,
  so load from other processes hits all cases alike): at least ``--repeats`` rounds, more (up to
  15) until the group has run ``--min-time-s``; median per case.
- Peak memory: per (size, batch, case), a fresh spawned process builds the model and input and
  reports two figures, weights and the input excluded from both: "allocated", the peak bytes held
  by live tensors during a forward (torch's CPU allocator events via the profiler: the analogue of
  ``torch.cuda.max_memory_allocated``, the figure the targets use), and "RSS", ru_maxrss minus the
  RSS before the process's first forward (adds one-time library set-up, ~20 MiB here, and malloc
  slack, so it overstates small models).
- A case is skipped, with the reason printed, when its own rule says so (``Case.skip``) or when
  its batch-1 peak times the batch exceeds ``--mem-budget-gb`` (the machine is shared).

Cases come from the builders in ``benchmarks/cases.py`` (``SUITES``: name -> function returning
a list of ``Case``); another family adds its own builder and registers it there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Optional

from benchmarks.cases import DEFAULT_LABEL, SUITES, Case


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"Expected comma-separated integers, got {text!r}") from e
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"Expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=_int_list, default=[224, 512, 1024], help="input sizes in px (square)")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 8], help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per (size, batch); median")
    parser.add_argument("--min-time-s", type=float, default=30.0,
                        help="keep adding timed rounds (up to 15) until a group has run this long")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in the measuring processes (0: torch's default); "
                             "1 is far less sensitive to other load on a shared machine")
    parser.add_argument("--suites", default="biformer,baselines", help=f"comma list of {sorted(SUITES)}")
    parser.add_argument("--models", default="", help="comma list of substrings; keep cases whose label has one")
    parser.add_argument("--mem-budget-gb", type=float, default=6.0,
                        help="skip a case whose batch-1 peak x batch exceeds this")
    parser.add_argument("--out", default="", help="write the results to this .md or .json path too")
    parser.add_argument("--gpu-precision", choices=("bf16", "fp32"), default="bf16",
                        help="on CUDA: bf16 autocast (default) or fp32; the CPU always runs fp32")


def select_cases(suites: str, models: str) -> list[Case]:
    cases = []
    for name in [s for s in suites.split(",") if s]:
        if name not in SUITES:
            raise ValueError(f"Expected suites from {sorted(SUITES)}, got {name!r}")
        cases.extend(SUITES[name]())
    wanted = [m for m in models.split(",") if m]
    return [c for c in cases if not wanted or any(w in c.label for w in wanted)]


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import resource

    return pages * resource.getpagesize() // 1024


def _allocated_peak_mib(fn: Callable[[], Any]) -> float:
    """Peak bytes held by live tensors during ``fn()``, above the level at its start: the CPU
    analogue of ``torch.cuda.max_memory_allocated``, from the profiler's allocator events."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0.0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(0, max(e["Total Allocated"] for e in events) - start) / 2**20


# --gpu-precision travels to the measuring processes (spawned) in this variable.
GPU_PRECISION_ENV = "SPARSE_EMBED_BENCH_GPU_PRECISION"


def _forward_fn(model, x):
    """One timed forward: fp32 on CPU; on CUDA bf16 autocast (or fp32 with --gpu-precision
    fp32), synchronised so the clock sees it."""
    import contextlib

    import torch

    if x.device.type != "cuda":
        return lambda: model(x)
    bf16 = os.environ.get(GPU_PRECISION_ENV, "bf16") == "bf16"

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            model(x)
        torch.cuda.synchronize()
    return run


def _build_on_device(case: Case, size: int, batch: int, threads: int):
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = case.build(size).to(device)
    return model, torch.randn(batch, 3, size, size).to(device)


def _peak_memory_child(case: Case, size: int, batch: int, threads: int = 0) -> dict[str, float]:
    """Runs in a fresh process. ``rss_mib``: peak RSS growth of the first forward (includes
    one-time library set-up and allocator slack); ``peak_mib``: the allocator peak of a second
    forward (tensors only, what the model itself holds; on CUDA, max_memory_allocated)."""
    import resource

    import torch

    model, x = _build_on_device(case, size, batch, threads)
    forward = _forward_fn(model, x)
    base = _current_rss_kib()
    with torch.inference_mode():
        forward()
        rss_mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        if x.device.type == "cuda":
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            forward()
            peak_mib = (torch.cuda.max_memory_allocated() - start) / 2**20
        else:
            peak_mib = _allocated_peak_mib(forward)
    return dict(peak_mib=peak_mib, rss_mib=rss_mib)


def _timing_child(cases: list[Case], size: int, batch: int, repeats: int,
                  min_time_s: float = 0.0, threads: int = 0, max_rounds: int = 15) -> dict[str, list[float]]:
    """Runs in a fresh process: interleaved timings (s per forward) of every case. At least
    ``repeats`` rounds; more (up to ``max_rounds``) while the rounds took under ``min_time_s``,
    so cheap cases get enough samples for a median on a noisy machine."""
    import torch

    built = {c.label: _build_on_device(c, size, batch, threads) for c in cases}
    forwards = {label: _forward_fn(m, x) for label, (m, x) in built.items()}
    warmups = {label: _forward_fn(m, x[:1]) for label, (m, x) in built.items()}
    times: dict[str, list[float]] = {label: [] for label in built}
    with torch.inference_mode():
        for warm in warmups.values():
            warm()  # warm-up at batch 1
        t_start, rounds = time.perf_counter(), 0
        while rounds < repeats or (time.perf_counter() - t_start < min_time_s and rounds < max_rounds):
            rounds += 1
            for label, forward in forwards.items():
                t0 = time.perf_counter()
                forward()
                times[label].append(time.perf_counter() - t0)
    return times


def _in_child(fn: Callable, *args: Any) -> Any:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


def measure(cases: list[Case], sizes: list[int], batches: list[int], repeats: int,
            mem_budget_mib: float, min_time_s: float = 0.0, threads: int = 0, log: Callable[[str], None] = print,
            on_group: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> list[dict[str, Any]]:
    """Batch-major order (every size at the smallest batch first), so an interrupted run still
    covers every size; ``on_group`` sees all rows so far after each (size, batch) group."""
    rows, b1_peak = [], {}
    for batch in sorted(batches):
        for size in sizes:
            live = []
            for c in cases:
                reason = c.skip(size, batch)
                est = b1_peak.get((c.label, size), 0.0) * batch
                if reason is None and est > mem_budget_mib:
                    reason = f"predicted peak {est / 1024:.1f} GiB > budget {mem_budget_mib / 1024:.1f} GiB"
                row = dict(model=c.label, size=size, batch=batch, skipped=reason or "")
                if reason is None:
                    t0 = time.perf_counter()
                    row.update(_in_child(_peak_memory_child, c, size, batch, threads))
                    if batch == 1:
                        b1_peak[(c.label, size)] = row["rss_mib"]
                    log(f"  memory {c.label} {size}px b{batch}: {row['peak_mib']:.0f} MiB allocated, "
                        f"{row['rss_mib']:.0f} MiB RSS ({time.perf_counter() - t0:.0f} s)")
                    live.append(c)
                else:
                    log(f"  skip {c.label} {size}px b{batch}: {reason}")
                rows.append(row)
            if live:
                t0 = time.perf_counter()
                times = _in_child(_timing_child, live, size, batch, repeats, min_time_s, threads)
                log(f"  timed {len(live)} cases at {size}px b{batch} ({time.perf_counter() - t0:.0f} s)")
                for row in rows:
                    if row["size"] == size and row["batch"] == batch and row["model"] in times:
                        med = statistics.median(times[row["model"]])
                        row.update(ms=1000 * med, best_ms=1000 * min(times[row["model"]]), img_s=batch / med,
                                   runs_s=times[row["model"]])
            on_group(rows)
    return rows


def _ratio(rows: list[dict], size: int, batch: int, a: str, b: str, key: str) -> Optional[float]:
    pick = {r["model"]: r for r in rows if r["size"] == size and r["batch"] == batch and key in r}
    if a in pick and b in pick and pick[b][key] > 0:
        return pick[a][key] / pick[b][key]
    return None


def format_markdown(rows: list[dict], meta: dict[str, Any]) -> str:
    lines = [f"{k}: {v}" for k, v in meta.items()] + [""]
    lines += ["| model | px | batch | img/s | ms/batch (median) | ms/batch (best) | peak MiB allocated "
              "| peak MiB RSS (first call) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | skipped: {r['skipped']} | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['img_s']:.2f} | {r['ms']:.0f} "
                         f"| {r.get('best_ms', r['ms']):.0f} | {r['peak_mib']:.0f} | {r['rss_mib']:.0f} |")
    others = ["biformer_tiny scaled/reference", "biformer_tiny fixed/reference",
              "vit_small_patch16_224", "swin_tiny_patch4_window7_224"]
    lines += ["", f"Ratios for `{DEFAULT_LABEL}` (speed = its img/s / other's; memory = its peak / other's):", "",
              "| px | batch | vs | speed x | memory x (allocated) | memory x (RSS) |", "|---|---|---|---|---|---|"]
    for size in sorted({r["size"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows}):
            for other in others:
                s = _ratio(rows, size, batch, DEFAULT_LABEL, other, "img_s")
                m = _ratio(rows, size, batch, DEFAULT_LABEL, other, "peak_mib")
                r = _ratio(rows, size, batch, DEFAULT_LABEL, other, "rss_mib")
                if s is not None:
                    lines.append(f"| {size} | {batch} | {other} | {s:.2f} | "
                                 f"{'' if m is None else f'{m:.2f}'} | {'' if r is None else f'{r:.2f}'} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import platform

    import torch

    os.environ[GPU_PRECISION_ENV] = getattr(args, "gpu_precision", "bf16")
    cases = select_cases(args.suites, args.models)
    if not cases:
        raise ValueError(f"Expected --models to match some case, got {args.models!r}")
    if args.repeats < 1:
        raise ValueError(f"Expected --repeats >= 1, got {args.repeats!r}")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{args.threads or torch.get_num_threads()} torch threads, "
                   + (f"{torch.cuda.get_device_name()}; "
                      + ("bf16 autocast" if args.gpu_precision == "bf16" else "fp32") + " on the GPU" if torch.cuda.is_available()
                      else "no GPU; fp32 CPU"),
        "torch": torch.__version__, "repeats": args.repeats,
    }
    t0 = time.perf_counter()

    def save(rows: list[dict[str, Any]], final: bool = False) -> None:
        meta["wall_s"] = round(time.perf_counter() - t0)
        meta["complete"] = final
        text = format_markdown(rows, meta)
        if final:
            print(text)
        else:  # partial tables go to stderr, with the progress log
            print(text, file=sys.stderr, flush=True)
        if args.out:  # rewritten after every group: an interrupted run keeps what it measured
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                if args.out.endswith(".json"):
                    json.dump(dict(meta=meta, rows=rows, cases=[asdict(c) for c in cases]), f, indent=1)
                else:
                    f.write(text + "\n")
            os.replace(tmp, args.out)

    rows = measure(cases, args.sizes, args.batch_sizes, args.repeats, args.mem_budget_gb * 1024, args.min_time_s, args.threads,
                   log=lambda s: print(s, file=sys.stderr, flush=True), on_group=save)
    save(rows, final=True)
    return 0
