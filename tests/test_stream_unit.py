"""The reconnect policy: a pure function of attempts and link stability, and the retry-or-give-up rule."""

from __future__ import annotations

from bridge.backoff import Backoff


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
