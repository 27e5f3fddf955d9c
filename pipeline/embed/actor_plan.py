"""The embed actor pool, planned and checked against the cluster before any object is fetched.

A plan Ray cannot place would wait forever (Ray Data waits for its actors without a
limit), so every plan that cannot run is a ValueError naming the option to change. On an
autoscaling cluster `--actor-wait` waits for the nodes the plan needs, then says which
resources never came.
"""
from __future__ import annotations

import logging
import math
import time

log = logging.getLogger(__name__)

# CPU-only clusters: one single-threaded embed actor per CPU, reserving CPU_ACTOR_SHARE each
# but always leaving at least one DECODE_TASK_CPUS slot for the decode and write tasks (the
# job runs no 1-CPU task: blocks are sliced on the driver, writes reserve a decode slot).
# Ray Data's backpressure keeps decode from running ahead. Reservations are logical: each
# actor still uses a whole core while it embeds. Measured on the 2-core dev machine
# (BENCHMARKS.md, pipeline throughput): one 1-thread actor left a core half idle, one
# 2-thread actor stalled whenever a decode task shared its cores, and 0.75 per actor (two
# decode slots) beat 0.5 (four), whose extra decode processes only competed for the cores.
CPU_ACTOR_SHARE = 0.75  # at most; less when --actors asks for more actors than CPUs
DECODE_TASK_CPUS = 0.25
GPU_DECODE_TASK_CPUS = 1.0  # a CPU decode task feeding GPU actors decodes on one whole core
FETCH_TASK_CPUS = 0.25  # --decode device: the tasks only fetch bytes (I/O bound)

# fetch+decode images/s per CPU: bench pipeline (b), 184 images/s on 2 cores (2,000 JPEGs at
# 640x480 + 500 at 2048x1536, to 224 px), BENCHMARKS.md "Pipeline throughput", 2026-11-21.
DECODE_IMAGES_PER_CPU_S = 92.0
# images/s of one GPU actor that the decode CPUs are sized for. Not measured on this project's
# machines (no GPU was lent): an assumed figure for a small encoder at 224 px in bf16 on an
# A100/H100 class GPU. `./dev gpu-check` prints the measured one.
GPU_IMAGES_S = 1500.0

DECODE_MODES = ("cpu", "device", "auto")


def decode_cpus_per_gpu(gpu_images_s: float, decode_images_per_cpu_s: float) -> int:
    """Whole CPUs of decode tasks that keep one GPU actor fed: ceil(GPU rate / per-CPU
    decode rate), at least 1."""
    if gpu_images_s <= 0 or decode_images_per_cpu_s <= 0:
        raise ValueError(f"Expected positive rates, got gpu {gpu_images_s!r}, decode {decode_images_per_cpu_s!r}")
    return max(1, math.ceil(gpu_images_s / decode_images_per_cpu_s))


