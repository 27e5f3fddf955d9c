"""What a long stage has done so far, for a person watching it.

On a terminal (stderr is a tty) one line per stage, rewritten in place with `\\r`:

    [fetch+decode+embed+write] |#########...............| 1200/5000 images, 41.3 images/s, ETA 1m32s

(the bar shrinks, then goes, to keep the line within the terminal's width). After each
draw the cursor goes back to the line's start, so a log line printed meanwhile writes over
the bar instead of after it (a log line shorter than the bar leaves the bar's tail), and
the next draw comes on the line below. At the end the bar is erased and the stage's end
line takes its place, so the terminal keeps the outline of start and end lines.

Anywhere else (a log file, `ray job logs`) the same text, without the bar, as a log line
at least every LOG_EVERY_S. StageTimer (timing.py) writes the stage's start and end lines
and runs the Ticker; this module draws what lies between them.

The embed stage's count comes from RowCounter, a zero-CPU Ray actor that the embed actors
add each batch's row count to (CountRows): the driver reads one integer, never rows.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger("sparse_embed.stages")

LOG_EVERY_S = 30.0  # off a terminal: a progress line at least this often (ticks on time)
TICK_S = 0.5  # the Ticker polls the count and redraws the bar this often
RATE_WINDOW_S = 60.0  # images/s and the ETA come from the count's change over this much recent time
BAR_WIDTH = 24


# -- arithmetic and text (pure) ---------------------------------------------------------

def format_duration(seconds: float) -> str:
    """45s, 1m32s, 2h05m (seconds dropped from an hour up)."""
    s = max(0, int(seconds + 0.5))  # half up: an ETA of 0.5 s reads 1s
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rate(samples) -> float | None:
    """Units per second between the oldest and the newest (time, done) sample; None until
    two samples span some time."""
    if len(samples) < 2:
        return None
    (t0, d0), (t1, d1) = samples[0], samples[-1]
    return (d1 - d0) / (t1 - t0) if t1 > t0 else None


def eta_s(done: int, total: int | None, per_s: float | None) -> float | None:
    """Seconds left at `per_s`; None without a total or with no rate (none yet, or 0)."""
    if total is None or not per_s or per_s <= 0:
        return None
    return max(0, total - done) / per_s


def progress_text(stage: str, *, done: int | None, total: int | None, unit: str, per_s: float | None,
                  elapsed_s: float) -> str:
    """`[embed] 1200/5000 images, 41.3 images/s, ETA 1m32s`; without a count yet, how long
    the stage has run; without a total, no ETA."""
    if done is None:
        return f"[{stage}] running for {format_duration(elapsed_s)}"
    parts = [f"{done}/{total} {unit}" if total is not None else f"{done} {unit}",
             f"{per_s:.1f} {unit}/s" if per_s is not None else f"-- {unit}/s"]
    if total is not None:
        eta = eta_s(done, total, per_s)
        parts.append("ETA " + (format_duration(eta) if eta is not None else "--"))
    return f"[{stage}] " + ", ".join(parts)


def bar(done: int | None, total: int | None, width: int = BAR_WIDTH) -> str:
    """`|######..........|`, filled in proportion to done/total (empty when either is unknown)."""
    filled = min(width, width * done // total) if done and total else 0
    return "|" + "#" * filled + "." * (width - filled) + "|"


MIN_BAR_WIDTH = 8  # narrower than this, the line goes without a bar


def tty_line(text: str, done: int | None, total: int | None, columns: int) -> str:
    """`text` with a bar after its `[stage] ` when done/total are known, all within
    columns - 1 characters (a line as wide as the terminal wraps, and `\\r` would then
    return to its second row): the bar narrows first, then goes, then the text is cut."""
    room = columns - 1
    if done is not None and total is not None:
        head, tail = text.split("] ", 1)
        width = min(BAR_WIDTH, room - len(text) - 3)  # 3: the bar's two ends and a space
        if width >= MIN_BAR_WIDTH:
            return f"{head}] {bar(done, total, width)} {tail}"
    return text[:room]


def line_due(now: float, last_at: float, *, every_s: float, tick_s: float) -> bool:
    """Whether a tick at `now` prints: yes when waiting for the next tick (tick_s later)
    would leave more than every_s since the last line. Ticks on time thus give a line at
    least every every_s, and at most one tick's worth sooner."""
    return now + tick_s > last_at + every_s


def summary_text(done: int | None, total: int | None, unit: str, elapsed_s: float) -> str | None:
    """The end line's tail: `5000/5000 images, 54.2 images/s` (the stage's average rate)."""
    if done is None:
        return None
    count = f"{done}/{total}" if total is not None else f"{done}"
    return f"{count} {unit}, {done / elapsed_s:.1f} {unit}/s" if elapsed_s > 0 else f"{count} {unit}"


# -- one stage's display -----------------------------------------------------------------

def _to_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _stderr_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):  # not a terminal, or stderr replaced by an object without a descriptor
        return 80


