"""Deprecated: the names that lived here moved; this module only re-exports them.

- frames and parsing -> ``bridge.wire``
- ``Outbound``, ``message_id``, ``event_message``, ``quarantine_message``,
  ``KIND_*`` -> ``bridge.contract``
- ``key_fingerprint``, ``redact`` -> ``bridge.secrets``

Kept so that code not yet moved over (the spool, the simulator) still imports.
Delete it once nothing imports ``bridge.protocol``.
"""

from __future__ import annotations

from typing import Any

from bridge import contract
from bridge.contract import KIND_EVENT, KIND_QUARANTINE, event_message, message_id, quarantine_message
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


class Outbound(contract.Outbound):
    """``contract.Outbound`` that still accepts the old ``label=`` keyword (for the spool)."""

    __slots__ = ()

    def __init__(self, *args: Any, label: str | None = None, **kwargs: Any) -> None:
        if label is not None:
            kwargs["metric_kind"] = label
        super().__init__(*args, **kwargs)
