"""Prometheus metrics of the bridge, built on an injected registry.

Every stage reports what happened through an action method of ``Metrics``
(``event_received(kind)``, ``published(n, kind)`` …); this module is the only
one that calls ``.labels()``, and it caches each label child once.
``/metrics`` serves the registry. Names carry the
``orangepill_bridge_`` prefix, counters end in ``_total``, units are base units.
"""

from __future__ import annotations

import asyncio
import enum
import weakref
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from bridge import __version__
from bridge.catalog import metric_labels
from bridge.contract import QUARANTINE_REASONS
from bridge.wire import REJECT_REASONS

# Reasons of messages that can reach the quarantine queue: an oversize frame or a text frame of
# invalid UTF-8 is refused by the WebSocket client, so nothing of it is kept.
_KEPT_REASONS = tuple(r for r in QUARANTINE_REASONS if r not in ("oversize", "invalid_utf8"))

__all__ = ["PREFIX", "DisconnectReason", "InFlightSource", "Metrics", "PublishFailure", "SpoolGauges"]

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
    REFUSED = "refused"  # refused for good, and its quarantine copy too: kept in the spool, retried later


_M = TypeVar("_M", Counter, Gauge)


class InFlightSource(Protocol):
    """What the ``publish_in_flight`` gauge reads: a publisher."""

    @property
    def in_flight(self) -> int:
        """Publishes awaiting a confirm now."""


class SpoolGauges(Protocol):
    """What the ``spool_depth`` and ``spool_bytes`` gauges read: a spool."""

    @property
    def depth(self) -> int:
        """Messages put and not yet confirmed."""

    @property
    def bytes(self) -> int:
        """Body bytes of those messages."""


class _Children(Generic[_M]):
    """The label children of one single-label metric, looked up once each (no lookups per event)."""

    def __init__(self, metric: _M, precreate: tuple[str, ...] = ()) -> None:
        self._metric: _M = metric
        self._children: dict[str, _M] = {}
        for value in precreate:  # so that dashboards and rate() see zeros, not gaps
            self(value)

    def __call__(self, value: str) -> _M:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._metric.labels(value)
        return child


