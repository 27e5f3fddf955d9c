"""What a build task may declare: Ray's per-node resources and the memory arithmetic
(pure functions, apart from node_resources which asks the running cluster)."""
from __future__ import annotations

MIN_TASK_MEMORY = 64 * 1024**2  # a task's declared memory is at least this


def node_resources() -> list[dict]:
    """The Resources dict of each alive Ray node (CPU, GPU, memory in bytes)."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def largest_node_memory(nodes: list[dict]) -> int:
    """Ray's `memory` resource of the largest node: what one task can declare (pure)."""
    return int(max([0] + [n.get("memory", 0) for n in nodes]))


def task_memory(want: int, nodes: list[dict]) -> int:
    """`want` bytes, raised to MIN_TASK_MEMORY and capped at the largest node's memory
    resource: a declaration above every node's would leave the task unschedulable (pure)."""
    cap = largest_node_memory(nodes)
    out = max(int(want), MIN_TASK_MEMORY)
    return min(out, cap) if cap else out
