"""Backlog progress: replay at start and drain after an outage report done/total, rate and ETA until the depth settles."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from bridge.backlog import BacklogWatch, watch_backlog
from bridge.memory import release_memory
from bridge.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Made:
    """Records every Progress the watch makes (real ones, with a test clock and no bar)."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.made: list[Progress] = []

    def __call__(self, what: str, total: int) -> Progress:
        progress = Progress(what, total, every=5.0, bar=False, clock=self.clock)
        self.made.append(progress)
        return progress


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_replay_at_start_reports_until_settled(caplog: pytest.LogCaptureFixture) -> None:
    """An old spool of 10,000 events is reported as a spool replay with rate and ETA, and ends near zero."""
    caplog.set_level(logging.INFO)
    clock = _Clock()
    made = _Made(clock)
    watch = BacklogWatch(progress=made)
    watch.observe(10_000, broker_up=False)  # broker not connected yet: nothing to report
    assert not watch.draining
    watch.observe(10_000, broker_up=True)
    assert watch.draining and made.made[0].what == "spool replay"
    clock.now = 5.0
    watch.observe(6_000, broker_up=True)  # 4,000 in 5 s: 800/s, 6,000 left -> 7.5 s
    assert "spool replay: 4000/10000 (40%), 800/s, ETA 8s" in _messages(caplog)
    clock.now = 8.0
    watch.observe(200, broker_up=True)  # under the settled level: finished
    assert not watch.draining
    assert _messages(caplog)[-1].startswith("spool replay: 9800/10000 (98%)")
    assert "finished in 8s" in _messages(caplog)[-1]


def test_small_backlog_is_not_reported() -> None:
    """A depth at or under the threshold (ordinary in-flight events) starts no progress."""
    made = _Made(_Clock())
    watch = BacklogWatch(progress=made)
    for depth in (0, 500, 1_000, 300):
        watch.observe(depth, broker_up=True)
    assert made.made == []


def test_drain_after_outage_is_labelled_and_total_grows_with_arrivals() -> None:
    """After an outage the drain says so; events that keep arriving raise the total, so left = depth."""
    clock = _Clock()
    made = _Made(clock)
    watch = BacklogWatch(progress=made)
    watch.observe(10, broker_up=True)
    watch.observe(5_000, broker_up=False)  # outage: the spool fills, nothing reported
    assert not watch.draining
    watch.observe(5_000, broker_up=True)
    progress = made.made[0]
    assert progress.what == "backlog drain"
    watch.observe(4_000, broker_up=True)
    watch.observe(4_500, broker_up=True)  # arrivals faster than publishing for a moment
    assert (progress.done, progress.total) == (1_000, 5_500)
    assert progress.total - progress.done == 4_500  # what is left is the depth


def test_broker_lost_mid_drain_ends_it_and_a_new_one_starts() -> None:
    """Losing the broker ends the current report; when it is back a new drain is reported."""
    made = _Made(_Clock())
    watch = BacklogWatch(progress=made)
    watch.observe(3_000, broker_up=True)
    watch.observe(2_000, broker_up=False)
    assert not watch.draining and len(made.made) == 1
    watch.observe(2_500, broker_up=True)
    assert watch.draining and len(made.made) == 2
    assert made.made[1].what == "backlog drain" and made.made[1].total == 2_500


def test_settled_must_be_below_threshold() -> None:
    """A settled level at or above the threshold is refused (the drain could never end)."""
    with pytest.raises(ValueError, match="settled"):
        BacklogWatch(threshold=100, settled=100)


async def test_watch_backlog_task_samples_until_stopped() -> None:
    """The task samples depth and broker state, reports the drain, and ends (closing it) when stopped."""
    depths = iter([5_000, 4_000, 3_000, 2_000, 1_500])
    last = [5_000]

    def depth() -> int:
        last[0] = next(depths, last[0])
        return last[0]

    made = _Made(_Clock())
    stop = asyncio.Event()
    task = asyncio.create_task(
        watch_backlog(depth, lambda: True, stop, interval=0.01, watch=BacklogWatch(progress=made))
    )
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 5)
    (progress,) = made.made
    assert progress.done == 3_500 and progress.total == 5_000


def test_memory_is_given_back_once_per_drain_that_finishes() -> None:
    """on_drained runs once when a backlog has drained, and not when the broker is lost mid-drain."""
    drained: list[int] = []
    watch = BacklogWatch(progress=_Made(_Clock()), on_drained=lambda: drained.append(1))
    watch.observe(3_000, broker_up=True)
    watch.observe(2_000, broker_up=False)  # paused, not drained
    assert drained == []
    watch.observe(2_000, broker_up=True)
    watch.observe(100, broker_up=True)
    watch.observe(0, broker_up=True)  # already settled: no second call
    assert drained == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_memory_trims_the_heap_on_glibc() -> None:
    """release_memory finds glibc's malloc_trim here and calls it."""
    assert release_memory() is True


def test_a_standby_spool_is_not_a_backlog() -> None:
    """The bridge reports as backlog only the spools of the realms it leads; a standby's window is kept, not drained."""
    from types import SimpleNamespace

    from bridge.app import Bridge

    eu = SimpleNamespace(spool=SimpleNamespace(depth=1_500), leading=True)
    us = SimpleNamespace(spool=SimpleNamespace(depth=40_000), leading=False)
    fake = SimpleNamespace(lanes={"eu": eu, "us": us}, broker=SimpleNamespace(connected=True))
    assert Bridge._led_depth(fake) == 1_500  # type: ignore[arg-type]
    assert Bridge._publishing_any(fake) is True  # type: ignore[arg-type]
    eu.leading = False  # standby for every realm: nothing to drain, nothing published
    assert Bridge._led_depth(fake) == 0  # type: ignore[arg-type]
    assert Bridge._publishing_any(fake) is False  # type: ignore[arg-type]