def resolve_decode(decode: str, gpus: int) -> str:
    """--decode auto -> "device" when the actors get GPUs, else "cpu"."""
    if decode not in DECODE_MODES:
        raise ValueError(f"Expected --decode in {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "auto":
        return "device" if gpus else "cpu"
    return decode


def plan_actors(resources: dict, *, actors: int | None, actor_cpus: float | None, decode: str = "cpu",
                precision: str = "fp32") -> dict:
    """Actor pool sizing from the cluster's resources ({"CPU": n, "GPU": m}).

    With GPUs: one actor per GPU (or --actors, at most one per GPU), 1 CPU each unless
    --actor-cpus; CPU decode tasks take a whole CPU each, fetch-only tasks (--decode device)
    FETCH_TASK_CPUS. Without: one single-threaded actor per CPU (see CPU_ACTOR_SHARE).
    Returns {"size", "num_gpus", "num_cpus", "decode_cpus", "decode"} plus, with GPUs,
    "decode_cpus_wanted": the decode CPUs the measured rates ask for. ValueError names the
    option when the plan cannot run."""
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    mode = resolve_decode(decode, gpus)
    if precision == "fp16" and not gpus:
        raise ValueError("--precision fp16 needs GPUs and the cluster has none: use --precision bf16 or fp32 on CPUs")
    if gpus:
        size = actors or gpus
        if size > gpus:
            raise ValueError(f"--actors {size} exceeds the cluster's {gpus} GPUs (one GPU per actor): lower --actors, "
                             f"or give --actor-wait SECONDS for an autoscaling cluster to add GPU nodes")
        per_actor = actor_cpus or 1.0
        task_cpus = FETCH_TASK_CPUS if mode == "device" else GPU_DECODE_TASK_CPUS
        left = cpus - size * per_actor
        if left < task_cpus:
            fix = ("lower --actor-cpus (e.g. 0.5)" if mode == "device"
                   else "use --decode device (JPEGs decoded on the GPU), or lower --actor-cpus")
            raise ValueError(f"{size} GPU actors x {per_actor:g} CPUs leave {max(left, 0):g} of the cluster's {cpus:g} CPUs "
                             f"for the {mode} decode tasks, which need {task_cpus:g} each: {fix}")
        pool = {"size": size, "num_gpus": 1, "num_cpus": per_actor, "decode_cpus": task_cpus, "decode": mode}
        if mode == "cpu":
            wanted = size * decode_cpus_per_gpu(GPU_IMAGES_S, DECODE_IMAGES_PER_CPU_S)
            pool["decode_cpus_wanted"] = wanted
            if left < wanted:
                log.warning("%g CPUs are left for decode tasks; at %g images/s per CPU, %d GPU actors need about %d: "
                            "the GPUs will wait on decode (--decode device decodes JPEGs on them)",
                            left, DECODE_IMAGES_PER_CPU_S, size, wanted)
        return pool
    size = actors or max(1, int(cpus))
    per_actor = actor_cpus or min(CPU_ACTOR_SHARE, max(0.0, cpus - DECODE_TASK_CPUS) / size)
    if per_actor <= 0 or cpus - size * per_actor < DECODE_TASK_CPUS:
        raise ValueError(f"{size} embed actors x {per_actor:g} CPUs leave under {DECODE_TASK_CPUS:g} of the cluster's "
                         f"{cpus:g} CPUs for the decode and write tasks: lower --actors or --actor-cpus")
    return {"size": size, "num_gpus": 0, "num_cpus": per_actor, "decode_cpus": DECODE_TASK_CPUS, "decode": mode}


def wanted_resources(*, actors: int | None, actor_cpus: float | None, decode: str) -> dict:
    """The least a GPU plan needs: --actors GPUs (1 without it), their CPUs and one decode
    (or fetch) task's CPUs. What --actor-wait waits for."""
    size = actors or 1
    task = FETCH_TASK_CPUS if decode == "device" else GPU_DECODE_TASK_CPUS
    return {"GPU": float(size), "CPU": size * (actor_cpus or 1.0) + task}


def missing_resources(have: dict, want: dict) -> dict:
    """{resource: amount still missing} for each resource `have` holds less of than `want`."""
    return {k: v - float(have.get(k, 0)) for k, v in want.items() if float(have.get(k, 0)) < v}


def plan_when_ready(current, *, actors: int | None, actor_cpus: float | None, decode: str = "cpu",
                    precision: str = "fp32", wait_s: float = 0.0, poll_s: float = 1.0,
                    clock=time.monotonic, sleep=time.sleep) -> dict:
    """plan_actors on `current()` (the cluster's resources now). With wait_s > 0 (an
    autoscaling cluster), first wait up to wait_s for wanted_resources to be there; the
    timeout is a ValueError naming what is missing."""
    if wait_s > 0:
        want = wanted_resources(actors=actors, actor_cpus=actor_cpus, decode=decode)
        deadline = clock() + wait_s
        have = current()
        while missing_resources(have, want):
            if clock() >= deadline:
                gone = ", ".join(f"{v:g} {k}" for k, v in sorted(missing_resources(have, want).items()))
                raise ValueError(f"--actor-wait {wait_s:g}: after {wait_s:g} s the cluster still lacks {gone} of the "
                                 f"{', '.join(f'{v:g} {k}' for k, v in sorted(want.items()))} the embed actors need "
                                 f"(it has {', '.join(f'{float(have.get(k, 0)):g} {k}' for k in sorted(want))}): "
                                 f"raise --actor-wait, or check that the autoscaler can add such nodes")
            log.info("waiting for %s (--actor-wait %g s)", missing_resources(have, want), wait_s)
            sleep(poll_s)
            have = current()
        return plan_actors(have, actors=actors, actor_cpus=actor_cpus, decode=decode, precision=precision)
    return plan_actors(current(), actors=actors, actor_cpus=actor_cpus, decode=decode, precision=precision)
