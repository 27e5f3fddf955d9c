"""The index that CURRENT points to, held by the server process and swapped when CURRENT moves.

A request takes `LiveIndex.loaded` once and uses that object to the end, so a swap never
changes the index under a request in flight. CURRENT is read at most once per `check_every_s`
(one GET of a few bytes); when it names another index, that index is opened in a worker
thread while requests keep using the old one, and then one attribute assignment swaps them; the cached files of index ids that neither
the new nor the old index uses are then removed (searcher.prune_cache).
A CURRENT that cannot be read, or an index that fails to open, leaves the old one serving
and is reported by /api/status.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_CHECK_EVERY_S = 2.0


@dataclass(frozen=True)
class LoadedIndex:
    index_id: str
    index: object  # pipeline.index.searcher.ShardedIndex
    opened_at: float = field(default_factory=time.time)  # unix seconds

    @property
    def manifest(self) -> dict:
        return self.index.manifest


def check_due(last_check: float | None, now: float, every_s: float) -> bool:
    """Whether CURRENT should be read again: never read yet, or `every_s` seconds have passed."""
    return last_check is None or now - last_check >= every_s


class LiveIndex:
    def __init__(self, index_root: str, *, check_every_s: float = DEFAULT_CHECK_EVERY_S, clock=time.monotonic):
        if check_every_s < 0:
            raise ValueError(f"Expected a CURRENT check interval >= 0 seconds, got {check_every_s!r}")
        self.index_root = index_root
        self.check_every_s = check_every_s
        self._clock = clock
        self._last_check: float | None = None
        self._checking: asyncio.Lock | None = None  # created on the server's event loop
        self.loaded: LoadedIndex | None = None
        self.reload_error: str | None = None  # the last failed check or open, in words; None after a good one

    def _open(self, index_id: str) -> LoadedIndex:
        from sparse_embed.pipeline.index.searcher import ShardedIndex

        t0 = time.perf_counter()
        index = ShardedIndex.open(self.index_root, index_id=index_id)
        log.info("opened index %s (%d vectors) in %.2f s", index_id, index.ntotal, time.perf_counter() - t0)
        return LoadedIndex(index_id, index)

    def _prune(self, old: LoadedIndex) -> None:
        from sparse_embed.pipeline.index.searcher import prune_cache, referenced_ids

        try:
            removed = prune_cache(self.index_root, referenced_ids(self.loaded.manifest) | referenced_ids(old.manifest))
        except OSError as e:  # a full or read-only cache is no reason to stop serving
            log.warning("could not prune the index cache: %s", e)
            return
        if removed:
            log.info("removed the cached files of %d index ids no longer served: %s", len(removed), ", ".join(removed))

    def load(self) -> LoadedIndex:
        """Open the index CURRENT names now (blocking): the server's first load, whose errors
        (no CURRENT, refused credentials) stop `serve` before it listens."""
        from sparse_embed.pipeline.index.searcher import current_index_id

        index_id = current_index_id(self.index_root)
        self._last_check = self._clock()
        if self.loaded is None or self.loaded.index_id != index_id:
            self.loaded = self._open(index_id)
        self.reload_error = None
        return self.loaded

    async def current(self) -> LoadedIndex:
        """The loaded index, after reading CURRENT if a check is due. A check that is already
        running elsewhere is not waited for: this request gets the index loaded now."""
        if self.loaded is None:
            raise RuntimeError("LiveIndex.load() must run before the server takes requests")
        if not check_due(self._last_check, self._clock(), self.check_every_s):
            return self.loaded
        if self._checking is None:
            self._checking = asyncio.Lock()
        if self._checking.locked():
            return self.loaded
        async with self._checking:
            if check_due(self._last_check, self._clock(), self.check_every_s):
                await asyncio.get_running_loop().run_in_executor(None, self._check)
        return self.loaded

    def _check(self) -> None:
        from sparse_embed.pipeline.embed.report import redact_text
        from sparse_embed.pipeline.index.searcher import current_index_id

        self._last_check = self._clock()
        try:
            index_id = current_index_id(self.index_root)
            if index_id != self.loaded.index_id:
                log.info("CURRENT moved from %s to %s: opening it", self.loaded.index_id, index_id)
                old, self.loaded = self.loaded, self._open(index_id)  # the swap: requests that took the old one keep it
                self._prune(old)
            self.reload_error = None
        except Exception as e:  # the old index keeps serving; status says why the new one is not
            self.reload_error = redact_text(f"{type(e).__name__}: {e}")[:500]
            log.warning("index %s keeps serving: %s", self.loaded.index_id, self.reload_error)
