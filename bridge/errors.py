"""The exception tree of orangepill-bridge.

Every error the bridge raises on purpose derives from ``BridgeError``::

    BridgeError
     ├── ConfigError (ValueError)        a setting is missing or invalid -> exit 2
     ├── ProtocolError (ValueError)      a frame is not a valid notification -> quarantine
     ├── RealmRejected                   the stream refused a realm key -> exit 2
     ├── TopologyError                   RabbitMQ refused the exchange/queue layout -> exit 2
     ├── SpoolError                      the durable spool cannot be opened or written -> exit 1
     └── StreamError (ConnectionError)   the stream link failed (retried, never fatal)

No message of these errors ever contains a realm key or a password.
"""

from __future__ import annotations

__all__ = [
    "BridgeError",
    "ConfigError",
    "ProtocolError",
    "RealmRejected",
    "SpoolError",
    "StreamError",
    "TopologyError",
]


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""

    exit_code: int = 1


class ConfigError(BridgeError, ValueError):
    """A setting is missing or invalid; the message names the setting."""

    exit_code = 2


class ProtocolError(BridgeError, ValueError):
    """A frame from the stream is not a valid notification.

    Attributes:
        reason: a short, bounded machine-readable reason (a metric label value).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RealmRejected(BridgeError):
    """The stream answered a subscribe with ``info`` NONE and/or ``error``; never retried."""

    exit_code = 2


class TopologyError(BridgeError):
    """RabbitMQ refused to declare the exchange or queues as configured."""

    exit_code = 2


class SpoolError(BridgeError):
    """The durable spool could not be opened, read or written."""


class SpoolPathError(SpoolError):
    """``--spool`` names something that can never be this bridge's spool (a directory, an unwritable place,
    a file that is not a spool, a newer schema): bad configuration, exit 2, not worth a restart."""

    exit_code = 2


class StreamError(BridgeError, ConnectionError):
    """The stream link failed; the client reconnects."""
