"""The pure wire and contract cores: frames in, typed values or ProtocolError out; messages out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.contract import KIND_EVENT, KIND_QUARANTINE, event_message, message_id, quarantine_message
from bridge.errors import ProtocolError
from bridge.secrets import key_fingerprint, redact
from bridge.wire import (
    REJECT_REASONS,
    ErrorFrame,
    Info,
    Notification,
    Other,
    Subscribed,
    Unsubscribed,
    parse_frame,
    parse_frames,
    subscribe_frame,
    timestamp_seconds,
    unsubscribe_frame,
    validate_routing_key,
)

KEY = "c9d4744c-0eae-4457-a665-2c18b9ac132b"


def test_subscribe_frame_is_the_documented_shape() -> None:
    """subscribe_frame builds {"type":"subscribe","realm":KEY}."""
    assert orjson.loads(subscribe_frame(KEY)) == {"type": "subscribe", "realm": KEY}


def test_unsubscribe_frame_is_the_documented_shape() -> None:
    """unsubscribe_frame builds {"type":"unsubscribe","realm":KEY}."""
    assert orjson.loads(unsubscribe_frame(KEY)) == {"type": "unsubscribe", "realm": KEY}


def test_info_with_realm_is_success() -> None:
    """An info frame echoing the realm means the subscribe succeeded."""
    frame = parse_frame(f'{{ "type":"info", "realm":"{KEY}", "timestamp": 1671547687 }}')
    assert frame == Info(accepted=True, timestamp=1671547687)


def test_info_none_is_failure() -> None:
    """An info frame with realm NONE means the key was refused."""
    assert parse_frame('{ "type":"info", "realm":"NONE", "timestamp": 1671547687 }') == Info(
        accepted=False, timestamp=1671547687
    )


def test_info_does_not_keep_the_echoed_key() -> None:
    """The parsed info frame does not carry the key the server echoed."""
    assert KEY not in repr(parse_frame(f'{{"type":"info","realm":"{KEY}"}}'))


def test_error_frame_message_comes_from_realm_field() -> None:
    """The documented error frame puts its text in the realm field."""
    frame = parse_frame('{ "type":"error", "realm":"Invalid Realm Key.", "timestamp": 1671547687 }')
    assert frame == ErrorFrame(message="Invalid Realm Key.", timestamp=1671547687)


def test_documented_error_frame_with_stray_brace_is_bad_json() -> None:
    """The documentation's own example with a stray closing brace is rejected as bad JSON, not a crash."""
    with pytest.raises(ProtocolError) as info:
        parse_frame('{ "type":"error", "realm":"Invalid Realm Key.", "timestamp": 1671547687 } }')
    assert info.value.reason == "bad_json"


def test_subscribe_and_unsubscribe_replies() -> None:
    """subscribe and unsubscribe replies parse to their own types."""
    assert parse_frame(f'{{"type":"subscribe","realm":"{KEY}","timestamp":1}}') == Subscribed(timestamp=1)
    assert parse_frame(f'{{"type":"unsubscribe","realm":"{KEY}","timestamp":"2"}}') == Unsubscribed(
        timestamp="2"
    )


FLAT = '{"type":"notification","event":"transaction.processed","data":"63967141191e9023f356df9f","timestamp":"162553625262"}'
NESTED = (
    '{"type":"notification","data":{"event":"transaction.processed",'
    '"data":"63967141191e9023f356df9f","timestamp":"162553625262"}}'
)


def test_flat_notification() -> None:
    """The "Event data" flat shape parses to a Notification with its fields."""
    frame = parse_frame(FLAT)
    assert isinstance(frame, Notification)
    assert (frame.event, frame.data, frame.timestamp, frame.shape) == (
        "transaction.processed",
        "63967141191e9023f356df9f",
        "162553625262",
        "flat",
    )


def test_nested_notification_matches_flat() -> None:
    """The JavaScript example's nested envelope produces the same body as the flat one."""
    flat, nested = parse_frame(FLAT), parse_frame(NESTED)
    assert isinstance(flat, Notification) and isinstance(nested, Notification)
    assert nested.shape == "nested"
    assert nested.body == flat.body
    assert orjson.loads(flat.body) == {
        "type": "notification",
        "event": "transaction.processed",
        "data": "63967141191e9023f356df9f",
        "timestamp": "162553625262",
    }


