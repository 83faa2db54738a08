"""Prometheus metrics of the bridge, built on an injected registry.

Every stage reports here; ``/metrics`` serves the registry. Names carry the
``orangepill_bridge_`` prefix, counters end in ``_total``, units are base units.
"""

from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from bridge import __version__
from bridge.catalog import metric_labels
from bridge.protocol import REJECT_REASONS

__all__ = ["PREFIX", "DisconnectReason", "Metrics", "PublishFailure"]

PREFIX = "orangepill_bridge"

# Read-off-socket to broker-confirm latency: sub-millisecond to a minute.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class DisconnectReason(enum.StrEnum):
    """Why a stream connection ended (bounded label values)."""

    CLOSED = "closed"  # the server closed the WebSocket
    ERROR = "error"  # a network or protocol error
    SILENT = "silent"  # nothing heard within the idle timeout
    SUBSCRIBE_TIMEOUT = "subscribe_timeout"  # no answer to subscribe
    CONNECT_FAILED = "connect_failed"  # the handshake did not complete
    SHUTDOWN = "shutdown"  # the bridge is stopping


class PublishFailure(enum.StrEnum):
    """Why a publish was not confirmed (bounded label values)."""

    NACK = "nack"
    TIMEOUT = "timeout"
    CHANNEL = "channel"  # channel or connection closed, broker down
    RETURNED = "returned"  # unroutable and not taken by the alternate exchange


class Metrics:
    """All metrics of one bridge process, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = PREFIX
        self.build_info = Info(f"{p}_build", "Version of the bridge.", registry=r)
        self.build_info.info({"version": __version__})

        # stream
        self.stream_connected = Gauge(
            f"{p}_stream_connected", "1 while every realm's WebSocket link is open.", registry=r
        )
        self.stream_connects = Counter(
            f"{p}_stream_connects", "WebSocket connections opened (handshake done).", registry=r
        )
        self.stream_disconnects = Counter(
            f"{p}_stream_disconnects",
            "WebSocket connections lost or closed, by reason.",
            ["reason"],
            registry=r,
        )
        self.subscribed = Gauge(
            f"{p}_subscribed", "1 while the realm's subscription is confirmed.", ["realm"], registry=r
        )
        self.stream_reconnect_delay = Gauge(
            f"{p}_stream_reconnect_delay_seconds",
            "Backoff delay before the next reconnect attempt (0 when connected).",
            ["realm"],
            registry=r,
        )
        self.frames_other = Counter(
            f"{p}_frames_other",
            "Frames that are neither notifications nor subscription answers (PONG, unknown type).",
            ["kind"],
            registry=r,
        )
        self.stream_errors = Counter(
            f"{p}_stream_error_frames", "error frames received after subscribing.", registry=r
        )

        # events
        self.events_received = Counter(
            f"{p}_events_received", "Notifications read off the stream, by event.", ["event"], registry=r
        )
        self.events_published = Counter(
            f"{p}_events_published",
            "Events confirmed by RabbitMQ, by event.",
            ["event"],
            registry=r,
        )
        self.events_rejected = Counter(
            f"{p}_events_rejected",
            "Frames that were not valid notifications (sent to quarantine), by reason.",
            ["reason"],
            registry=r,
        )
        self.events_quarantined = Counter(
            f"{p}_events_quarantined",
            "Rejected frames confirmed into the quarantine queue.",
            registry=r,
        )
        self.events_unroutable = Counter(
            f"{p}_events_unroutable",
            "Events no queue was bound for: taken by the alternate exchange, or returned (mandatory).",
            registry=r,
        )
        self.last_event_timestamp = Gauge(
            f"{p}_last_event_timestamp_seconds",
            "Unix time at which the last notification was read off the stream.",
            registry=r,
        )

        # publisher
        self.publish_failures = Counter(
            f"{p}_publish_failures",
            "Publishes not confirmed (retried from the spool), by reason.",
            ["reason"],
            registry=r,
        )
        self.publish_latency = Histogram(
            f"{p}_publish_latency_seconds",
            "From reading the frame off the socket to the broker's confirm.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_in_flight = Gauge(
            f"{p}_publish_in_flight", "Messages published and awaiting a confirm.", registry=r
        )
        self.amqp_connected = Gauge(
            f"{p}_amqp_connected", "1 while the RabbitMQ connection and channel are open.", registry=r
        )
        self.amqp_connects = Counter(
            f"{p}_amqp_connects", "RabbitMQ connections opened (first and reconnects).", registry=r
        )
        self.queue_depth = Gauge(
            f"{p}_queue_messages",
            "Messages waiting in the bridge's own queues (unrouted, quarantine).",
            ["queue"],
            registry=r,
        )

        # spool
        self.spool_depth = Gauge(
            f"{p}_spool_depth", "Events in the spool not yet confirmed by RabbitMQ.", registry=r
        )
        self.spool_bytes = Gauge(f"{p}_spool_bytes", "Payload bytes held in the spool.", registry=r)
        self.spool_full = Gauge(
            f"{p}_spool_full",
            "1 while the spool is at --spool-max-bytes and the stream is not being read.",
            registry=r,
        )

        # Pre-create label sets so dashboards and rate() see zeros, not gaps.
        for label in metric_labels():
            self.events_received.labels(label)
            self.events_published.labels(label)
        for reason in REJECT_REASONS:
            self.events_rejected.labels(reason)
        for failure in PublishFailure:
            self.publish_failures.labels(failure.value)
        for disconnect in DisconnectReason:
            self.stream_disconnects.labels(disconnect.value)
        self.frames_other.labels("text")
        self.frames_other.labels("unknown_type")
