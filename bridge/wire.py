"""The Orangepill WebSocket wire protocol, sans-I/O: frames, the subscribe handshake, link liveness.

Pure and synchronous, like websockets' ``Protocol``: nothing here reads a socket
or the clock. ``bridge.stream`` and ``bridge.check`` feed it frames and the
time, and act on what it answers. The upstream reference is "WebSocket
Subscriptions" in the Orangepill WebSocket documentation; the quirks this
module absorbs are written down in ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import orjson

from bridge.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_DEPTH",
    "PING",
    "REJECT_REASONS",
    "ErrorFrame",
    "Frame",
    "Handshake",
    "Info",
    "LinkAction",
    "Liveness",
    "Notification",
    "Other",
    "SubscribeOutcome",
    "Subscribed",
    "Timestamp",
    "Unsubscribed",
    "dumps_exact",
    "parse_frame",
    "parse_frames",
    "subscribe_frame",
    "timestamp_seconds",
    "unsubscribe_frame",
    "validate_routing_key",
]

PING: Final = "PING"
"""The text keepalive the documentation's JavaScript client sends every 10 seconds."""

DEFAULT_MAX_FRAME_BYTES: Final = 1024 * 1024

# Why a frame is not a valid notification: the ``reason`` of ProtocolError, the
# ``reason`` label of events_rejected_total, and the quarantine routing key.
REJECT_REASONS: Final = (
    "bad_json",
    "not_object",
    "missing_event",
    "invalid_routing_key",
    "oversize",
    "too_deep",  # nested deeper than MAX_DEPTH
    "unencodable",  # parsed, but could not be turned into a message (the frame boundary's catch-all)
    "unknown_type",  # carries an event name under a type other than notification: kept, not guessed at
    "invalid_utf8",  # a text frame that is not UTF-8: RFC 6455 fails the link (1007); nothing to keep
)

MAX_DEPTH: Final = 64
"""Deepest nesting of arrays/objects a notification may hold (orjson stops at 254 when encoding)."""

_NONE_REALM: Final = "NONE"
_MAX_ROUTING_KEY_BYTES: Final = 255
# A bare token such as PONG or OK is a keepalive reply, not a broken notification.
_TEXT_TOKEN = re.compile(r"^[A-Za-z]{1,16}$")
_JSON_LITERALS: Final = frozenset({"null", "true", "false"})
_BAD_KEY_CHARS = re.compile(r"[\s*#\x00-\x1f\x7f]")
_ENVELOPE_KEYS: Final = ("type", "event", "data", "timestamp")

Timestamp: TypeAlias = "str | int | float | None"


# -- client frames ---------------------------------------------------------------


def subscribe_frame(realm_key: str) -> str:
    """Build the ``{"type":"subscribe","realm":KEY}`` text frame."""
    return orjson.dumps({"type": "subscribe", "realm": realm_key}).decode()


def unsubscribe_frame(realm_key: str) -> str:
    """Build the ``{"type":"unsubscribe","realm":KEY}`` text frame."""
    return orjson.dumps({"type": "unsubscribe", "realm": realm_key}).decode()


# -- server frames -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Info:
    """An ``info`` frame: success (``accepted``) or ``"realm":"NONE"`` (failure).

    The realm value itself is not kept: on success the server echoes the key.
    """

    accepted: bool
    timestamp: Timestamp = None


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """An ``error`` frame, such as ``Invalid Realm Key.`` after a failed subscribe."""

    message: str
    timestamp: Timestamp = None


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The ``subscribe`` reply."""

    timestamp: Timestamp = None


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """The ``unsubscribe`` reply."""

    timestamp: Timestamp = None


@dataclass(frozen=True, slots=True)
class Notification:
    """An event, normalised to the flat documented shape whatever envelope it came in.

    Attributes:
        event: the event name, already valid as an AMQP routing key.
        data: the entity id (or whatever ``data`` held), as received.
        timestamp: as received (a string or a number).
        body: the flat JSON body published to RabbitMQ, extra fields kept.
        shape: which upstream envelope it arrived in.
    """

    event: str
    data: Any
    timestamp: Timestamp
    body: bytes
    shape: Literal["flat", "nested"]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def entity_id(self) -> str | None:
        """The affected entity's id, when ``data`` carries one."""
        data = self.data
        return _scalar_id(data.get("id")) if isinstance(data, dict) else _scalar_id(data)