def test_extra_fields_are_kept_in_both_shapes() -> None:
    """Extra upstream fields survive flattening, from the inner and the outer envelope."""
    flat = parse_frame('{"type":"notification","event":"a.b","data":"x","timestamp":1,"seq":7}')
    nested = parse_frame('{"type":"notification","data":{"event":"a.b","data":"x","timestamp":1,"seq":7}}')
    outer = parse_frame('{"type":"notification","id":"o","data":{"event":"a.b","data":"x","timestamp":1}}')
    assert isinstance(flat, Notification) and isinstance(nested, Notification)
    assert isinstance(outer, Notification)
    assert orjson.loads(flat.body)["seq"] == 7 == orjson.loads(nested.body)["seq"]
    assert orjson.loads(outer.body)["id"] == "o"


def test_numeric_timestamp_is_kept_as_number() -> None:
    """A numeric timestamp stays a number in the body."""
    frame = parse_frame('{"type":"notification","event":"a.b","data":"x","timestamp":1671547687}')
    assert isinstance(frame, Notification)
    assert orjson.loads(frame.body)["timestamp"] == 1671547687


def test_notification_without_type_is_still_a_notification() -> None:
    """A frame with an event but no type is read as a notification (the JS example never checks type)."""
    assert isinstance(parse_frame('{"data":{"event":"deposit.received","data":"d"}}'), Notification)


@pytest.mark.parametrize("raw", ["PONG", "pong", " PING ", "OK"])
def test_text_tokens_are_other(raw: str) -> None:
    """A bare text reply such as PONG is an Other frame, not an error."""
    assert parse_frame(raw) == Other(kind="text", detail=raw.strip())


def test_unknown_type_is_other() -> None:
    """JSON with an unknown type and no event is Other(unknown_type)."""
    assert parse_frame('{"type":"hello"}') == Other(kind="unknown_type", detail="hello")
    assert parse_frame('{"type":"pong","data":"x"}') == Other(kind="unknown_type", detail="pong")


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"event","event":"deposit.received","data":"d1","timestamp":"1"}',
        '{"type":"notifications","event":"deposit.received","data":"d1"}',
        '{"type":"push","data":{"event":"deposit.received","data":"d1","timestamp":1}}',
    ],
)
def test_an_event_under_an_unknown_type_is_quarantined_not_dropped(raw: str) -> None:
    """A frame that carries an event name under a type other than notification is refused (quarantined), not counted away."""
    with pytest.raises(ProtocolError) as info:
        parse_frame(raw)
    assert info.value.reason == "unknown_type"
    assert "carries an event" in str(info.value)


@pytest.mark.parametrize("kind", ["Notification", "NOTIFICATION", " notification "])
def test_the_type_is_read_without_case(kind: str) -> None:
    """"Notification" is a notification; the published body says "notification" as documented."""
    frame = parse_frame(f'{{"type":"{kind}","event":"deposit.received","data":"d1","timestamp":"1"}}')
    assert isinstance(frame, Notification)
    assert orjson.loads(frame.body)["type"] == "notification"
    assert parse_frame('{"type":"INFO","realm":"NONE","timestamp":1}') == Info(accepted=False, timestamp=1)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('{"type":"notification","event":"deposit.received","data":', "bad_json"),
        ("not json at all", "bad_json"),
        ('["notification"]', "not_object"),
        ("42", "not_object"),
        # JSON literals are values, not keepalive words like PONG: quarantined, never dropped unseen.
        ("null", "not_object"),
        (" true ", "not_object"),
        ("false", "not_object"),
        ('{"type":"notification","data":"x"}', "missing_event"),
        ('{"type":"notification","event":"","data":"x"}', "missing_event"),
        ('{"type":"notification","event":7,"data":"x"}', "missing_event"),
        ('{"type":"notification","event":"deposit..received"}', "invalid_routing_key"),
        ('{"type":"notification","event":".deposit"}', "invalid_routing_key"),
        ('{"type":"notification","event":"deposit.#"}', "invalid_routing_key"),
        ('{"type":"notification","event":"has space"}', "invalid_routing_key"),
    ],
)
def test_invalid_frames_raise_protocol_error(raw: str, reason: str) -> None:
    """Frames that are not valid notifications raise ProtocolError with a bounded reason."""
    with pytest.raises(ProtocolError) as info:
        parse_frame(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("raw", "kind"),
    [("null", "null"), ("true", "boolean"), ("42", "number"), ("1.5", "number"), ('"x"', "string"), ("[1]", "array")],
)
def test_a_frame_that_is_not_an_object_is_named_in_json_terms(raw: str, kind: str) -> None:
    """The quarantine detail says "a JSON null", not Python's "NoneType"."""
    with pytest.raises(ProtocolError) as info:
        parse_frame(raw)
    assert info.value.detail == f"frame is a JSON {kind}, not an object"


