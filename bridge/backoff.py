"""Reconnect policy, pure: a jittered exponential backoff and a retry-or-give-up classification.

Both the WebSocket side (``bridge.stream``) and the RabbitMQ side
(``bridge.broker``) use it, so neither depends on the other.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Final

from bridge.errors import BridgeError, StreamError

__all__ = ["RETRY_AFTER_CAP", "Backoff", "Verdict", "classify", "retry_after_seconds"]

RETRY_AFTER_CAP: Final = 300.0
"""Longest ``Retry-After`` honoured, seconds: the stream has no replay, so a server's wish to be left
alone is bounded (an hour-long value would be an hour of lost events)."""


class Backoff:
    """Exponential reconnect delays with jitter, capped, reset only by a stable link.

    websockets' own reconnect iterator resets after any handshake, so a server
    that accepts and drops at once would make it spin; here only a link that
    stayed subscribed for ``reset_after`` seconds resets the delay.
    """

    def __init__(
        self,
        minimum: float,
        maximum: float,
        reset_after: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.reset_after = reset_after
        self._rand = rand
        self._attempt = 0

    def next_delay(self, subscribed_for: float | None) -> float:
        """The delay before the next attempt, given how long the last link stayed up.

        Args:
            subscribed_for: seconds the last connection was up (subscribed), None if never.

        Returns:
            Seconds to wait: between half and all of ``min * 2**n``, capped at ``max``.
        """
        if subscribed_for is not None and subscribed_for >= self.reset_after:
            self._attempt = 0
        ceiling = min(self.maximum, self.minimum * (2.0**self._attempt))
        self._attempt = min(self._attempt + 1, 62)
        return ceiling * (0.5 + 0.5 * self._rand())


class Verdict(enum.Enum):
    """What to do about an exception raised while connecting or talking to a peer."""

    RETRY = "retry"  # the network or the peer is down for now: wait and try again
    GIVE_UP = "give_up"  # a retry cannot fix it (a rejected key, a bad setting, a bug)


def classify(exc: BaseException) -> Verdict:
    """Sort an exception into retry or give up (like websockets' ``process_exception``).

    Network failures, timeouts and the libraries' connection errors are retried;
    the bridge's own errors (a rejected realm key, a refused topology, a bad
    setting) and anything unexpected are not.
    """
    if isinstance(exc, StreamError):
        return Verdict.RETRY
    if isinstance(exc, BridgeError):
        return Verdict.GIVE_UP
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return Verdict.RETRY
    if _is_library_connection_error(exc):
        return Verdict.RETRY
    return Verdict.GIVE_UP


def _is_library_connection_error(exc: BaseException) -> bool:
    # Imported here: this module stays importable (and testable) without the I/O libraries.
    import aiormq.exceptions
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

    if isinstance(exc, InvalidURI):
        return False
    return isinstance(exc, (aiormq.exceptions.AMQPError, ConnectionClosed, InvalidHandshake))


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks the client to wait (RFC 9110 10.2.3), capped; None if absent or unreadable.

    Args:
        value: the header's value: delay-seconds (``"20"``) or an HTTP-date.
        now: the current time, unix seconds (for an HTTP-date).

    Returns:
        The wait, between 0 and ``RETRY_AFTER_CAP``; None for a missing or malformed value.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), RETRY_AFTER_CAP)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110: an HTTP-date is UTC
        return None
    return min(max(0.0, when.timestamp() - now), RETRY_AFTER_CAP)