class Metrics:
    """All metrics of one bridge process, registered on ``registry``, with one action method per happening.

    The metric objects stay public attributes (``/metrics`` and the tests read
    them), but code outside this module reports through the action methods.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.build_info = Info(f"{PREFIX}_build", "Version of the bridge.", registry=self.registry)
        self.build_info.info({"version": __version__})
        self._declare_stream()
        self._declare_events()
        self._declare_publisher()
        self._declare_spool()
        self.asyncio_tasks = Gauge(
            f"{PREFIX}_asyncio_tasks", "asyncio tasks alive in the bridge's event loop.", registry=self.registry
        )
        self._declare_ha()
        kinds = tuple(metric_labels())
        self._received = _Children(self.events_received, kinds)
        self._published = _Children(self.events_published, kinds)
        self._rejected = _Children(self.events_rejected, REJECT_REASONS)
        self._quarantined = _Children(self.events_quarantined, _KEPT_REASONS)
        self._failures = _Children(self.publish_failures, tuple(f.value for f in PublishFailure))
        self._disconnects = _Children(self.stream_disconnects, tuple(d.value for d in DisconnectReason))
        self._other = _Children(self.frames_other, ("text", "unknown_type"))
        self._subscribed = _Children(self.subscribed_gauge)
        self._reconnect_delay = _Children(self.stream_reconnect_delay)
        self._realm_rejected = _Children(self.realm_rejected_gauge)
        self._queue_depth = _Children(self.queue_depth_gauge)
        self._leader = _Children(self.leader_gauge)
        self._leader_changes = _Children(self.leader_changes)

    # -- declarations -------------------------------------------------------------

    def _declare_stream(self) -> None:
        p, r = PREFIX, self.registry
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
        self.subscribed_gauge = Gauge(
            f"{p}_subscribed", "1 while the realm's subscription is confirmed.", ["realm"], registry=r
        )
        self.realm_rejected_gauge = Gauge(
            f"{p}_realm_rejected",
            "1 once the stream refused the realm's key after accepting it: that realm stopped, the other realms go on.",
            ["realm"],
            registry=r,
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
            f"{p}_stream_error_frames",
            "error frames from the stream: after subscribing, or answering subscribe (a rejected key excepted).",
            registry=r,
        )

    def _declare_events(self) -> None:
        p, r = PREFIX, self.registry
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
            "Messages confirmed into the quarantine queue, by reason: a rejected frame's reason "
            "(bad_json ...), or unpublishable for an event RabbitMQ refused for good.",
            ["reason"],
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

    def _declare_publisher(self) -> None:
        p, r = PREFIX, self.registry
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
        self._in_flight_sources: weakref.WeakSet[InFlightSource] = weakref.WeakSet()
        self._spool_sources: list[Callable[[], tuple[int, int]]] = []
        self.publish_in_flight.set_function(self._in_flight_total)
        self.amqp_connected = Gauge(
            f"{p}_amqp_connected", "1 while the RabbitMQ connection and channel are open.", registry=r
        )
        self.amqp_connects = Counter(
            f"{p}_amqp_connects", "RabbitMQ connections opened (first and reconnects).", registry=r
        )
        self.amqp_blocked = Gauge(
            f"{p}_amqp_blocked",
            "1 while RabbitMQ blocks publishing on the connection (a memory or disk alarm); events wait in the spool.",
            registry=r,
        )
        self.queue_depth_gauge = Gauge(
            f"{p}_queue_messages",
            "Messages waiting in the bridge's own queues (unrouted, quarantine).",
            ["queue"],
            registry=r,
        )

    def _declare_spool(self) -> None:
        p, r = PREFIX, self.registry
        self.spool_depth = Gauge(
            f"{p}_spool_depth", "Events in the spool not yet confirmed by RabbitMQ.", registry=r
        )
        self.spool_bytes = Gauge(f"{p}_spool_bytes", "Payload bytes held in the spool.", registry=r)
        self.spool_full = Gauge(
            f"{p}_spool_full",
            "1 while the spool is at --spool-max-bytes and the stream is not being read.",
            registry=r,
        )

    def _declare_ha(self) -> None:
        p, r = PREFIX, self.registry
        self.leader_gauge = Gauge(
            f"{p}_leader", "1 while this replica leads (publishes) the realm, 0 while it is a standby.", ["realm"],
            registry=r,
        )
        self.leader_changes = Counter(
            f"{p}_leader_changes", "Role changes of this replica for the realm (promotions and demotions).",
            ["realm"], registry=r,
        )  # fmt: skip

    # -- stream -------------------------------------------------------------------

    def stream_opened(self) -> None:
        """A WebSocket handshake completed."""
        self.stream_connects.inc()

    def disconnected(self, reason: DisconnectReason) -> None:
        """A WebSocket link ended."""
        self._disconnects(reason.value).inc()

    def stream_links(self, all_connected: bool) -> None:
        """Whether every realm's link is open now."""
        self.stream_connected.set(1 if all_connected else 0)

    def subscribed(self, realm: str, subscribed: bool) -> None:
        """Whether a realm's subscription is confirmed now."""
        self._subscribed(realm).set(1 if subscribed else 0)

    def realm_rejected(self, realm: str, rejected: bool = True) -> None:
        """The stream rejected a realm's key (1), or has not (0, set for every realm at start)."""
        self._realm_rejected(realm).set(1 if rejected else 0)

    def reconnect_delay(self, realm: str, seconds: float) -> None:
        """The backoff before a realm's next connect attempt (0 while connected)."""
        self._reconnect_delay(realm).set(seconds)

    def frame_other(self, kind: str) -> None:
        """A frame that is not an event: ``text``, ``unknown_type``, or ``answer``.

        ``answer``: an info, subscribe or unsubscribe frame once the subscription stands.
        """
        self._other(kind).inc()

    def error_frame(self) -> None:
        """An ``error`` frame arrived after the subscription was confirmed."""
        self.stream_errors.inc()

    # -- events -------------------------------------------------------------------

    def event_received(self, kind: str, at: float) -> None:
        """A notification was read off the stream (``kind``: its bounded metric label)."""
        self._received(kind).inc()
        self.last_event_timestamp.set(at)

    def rejected(self, reason: str) -> None:
        """A frame was not a valid notification (it goes to quarantine)."""
        self._rejected(reason).inc()

    # -- publisher ----------------------------------------------------------------

    def published(self, n: int, kind: str, latency: float | None = None) -> None:
        """RabbitMQ confirmed ``n`` events of one kind (``latency``: read-to-confirm seconds)."""
        self._published(kind).inc(n)
        if latency is not None:
            self.publish_latency.observe(latency)

    def confirm_latency(self, latency: float) -> None:
        """Read-to-confirm seconds of one published event (counted by ``published``)."""
        self.publish_latency.observe(latency)

    def quarantined(self, reason: str, latency: float | None = None) -> None:
        """RabbitMQ confirmed a message into the quarantine queue (``reason``: its ``reason`` header)."""
        self._quarantined(reason if reason in QUARANTINE_REASONS else "other").inc()
        if latency is not None:
            self.publish_latency.observe(latency)

    def unroutable(self) -> None:
        """An event no binding took (alternate exchange, or returned)."""
        self.events_unroutable.inc()

    def publish_failed(self, reason: PublishFailure) -> None:
        """A publish was not confirmed; the message goes back to the spool."""
        self._failures(reason.value).inc()

    def count_in_flight(self, source: InFlightSource) -> None:
        """Add ``source.in_flight`` to the ``publish_in_flight`` gauge, which is read when scraped.

        Every publisher of the process counts (one per realm, and those that publish the spool
        files of an earlier run); a publisher that is gone drops out by itself.
        """
        self._in_flight_sources.add(source)

    def _in_flight_total(self) -> float:
        return float(sum(source.in_flight for source in list(self._in_flight_sources)))

    def amqp_up(self, up: bool) -> None:
        """Whether the RabbitMQ connection and its channel are usable now."""
        self.amqp_connected.set(1 if up else 0)

    def watch_blocked(self, blocked: Callable[[], bool]) -> None:
        """Read ``amqp_blocked`` from ``blocked`` whenever scraped (RabbitMQ's connection.blocked state)."""
        self.amqp_blocked.set_function(lambda: 1.0 if blocked() else 0.0)

    def amqp_connect(self) -> None:
        """A RabbitMQ connection was made (first or reconnect)."""
        self.amqp_connects.inc()

    def queue_depth(self, name: str, n: int) -> None:
        """Messages waiting in one of the bridge's own queues (``unrouted``, ``quarantine``)."""
        self._queue_depth(name).set(n)

    # -- spool --------------------------------------------------------------------

    def watch_spools(self, spools: Iterable[SpoolGauges]) -> None:
        """Read ``spool_depth`` and ``spool_bytes`` from these spools (summed) whenever scraped.

        Read, not pushed: an ack of a message confirmed before its commit changes both and
        writes nothing, so no commit (and no report) follows it; a pushed value kept counting it.
        """
        held = tuple(spools)
        extra = self._spool_sources
        self.spool_depth.set_function(lambda: float(sum(s.depth for s in held) + sum(f()[0] for f in extra)))
        self.spool_bytes.set_function(lambda: float(sum(s.bytes for s in held) + sum(f()[1] for f in extra)))

    def add_spool_source(self, totals: Callable[[], tuple[int, int]]) -> None:
        """Count ``totals()`` (depth, bytes) in ``spool_depth``/``spool_bytes`` too: spool files of an earlier run."""
        self._spool_sources.append(totals)

    def spool_full_now(self, full: bool) -> None:
        """Whether a spool is full (the spools' observer, called on every change)."""
        self.spool_full.set(1 if full else 0)

    # -- process ------------------------------------------------------------------

    def watch_tasks(self, loop: asyncio.AbstractEventLoop) -> None:
        """Report the number of live asyncio tasks of ``loop`` at every scrape (served on that loop)."""
        self.asyncio_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
    # -- high availability ---------------------------------------------------------

    def realm_role(self, realm: str, leader: bool) -> None:
        """This replica's role for a realm now (creates the series at 0 for a standby)."""
        self._leader(realm).set(1 if leader else 0)
        self._leader_changes(realm)

    def leader_changed(self, realm: str, leader: bool) -> None:
        """This replica was promoted (``leader``) or demoted for a realm."""
        self._leader(realm).set(1 if leader else 0)
        self._leader_changes(realm).inc()
