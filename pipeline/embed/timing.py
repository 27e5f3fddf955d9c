"""Stage timers: the log reads as an outline of the job, and the run report gets the seconds."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("sparse_embed.stages")


class StageTimer:
    def __init__(self):
        self._seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        log.info("[%s] start", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self._seconds[name] = self._seconds.get(name, 0.0) + dt
            log.info("[%s] done in %.2f s", name, dt)

    def seconds(self, name: str) -> float:
        return self._seconds.get(name, 0.0)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self._seconds.items()}
