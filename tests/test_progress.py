"""Progress reporting: a log line every few seconds with done/total, rate and ETA; a bar on a terminal."""

from __future__ import annotations

import io
import logging

import pytest

from bridge.progress import Progress, format_eta
from bridge.simulator import SentEvent, SimulatorConfig
from bridge.simulator.cli import SentProgress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (7.4, "7s"), (245, "4m05s"), (3723, "1h02m03s"), (None, "?"), (float("inf"), "?")]
)
def test_format_eta(seconds: float | None, text: str) -> None:
    """ETAs read as h/m/s, and unknown ones as '?'."""
    assert format_eta(seconds) == text


def test_logs_a_line_every_few_seconds_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    """One line per interval, not per item, saying done/total, percentage, rate and ETA."""
    caplog.set_level(logging.INFO, logger="bridge.progress")
    clock = _Clock()
    progress = Progress("spool replay", 1000, every=5.0, bar=False, clock=clock)
    for _ in range(100):  # 100 items in 4.95 s: no line yet
        clock.now += 0.0495
        progress.update()
    assert not caplog.records
    clock.now = 5.0
    progress.update(100)  # 200 done after 5 s: 40/s, 800 left -> 20 s
    assert [r.getMessage() for r in caplog.records] == ["spool replay: 200/1000 (20%), 40/s, ETA 20s"]
    clock.now = 6.0
    progress.update()
    assert len(caplog.records) == 1  # next line only 5 s later
    clock.now = 10.0
    progress.update(799)
    progress.close()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-1] == "spool replay: 1000/1000 (100%), 100/s, ETA 0s (finished in 10s)"


def test_unknown_total() -> None:
    """Without a total the line gives the count and rate only."""
    clock = _Clock()
    progress = Progress("drain", None, bar=False, clock=clock)
    clock.now = 2.0
    progress.update(10)
    assert progress.line() == "drain: 10 done, 5/s"


def test_bar_only_on_a_terminal() -> None:
    """A terminal gets a tqdm bar; a pipe or file gets none."""
    tty, pipe = _Tty(), io.StringIO()
    with Progress("tail", 50, stream=tty) as shown, Progress("tail", 50, stream=pipe) as hidden:
        shown.update(25)
        hidden.update(25)
    assert "tail:" in tty.getvalue() and "/50" in tty.getvalue()
    assert pipe.getvalue() == ""


def test_total_can_grow_and_the_bar_follows() -> None:
    """set_total changes the total of the log line and of the terminal bar."""
    tty = _Tty()
    clock = _Clock()
    progress = Progress("backlog drain", 100, stream=tty, clock=clock)
    progress.update(50)
    progress.set_total(200)
    clock.now = 10.0
    assert progress.line() == "backlog drain: 50/200 (25%), 5/s, ETA 30s"
    progress.close()
    assert "/200" in tty.getvalue()


def _sent(seq: int) -> SentEvent:
    return SentEvent(seq, "fp", "user.created", "id", "0", 0.0, "flat", "{}")


def test_simulate_count_progress_counts_every_realm_and_closes_at_the_total() -> None:
    """simulate --count N: the bar's total is N per realm key, and it ends itself once all are sent."""
    tty = _Tty()
    config = SimulatorConfig(realm_keys=("key-a-123456", "key-b-123456"), count=3)
    hook = SentProgress(config, stream=tty)
    assert hook.progress.total == 6
    for seq in range(1, 7):
        hook(_sent(seq))
    assert hook._closed and hook.progress.done == 6
    assert "simulate:" in tty.getvalue() and "/6 [" in tty.getvalue()
    hook.close()  # a second close (at stop) does nothing


def test_simulate_count_progress_bar_only_on_a_terminal() -> None:
    """Without a terminal the simulate hook draws no bar (log lines only)."""
    pipe = io.StringIO()
    with SentProgress(SimulatorConfig(count=2), stream=pipe) as hook:
        hook(_sent(1))
    assert pipe.getvalue() == ""
