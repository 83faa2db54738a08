"""The reconnect policy: a pure function of attempts and link stability, and the retry-or-give-up rule."""

from __future__ import annotations

import pytest

from bridge.backoff import Backoff, retry_after_seconds


def test_backoff_grows_exponentially_and_is_capped() -> None:
    """Without a stable link the delay doubles up to the cap (jitter fixed at its top)."""
    backoff = Backoff(0.5, 8.0, 10.0, rand=lambda: 1.0)
    assert [backoff.next_delay(None) for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_backoff_jitter_stays_within_half_and_full() -> None:
    """Jitter keeps each delay between half and all of the ceiling."""
    low = Backoff(1.0, 8.0, 10.0, rand=lambda: 0.0)
    assert [low.next_delay(None) for _ in range(3)] == [0.5, 1.0, 2.0]


def test_short_lived_subscription_does_not_reset() -> None:
    """A server that accepts and drops at once keeps the delay growing: no hot loop."""
    backoff = Backoff(0.5, 30.0, 10.0, rand=lambda: 1.0)
    delays = [backoff.next_delay(0.01) for _ in range(5)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_stable_subscription_resets() -> None:
    """A link that stayed subscribed past reset_after starts again from the minimum."""
    backoff = Backoff(0.5, 30.0, 10.0, rand=lambda: 1.0)
    for _ in range(4):
        backoff.next_delay(None)
    assert backoff.next_delay(12.0) == 0.5


def test_network_errors_are_retried_and_bridge_errors_are_not() -> None:
    """A refused connection or a timeout is retried; a rejected key or a bad topology is not."""
    from bridge.backoff import Verdict, classify
    from bridge.errors import RealmRejected, StreamError, TopologyError

    assert classify(ConnectionRefusedError()) is Verdict.RETRY
    assert classify(TimeoutError()) is Verdict.RETRY
    assert classify(StreamError("dropped")) is Verdict.RETRY
    assert classify(RealmRejected("no")) is Verdict.GIVE_UP
    assert classify(TopologyError("no")) is Verdict.GIVE_UP
    assert classify(KeyError("bug")) is Verdict.GIVE_UP


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20", 20.0),
        (" 0 ", 0.0),
        ("86400", 300.0),  # capped: the stream has no replay
        ("Thu, 01 Jan 1970 00:01:40 GMT", 60.0),  # an HTTP-date 60 s after "now" (40 s)
        ("Thu, 01 Jan 1970 00:00:10 GMT", 0.0),  # in the past: no wait
        (None, None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),  # delay-seconds is a whole number
        ("Thu, 01 Jan 1970 00:01:40", None),  # no zone: not an HTTP-date
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    """Retry-After as delay-seconds or an HTTP-date, capped at RETRY_AFTER_CAP; anything else is ignored."""
    assert retry_after_seconds(value, now=40.0) == expected
