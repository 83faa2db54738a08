"""Progress on long work (spool replay and drain, ``tail --count``, ``simulate --count``).

A :class:`Progress` logs one line every few seconds with done/total, rate and
ETA, and on a terminal also draws a bar (tqdm). It is cheap to call per item:
``update`` only adds and compares a clock reading.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any, Self

from tqdm import tqdm

__all__ = ["Progress", "format_eta"]

log = logging.getLogger(__name__)


def format_eta(seconds: float | None) -> str:
    """``1h02m03s``, ``4m05s``, ``7s``, or ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf") or seconds < 0:
        return "?"
    s = round(seconds)
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Report progress of ``total`` items: a log line every ``every`` seconds, and a bar on a terminal.

    Args:
        what: what is being done (``spool replay``), the start of each line.
        total: how many items, or None when unknown (no ETA then).
        every: seconds between log lines.
        bar: draw a terminal bar; default: when ``stream`` is a terminal.
        stream: where the bar goes (standard error).
        logger: where the lines go.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        *,
        every: float = 5.0,
        bar: bool | None = None,
        stream: IO[str] | None = None,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self.every = every
        self._log = logger
        self._clock = clock
        self._start = clock()
        self._next = self._start + every
        out = stream if stream is not None else sys.stderr
        if bar is None:
            bar = bool(getattr(out, "isatty", lambda: False)())
        self._bar: tqdm[Any] | None = (
            tqdm(total=total, desc=what, unit="ev", file=out, dynamic_ncols=True, mininterval=0.25, leave=False)
            if bar
            else None
        )

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        now = self._clock()
        if now >= self._next:
            self._next = now + self.every
            self._log.info("%s", self.line(now))

    def set_total(self, total: int) -> None:
        """Change the total (work that grows while it is done, such as a backlog still being fed)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def rate(self, now: float | None = None) -> float:
        """Items per second since the start."""
        elapsed = (self._clock() if now is None else now) - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        """The log line: ``spool replay: 1200/5000 (24%), 400/s, ETA 10s``."""
        rate = self.rate(now)
        if self.total:
            left = max(self.total - self.done, 0)
            eta = format_eta(left / rate if rate > 0 else None)
            pct = 100.0 * self.done / self.total
            return f"{self.what}: {self.done}/{self.total} ({pct:.0f}%), {rate:.0f}/s, ETA {eta}"
        return f"{self.what}: {self.done} done, {rate:.0f}/s"

    def close(self, outcome: str = "finished") -> None:
        """Stop the bar and log the final line (``outcome``: ``finished``, or ``stopped`` for work cut short)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._log.info("%s (%s in %s)", self.line(), outcome, format_eta(self._clock() - self._start))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