def test_oversize_frame() -> None:
    """A frame over the size limit is refused as oversize before parsing."""
    big = '{"type":"notification","event":"a.b","data":"' + "x" * 2000 + '"}'
    with pytest.raises(ProtocolError) as info:
        parse_frame(big, max_bytes=1000)
    assert info.value.reason == "oversize"


def test_routing_key_length_limit() -> None:
    """Event names are valid up to 255 UTF-8 bytes and invalid beyond."""
    assert validate_routing_key("a" * 255) == "a" * 255
    with pytest.raises(ProtocolError):
        validate_routing_key("a" * 256)
    with pytest.raises(ProtocolError):
        validate_routing_key("é" * 128)  # 256 bytes


def test_channel_events_are_valid_routing_keys() -> None:
    """Infobip channel events such as sms.message.sent are valid routing keys."""
    assert validate_routing_key("sms.message.sent") == "sms.message.sent"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1671547687", 1671547687.0), (1671547687, 1671547687.0), ("1625536252620", 1625536252.62), ("x", None)],
)
def test_timestamp_seconds(value: str | int, seconds: float | None) -> None:
    """Timestamps arrive as strings or numbers, in seconds or milliseconds."""
    assert timestamp_seconds(value) == seconds


def test_message_id_is_deterministic_and_timestamp_type_agnostic() -> None:
    """The same event gets the same id whether its timestamp is a string or a number."""
    a = message_id("fp-1", "a.b", "x", "1671547687")
    assert a == message_id("fp-1", "a.b", "x", 1671547687)
    assert a != message_id("fp-2", "a.b", "x", "1671547687")
    assert a != message_id("fp-1", "a.c", "x", "1671547687")
    assert a != message_id("fp-1", "a.b", "y", "1671547687")
    assert a != message_id("fp-1", "a.b", "x", "1671547688")


def test_event_message_contract() -> None:
    """An event message carries the routing key, realm label, entity id and received_at, never the key."""
    note = parse_frame(FLAT)
    assert isinstance(note, Notification)
    msg = event_message(note, realm="main", realm_fp=key_fingerprint(KEY), received_at=1700000000.5)
    assert msg.kind == KIND_EVENT
    assert msg.routing_key == "transaction.processed"
    assert msg.headers == {"realm": "main", "entity_id": "63967141191e9023f356df9f", "received_at": 1700000000500}
    assert KEY not in repr(msg)


def test_quarantine_message_redacts_the_key() -> None:
    """A quarantined frame that contains a realm key keeps the frame with the key replaced."""
    raw = f'{{"type":"info","realm":"{KEY}"'
    with pytest.raises(ProtocolError) as info:
        parse_frame(raw)
    msg = quarantine_message(raw, info.value, realm="main", secrets=(KEY,), received_at=1.0)
    assert msg.kind == KIND_QUARANTINE
    assert KEY.encode() not in msg.body
    assert key_fingerprint(KEY).encode() in msg.body
    assert msg.headers["reason"] == "bad_json"


def test_redact_replaces_every_secret() -> None:
    """redact replaces each occurrence of each secret."""
    assert redact("a KEY b KEY", ("KEY",)).count("KEY") == 0


