"""Hostile input, without sockets: no frame can raise out of the frame boundary, and values stay exact."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.contract import (
    KIND_EVENT,
    KIND_QUARANTINE,
    MAX_ENTITY_ID_BYTES,
    QUARANTINE_REASONS,
    event_message,
    message_id,
)
from bridge.errors import ProtocolError
from bridge.metrics import Metrics
from bridge.stream import FrameResult, frame_messages
from bridge.wire import (
    MAX_DEPTH,
    REJECT_REASONS,
    ErrorFrame,
    Handshake,
    Info,
    Notification,
    SubscribeOutcome,
    parse_frame,
    parse_frames,
)

SECRET = "hostile-realm-key-5c1e"
BIG = 123456789012345678901234567890


def _messages(raw: str | bytes, max_bytes: int = 1024 * 1024) -> FrameResult:
    return frame_messages(
        raw, realm="r", realm_fp="fp-test", secrets=(SECRET,), max_bytes=max_bytes, received_at=1700000000.0
    )


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _assert_total(result: FrameResult) -> None:
    """A frame became events (or nothing), or exactly one quarantine message with a bounded reason."""
    if result.rejected is None:
        assert all(msg.kind == KIND_EVENT for msg in result.messages)
        for msg in result.messages:
            assert isinstance(json.loads(msg.body), dict)
    else:
        assert result.rejected.reason in REJECT_REASONS
        (msg,) = result.messages
        assert msg.kind == KIND_QUARANTINE
        assert msg.routing_key in QUARANTINE_REASONS
        assert SECRET.encode() not in msg.body


@pytest.mark.parametrize("depth", [200, 252, 253, 254, 300, 1000])
def test_deeply_nested_extra_field_is_quarantined_not_raised(depth: int) -> None:
    """A notification with an extra field nested hundreds of levels deep is quarantined, never raised."""
    raw = orjson.dumps({"type": "notification", "event": "a.b", "data": "x", "timestamp": 1})[:-1]
    raw += b',"extra":' + b'{"a":' * (depth - 1) + b"1" + b"}" * (depth - 1) + b"}"
    result = _messages(raw)
    assert result.rejected is not None
    assert result.rejected.reason == "too_deep"
    assert result.messages[0].body == raw


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_nesting_past_the_parsers_own_limit_is_too_deep_not_bad_json(opener: bytes) -> None:
    """2,000 levels stop orjson itself ("depth limit exceeded"): still reason too_deep, as the docs say."""
    closer = b"]" if opener == b"[" else b"}"
    raw = b'{"type":"notification","event":"a.b","data":' + opener * 2000 + b"1" + closer * 2000 + b"}"
    result = _messages(raw)
    assert result.rejected is not None and result.rejected.reason == "too_deep"


def test_nesting_up_to_the_bound_is_published() -> None:
    """A notification nested up to MAX_DEPTH levels is a normal event."""
    obj = {"event": "a.b", "data": _nested(MAX_DEPTH - 1), "timestamp": 1}
    result = _messages(orjson.dumps(obj))
    assert result.rejected is None
    assert orjson.loads(result.messages[0].body)["data"] == obj["data"]


def test_failure_while_building_the_message_is_quarantined_as_unencodable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever raises after parsing (here: the message id) becomes an 'unencodable' quarantine message."""

    def boom(*args: object, **kwargs: object) -> str:
        raise TypeError("Recursion limit reached")

    monkeypatch.setattr("bridge.contract.message_id", boom)
    raw = '{"type":"notification","event":"a.b","data":"x"}'
    result = _messages(raw)
    assert result.rejected is not None
    assert result.rejected.reason == "unencodable"
    assert result.messages[0].body == raw.encode()
    assert "unencodable" in REJECT_REASONS
    Metrics().rejected("unencodable")  # a known label value: no KeyError


def test_frame_size_limit_is_the_callers() -> None:
    """An 80,025-byte text frame of 40,036 code points is oversize with max_bytes=65536 (bytes, not code points)."""
    raw = '{"type":"notification","event":"a.b","data":"' + "\u00e9" * 39_989 + '"}'
    assert len(raw.encode()) == 80_025
    with pytest.raises(ProtocolError) as info:
        parse_frame(raw, max_bytes=65_536)
    assert info.value.reason == "oversize"
    assert isinstance(parse_frame(raw, max_bytes=80_025), Notification)


