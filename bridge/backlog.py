"""Progress of a spool backlog draining: the replay of an old spool at start, and the drain after an outage.

:class:`BacklogWatch` is the pure core: it is fed the spool depth and whether the
broker is up, and decides when a drain starts (a backlog of more than
``threshold`` events with the broker up) and when it ends (the depth is back
under ``settled``). While a drain runs it drives a :class:`~bridge.progress.Progress`
(done/total, rate and ETA every few seconds; a bar on a terminal).
:func:`watch_backlog` is the thin task that samples the two values.

Events keep arriving during a drain, so "done" counts the depth's decreases and
"total" grows with its increases: the rate is the net drain rate, and the ETA is
the time until the depth is back to about zero at that rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final, Protocol

from bridge.memory import release_memory
from bridge.progress import Progress

__all__ = ["BacklogWatch", "watch_backlog"]

log = logging.getLogger(__name__)

THRESHOLD: Final = 1_000
SETTLED: Final = 256  # about one confirm window in flight: "back to ~0" while events keep flowing


class _ProgressLike(Protocol):
    total: int | None
    done: int

    def update(self, n: int = 1) -> None: ...

    def set_total(self, total: int) -> None: ...

    def close(self) -> None: ...


class BacklogWatch:
    """Report the drain of a spool backlog; fed by :meth:`observe`, does no I/O of its own.

    Args:
        threshold: a drain is reported only for a backlog of more than this many events.
        settled: the drain is over once the depth is at or under this.
        progress: makes the :class:`Progress` of one drain from its label and total (tests inject theirs).
        on_drained: called once each time a reported backlog has drained (the bridge gives its memory back).
    """

    def __init__(
        self,
        *,
        threshold: int = THRESHOLD,
        settled: int = SETTLED,
        progress: Callable[[str, int], _ProgressLike] | None = None,
        on_drained: Callable[[], object] | None = None,
    ) -> None:
        if not 0 <= settled < threshold:
            raise ValueError("settled must be >= 0 and below threshold")
        self.threshold = threshold
        self.settled = settled
        self._make = progress or (lambda what, total: Progress(what, total))
        self._current: _ProgressLike | None = None
        self._depth = 0
        self._ever_up = False
        self._on_drained = on_drained

    @property
    def draining(self) -> bool:
        """True while a drain is being reported."""
        return self._current is not None

    def observe(self, depth: int, broker_up: bool) -> None:
        """Take one sample of the spool depth and the broker state."""
        current = self._current
        if current is None:
            if broker_up and depth > self.threshold:
                what = "backlog drain" if self._ever_up else "spool replay"
                log.info("%s: %d events to publish", what, depth)
                self._current = self._make(what, depth)
                self._depth = depth
            self._ever_up = self._ever_up or broker_up
            return
        self._ever_up = True
        if depth < self._depth:
            current.update(self._depth - depth)
        elif depth > self._depth:
            current.set_total((current.total or 0) + depth - self._depth)
        self._depth = depth
        if not broker_up:
            log.info("backlog drain paused: not publishing now (broker down, or no realm led) with %d events", depth)
            self.close()
        elif depth <= self.settled:
            self.close()
            if self._on_drained is not None:
                self._on_drained()

    def close(self) -> None:
        """End the drain being reported, if any (its final line is logged)."""
        if self._current is not None:
            self._current.close()
            self._current = None


async def watch_backlog(
    depth: Callable[[], int],
    broker_up: Callable[[], bool],
    stop: asyncio.Event,
    *,
    interval: float = 0.5,
    watch: BacklogWatch | None = None,
) -> None:
    """Sample the spool depth and the broker state every ``interval`` seconds until ``stop`` is set.

    Args:
        depth: the spool's depth now (``lambda: spool.stats().depth``).
        broker_up: whether the broker link is up (``lambda: broker.connected``).
        stop: set it to stop.
        interval: seconds between samples.
        watch: the core (default: a :class:`BacklogWatch` with its defaults).
    """
    watch = watch or BacklogWatch(on_drained=release_memory)
    try:
        while not stop.is_set():
            watch.observe(depth(), broker_up())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
    finally:
        watch.close()
