"""Stage timers: the log reads as an outline of the job, and the run report gets the seconds.

A stage given a `unit` also shows its progress in between (progress.py): a bar on a
terminal, a line at least every 30 s elsewhere; its end line adds the count and the rate.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable

from sparse_embed.pipeline.embed.progress import Progress, Ticker

log = logging.getLogger("sparse_embed.stages")


class StageTimer:
    def __init__(self, *, tty: bool | None = None):
        """tty: draw progress bars (True), log progress lines (False), or decide by
        sys.stderr.isatty() when each stage starts (None)."""
        self._seconds: dict[str, float] = {}
        self.tty = tty

    @contextmanager
    def stage(self, name: str, *, unit: str | None = None, total: int | None = None,
              poll: Callable[[], int] | None = None):
        """Times the block. With `unit` ("images"), yields a Progress the block may
        update(done); with `poll` too, a Ticker thread updates it from poll() meanwhile.
        Without `unit`, yields None."""
        log.info("[%s] start", name)
        t0 = time.perf_counter()
        shown = Progress(name, unit=unit, total=total, tty=self.tty) if unit else None
        ticker = Ticker(shown, poll).start() if shown else None
        try:
            yield shown
        finally:
            if ticker:
                ticker.stop()
            tail = shown.close() if shown else None
            dt = time.perf_counter() - t0
            self._seconds[name] = self._seconds.get(name, 0.0) + dt
            log.info("[%s] done in %.2f s%s", name, dt, f": {tail}" if tail else "")

    def seconds(self, name: str) -> float:
        return self._seconds.get(name, 0.0)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self._seconds.items()}
