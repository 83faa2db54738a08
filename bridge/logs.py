"""Logging set-up: JSON lines off a terminal, readable text on one, secrets scrubbed."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from bridge.secrets import LogScrubber

__all__ = ["LibraryNoise", "RateLimitedWarning", "setup_logging"]

class RateLimitedWarning:
    """One WARNING line per period on ``logger``, saying how many were held back since."""

    def __init__(self, logger: logging.Logger, period: float) -> None:
        self.logger = logger
        self.period = period
        self._last = -period
        self.suppressed = 0

    def __call__(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.period:
            self.suppressed += 1
            return
        held, self.suppressed, self._last = self.suppressed, 0, now
        suffix = f" ({held} more since the last such line)" if held else ""
        self.logger.warning(fmt + "%s", *args, suffix)


_STD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class _TextFormatter(logging.Formatter):
    def __init__(self, clean: Callable[[str], str]) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self._clean = clean

    def format(self, record: logging.LogRecord) -> str:
        return self._clean(super().format(record))


class _JsonFormatter(logging.Formatter):
    def __init__(self, clean: Callable[[str], str]) -> None:
        super().__init__()
        self._clean = clean

    def format(self, record: logging.LogRecord) -> str:
        clean = self._clean
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": clean(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = clean(str(value)) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = clean(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = clean(record.exc_text)
        return orjson.dumps(out, default=lambda v: clean(str(v))).decode()


# What aio-pika and aiormq log, at WARNING or ERROR, about a broker that is down or a link that
# broke: a line per reconnect attempt (every second), the reader's traceback, callbacks of channels
# that close with their connection.
# Each entry: logger, start of the format string, text the formatted line must hold ("" = any), and
# ``always`` (a duplicate of what the bridge or aio-pika already says: always DEBUG) or ``repeats``
# (the first line of each text passes as it is, so the cause of a failing reconnect such as
# ACCESS_REFUSED after a password change is shown; the same text again within a minute is DEBUG).
# A failing callback is noise only for aio-pika's own channel-close handler: any other (the
# bridge's own included) stays an ERROR.
_NOISE: tuple[tuple[str, str, str, str], ...] = (
    ("aiormq.connection", "error when creating transport", "", "always"),
    ("aiormq.connection", "Cancelling cause reader exited abnormally", "", "repeats"),
    ("aio_pika.robust_connection", "Connection attempt to ", "", "repeats"),
    ("aio_pika.tools", "Callback %r error", "RobustChannel._on_close", "always"),
)
_REPEAT_WINDOW = 60.0
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_SEEN_MAX = 256


class LibraryNoise(logging.Filter):
    """Demote the libraries' per-attempt lines about a broker outage to DEBUG (see ``_NOISE``).

    A logger filter runs after the logger's own level check, so a demoted record is
    dropped here unless the root logger shows DEBUG.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, float] = {}  # text of a "repeats" line -> when it last passed

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        msg = record.msg if isinstance(record.msg, str) else ""
        mode = next(
            (mode for name, prefix, holds, mode in _NOISE
             if record.name == name and msg.startswith(prefix) and (not holds or holds in record.getMessage())),
            None,
        )  # fmt: skip
        if mode is None:
            return True
        if mode == "repeats":
            # The same cause with another object address ("<Connection.Close object at 0x7f…>") is the same text.
            text, now = _ADDRESS.sub("0x…", record.getMessage()), record.created
            if now - self._seen.get(text, float("-inf")) >= _REPEAT_WINDOW:
                if len(self._seen) >= _SEEN_MAX:
                    self._seen.clear()
                self._seen[text] = now
                return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def setup_logging(
    level: str = "INFO",
    fmt: str = "auto",
    realm_keys: tuple[str, ...] = (),
    passwords: tuple[str, ...] = (),
) -> None:
    """Configure the root logger once for the process.

    Args:
        level: DEBUG, INFO, WARNING or ERROR.
        fmt: ``json``, ``text`` or ``auto`` (text when stderr is a terminal).
        realm_keys: scrubbed from every line.
        passwords: scrubbed from every URL in every line.
    """
    clean = LogScrubber(realm_keys, passwords)
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(_JsonFormatter(clean) if use_json else _TextFormatter(clean))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Library chatter at INFO would be one line per reconnect attempt; ours says it once.
    for noisy in ("aio_pika", "aiormq", "websockets", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    noise = LibraryNoise()
    for name in {entry[0] for entry in _NOISE}:
        logger = logging.getLogger(name)
        for old_filter in [f for f in logger.filters if isinstance(f, LibraryNoise)]:
            logger.removeFilter(old_filter)
        logger.addFilter(noise)
