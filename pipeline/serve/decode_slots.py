"""A bound on the server's decode work (thumbnails not yet cached, uploads): at most
`running` decodes at once and `waiting` requests queued behind them; one more is answered
503 with Retry-After at once, so a burst of large images costs a bounded amount of
memory (running x the pixel limit x 3 bytes, plus the waiting uploads' bytes) and time."""
from __future__ import annotations

import asyncio
import contextlib

from .requests import RequestError

DEFAULT_RUNNING = 4
DEFAULT_WAITING = 16
RETRY_AFTER_S = 2


class DecodeSlots:
    def __init__(self, running: int = DEFAULT_RUNNING, waiting: int = DEFAULT_WAITING):
        if running < 1 or waiting < 0:
            raise ValueError(f"Expected at least 1 running decode and 0 or more waiting, got {running} and {waiting}")
        self.running, self.waiting = running, waiting
        self.held = 0  # running + waiting now; read and changed on the event loop's thread only
        self._semaphore: asyncio.Semaphore | None = None

    @contextlib.asynccontextmanager
    async def slot(self):
        """Hold one decode slot for the block; RequestError 503 when every slot and queue place is taken."""
        if self.held >= self.running + self.waiting:
            raise RequestError(503, f"The server is busy decoding {self.running} images with {self.waiting} more "
                                    f"waiting: retry in a few seconds", headers={"Retry-After": str(RETRY_AFTER_S)})
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.running)
        self.held += 1
        try:
            async with self._semaphore:
                yield
        finally:
            self.held -= 1
