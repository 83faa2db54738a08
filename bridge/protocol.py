"""The Orangepill stream protocol and the bridge's message contract: pure, no I/O.

Everything that decides what a frame means, which routing key an event gets and
which ``message_id`` it carries lives here, so it can be tested without sockets.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import orjson

from bridge.catalog import metric_label
from bridge.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "KIND_EVENT",
    "KIND_QUARANTINE",
    "PING",
    "REJECT_REASONS",
    "ErrorFrame",
    "Frame",
    "Info",
    "Notification",
    "Other",
    "Outbound",
    "Subscribed",
    "Unsubscribed",
    "event_message",
    "key_fingerprint",
    "message_id",
    "parse_frame",
    "parse_frames",
    "quarantine_message",
    "redact",
    "subscribe_answer",
    "subscribe_frame",
    "timestamp_seconds",
    "unsubscribe_frame",
    "validate_routing_key",
]

PING: Final = "PING"
"""The text keepalive the seed's JavaScript client sends every 10 seconds."""

DEFAULT_MAX_FRAME_BYTES: Final = 1024 * 1024

KIND_EVENT: Final = 0
KIND_QUARANTINE: Final = 1

# Bounded values of the ``reason`` label of events_rejected_total.
REJECT_REASONS: Final = (
    "bad_json",
    "not_object",
    "missing_event",
    "invalid_routing_key",
    "oversize",
)

_NONE_REALM: Final = "NONE"
_MAX_ROUTING_KEY_BYTES: Final = 255
# A bare token such as PONG or OK is a keepalive reply, not a broken notification.
_TEXT_TOKEN = re.compile(r"^[A-Za-z]{1,16}$")
_BAD_KEY_CHARS = re.compile(r"[\s*#\x00-\x1f\x7f]")
_ENVELOPE_KEYS: Final = ("type", "event", "data", "timestamp")

Timestamp: TypeAlias = "str | int | float | None"


# -- client frames ---------------------------------------------------------------


def subscribe_frame(realm_key: str) -> str:
    """Build the seed's ``{"type":"subscribe","realm":KEY}`` text frame."""
    return orjson.dumps({"type": "subscribe", "realm": realm_key}).decode()


def unsubscribe_frame(realm_key: str) -> str:
    """Build the seed's ``{"type":"unsubscribe","realm":KEY}`` text frame."""
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
        if isinstance(data, str):
            return data
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return str(data)
        if isinstance(data, dict):
            ident = data.get("id")
            if isinstance(ident, (str, int)) and not isinstance(ident, bool):
                return str(ident)
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
    size = len(raw) if isinstance(raw, bytes) else _utf8_len(raw)
    if size > max_bytes:
        raise ProtocolError("oversize", f"frame of {size} bytes exceeds the limit of {max_bytes}")
    text_token = _as_token(raw)
    if text_token is not None:
        return Other(kind="text", detail=text_token)
    try:
        obj = orjson.loads(raw)
    except (orjson.JSONDecodeError, UnicodeError, TypeError) as exc:
        raise ProtocolError("bad_json", f"frame is not valid JSON ({_short(str(exc))})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not_object", f"frame is JSON {type(obj).__name__}, not an object")
    return _from_object(obj)


SubscribeAnswer: TypeAlias = Literal["accepted", "rejected", "refused", "none"]


def subscribe_answer(frame: Frame, *, refused: bool) -> SubscribeAnswer:
    """What a frame read while waiting for the answer to subscribe says about the key.

    The seed answers success with ``info`` (the realm) and/or ``subscribe``, and
    failure with ``info`` ``"realm":"NONE"`` followed by ``error``. A server that
    starts streaming without answering is delivering, so that counts as success.

    Args:
        frame: the parsed frame.
        refused: whether an ``info`` NONE was seen already.

    Returns:
        ``rejected`` (an error frame: give up), ``refused`` (info NONE: expect the
        error), ``accepted``, or ``none`` (says nothing about the subscription).
    """
    if isinstance(frame, ErrorFrame):
        return "rejected"
    if isinstance(frame, Info) and not frame.accepted:
        return "refused"
    if isinstance(frame, (Info, Subscribed, Notification)) and not refused:
        return "accepted"
    return "none"


