"""Deprecated: the names that lived here moved; this module only re-exports them.

- frames and parsing -> ``bridge.wire``
- ``Outbound``, ``message_id``, ``event_message``, ``quarantine_message``,
  ``KIND_*`` -> ``bridge.contract``
- ``key_fingerprint``, ``redact`` -> ``bridge.secrets``

Kept so that code not yet moved over (the spool, the simulator) still imports.
Delete it once nothing imports ``bridge.protocol``.
"""

from __future__ import annotations

from bridge.contract import (
    KIND_EVENT,
    KIND_QUARANTINE,
    Outbound,
    event_message,
    message_id,
    quarantine_message,
)
from bridge.secrets import key_fingerprint, redact
from bridge.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    PING,
    REJECT_REASONS,
    ErrorFrame,
    Frame,
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
    "subscribe_frame",
    "timestamp_seconds",
    "unsubscribe_frame",
    "validate_routing_key",
]
