"""The sans-I/O subscribe handshake and link-liveness machines, driven without sockets."""

from __future__ import annotations

import pytest

from bridge.wire import (
    ErrorFrame,
    Handshake,
    Info,
    LinkAction,
    Liveness,
    Other,
    Subscribed,
    SubscribeOutcome,
    Unsubscribed,
    parse_frame,
    parse_frames,
)


def _handshake(now: float = 0.0) -> Handshake:
    return Handshake(now=now, timeout=10.0, reject_grace=2.0)


@pytest.mark.parametrize("frame", [Info(accepted=True), Subscribed()])
def test_info_or_subscribe_answer_accepts(frame: object) -> None:
    """An info echoing the realm, or a subscribe reply, accepts the key."""
    assert _handshake().receive(frame, 1.0) is SubscribeOutcome.ACCEPTED  # type: ignore[arg-type]


def test_notification_before_any_answer_counts_as_accepted() -> None:
    """A server that streams without answering is delivering: accepted."""
    note = parse_frame('{"type":"notification","event":"a.b","data":"x"}')
    assert _handshake().receive(note, 1.0) is SubscribeOutcome.ACCEPTED


@pytest.mark.parametrize("frame", [Other(kind="text", detail="PONG"), Unsubscribed()])
def test_unrelated_frames_leave_the_handshake_pending(frame: object) -> None:
    """A PONG or an unsubscribe reply says nothing about the key."""
    assert _handshake().receive(frame, 1.0) is SubscribeOutcome.PENDING  # type: ignore[arg-type]


def test_error_frame_rejects_the_key_with_its_text() -> None:
    """An error frame rejects the key, and the detail is the server's text."""
    handshake = _handshake()
    assert handshake.receive(ErrorFrame(message="Invalid Realm Key."), 1.0) is SubscribeOutcome.KEY_REJECTED
    assert handshake.detail == "Invalid Realm Key."


def test_documented_rejection_info_none_then_error() -> None:
    """The documented failure answer (info NONE and error, as two objects in one frame) rejects the key."""
    handshake = _handshake()
    outcome = SubscribeOutcome.PENDING
    for frame in parse_frames('{"type":"info","realm":"NONE"}\n{"type":"error","realm":"Invalid Realm Key."}'):
        outcome = handshake.receive(frame, 1.0)
    assert outcome is SubscribeOutcome.KEY_REJECTED
    assert handshake.detail == "Invalid Realm Key."


def test_info_none_waits_only_the_grace_for_the_error() -> None:
    """After info NONE the deadline shrinks to the grace, and then the key counts as rejected."""
    handshake = _handshake()
    assert handshake.receive(Info(accepted=False), 1.0) is SubscribeOutcome.PENDING
    assert handshake.deadline == 3.0
    assert handshake.tick(2.9) is SubscribeOutcome.PENDING
    assert handshake.tick(3.0) is SubscribeOutcome.KEY_REJECTED


def test_after_info_none_a_subscribe_reply_does_not_accept() -> None:
    """Once the key was refused, a later subscribe reply does not turn it into a success."""
    handshake = _handshake()
    handshake.receive(Info(accepted=False), 1.0)
    assert handshake.receive(Subscribed(), 1.1) is SubscribeOutcome.PENDING


def test_silence_until_the_timeout_is_no_answer() -> None:
    """No word about the key before the timeout is NO_ANSWER (retried), not a rejection."""
    handshake = _handshake()
    assert handshake.tick(9.99) is SubscribeOutcome.PENDING
    assert handshake.tick(10.0) is SubscribeOutcome.NO_ANSWER


def test_close_after_info_none_rejects_and_close_before_any_answer_does_not() -> None:
    """A close after info NONE rejects the key; a close with no answer at all is retried."""
    refused = _handshake()
    refused.receive(Info(accepted=False), 1.0)
    assert refused.connection_closed() is SubscribeOutcome.KEY_REJECTED
    assert _handshake().connection_closed() is SubscribeOutcome.CLOSED_UNANSWERED


def test_the_outcome_is_final() -> None:
    """Frames after the handshake ended do not change its outcome."""
    handshake = _handshake()
    handshake.receive(Subscribed(), 1.0)
    assert handshake.receive(ErrorFrame(message="late"), 1.1) is SubscribeOutcome.ACCEPTED
    assert handshake.tick(100.0) is SubscribeOutcome.ACCEPTED


def test_liveness_pings_at_once_then_every_interval() -> None:
    """The first check pings; the next ping is due one interval later."""
    live = Liveness(ping_interval=10.0, idle_timeout=30.0, now=0.0)
    assert live.due(0.0) is LinkAction.PING
    assert live.due(5.0) is LinkAction.WAIT
    live.heard(9.0)
    assert live.due(10.0) is LinkAction.PING


def test_liveness_drops_a_silent_link() -> None:
    """Nothing heard for longer than the idle timeout means the link is silent."""
    live = Liveness(ping_interval=10.0, idle_timeout=30.0, now=0.0)
    live.heard(5.0)
    assert live.due(35.0) is not LinkAction.SILENT
    assert live.due(35.1) is LinkAction.SILENT
    assert live.silent_for(35.1) == pytest.approx(30.1)


def test_a_paused_reader_is_not_a_silent_link() -> None:
    """While our own reader is paused (spool full) silence is ours: the link is not dropped."""
    live = Liveness(ping_interval=10.0, idle_timeout=30.0, now=0.0)
    assert live.due(100.0, reader_paused=True) is not LinkAction.SILENT
    assert live.silent_for(100.0) == 0.0


def test_check_interval_is_a_third_of_the_idle_timeout_at_most() -> None:
    """The keepalive loop looks often enough to notice silence within a third of the idle timeout."""
    assert Liveness(ping_interval=10.0, idle_timeout=6.0, now=0.0).check_every == 2.0
    assert Liveness(ping_interval=1.0, idle_timeout=6.0, now=0.0).check_every == 1.0


def test_notification_body_takes_its_own_size_in_memory() -> None:
    """A spooled body costs about its length, not orjson's 4 KiB output buffer (issue 14: RSS after outages)."""
    import tracemalloc

    from bridge.wire import Notification

    raw = '{"type":"notification","event":"transaction.created","data":{"id":"t-1","amount":12.5},"timestamp":1}'
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        bodies = []
        for _ in range(1000):
            note = parse_frame(raw)
            assert isinstance(note, Notification)
            bodies.append(note.body)
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert len(bodies[0]) < 150
    assert grown < 1000 * 400, f"{grown / 1000:.0f} bytes per held body"


def test_a_valid_event_name_is_remembered_but_an_invalid_one_is_still_refused() -> None:
    """The cache of valid routing keys holds only names that passed, and stays bounded."""
    from bridge import wire
    from bridge.errors import ProtocolError

    assert wire.validate_routing_key("transaction.created") == "transaction.created"
    assert "transaction.created" in wire._VALID_KEYS
    for bad in ("transaction..created", "transaction.#", "a b", "x" * 256):
        with pytest.raises(ProtocolError):
            wire.validate_routing_key(bad)
        assert bad not in wire._VALID_KEYS
    for n in range(wire._VALID_KEYS_MAX + 10):
        wire.validate_routing_key(f"kind.{n}")
    assert len(wire._VALID_KEYS) <= wire._VALID_KEYS_MAX