def parse_frames(raw: str | bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> list[Frame]:
    """Parse a frame, tolerating the variations the seed itself shows.

    Besides what ``parse_frame`` accepts: several JSON objects in one frame
    (the seed prints its info + error answer as two objects), and a control
    frame followed by stray closing braces (the seed's own examples end in
    ``} }``). A notification with trailing junk is still refused: its data
    goes to quarantine for a person to look at.

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
    decoder = json.JSONDecoder()
    objects: list[dict[str, Any]] = []
    index, end = 0, len(text)
    while True:
        while index < end and text[index].isspace():
            index += 1
        if index >= end or text[index] != "{":
            break
        try:
            value, index = decoder.raw_decode(text, index)
        except (ValueError, RecursionError):
            break
        if not isinstance(value, dict):
            return None
        objects.append(value)
    rest = text[index:].strip()
    if not objects:
        return None
    if not rest and len(objects) > 1:
        return objects
    if rest and set(rest) <= {"}"} and all(obj.get("type") in _CONTROL_TYPES for obj in objects):
        return objects
    return None


def _from_object(obj: dict[str, Any]) -> Frame:
    kind = obj.get("type")
    if kind == "info":
        return Info(accepted=obj.get("realm") != _NONE_REALM, timestamp=_ts(obj.get("timestamp")))
    if kind == "error":
        message = obj.get("realm")
        if not isinstance(message, str):
            message = obj.get("message", obj.get("error", ""))
        return ErrorFrame(message=_short(str(message), 200), timestamp=_ts(obj.get("timestamp")))
    if kind == "subscribe":
        return Subscribed(timestamp=_ts(obj.get("timestamp")))
    if kind == "unsubscribe":
        return Unsubscribed(timestamp=_ts(obj.get("timestamp")))
    if kind == "notification" or (kind is None and _looks_like_notification(obj)):
        return _notification(obj)
    return Other(kind="unknown_type", detail=_short(str(kind), 64))


def _utf8_len(text: str) -> int:
    # Cheap bound first: a str of n code points is at most 4n UTF-8 bytes.
    if len(text) * 4 <= DEFAULT_MAX_FRAME_BYTES:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _as_token(raw: str | bytes) -> str | None:
    if len(raw) > 64:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.strip()
    return text if _TEXT_TOKEN.match(text) else None


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
        extras = [(k, v) for k, v in inner.items() if k not in _ENVELOPE_KEYS]
        extras += [(k, v) for k, v in obj.items() if k not in _ENVELOPE_KEYS and k not in inner]
    else:
        shape = "flat"
        event = obj.get("event")
        data = inner
        timestamp = obj.get("timestamp")
        extras = [(k, v) for k, v in obj.items() if k not in _ENVELOPE_KEYS]
    if not isinstance(event, str) or not event:
        raise ProtocolError("missing_event", "notification has no event name")
    validate_routing_key(event)
    flat: dict[str, Any] = {"type": "notification", "event": event, "data": data, "timestamp": timestamp}
    flat.update(extras)
    try:
        body = orjson.dumps(flat)
    except TypeError as exc:  # pragma: no cover - orjson.loads output always dumps
        raise ProtocolError("bad_json", _short(str(exc))) from None
    return Notification(
        event=event, data=data, timestamp=_ts(timestamp), body=body, shape=shape, extra=dict(extras)
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
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("invalid_routing_key", "event name is not valid UTF-8") from None
    if len(encoded) > _MAX_ROUTING_KEY_BYTES:
        raise ProtocolError(
            "invalid_routing_key", f"event name is {len(encoded)} bytes, the limit is 255"
        )
    if "" in name.split("."):
        raise ProtocolError("invalid_routing_key", f"event name {_short(name, 80)!r} has an empty word")
    if _BAD_KEY_CHARS.search(name):
        raise ProtocolError(
            "invalid_routing_key",
            f"event name {_short(name, 80)!r} holds whitespace, a control character, '*' or '#'",
        )
    return name


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


# -- identity and ids ----------------------------------------------------------------


def key_fingerprint(realm_key: str) -> str:
    """A short, stable, non-reversible name for a realm key (``fp-`` + 12 hex)."""
    digest = hashlib.sha256(realm_key.encode("utf-8", "surrogatepass")).hexdigest()
    return "fp-" + digest[:12]


def _norm_ts(value: Timestamp) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def message_id(
    realm_fp: str, event: str, data: Any, timestamp: Timestamp, extra: dict[str, Any] | None = None
) -> str:
    """Deterministic id of an event: the same event always gets the same id.

    The timestamp counts by value, so ``"1671547687"`` and ``1671547687`` agree.
    Extra upstream fields count too (when there are any), so two different
    events that share entity and millisecond still get different ids.
    """
    parts: list[Any] = [realm_fp, event, data, _norm_ts(timestamp)]
    if extra:
        parts.append(extra)
    canonical = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:32]


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every occurrence of a secret by its fingerprint."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, f"<realm-key {key_fingerprint(secret)}>")
    return text


# -- outbound messages -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message ready for RabbitMQ, as stored in the spool.

    Attributes:
        kind: ``KIND_EVENT`` (to the topic exchange) or ``KIND_QUARANTINE``.
        routing_key: the event name; for quarantine, the rejection reason.
        message_id: deterministic id shared by every copy of this event.
        body: the bytes to publish.
        headers: AMQP headers (``realm``, ``entity_id``, ``received_at`` …).
        received_at: when the frame was read off the socket (unix seconds).
        label: the bounded metric label of the event.
    """

    kind: int
    routing_key: str
    message_id: str
    body: bytes
    headers: dict[str, str | int] = field(default_factory=dict)
    received_at: float = 0.0
    label: str = "other"


def event_message(note: Notification, *, realm: str, realm_fp: str, received_at: float) -> Outbound:
    """Turn a parsed notification into the message the contract promises.

    Args:
        note: the parsed notification.
        realm: the realm's label (configured, or the key fingerprint).
        realm_fp: the key fingerprint, which feeds ``message_id``.
        received_at: when the frame was read (unix seconds).
    """
    headers: dict[str, str | int] = {"realm": realm, "received_at": int(received_at * 1000)}
    entity = note.entity_id
    if entity is not None:
        headers["entity_id"] = entity
    return Outbound(
        kind=KIND_EVENT,
        routing_key=note.event,
        message_id=message_id(realm_fp, note.event, note.data, note.timestamp, note.extra),
        body=note.body,
        headers=headers,
        received_at=received_at,
        label=metric_label(note.event),
    )


def quarantine_message(
    raw: str | bytes,
    error: ProtocolError,
    *,
    realm: str,
    secrets: tuple[str, ...],
    received_at: float,
) -> Outbound:
    """Keep a frame that is not a valid notification, with the reason, for the quarantine queue.

    Any realm key that appears in the raw frame is replaced by its fingerprint.
    """
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    body = redact(text, secrets).encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(realm.encode() + b"\x00" + body).hexdigest()[:32]
    headers: dict[str, str | int] = {
        "realm": realm,
        "reason": error.reason,
        "detail": redact(error.detail, secrets),
        "received_at": int(received_at * 1000),
    }
    return Outbound(
        kind=KIND_QUARANTINE,
        routing_key=error.reason,
        message_id=digest,
        body=body,
        headers=headers,
        received_at=received_at,
        label=error.reason,
    )