@pytest.mark.parametrize("shape", ["flat", "nested"])
def test_integers_wider_than_64_bits_stay_exact(shape: str) -> None:
    """A 30-digit integer stays exact in the body, the entity_id header and the message id."""
    inner = {"event": "a.b", "data": BIG, "timestamp": 1700000000000, "n": -BIG}
    obj = inner if shape == "flat" else {"type": "notification", "data": inner}
    (note,) = parse_frames(json.dumps(obj))
    assert isinstance(note, Notification)
    msg = event_message(note, realm="r", realm_fp="fp", received_at=1.0)
    body = json.loads(msg.body)
    assert body["data"] == BIG
    assert body["n"] == -BIG
    assert msg.headers["entity_id"] == str(BIG)
    assert msg.message_id == message_id("fp", "a.b", BIG, 1700000000000, {"n": -BIG})
    assert msg.message_id != message_id("fp", "a.b", float(BIG), 1700000000000, {"n": -BIG})


def test_big_integer_message_id_is_the_same_for_flat_and_nested() -> None:
    """The same event with a big integer gets the same body and id in both envelopes."""
    flat = f'{{"type":"notification","event":"a.b","data":{BIG},"timestamp":"1"}}'
    nested = f'{{"type":"notification","data":{{"event":"a.b","data":{BIG},"timestamp":"1"}}}}'
    (a,) = _messages(flat).messages
    (b,) = _messages(nested).messages
    assert (a.body, a.message_id) == (b.body, b.message_id)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", f"{BIG}.5e400"])
def test_non_finite_numbers_are_quarantined(number: str) -> None:
    """NaN, Infinity and numbers that overflow a double are refused, also on the big-integer parser."""
    for extra in ("", f',"big":{BIG}'):
        raw = f'{{"event":"a.b","data":{number}{extra}}}'
        result = _messages(raw)
        assert result.rejected is not None, raw
        assert result.rejected.reason == "bad_json"


def test_invalid_utf8_binary_frame_keeps_its_bytes_in_quarantine() -> None:
    """A binary frame with invalid UTF-8 is quarantined byte for byte (the key still redacted)."""
    raw = b'{"event":"a.b","data":"\xff\xfe\x80", "k":"' + SECRET.encode() + b'"}'
    result = _messages(raw)
    assert result.rejected is not None
    body = result.messages[0].body
    assert SECRET.encode() not in body
    assert body.startswith(b'{"event":"a.b","data":"\xff\xfe\x80", "k":"<realm-key fp-')
    # The detail names the byte, not orjson's "str is not valid UTF-8: surrogates not allowed".
    assert result.rejected.detail == "binary frame is not valid UTF-8 (byte 0xff at offset 23)"


def test_entity_id_header_only_for_short_ids() -> None:
    """entity_id is a header only up to 128 bytes: a 200 KB data string stays in the body only."""
    long_data = "x" * 200_000
    (msg,) = _messages(orjson.dumps({"event": "a.b", "data": long_data})).messages
    assert "entity_id" not in msg.headers
    assert sum(len(str(v)) for v in msg.headers.values()) < 200
    short = "y" * MAX_ENTITY_ID_BYTES
    (msg,) = _messages(orjson.dumps({"event": "a.b", "data": short})).messages
    assert msg.headers["entity_id"] == short


@pytest.mark.parametrize(
    ("frames", "outcome"),
    [
        ([ErrorFrame(message="Service temporarily unavailable")], SubscribeOutcome.SERVER_ERROR),
        ([ErrorFrame(message="Internal error")], SubscribeOutcome.SERVER_ERROR),
        ([ErrorFrame(message="Invalid Realm Key.")], SubscribeOutcome.KEY_REJECTED),
        ([ErrorFrame(message="unknown realm")], SubscribeOutcome.KEY_REJECTED),
        ([Info(accepted=False), ErrorFrame(message="Service temporarily unavailable")], SubscribeOutcome.KEY_REJECTED),
    ],
)
def test_only_a_refused_key_is_fatal(frames: list[Any], outcome: SubscribeOutcome) -> None:
    """An error that does not name the key (without info NONE) is a retryable server error."""
    handshake = Handshake(now=0.0, timeout=10.0)
    for frame in frames:
        handshake.receive(frame, 1.0)
    assert handshake.outcome is outcome


# -- property tests: the frame boundary is total --------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
)
_hostile_tokens = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", str(10**30), str(-(10**25)), "18446744073709551616",
     '"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"', "1.0e-400", "0" * 30, "9" * 5000]
)


@st.composite
def _deep(draw: st.DrawFn) -> str:
    depth = draw(st.integers(min_value=1, max_value=1100))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return opener * depth + draw(_hostile_tokens) + closer * depth