def _scalar_id(value: Any) -> str | None:
    """A string as it is, a number as its text (``data`` or ``data.id``); anything else is no id."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


@dataclass(frozen=True, slots=True)
class Other:
    """Any other frame: a ``PONG`` text reply, an unknown ``type``.

    Attributes:
        kind: ``text`` for a bare token, ``unknown_type`` for JSON of another type.
        detail: the token or the type name (truncated).
    """

    kind: Literal["text", "unknown_type"]
    detail: str


Frame: TypeAlias = "Info | ErrorFrame | Subscribed | Unsubscribed | Notification | Other"


def parse_frame(raw: str | bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Parse one frame received from the stream.

    Args:
        raw: the text (or binary) frame as read off the WebSocket.
        max_bytes: frames larger than this are refused as ``oversize``.

    Returns:
        A typed frame; unknown but harmless frames are ``Other``.

    Raises:
        ProtocolError: the frame is not a valid notification (the caller
            quarantines it); ``reason`` is one of ``REJECT_REASONS``.
    """
    size = len(raw) if isinstance(raw, bytes) else _utf8_len(raw, max_bytes)
    if size > max_bytes:
        raise ProtocolError("oversize", f"frame of {size} bytes exceeds the limit of {max_bytes}")
    text_token = _as_token(raw)
    if text_token is not None:
        return Other(kind="text", detail=text_token)
    obj = _loads(raw)
    if not isinstance(obj, dict):
        raise ProtocolError("not_object", f"frame is a JSON {_json_type(obj)}, not an object")
    if _may_be_deep(raw):
        _check_depth(obj)
    return _from_object(obj)


def _json_type(value: Any) -> str:
    """JSON's name for a decoded value's type (``null``, not Python's ``NoneType``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "string" if isinstance(value, str) else "array"


def _may_be_deep(raw: str | bytes) -> bool:
    """False when the text cannot nest deeper than MAX_DEPTH: each level opens with its own bracket.

    Brackets inside strings only make the count larger, so the answer errs towards the walk.
    """
    if isinstance(raw, bytes):
        return raw.count(b"{") + raw.count(b"[") > MAX_DEPTH
    return raw.count("{") + raw.count("[") > MAX_DEPTH


# A run of 19+ digits may be an integer orjson would turn into a float (it keeps
# 64 bits exact); such frames are parsed by the stdlib, which keeps every int exact.
_LONG_DIGITS = re.compile(rb"[0-9]{19,}")
_LONG_DIGITS_STR = re.compile(r"[0-9]{19,}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number is infinity when parsed as double")
    return value


# The stdlib decoder with orjson's rules: no NaN/Infinity, no float overflow.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _loads(raw: str | bytes) -> Any:
    long_digits = (
        _LONG_DIGITS.search(raw) if isinstance(raw, bytes) else _LONG_DIGITS_STR.search(raw)
    )
    try:
        if long_digits is None:
            return orjson.loads(raw)
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return _DECODER.decode(text)
    except (RecursionError, ValueError, UnicodeError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
        # The stdlib decoder recurses; orjson stops at 1,024 levels, before our own depth walk.
        if isinstance(exc, RecursionError) or str(exc).startswith("depth limit exceeded"):
            raise ProtocolError("too_deep", "frame is nested too deeply to parse") from None
        if isinstance(raw, bytes) and (where := _bad_utf8_at(raw)) is not None:
            # orjson says "str is not valid UTF-8: surrogates not allowed" for any bad byte of a binary frame.
            detail = f"binary frame is not valid UTF-8 (byte 0x{raw[where]:02x} at offset {where})"
            raise ProtocolError("bad_json", detail) from None
        raise ProtocolError("bad_json", f"frame is not valid JSON ({_short(str(exc))})") from None


def _bad_utf8_at(raw: bytes) -> int | None:
    """Offset of the first byte that is not UTF-8, or None when ``raw`` is UTF-8."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return None