class Progress:
    """One stage's count, drawn as a bar (tty) or logged every LOG_EVERY_S (not a tty).
    The stage's own code and the Ticker's thread both call it (a lock orders them)."""

    def __init__(self, stage: str, *, unit: str, total: int | None = None, tty: bool | None = None,
                 write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 every_s: float = LOG_EVERY_S, tick_s: float = TICK_S, columns: Callable[[], int] | None = None):
        self.stage, self.unit, self.total = stage, unit, total
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._write = write or (_to_stderr if self.tty else log.info)
        self._clock, self._every_s, self._tick_s = clock, every_s, tick_s
        self._columns = columns or _stderr_columns  # asked at each draw: it follows a resize
        self.started = clock()
        self.done: int | None = None
        self._samples: deque = deque()  # (time, done) since the last zero count, over the last RATE_WINDOW_S
        self._last_line = self.started  # the stage's start line counts as a line
        self._drawn = False
        self._closed = False  # a poll that outlived Ticker.stop must not draw after the end line
        self._lock = threading.Lock()

    def update(self, done: int) -> None:
        """Record `done` units finished so far; prints if due. Counts only grow, and stop at
        the total (a retried block is counted again by the embed actors)."""
        with self._lock:
            if self._closed:
                return
            now = self._clock()
            done = max(done, self.done or 0)
            self.done = min(done, self.total) if self.total is not None else done
            if self.done == 0:
                self._samples.clear()  # the rate starts at the last zero count: actor start-up and model load stay out
            self._samples.append((now, self.done))
            while len(self._samples) > 2 and self._samples[1][0] <= now - RATE_WINDOW_S:
                self._samples.popleft()
            self._show(now)

    def tick(self) -> None:
        """No new count: redraw the bar, or log the line if one is due (a stalled stage still shows)."""
        with self._lock:
            if not self._closed:
                self._show(self._clock())

    def text(self, now: float) -> str:
        """The progress line; the rate is the recent one (rate over the samples), or the
        stage's average until two counts differ in time."""
        per_s = rate(self._samples)
        if per_s is None and self.done and now > self.started:
            per_s = self.done / (now - self.started)
        return progress_text(self.stage, done=self.done, total=self.total, unit=self.unit, per_s=per_s,
                             elapsed_s=now - self.started)

    def _show(self, now: float) -> None:
        if self.tty:
            line = tty_line(self.text(now), self.done, self.total, self._columns())
            self._write("\r" + line + "\x1b[K\r")  # \x1b[K: erase what a longer earlier line left
            self._drawn = True
        elif line_due(now, self._last_line, every_s=self._every_s, tick_s=self._tick_s):
            self._write(self.text(now))
            self._last_line = now

    def close(self) -> str | None:
        """Erases the bar (tty): the stage's end line, written where it was, carries the
        count. Returns that line's tail (summary_text)."""
        with self._lock:
            now = self._clock()
            if self.tty and self._drawn and not self._closed:
                self._write("\r\x1b[K")
            self._closed = True
            return summary_text(self.done, self.total, self.unit, now - self.started)


class Ticker:
    """A daemon thread that every tick_s puts poll() into `progress` (or only ticks it,
    without a poll). A poll that raises (a timeout, an actor not up yet) keeps the last count."""

    def __init__(self, progress: Progress, poll: Callable[[], int] | None = None, tick_s: float = TICK_S):
        self.progress, self.poll, self.tick_s = progress, poll, tick_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{progress.stage}", daemon=True)

    def start(self) -> "Ticker":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10 * self.tick_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            if self.poll is None:
                self.progress.tick()
                continue
            try:
                done = self.poll()
            except Exception as e:  # the count is for display only: the stage goes on
                log.debug("[%s] progress poll failed: %s: %s", self.progress.stage, type(e).__name__, e)
                self.progress.tick()
            else:
                self.progress.update(done)


# -- counting rows on Ray ----------------------------------------------------------------

class _Sum:
    """RowCounter's actor: a running sum."""

    def __init__(self):
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def get(self) -> int:
        return self.n


class RowCounter:
    """A zero-CPU Ray actor that workers add row counts to (`handle.add.remote(n)`, not
    waited for); `rows()` reads the sum from the driver. Calls from different workers
    arrive in no set order, so the sum can lag the rows already done by a few batches."""

    def __init__(self):
        import ray

        self.handle = ray.remote(num_cpus=0)(_Sum).remote()

    def rows(self, timeout_s: float = 5.0) -> int:
        import ray

        return ray.get(self.handle.get.remote(), timeout=timeout_s)

    def close(self) -> None:
        import ray

        ray.kill(self.handle)


class CountRows:
    """A Ray Data callable class around another one: builds `inner(**inner_kwargs)` once per
    actor, runs it on each batch, and adds the output's row count to `counter` (a
    RowCounter's handle). The output is returned unchanged."""

    def __init__(self, *, inner: type, inner_kwargs: dict, counter):
        self.inner = inner(**inner_kwargs)
        self.counter = counter

    def __call__(self, batch):
        out = self.inner(batch)
        self.counter.add.remote(out.num_rows)
        return out