@st.composite
def _hostile_notification(draw: st.DrawFn) -> str:
    """A notification text (flat or nested) with hostile values, duplicate keys and extra fields."""
    event = draw(st.sampled_from(["a.b", "transaction.created", "", "a..b", "x*", "é.ü"]))
    fields = [f'"event":{json.dumps(event)}']
    fields.append('"data":' + draw(st.one_of(_hostile_tokens, _deep(), _values.map(json.dumps))))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["extra", "data", "event", "timestamp", "x"]))  # duplicates included
        fields.append(f'"{key}":' + draw(st.one_of(_hostile_tokens, _deep(), _values.map(json.dumps))))
    body = "{" + ",".join(draw(st.permutations(fields))) + "}"
    if draw(st.booleans()):
        body = '{"type":"notification","data":' + body + "}"
    return body


_frames = st.one_of(
    _hostile_notification(),
    _hostile_notification().map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.text(max_size=200),
    _deep(),
    st.builds(lambda a, b: a + b, _hostile_notification(), st.sampled_from(["}", " }", "{", "\n{}", "\x00"])),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_frames)
def test_frame_boundary_never_raises(raw: str | bytes) -> None:
    """Any frame (nesting, huge numbers, NaN, lone surrogates, duplicate keys, extras) becomes events or one quarantine."""
    _assert_total(_messages(raw))


@settings(max_examples=200, deadline=None)
@given(raw=_frames, limit=st.integers(min_value=1, max_value=300))
def test_frame_boundary_is_total_under_a_small_size_limit(raw: str | bytes, limit: int) -> None:
    """With a tiny frame limit the boundary still only ever answers events or one quarantine message."""
    _assert_total(_messages(raw, max_bytes=limit))


@settings(max_examples=300, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["x", "y", "extra"]), _values, max_size=3), data=_values)
def test_flat_and_nested_envelopes_agree_on_any_values(obj: dict[str, Any], data: Any) -> None:
    """Whatever the values (big integers included), both envelopes give the same body and message id."""
    inner = {"event": "a.b", "data": data, "timestamp": 5, **obj}
    flat = _messages(json.dumps(inner))
    nested = _messages(json.dumps({"type": "notification", "data": inner}))
    assert flat.rejected is None
    assert nested.rejected is None
    assert [(m.body, m.message_id) for m in flat.messages] == [(m.body, m.message_id) for m in nested.messages]
    assert json.loads(flat.messages[0].body)["data"] == data



@pytest.mark.parametrize("as_bytes", [False, True])
def test_one_level_past_the_bound_is_quarantined_as_too_deep(as_bytes: bool) -> None:
    """MAX_DEPTH + 1 levels (just past the bracket count that skips the walk) is refused, text or binary."""
    text = orjson.dumps({"event": "a.b", "data": _nested(MAX_DEPTH + 1), "timestamp": 1}).decode()
    assert text.count("{") == MAX_DEPTH + 1
    result = _messages(text.encode() if as_bytes else text)
    assert result.rejected is not None
    assert result.rejected.reason == "too_deep"


def test_brackets_inside_strings_do_not_make_a_shallow_frame_deep() -> None:
    """Hundreds of '{' and '[' in string values: the depth walk runs and finds the frame shallow."""
    obj = {"event": "a.b", "data": "{[" * 300, "timestamp": 1, "note": {"text": "[" * 100}}
    result = _messages(orjson.dumps(obj))
    assert result.rejected is None
    assert orjson.loads(result.messages[0].body)["data"] == "{[" * 300


def test_a_key_in_an_unknown_type_is_redacted_before_any_cut() -> None:
    """The unknown_type detail quotes the type; a key in it is replaced whole, even past the 64th character."""
    raw = json.dumps({"type": "realm-" + "x" * 40 + " " + SECRET, "event": "a.b", "data": "d"})
    result = _messages(raw)
    assert result.rejected is not None and result.rejected.reason == "unknown_type"
    (msg,) = result.messages
    detail = str(msg.headers["detail"])
    assert SECRET[:8] not in detail, detail
    assert SECRET[:8] not in msg.body.decode(), msg.body


@pytest.mark.parametrize("raw", ['{"type":[]} }', '{"type":{}} }', '{"type":["info"],"realm":"x"}}'])
def test_an_unhashable_type_with_a_stray_brace_is_bad_json(raw: str) -> None:
    """A list or dict as the type, then a stray brace: bad JSON like any other notification (no TypeError)."""
    with pytest.raises(ProtocolError) as info:
        parse_frames(raw)
    assert info.value.reason == "bad_json"


def test_info_none_is_read_without_case() -> None:
    """The type is read without case, and so is the NONE of a refusal."""
    assert parse_frame('{"type":"INFO","realm":"none","timestamp":1}') == Info(accepted=False, timestamp=1)
    assert parse_frame('{"type":"info","realm":" None "}') == Info(accepted=False, timestamp=None)
