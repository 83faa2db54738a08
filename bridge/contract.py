"""The RabbitMQ message contract: the one place that defines what a consumer sees. Pure, no I/O.

Names of the exchange and queues, the message id, the body, the AMQP properties
and headers, and the quarantine reasons. ``docs`` and DESIGN.md describe the
same contract for people; this module is it for code, tests and benchmarks.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from pamqp.commands import Basic
from pamqp.encode import field_table, short_string, table_integer

from bridge.catalog import metric_label
from bridge.errors import ProtocolError
from bridge.secrets import clip, holds_secret, key_mark, redact
from bridge.wire import REJECT_REASONS, Notification, Timestamp, dumps_exact, parse_frame, validate_routing_key

__all__ = [
    "APP_ID",
    "KIND_EVENT",
    "KIND_QUARANTINE",
    "MAX_ENTITY_ID_BYTES",
    "ORIGINAL_ROUTING_KEY",
    "QUARANTINE_REASONS",
    "UNPUBLISHABLE",
    "Outbound",
    "Topology",
    "amqp_properties",
    "event_message",
    "header_frame_bytes",
    "header_text",
    "message_id",
    "properties_bytes",
    "publish_frames",
    "quarantine_message",
    "refused_event",
    "unpublishable_message",
]

APP_ID: Final = "orangepill-bridge"
"""The ``app_id`` property of every message, and the AMQP connection name."""

KIND_EVENT: Final = 0
KIND_QUARANTINE: Final = 1

UNPUBLISHABLE: Final = "unpublishable"
"""The quarantine reason of an event RabbitMQ refused for good (a poison message)."""

QUARANTINE_REASONS: Final = (*REJECT_REASONS, UNPUBLISHABLE)
"""The routing keys (and ``reason`` header) of quarantined messages."""

ORIGINAL_ROUTING_KEY: Final = "original_routing_key"
"""The header naming an event's routing key where the message carries another one: a copy the bridge keeps
in ``<exchange>.unrouted`` itself (the exchange returned it), or a poison event in the quarantine."""

MAX_ENTITY_ID_BYTES: Final = 128
"""The ``entity_id`` header is set only for ids up to this many UTF-8 bytes: headers stay small."""


@dataclass(frozen=True, slots=True)
class Topology:
    """Names of everything the bridge declares (or reserves) on RabbitMQ.

    Attributes:
        exchange: the topic exchange events are published to (routing key = event name).
    """

    exchange: str

    @property
    def unrouted(self) -> str:
        """The alternate exchange (fanout) and the queue that keeps events no binding took."""
        return f"{self.exchange}.unrouted"

    @property
    def quarantine(self) -> str:
        """The queue that keeps frames that were not valid notifications."""
        return f"{self.exchange}.quarantine"

    @property
    def ha(self) -> str:
        """The replicas' coordination exchange (fanout): the leader's announcements of confirmed ids."""
        return f"{self.exchange}.ha"

    def leader_queue(self, realm_fp: str) -> str:
        """Reserved for high availability: the single-active-consumer queue of one realm."""
        return f"{self.exchange}.leader.{realm_fp}"

    @property
    def own_queues(self) -> tuple[str, str]:
        """The queues the bridge declares itself (unrouted, quarantine)."""
        return (self.unrouted, self.quarantine)

    @property
    def own_exchanges(self) -> tuple[str, str, str]:
        """The exchanges the bridge declares itself (the topic exchange, the alternate one, the replicas' one)."""
        return (self.exchange, self.unrouted, self.ha)


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
        metric_kind: the bounded ``event`` metric label of the event (see ``catalog.metric_label``).
    """

    kind: int
    routing_key: str
    message_id: str
    body: bytes
    headers: dict[str, str | int] = field(default_factory=dict)
    received_at: float = 0.0
    metric_kind: str = "other"
    key_removed: bool = False  # a realm key in the body was replaced by its fingerprint (not stored, not sent)


def _norm_ts(value: Timestamp) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def message_id(realm_fp: str, event: str, data: Any, timestamp: Timestamp, extra: dict[str, Any] | None = None) -> str:
    """Deterministic id of an event: the same event always gets the same id.

    The timestamp counts by value, so ``"1671547687"`` and ``1671547687`` agree.
    Extra upstream fields count too (when there are any), so two different
    events that share entity and millisecond still get different ids.
    """
    parts: list[Any] = [realm_fp, event, data, _norm_ts(timestamp)]
    if extra:
        parts.append(extra)
    # Exact for integers wider than 64 bits: the id is a function of the received values.
    canonical = dumps_exact(parts, sort_keys=True)
    return hashlib.sha256(canonical).hexdigest()[:32]


def event_message(
    note: Notification, *, realm: str, realm_fp: str, received_at: float, secrets: tuple[str, ...] = ()
) -> Outbound:
    """Turn a parsed notification into the message the contract promises.

    Args:
        note: the parsed notification.
        realm: the realm's label (configured, or the key fingerprint).
        realm_fp: the key fingerprint, which feeds ``message_id``.
        received_at: when the frame was read (unix seconds).
        secrets: the realm keys: an ``entity_id`` holding one (an upstream that echoes the key in
            ``data``) is left out, as a header never carries a key (SECURITY.md).
    """
    headers: dict[str, str | int] = {"realm": realm, "received_at": int(received_at * 1000)}
    entity = _entity_header(note.entity_id, secrets)
    if entity is not None:
        headers["entity_id"] = entity
    body, removed = _without_keys(note.body, secrets)
    return Outbound(
        kind=KIND_EVENT,
        routing_key=note.event,
        # Of the values as received: a copy of this event whose key was not removed has the same id.
        message_id=message_id(realm_fp, note.event, note.data, note.timestamp, note.extra),
        body=body,
        headers=headers,
        received_at=received_at,
        metric_kind=metric_label(note.event),
        key_removed=removed,
    )


@functools.lru_cache(maxsize=16)
def _key_forms(secrets: tuple[str, ...]) -> tuple[tuple[bytes, bytes], ...]:
    """Each realm key as it reads inside a body the bridge encoded (orjson's escaping), and its mark."""
    return tuple(
        (dumps_exact(key)[1:-1], key_mark(key).encode()) for key in secrets if key
    )


def _without_keys(body: bytes, secrets: tuple[str, ...]) -> tuple[bytes, bool]:
    """The body with every realm key replaced by ``<realm-key fp-…>``; True if one was there.

    An upstream that echoes the realm key in an event (``data``, an extra field) would otherwise
    hand the key to every consumer of the exchange. The body is the bridge's own encoding, so the
    key reads there exactly as orjson writes it; the mark needs no JSON escaping, and the body stays
    valid JSON. A whole key is looked for (a ``bytes`` search, well under a microsecond); pieces of
    one are left, as the body keeps the values as received otherwise.
    """
    if not secrets:
        return body, False
    removed = False
    for form, mark in _key_forms(secrets):
        if form in body:
            body = body.replace(form, mark)
            removed = True
    return body, removed


DETAIL_LIMIT: Final = 200
"""Characters of a reason kept in headers and log lines (cut after redaction)."""


def quarantine_message(
    raw: str | bytes,
    error: ProtocolError,
    *,
    realm: str,
    secrets: tuple[str, ...],
    received_at: float,
) -> Outbound:
    """Keep a frame that is not a valid notification, with the reason, for the quarantine queue.

    Any realm key that appears in the raw frame or the reason, raw or escaped, is replaced by its
    fingerprint (the detail is truncated only after that); every other byte is kept as received,
    invalid UTF-8 included.
    """
    if isinstance(raw, bytes):
        # surrogateescape round-trips every byte, so invalid UTF-8 survives redaction unchanged.
        body = redact(raw.decode("utf-8", "surrogateescape"), secrets).encode("utf-8", "surrogateescape")
    else:
        body = redact(raw, secrets).encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(realm.encode() + b"\x00" + body).hexdigest()[:32]
    headers: dict[str, str | int] = {
        "realm": realm,
        "reason": error.reason,
        "detail": clip(redact(error.detail, secrets), DETAIL_LIMIT),
        "received_at": int(received_at * 1000),
    }
    return Outbound(
        kind=KIND_QUARANTINE,
        routing_key=error.reason,
        message_id=digest,
        body=body,
        headers=headers,
        received_at=received_at,
        metric_kind=error.reason,
    )


def unpublishable_message(msg: Outbound, detail: str) -> Outbound:
    """The quarantine copy of an event RabbitMQ refuses for good (a poison message).

    The body is kept as it was; the headers are a small bounded set (whatever made
    the original unpublishable, such as oversized headers, is left out).
    """
    realm = str(msg.headers.get("realm", ""))[:MAX_ENTITY_ID_BYTES]
    headers: dict[str, str | int] = {
        "realm": realm,
        "reason": UNPUBLISHABLE,
        "detail": detail[:500],
        ORIGINAL_ROUTING_KEY: msg.routing_key,
        "received_at": int(msg.received_at * 1000),
    }
    return Outbound(
        kind=KIND_QUARANTINE,
        routing_key=UNPUBLISHABLE,
        message_id=msg.message_id,
        body=msg.body,
        headers=headers,
        received_at=msg.received_at,
        metric_kind=UNPUBLISHABLE,
    )


def _entity_header(entity: str | None, secrets: tuple[str, ...]) -> str | None:
    """The ``entity_id`` header's value, or None: only ids up to ``MAX_ENTITY_ID_BYTES``, never one holding a key."""
    if entity is None or len(entity.encode("utf-8", "surrogatepass")) > MAX_ENTITY_ID_BYTES:
        return None
    return None if holds_secret(entity, secrets) else entity


def refused_event(
    body: bytes, headers: Mapping[str, Any], message_id: str, secrets: tuple[str, ...] = ()
) -> Outbound:
    """An event kept in the quarantine as ``unpublishable``, rebuilt as the contract publishes it.

    The quarantine copy keeps the body, the ``message_id``, the ``realm``, ``received_at`` and the
    ``original_routing_key``; the ``entity_id`` header is read from the body again (the copy left it out
    with every other header, bounded or not), so the event goes out exactly as a new one would: an
    ``entity_id`` holding one of ``secrets`` (the realm keys) is left out, as ``event_message`` does.

    Raises:
        ValueError: the message is not such an event (another reason, no routing key, no message id).
    """
    reason, key = header_text(headers.get("reason")), header_text(headers.get(ORIGINAL_ROUTING_KEY))
    if reason != UNPUBLISHABLE or not key or not message_id:
        raise ValueError(f"not an event RabbitMQ refused (reason {reason or 'none'})")
    try:
        validate_routing_key(key)
    except ProtocolError as exc:
        raise ValueError(f"its {ORIGINAL_ROUTING_KEY} is not a routing key: {exc.detail}") from None
    received = headers.get("received_at")
    received_ms = received if isinstance(received, int) and not isinstance(received, bool) else 0
    rebuilt: dict[str, str | int] = {"realm": header_text(headers.get("realm")), "received_at": received_ms}
    try:
        note = parse_frame(body, max_bytes=len(body) + 1)
    except ProtocolError:
        note = None
    entity = _entity_header(note.entity_id if isinstance(note, Notification) else None, secrets)
    if entity is not None:
        rebuilt["entity_id"] = entity
    return Outbound(
        kind=KIND_EVENT,
        routing_key=key,
        message_id=message_id,
        body=body,
        headers=rebuilt,
        received_at=received_ms / 1000,
        metric_kind=metric_label(key),
    )


def header_text(value: Any) -> str:
    """A header value as text, "" when it is none (AMQP long strings may arrive as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def header_frame_bytes(properties: Basic.Properties) -> int:
    """Size of the AMQP content-header frame these properties make (payload and 8 bytes of framing).

    It must not exceed the connection's ``frame_max``: unlike the body, the
    header is never split, and RabbitMQ closes the connection (501 FRAME_ERROR).
    """
    return 8 + 12 + len(properties.marshal())


def amqp_properties(msg: Outbound, extra_headers: dict[str, str] | None = None) -> Basic.Properties:
    """The AMQP properties of the contract: persistent, JSON, deterministic message_id.

    Built as pamqp properties directly: aio_pika.Message costs about eight times as
    much per event, and the publisher makes one per event.
    """
    is_event = msg.kind == KIND_EVENT
    headers: dict[str, Any] = dict(msg.headers)
    if extra_headers:
        headers.update(extra_headers)
    return Basic.Properties(
        content_type="application/json" if is_event else "text/plain",
        content_encoding="utf-8",
        headers=headers,
        delivery_mode=2,
        message_id=msg.message_id,
        timestamp=datetime.fromtimestamp(int(msg.received_at), tz=UTC),
        message_type=msg.routing_key if is_event else "quarantine",
        app_id=APP_ID,
    )


# -- the wire form of a publish, built without pamqp objects ------------------------------
# Property flags of the contract's properties (AMQP 0-9-1 basic class): content_type,
# content_encoding, headers, delivery_mode, message_id, timestamp, type, app_id.
_FLAGS: Final = 0x8000 | 0x4000 | 0x2000 | 0x1000 | 0x0080 | 0x0040 | 0x0020 | 0x0008
_H: Final = struct.Struct(">H")
_Q: Final = struct.Struct(">Q")
_FRAME: Final = struct.Struct(">BHI")
_HEADER_START: Final = struct.Struct(">HHQ")  # class 60, weight 0, body size
_FRAME_END: Final = b"\xce"
_PROPS_START: Final = {
    KIND_EVENT: _H.pack(_FLAGS) + short_string("application/json") + short_string("utf-8"),
    KIND_QUARANTINE: _H.pack(_FLAGS) + short_string("text/plain") + short_string("utf-8"),
}
_PERSISTENT: Final = b"\x02"
_APP_ID_FIELD: Final = short_string(APP_ID)
_PUBLISH_START: Final = struct.pack(">HHH", 60, 40, 0)  # Basic.Publish, ticket 0
_method_cache: dict[tuple[int, str, str, bool], bytes] = {}


def properties_bytes(msg: Outbound, extra_headers: dict[str, str] | None = None) -> bytes:
    """The encoded AMQP properties of ``amqp_properties(msg, extra_headers)`` (flags and values).

    Byte for byte what pamqp marshals for those properties, at a fraction of the
    cost: the constant parts are encoded once, the headers table by ``_table``.
    """
    headers = msg.headers if not extra_headers else {**msg.headers, **extra_headers}
    is_event = msg.kind == KIND_EVENT
    message_id = msg.message_id.encode()
    kind = (msg.routing_key if is_event else "quarantine").encode()
    if len(message_id) > 255 or len(kind) > 255:
        return _properties_slow(msg, headers, is_event)
    return b"".join((
        _PROPS_START[KIND_EVENT if is_event else KIND_QUARANTINE],
        _table(headers),
        _PERSISTENT,
        _SHORT_LEN[len(message_id)],
        message_id,
        _Q.pack(int(msg.received_at)),
        _SHORT_LEN[len(kind)],
        kind,
        _APP_ID_FIELD,
    ))  # fmt: skip


def _properties_slow(msg: Outbound, headers: dict[str, str | int], is_event: bool) -> bytes:
    """``properties_bytes`` through pamqp's encoders (which raise on a string above 255 bytes)."""
    return b"".join((
        _PROPS_START[KIND_EVENT if is_event else KIND_QUARANTINE],
        _table(headers),
        _PERSISTENT,
        short_string(msg.message_id),
        _Q.pack(int(msg.received_at)),
        short_string(msg.routing_key if is_event else "quarantine"),
        _APP_ID_FIELD,
    ))  # fmt: skip


_SHORT_LEN: Final = tuple(bytes((n,)) for n in range(256))
_I: Final = struct.Struct(">I")
_LONG_LONG: Final = struct.Struct(">q")
_key_cache: dict[str, bytes] = {}
_realm_cache: dict[str, bytes] = {}  # the realm header: one value per lane, encoded once


def _str_field(value: str) -> bytes:
    data = value.encode("utf-8")
    return b"".join((b"S", _I.pack(len(data)), data))


def _table(headers: dict[str, str | int]) -> bytes:
    """``pamqp.encode.field_table`` for the contract's headers (str and int values), with keys encoded once."""
    out = []
    for key in sorted(headers):
        value = headers[key]
        name = _key_cache.get(key)
        if name is None:
            if len(key.encode()) > 128 or len(_key_cache) >= 256:
                return field_table(dict(headers))  # pamqp's rules for anything unusual
            name = _key_cache[key] = short_string(key)
        out.append(name)
        if isinstance(value, str):
            if key == "realm":
                field = _realm_cache.get(value)
                if field is None:
                    if len(_realm_cache) >= 256:
                        _realm_cache.clear()
                    field = _realm_cache[value] = _str_field(value)
                out.append(field)
            else:
                out.append(_str_field(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            if 2**32 <= value < 2**63 or -(2**63) <= value < -(2**31):
                out.append(b"l" + _LONG_LONG.pack(value))  # what table_integer picks for these
            else:
                out.append(table_integer(value))
        else:
            return field_table(dict(headers))
    body = b"".join(out)
    return _I.pack(len(body)) + body


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return b"".join((_FRAME.pack(kind, channel, len(payload)), payload, _FRAME_END))


def publish_frames(
    channel: int, exchange: str, routing_key: str, properties: bytes, body: bytes, *,
    mandatory: bool, max_content: int,
) -> bytes:  # fmt: skip
    """The frames of one ``basic.publish`` (method, content header, body frames) as one byte string.

    Args:
        channel: the channel number.
        properties: from ``properties_bytes``.
        max_content: the largest body frame payload (the connection's ``frame_max`` - 8).
    """
    key = (channel, exchange, routing_key, mandatory)
    method = _method_cache.get(key)
    if method is None:
        payload = b"".join((_PUBLISH_START, short_string(exchange), short_string(routing_key),
                            b"\x01" if mandatory else b"\x00"))  # fmt: skip
        method = _frame(1, channel, payload)
        if len(_method_cache) >= 4096:
            _method_cache.clear()
        _method_cache[key] = method
    parts = [method, _frame(2, channel, _HEADER_START.pack(60, 0, len(body)) + properties)]
    if body:
        if len(body) < max_content:
            parts.append(_frame(3, channel, body))
        else:
            view = memoryview(body)
            parts.extend(_frame(3, channel, bytes(view[i : i + max_content])) for i in range(0, len(body), max_content))
    return b"".join(parts)