def _check_depth(obj: Any) -> None:
    """Refuse values nested deeper than MAX_DEPTH (an iterative walk: no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError("too_deep", f"frame is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))


def dumps_exact(value: Any, *, sort_keys: bool = False) -> bytes:
    """Encode JSON as orjson does, but keep integers wider than 64 bits exact (stdlib fallback).

    Raises:
        TypeError, ValueError: the value cannot be encoded (a lone surrogate, too deep).
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise
    text = json.dumps(value, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def parse_frames(raw: str | bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> list[Frame]:
    """Parse a frame, tolerating the variations the Orangepill WebSocket documentation itself shows.

    Besides what ``parse_frame`` accepts: several JSON objects in one frame
    (the documentation prints its info + error answer as two objects), and control
    objects followed by stray closing braces (the documentation's own examples end in
    ``} }``), also when several such objects share one frame. A notification with
    trailing junk is still refused: its data goes to quarantine for a person to look at.

    Raises:
        ProtocolError: as ``parse_frame``.
    """
    try:
        return [parse_frame(raw, max_bytes=max_bytes)]
    except ProtocolError as exc:
        if exc.reason != "bad_json":
            raise
        objects = _lenient_objects(raw)
        if objects is None:
            raise
    return [_from_object(obj) for obj in objects]


_CONTROL_TYPES: Final = frozenset({"info", "error", "subscribe", "unsubscribe"})


def _lenient_objects(raw: str | bytes) -> list[dict[str, Any]] | None:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None
    objects: list[dict[str, Any]] = []
    index, end = 0, len(text)
    stray = False  # closing braces skipped after a control object (the documentation's "} }")
    while True:
        while index < end:
            if text[index].isspace():
                index += 1
            elif text[index] == "}" and objects and _is_control(objects[-1]):
                index, stray = index + 1, True
            else:
                break
        if index >= end or text[index] != "{":
            break
        try:
            value, index = _DECODER.raw_decode(text, index)
        except (ValueError, RecursionError):
            break
        if not isinstance(value, dict):
            return None
        _check_depth(value)
        objects.append(value)
    if not objects or text[index:].strip():
        return None  # junk, or a stray brace after a notification: its data goes to quarantine
    return objects if len(objects) > 1 or stray else None


def _type_of(obj: dict[str, Any]) -> Any:
    """The frame's ``type``, compared without case or surrounding blanks (``"Notification"`` too)."""
    kind = obj.get("type")
    return kind.strip().lower() if isinstance(kind, str) else kind


def _is_control(obj: dict[str, Any]) -> bool:
    kind = _type_of(obj)
    return isinstance(kind, str) and kind in _CONTROL_TYPES  # a list or dict type is not hashable


def _from_object(obj: dict[str, Any]) -> Frame:
    kind = _type_of(obj)
    if kind == "info":
        realm = obj.get("realm")
        rejected = isinstance(realm, str) and realm.strip().upper() == _NONE_REALM
        return Info(accepted=not rejected, timestamp=_ts(obj.get("timestamp")))
    if kind == "error":
        message = obj.get("realm")
        if not isinstance(message, str):
            message = obj.get("message", obj.get("error", ""))
        # Not truncated here: the text may echo a realm key, which the caller redacts before it truncates.
        return ErrorFrame(message=str(message), timestamp=_ts(obj.get("timestamp")))
    if kind == "subscribe":
        return Subscribed(timestamp=_ts(obj.get("timestamp")))
    if kind == "unsubscribe":
        return Unsubscribed(timestamp=_ts(obj.get("timestamp")))
    if kind == "notification" or (kind is None and _looks_like_notification(obj)):
        return _notification(obj)
    if _looks_like_notification(obj):
        # An event under a type this bridge does not know: quarantined (kept for a person), not dropped.
        # Not truncated here (the type may echo a realm key): the caller redacts, then clips.
        raise ProtocolError("unknown_type", f"frame of type {json.dumps(obj.get('type'))} carries an event")
    return Other(kind="unknown_type", detail=_short(str(obj.get("type")), 64))


def _utf8_len(text: str, limit: int) -> int:
    # Cheap bound first: a str of n code points is at most 4n UTF-8 bytes.
    if len(text) * 4 <= limit:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _as_token(raw: str | bytes) -> str | None:
    if len(raw) > 64:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.strip()
    # null, true and false are JSON values, not keepalive words: a frame of one is not_object.
    return text if _TEXT_TOKEN.match(text) and text not in _JSON_LITERALS else None


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ts(value: Any) -> Timestamp:
    if isinstance(value, bool):
        return None
    if isinstance(value, (str, int, float)):
        return value
    return None


def _looks_like_notification(obj: dict[str, Any]) -> bool:
    if "event" in obj:
        return True
    inner = obj.get("data")
    return isinstance(inner, dict) and "event" in inner


def _notification(obj: dict[str, Any]) -> Notification:
    inner = obj.get("data")
    shape: Literal["flat", "nested"]
    if "event" not in obj and isinstance(inner, dict) and "event" in inner:
        # The JavaScript example's envelope: notification.data.{event,data,timestamp}.
        shape = "nested"
        event = inner.get("event")
        data = inner.get("data")
        timestamp = inner.get("timestamp", obj.get("timestamp"))
        extra = {k: v for k, v in inner.items() if k not in _ENVELOPE_KEYS}
        extra.update((k, v) for k, v in obj.items() if k not in _ENVELOPE_KEYS and k not in inner)
    else:
        shape = "flat"
        event = obj.get("event")
        data = inner
        timestamp = obj.get("timestamp")
        extra = {k: v for k, v in obj.items() if k not in _ENVELOPE_KEYS}
    if not isinstance(event, str) or not event:
        raise ProtocolError("missing_event", "notification has no event name")
    validate_routing_key(event)
    flat: dict[str, Any] = {"type": "notification", "event": event, "data": data, "timestamp": timestamp}
    if extra:
        flat.update(extra)
    try:
        # A right-sized copy: orjson >= 3.12 hands out its working buffer (4 KiB at least) as the bytes
        # object, and the spool keeps this body in memory while the broker is down (issue 14).
        body = bytes(memoryview(dumps_exact(flat)))
    except (TypeError, ValueError) as exc:
        raise ProtocolError("unencodable", _short(str(exc))) from None
    return Notification(
        event=event, data=data, timestamp=_ts(timestamp), body=body, shape=shape, extra=extra
    )


def validate_routing_key(name: str) -> str:
    """Check that an event name is usable as an AMQP topic routing key.

    Args:
        name: the event name.

    Returns:
        The name, unchanged.

    Raises:
        ProtocolError: ``invalid_routing_key`` when it is longer than 255 UTF-8
            bytes, has an empty word, or holds whitespace, control characters,
            ``*`` or ``#`` (wildcards of bindings, never of routing keys).
    """
    if name in _VALID_KEYS:
        return name
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("invalid_routing_key", "event name is not valid UTF-8") from None
    if len(encoded) > _MAX_ROUTING_KEY_BYTES:
        raise ProtocolError(
            "invalid_routing_key", f"event name is {len(encoded)} bytes, the limit is 255"
        )
    if "" in name.split("."):
        raise ProtocolError("invalid_routing_key", f"event name {name!r} has an empty word")
    if _BAD_KEY_CHARS.search(name):
        raise ProtocolError(
            "invalid_routing_key",
            f"event name {name!r} holds whitespace, a control character, '*' or '#'",
        )
    if len(_VALID_KEYS) >= _VALID_KEYS_MAX:  # names come from upstream: bound what is kept
        _VALID_KEYS.clear()
    _VALID_KEYS[name] = None
    return name


# Event names already found valid: a stream repeats a few dozen names millions of times.
_VALID_KEYS: dict[str, None] = {}
_VALID_KEYS_MAX: Final = 4096


def timestamp_seconds(value: Timestamp) -> float | None:
    """Read an upstream timestamp (seconds or ``Date.now()`` milliseconds, str or number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number != number or number in (float("inf"), float("-inf")) or number < 0:
        return None
    return number / 1000.0 if number > 1e11 else number


# -- the subscribe handshake -------------------------------------------------------


class SubscribeOutcome(enum.Enum):
    """Where a subscribe handshake stands."""

    PENDING = "pending"  # nothing decisive yet: keep reading
    ACCEPTED = "accepted"  # info (the realm), subscribe, or events already flowing
    KEY_REJECTED = "key_rejected"  # info NONE (then error/nothing/closed), or an error naming the key: fatal
    SERVER_ERROR = "server_error"  # an error frame that does not name the key: retry with backoff
    NO_ANSWER = "no_answer"  # the timeout passed without a word about the key: retry
    CLOSED_UNANSWERED = "closed_unanswered"  # the server closed before answering: retry


class Handshake:
    """The subscribe handshake as a state machine: feed it frames and the time.

    The documentation answers success with ``info`` (the realm) and/or
    ``subscribe``, and failure with ``info`` ``"realm":"NONE"`` followed by
    ``error``. A server that starts streaming without answering is delivering,
    so that counts as success. After info NONE the machine waits ``reject_grace``
    seconds for the error's text; without it the key still counts as rejected.
    An ``error`` without info NONE is fatal only when its text names the key
    or realm; any other error (a server in trouble) is ``SERVER_ERROR``: retried.

    Attributes:
        outcome: where the handshake stands.
        detail: why it was rejected (the server's error text, unredacted: the
            caller redacts it), or what went wrong; empty while pending.
        deadline: the time after which ``tick`` gives up.
    """

    def __init__(self, *, now: float, timeout: float, reject_grace: float = 2.0) -> None:
        self.deadline = now + timeout
        self.outcome = SubscribeOutcome.PENDING
        self.detail = ""
        self._reject_grace = reject_grace
        self._saw_info_none = False

    def receive(self, frame: Frame, now: float) -> SubscribeOutcome:
        """Account for one frame read while the answer is awaited."""
        if self.outcome is not SubscribeOutcome.PENDING:
            return self.outcome
        if isinstance(frame, ErrorFrame):
            # Only a refused key is fatal; "Service temporarily unavailable" is worth a retry.
            if self._saw_info_none or _names_the_key(frame.message):
                return self._finish(SubscribeOutcome.KEY_REJECTED, frame.message or "error frame")
            return self._finish(SubscribeOutcome.SERVER_ERROR, frame.message or "error frame")
        if isinstance(frame, Info) and not frame.accepted:
            # info NONE: the error with its text follows; wait briefly for it.
            self._saw_info_none = True
            self.deadline = min(self.deadline, now + self._reject_grace)
        elif isinstance(frame, (Info, Subscribed, Notification)) and not self._saw_info_none:
            return self._finish(SubscribeOutcome.ACCEPTED, "")
        return self.outcome

    def tick(self, now: float) -> SubscribeOutcome:
        """Account for the passing of time: after the deadline the handshake ends."""
        if self.outcome is SubscribeOutcome.PENDING and now >= self.deadline:
            if self._saw_info_none:
                return self._finish(SubscribeOutcome.KEY_REJECTED, "the server answered info NONE")
            return self._finish(SubscribeOutcome.NO_ANSWER, "no answer to subscribe")
        return self.outcome

    def connection_closed(self) -> SubscribeOutcome:
        """Account for the server closing the connection before the handshake ended."""
        if self.outcome is SubscribeOutcome.PENDING:
            if self._saw_info_none:
                return self._finish(
                    SubscribeOutcome.KEY_REJECTED,
                    "the server answered info NONE and closed the connection",
                )
            return self._finish(
                SubscribeOutcome.CLOSED_UNANSWERED, "the server closed the connection before answering"
            )
        return self.outcome

    def _finish(self, outcome: SubscribeOutcome, detail: str) -> SubscribeOutcome:
        self.outcome, self.detail = outcome, detail
        return outcome


_KEY_WORDS = re.compile(r"\b(key|realm)\b", re.IGNORECASE)


def _names_the_key(message: str) -> bool:
    """True when an error's text is about the realm key ("Invalid Realm Key.")."""
    return _KEY_WORDS.search(message) is not None


# -- link liveness -------------------------------------------------------------------


class LinkAction(enum.Enum):
    """What the keepalive loop should do now."""

    WAIT = "wait"
    PING = "ping"  # send the text PING and a WebSocket ping
    SILENT = "silent"  # nothing heard for longer than the idle timeout: drop the link


class Liveness:
    """The link-liveness rules: when to ping, when a link counts as silent.

    ``heard`` is the only writer of the last-heard time: a frame, a pong, a
    completed handshake and a paused reader (a full spool: the silence is ours,
    not the link's) all go through it.
    """

    def __init__(self, *, ping_interval: float, idle_timeout: float, now: float) -> None:
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self._last_heard = now
        self._last_ping = -math.inf

    @property
    def check_every(self) -> float:
        """How often the keepalive loop should call ``due``."""
        return min(self.ping_interval, self.idle_timeout / 3)

    def heard(self, now: float) -> None:
        """Something came from the server (or our reader is paused on purpose)."""
        self._last_heard = max(self._last_heard, now)

    def silent_for(self, now: float) -> float:
        """Seconds since the server was last heard."""
        return now - self._last_heard

    def due(self, now: float, *, reader_paused: bool = False) -> LinkAction:
        """What to do at ``now``; a PING answer also marks the ping as sent."""
        if reader_paused:
            self.heard(now)
        if self.silent_for(now) > self.idle_timeout:
            return LinkAction.SILENT
        if now - self._last_ping >= self.ping_interval:
            self._last_ping = now
            return LinkAction.PING
        return LinkAction.WAIT