def _reject_reason(parse: Callable[[str | bytes], object], raw: str | bytes) -> str | None:
    """Parse; return None on success or the ProtocolError's reason (anything else propagates)."""
    try:
        parse(raw)
    except ProtocolError as exc:
        return exc.reason
    return None


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_parser_never_raises_anything_but_protocol_error(raw: str | bytes) -> None:
    """No input, text or bytes, makes the parser raise anything but ProtocolError."""
    reason = _reject_reason(parse_frame, raw)
    assert reason is None or reason in REJECT_REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["type", "event", "data", "timestamp", "realm", "seq"]), json_values, max_size=6
    )
)
def test_parser_on_json_objects_never_raises_unexpected(obj: dict[str, object]) -> None:
    """Any JSON object, however odd its fields, parses or raises ProtocolError only."""
    try:
        frame = parse_frame(orjson.dumps(obj))
    except ProtocolError:
        return
    if isinstance(frame, Notification):
        assert orjson.loads(frame.body)["event"] == frame.event


def test_message_id_tells_apart_events_that_differ_only_in_extra_fields() -> None:
    """Two events of one entity in the same millisecond but with different extra fields get different ids."""
    a = parse_frame('{"type":"notification","event":"account.updated","data":"x","timestamp":"1","seq":1}')
    b = parse_frame('{"type":"notification","event":"account.updated","data":"x","timestamp":"1","seq":2}')
    c = parse_frame('{"type":"notification","data":{"event":"account.updated","data":"x","timestamp":1,"seq":1}}')
    assert isinstance(a, Notification) and isinstance(b, Notification) and isinstance(c, Notification)
    ids = [event_message(n, realm="r", realm_fp="fp", received_at=0.0).message_id for n in (a, b, c)]
    assert ids[0] != ids[1]
    assert ids[0] == ids[2]


def test_documented_control_frames_with_stray_brace_are_tolerated() -> None:
    """The documentation's subscribe and error examples, stray closing brace included, still parse as control frames."""
    assert parse_frames(f'{{ "type":"subscribe", "realm":"{KEY}", "timestamp": 1671547687 }} }}') == [
        Subscribed(timestamp=1671547687)
    ]
    assert parse_frames('{ "type":"error", "realm":"Invalid Realm Key.", "timestamp": 1671547687 } }') == [
        ErrorFrame(message="Invalid Realm Key.", timestamp=1671547687)
    ]


def test_info_and_error_in_one_frame() -> None:
    """The failure answer printed as two objects in one frame yields both frames, in order."""
    raw = (
        '{ "type":"info", "realm":"NONE", "timestamp": 1671547687 }\n'
        '{ "type":"error", "realm":"Invalid Realm Key.", "timestamp": 1671547687 } }'
    )
    assert parse_frames(raw) == [
        Info(accepted=False, timestamp=1671547687),
        ErrorFrame(message="Invalid Realm Key.", timestamp=1671547687),
    ]


@pytest.mark.parametrize("between", ["\n", " ", "", "\r\n  "])
def test_info_and_error_in_one_frame_each_with_its_stray_brace(between: str) -> None:
    """Both answers in one frame, each ending in the documentation's "} }", still read as a rejection (and success)."""
    raw = (
        '{ "type":"info", "realm":"NONE", "timestamp": 1671547687 } }' + between
        + '{ "type":"error", "realm":"Invalid Realm Key.", "timestamp": 1671547687 } }'
    )  # fmt: skip
    assert parse_frames(raw) == [
        Info(accepted=False, timestamp=1671547687),
        ErrorFrame(message="Invalid Realm Key.", timestamp=1671547687),
    ]
    ok = f'{{ "type":"info", "realm":"{KEY}", "timestamp": 1 }} }}{between}{{ "type":"subscribe", "realm":"{KEY}" }} }}'
    assert [type(f) for f in parse_frames(ok)] == [Info, Subscribed]


