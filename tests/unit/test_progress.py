"""Stage progress (pipeline/embed/progress.py): the arithmetic and the text as pure functions,
and the display driven by a fake clock (nothing here sleeps)."""
from __future__ import annotations

import logging
import threading

import pytest

from sparse_embed.pipeline.embed import progress
from sparse_embed.pipeline.embed.progress import (Progress, Ticker, bar, eta_s, format_duration, line_due,
                                                   progress_text, rate, summary_text, tty_line)
from sparse_embed.pipeline.embed.timing import StageTimer


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (0.4, "0s"), (45, "45s"), (59.6, "1m00s"), (92, "1m32s"),
                                           (3599, "59m59s"), (3600, "1h00m"), (7530, "2h05m"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_rate_is_the_change_between_the_oldest_and_newest_sample():
    assert rate([]) is None and rate([(5.0, 10)]) is None
    assert rate([(5.0, 10), (5.0, 20)]) is None  # no time between them
    assert rate([(0.0, 0), (3.0, 5), (10.0, 100)]) == pytest.approx(10.0)


def test_eta_is_the_remaining_count_at_the_rate():
    assert eta_s(1200, 5000, 41.3) == pytest.approx(3800 / 41.3)
    assert eta_s(5000, 5000, 41.3) == 0
    assert eta_s(10, None, 2.0) is None and eta_s(10, 100, None) is None and eta_s(10, 100, 0.0) is None


def test_progress_text():
    assert progress_text("embed", done=1200, total=5000, unit="images", per_s=41.3, elapsed_s=30) == \
        "[embed] 1200/5000 images, 41.3 images/s, ETA 1m32s"
    assert progress_text("embed", done=0, total=5000, unit="images", per_s=None, elapsed_s=1) == \
        "[embed] 0/5000 images, -- images/s, ETA --"
    assert progress_text("list", done=7, total=None, unit="objects", per_s=3.5, elapsed_s=2) == "[list] 7 objects, 3.5 objects/s"
    assert progress_text("list", done=None, total=None, unit="objects", per_s=None, elapsed_s=90) == "[list] running for 1m30s"


def test_bar_fills_in_proportion_and_never_overflows():
    assert bar(0, 10, width=10) == "|..........|"
    assert bar(5, 10, width=10) == "|#####.....|"
    assert bar(10, 10, width=10) == bar(12, 10, width=10) == "|##########|"
    assert bar(None, 10, width=4) == bar(3, None, width=4) == bar(3, 0, width=4) == "|....|"


def test_line_due_prints_on_the_last_tick_before_the_interval_would_be_exceeded():
    assert not line_due(29.0, 0.0, every_s=30, tick_s=1)  # the tick at 30 is still in time
    assert line_due(29.5, 0.0, every_s=30, tick_s=1)
    assert line_due(30.0, 0.0, every_s=30, tick_s=1)


def test_summary_text_uses_the_stage_average():
    assert summary_text(5000, 5000, "images", 100.0) == "5000/5000 images, 50.0 images/s"
    assert summary_text(129, None, "objects", 2.0) == "129 objects, 64.5 objects/s"
    assert summary_text(None, 10, "images", 2.0) is None
    assert summary_text(3, None, "vectors", 0.0) == "3 vectors"


def _lines(tty: bool, clock: FakeClock, total: int | None = 5000):
    out: list[tuple[float, str]] = []
    p = Progress("embed", unit="images", total=total, tty=tty, write=lambda s: out.append((clock.t, s)), clock=clock,
                 every_s=30.0, tick_s=0.5)
    return p, out


def test_not_a_tty_a_line_at_least_every_30_s_of_fake_time_even_when_stalled():
    clock = FakeClock()
    p, out = _lines(False, clock)
    start = clock.t
    for step in range(1, 601):  # 300 s in ticks of 0.5 s; the count stalls from 100 s to 200 s
        clock.t = start + step * 0.5
        if step * 0.5 < 100 or step * 0.5 >= 200:
            p.update(step * 5)
        else:
            p.tick()
    times = [start] + [t for t, _ in out]  # the stage's start line counts as the first line
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps and max(gaps) <= 30.0, gaps
    assert len(out) <= 300 / 29.5 + 1, "about one line per 30 s, not one per tick"
    assert all(not s.startswith("\r") for _, s in out)
    assert out[0] == (start + 30.0, "[embed] 300/5000 images, 10.0 images/s, ETA 7m50s")  # 5 images per 0.5 s


def test_not_a_tty_the_rate_is_recent_so_a_stall_shows():
    clock = FakeClock()
    p, out = _lines(False, clock)
    start = clock.t
    for step in range(1, 121):  # 60 s at 10 images/s
        clock.t = start + step * 0.5
        p.update(step * 5)
    for step in range(121, 361):  # then 120 s with no new image
        clock.t = start + step * 0.5
        p.update(600)
    assert out[-1][1].startswith("[embed] 600/5000 images, 0.0 images/s, ETA --")


def test_the_rate_leaves_out_the_start_up_before_the_first_row():
    clock = FakeClock()
    p, out = _lines(False, clock, total=1000)
    start = clock.t
    for step in range(1, 61):  # 20 s of model load (count 0), then 10 images/s
        clock.t = start + step * 0.5
        p.update(0 if clock.t - start <= 20 else int((clock.t - start - 20) * 10))
    assert out == [(start + 30.0, "[embed] 100/1000 images, 10.0 images/s, ETA 1m30s")]


def test_tty_line_fits_the_terminal_bar_first():
    text = "[embed] 40/100 images, 4.0 images/s, ETA 15s"  # 44 characters
    assert tty_line(text, 40, 100, 200) == "[embed] |#########...............| 40/100 images, 4.0 images/s, ETA 15s"
    assert tty_line(text, 40, 100, 60) == "[embed] |####........| 40/100 images, 4.0 images/s, ETA 15s"
    assert len(tty_line(text, 40, 100, 60)) == 59  # never the full width: that would wrap
    assert tty_line(text, 40, 100, 56) == "[embed] |###.....| 40/100 images, 4.0 images/s, ETA 15s"  # MIN_BAR_WIDTH
    assert tty_line(text, 40, 100, 55) == text  # no room for a bar of MIN_BAR_WIDTH
    assert tty_line(text, 40, 100, 21) == text[:20]
    assert tty_line("[list] running for 3s", None, None, 200) == "[list] running for 3s"


def test_tty_redraws_one_line_in_place_and_erases_it_at_the_end():
    clock = FakeClock()
    out: list[str] = []
    p = Progress("embed", unit="images", total=100, tty=True, write=out.append, clock=clock, columns=lambda: 120)
    clock.t += 1.0
    p.update(40)
    clock.t += 1.0
    p.update(80)
    clock.t += 0.5
    p.tick()
    tail = p.close()
    assert out[0] == "\r[embed] |#########...............| 40/100 images, 40.0 images/s, ETA 2s\x1b[K\r"
    assert out[1] == out[2] == "\r[embed] |###################.....| 80/100 images, 40.0 images/s, ETA 1s\x1b[K\r"
    assert out[3] == "\r\x1b[K" and len(out) == 4  # the cursor is back at column 0 after each draw; no newline
    assert tail == "80/100 images, 32.0 images/s"
    p.update(90)  # a late poll
    p.tick()
    assert len(out) == 4, "nothing is drawn after the end"


def test_tty_a_stage_without_a_count_shows_how_long_it_has_run():
    clock = FakeClock()
    out = []
    p = Progress("list", unit="objects", tty=True, write=out.append, clock=clock, columns=lambda: 80)
    clock.t += 75
    p.tick()
    assert out == ["\r[list] running for 1m15s\x1b[K\r"]


def test_a_stage_too_short_to_draw_ends_no_line():
    out = []
    p = Progress("diff", unit="rows", tty=True, write=out.append, clock=FakeClock())
    assert p.close() is None and out == []


def test_counts_only_grow_and_stop_at_the_total():
    clock = FakeClock()
    p, _ = _lines(False, clock, total=10)
    p.update(6)
    p.update(4)  # a poll answered late
    assert p.done == 6
    p.update(12)  # a retried block counted twice
    assert p.done == 10


def test_ticker_polls_into_the_progress_and_survives_a_failing_poll():
    clock = FakeClock()
    p, _ = _lines(False, clock, total=10)
    calls = []
    polled = threading.Event()

    def poll():
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("actor not up yet")
        if len(calls) >= 3:
            polled.set()
        return 7

    ticker = Ticker(p, poll, tick_s=0.001).start()
    assert polled.wait(timeout=10)
    ticker.stop()
    assert p.done == 7 and not ticker._thread.is_alive()


def test_stage_timer_end_line_carries_the_count(caplog):
    timer = StageTimer(tty=False)
    with caplog.at_level(logging.INFO, logger="sparse_embed.stages"):
        with timer.stage("list", unit="objects") as shown:
            shown.update(129)
        with timer.stage("diff") as nothing:
            assert nothing is None
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "[list] start"
    assert messages[1].startswith("[list] done in ") and messages[1].endswith(" objects/s") and ": 129 objects, " in messages[1]
    assert messages[3].startswith("[diff] done in ") and ":" not in messages[3]
    assert set(timer.as_dict()) == {"list", "diff"}


def test_count_rows_passes_batches_through_and_counts_them():
    import pyarrow as pa

    added = []

    class Handle:  # stands in for a RowCounter's actor handle
        class add:
            @staticmethod
            def remote(n):
                added.append(n)

    class Double:
        def __init__(self, *, k):
            self.k = k

        def __call__(self, batch):
            return batch.append_column("y", pa.array([v * self.k for v in batch.column("x").to_pylist()]))

    wrapped = progress.CountRows(inner=Double, inner_kwargs={"k": 2}, counter=Handle)
    out = wrapped(pa.table({"x": [1, 2, 3]}))
    assert out.column("y").to_pylist() == [2, 4, 6] and added == [3]