def test_a_stray_brace_is_read_past_only_after_a_control_object() -> None:
    """A stray brace after a notification still quarantines the frame, whatever control object comes first."""
    note = '{"type":"notification","event":"deposit.received","data":"x","timestamp":"1"}'
    for raw in (f'{{"type":"info","realm":"NONE"}} }} {note} }}', f"{note} }} {{\"type\":\"info\"}}"):
        with pytest.raises(ProtocolError) as info:
            parse_frames(raw)
        assert info.value.reason == "bad_json"


def test_notification_with_stray_brace_is_still_quarantined() -> None:
    """A notification with trailing junk is refused (its data goes to quarantine), not guessed at."""
    with pytest.raises(ProtocolError) as info:
        parse_frames('{"type":"notification","event":"deposit.received","data":"x","timestamp":"1"} }')
    assert info.value.reason == "bad_json"


def test_two_notifications_in_one_frame_are_both_read() -> None:
    """Two complete notification objects in one frame are both delivered."""
    frames = parse_frames('{"type":"notification","event":"a.b","data":"1"}\n{"type":"notification","event":"a.c","data":"2"}')
    assert [f.event for f in frames if isinstance(f, Notification)] == ["a.b", "a.c"]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}[]":, \\nab1', max_size=120))
def test_lenient_parser_never_raises_anything_but_protocol_error(raw: str) -> None:
    """The tolerant parser, fed brace soup, returns frames or raises ProtocolError only."""
    reason = _reject_reason(parse_frames, raw)
    assert reason is None or reason in REJECT_REASONS


@pytest.mark.parametrize(
    ("data", "entity"),
    [
        ('"abc"', "abc"), ("7", "7"), ("1.5", "1.5"), ('{"id":"abc"}', "abc"), ('{"id":7}', "7"),
        ('{"id":1.5}', "1.5"), ("true", None), ('{"id":true}', None), ('{"id":null}', None), ('{"id":[1]}', None),
        ("[1]", None), ("null", None), ('{"ref":"abc"}', None),
    ],
)  # fmt: skip
def test_entity_id_is_data_or_data_id_when_a_string_or_number(data: str, entity: str | None) -> None:
    """entity_id: data itself, or data.id when data is an object, as long as it is a string or a number (as README)."""
    note = parse_frame(f'{{"type":"notification","event":"a.b","data":{data},"timestamp":1}}')
    assert isinstance(note, Notification)
    assert note.entity_id == entity


def test_a_refused_event_is_rebuilt_as_the_contract_published_it() -> None:
    """The quarantine copy of a poison event (bounded headers) gives back the event the contract promises:
    same body, message_id, realm and received_at to the millisecond, entity_id read from the body again."""
    from bridge.contract import refused_event, unpublishable_message
    from bridge.wire import parse_frame

    frame = '{"type":"notification","event":"deposit.received","data":{"id":77,"n":"x"},"timestamp":"162553625262"}'
    note = parse_frame(frame)
    assert isinstance(note, Notification)
    original = event_message(note, realm="eu", realm_fp="fp-0123456789ab", received_at=1764150000.987)
    poisoned = dataclasses.replace(original, headers={**original.headers, "huge": "h" * 10})
    kept = unpublishable_message(poisoned, "FRAME_ERROR")
    assert "entity_id" not in kept.headers and "huge" not in kept.headers

    # As a consumer reads the copy back: long strings may come as bytes.
    read_back = {k: v.encode() if isinstance(v, str) else v for k, v in kept.headers.items()}
    rebuilt = refused_event(kept.body, read_back, kept.message_id)
    assert rebuilt == original

    # An entity_id holding a realm key is left out, as event_message leaves it out.
    keyed = frame.replace('"id":77', '"id":"the-realm-key-0123456789"').encode()
    assert "entity_id" in refused_event(keyed, read_back, kept.message_id).headers
    assert "entity_id" not in refused_event(keyed, read_back, kept.message_id, ("the-realm-key-0123456789",)).headers

    with pytest.raises(ValueError, match="not an event RabbitMQ refused"):
        refused_event(b"{", {"reason": "bad_json"}, "some-id")
    with pytest.raises(ValueError, match="not a routing key"):
        refused_event(kept.body, {**read_back, "original_routing_key": "deposit.#"}, kept.message_id)
