"""The RabbitMQ side: topology, and publishing from the spool with pipelined confirms.

A message leaves the spool only when RabbitMQ confirmed it. Anything else (a
nack, a timeout, a channel closed by a broker outage) puts it back for a retry.
Reconnection is aio-pika's robust connection; this module only adds the
first-connect retry (``connect_robust`` raises when the broker is down at start)
and the gate that stops publishing while the link is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
    ExchangeType,
)
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from bridge.bindings import declare_bindings
from bridge.catalog import metric_labels
from bridge.config import Settings, redact_url
from bridge.errors import TopologyError
from bridge.metrics import Metrics, PublishFailure
from bridge.protocol import KIND_EVENT, Outbound
from bridge.spool import Spooled
from bridge.stream import Backoff

__all__ = ["MessageSource", "Publisher", "Topology", "amqp_properties", "declare_topology"]

log = logging.getLogger(__name__)

_QUEUE_POLL_INTERVAL = 10.0
_APP_ID = "orangepill-bridge"


class MessageSource(Protocol):
    """The spool, as the publisher sees it."""

    async def get_batch(self, max_n: int) -> list[Spooled]:
        """Wait for committed messages and hand out up to ``max_n`` in order."""

    def ack(self, ids: Iterable[int]) -> None:
        """Confirmed: remove for good."""

    def release(self, items: Iterable[Spooled]) -> None:
        """Not confirmed: hand out again first."""


class Topology:
    """Names of everything the bridge declares on RabbitMQ."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.unrouted = f"{exchange}.unrouted"
        self.quarantine = f"{exchange}.quarantine"


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
        app_id=_APP_ID,
    )


async def declare_topology(
    connection: AbstractConnection, settings: Settings, *, confirms: bool
) -> tuple[AbstractChannel, AbstractExchange, bool]:
    """Declare the exchange, the quarantine queue and (with ``keep``) the alternate exchange and queue.

    Returns:
        The channel to publish on, the topic exchange, and whether the
        alternate exchange is attached (False when the exchange already existed
        without it: returned events are then moved to the unrouted queue by us).

    Raises:
        TopologyError: the exchange cannot be used at all.
    """
    names = Topology(settings.exchange)
    keep = settings.unroutable == "keep"
    channel = await connection.channel(publisher_confirms=confirms, on_return_raises=False)
    await channel.declare_queue(names.quarantine, durable=True)
    arguments: dict[str, Any] = {}
    if keep:
        unrouted_x = await channel.declare_exchange(names.unrouted, ExchangeType.FANOUT, durable=True)
        unrouted_q = await channel.declare_queue(names.unrouted, durable=True)
        await unrouted_q.bind(unrouted_x)
        arguments["alternate-exchange"] = names.unrouted
    try:
        exchange = await channel.declare_exchange(
            names.exchange, ExchangeType.TOPIC, durable=True, arguments=arguments or None
        )
        return channel, exchange, keep
    except aiormq.exceptions.ChannelPreconditionFailed:
        # The exchange exists with other arguments (no alternate exchange, or another type).
        log.warning(
            "exchange %s already exists with different arguments; using it as it is. Unroutable "
            "events are still kept: the bridge publishes with mandatory and moves returned events "
            "to queue %s itself. To attach the alternate exchange on the broker instead, use a "
            "policy: rabbitmqctl set_policy AE '^%s$' '{\"alternate-exchange\":\"%s\"}' "
            "--apply-to exchanges",
            names.exchange, names.unrouted, names.exchange.replace(".", "\\."), names.unrouted,
        )  # fmt: skip
    channel = await connection.channel(publisher_confirms=confirms, on_return_raises=False)
    try:
        exchange = await channel.get_exchange(names.exchange, ensure=True)
    except aiormq.exceptions.AMQPError as exc:
        raise TopologyError(f"exchange {names.exchange} cannot be used: {_describe(exc)}") from None
    return channel, exchange, False


class Publisher:
    """Moves messages from the spool to RabbitMQ with a window of unconfirmed publishes."""

    def __init__(self, settings: Settings, source: MessageSource, metrics: Metrics) -> None:
        self._settings = settings
        self._source = source
        self._metrics = metrics
        self.topology = Topology(settings.exchange)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._raw: RawChannel | None = None
        self._alternate_active = False
        self._up = asyncio.Event()
        self._window = asyncio.Semaphore(settings.confirm_window)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._in_flight_gauge = metrics.publish_in_flight
        self._failure_pause = 0.0
        self._closing = False
        self._published = {label: metrics.events_published.labels(label) for label in metric_labels()}
        self._failures = {f: metrics.publish_failures.labels(f.value) for f in PublishFailure}
        self.last_error = "not connected yet"

    @property
    def connected(self) -> bool:
        """True while the connection and channel are open."""
        return self._up.is_set()

    @property
    def in_flight(self) -> int:
        """Publishes awaiting a confirm."""
        return len(self._in_flight)

    # -- connection ---------------------------------------------------------------

    async def connect(self, stop: asyncio.Event) -> bool:
        """Connect (retrying with backoff while the broker is down) and declare the topology.

        Returns:
            False when ``stop`` was set before a connection was made.

        Raises:
            TopologyError: RabbitMQ refused the layout in a way a retry cannot fix.
        """
        backoff = Backoff(self._settings.reconnect_min, self._settings.reconnect_max, float("inf"))
        url = self._settings.amqp_url
        while not stop.is_set():
            try:
                connection = await aio_pika.connect_robust(
                    url,
                    reconnect_interval=1.0,
                    client_properties={"connection_name": _APP_ID},
                    timeout=10,
                )
            except (aiormq.exceptions.AMQPError, OSError, ConnectionError, TimeoutError) as exc:
                delay = backoff.next_delay(None)
                self.last_error = f"broker unreachable at {_host_port(url)}: {_describe(exc)}"
                log.warning("broker down: %s; retrying in %.1fs", self.last_error, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                continue
            self._connection = connection
            connection.close_callbacks.add(self._on_connection_lost)
            connection.reconnect_callbacks.add(self._on_reconnected)
            try:
                await self._declare(connection)
            except BaseException:
                await connection.close()
                raise
            self._metrics.amqp_connects.inc()
            self._set_up(True)
            log.info(
                "broker up url=%s exchange=%s alternate_exchange=%s",
                redact_url(url), self.topology.exchange, self._alternate_active,
            )  # fmt: skip
            return True
        return False

    async def _declare(self, connection: AbstractRobustConnection) -> None:
        channel, _, alternate = await declare_topology(connection, self._settings, confirms=True)
        self._channel, self._alternate_active = channel, alternate
        if self._settings.bindings:
            side = await connection.channel()
            try:
                await declare_bindings(side, self._settings.exchange, self._settings.bindings)
            finally:
                await side.close()
        if alternate:
            await self._tap_unrouted(connection)

    async def _tap_unrouted(self, connection: AbstractRobustConnection) -> None:
        """Count events the alternate exchange takes.

        RabbitMQ confirms an event routed to the alternate exchange like any
        other, so the publisher never hears of it. A private queue bound to the
        (fanout) alternate exchange sees a copy of each; the bridge counts and
        drops the copies, the originals stay in ``<exchange>.unrouted``.
        """
        channel = await connection.channel()
        tap = await channel.declare_queue(
            f"{self.topology.unrouted}.tap.{uuid.uuid4().hex[:8]}",
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": 10_000},
        )
        await tap.bind(self.topology.unrouted)
        counter = self._metrics.events_unroutable

        async def count(message: AbstractIncomingMessage) -> None:
            counter.inc()

        await tap.consume(count, no_ack=True)

    def _set_up(self, up: bool) -> None:
        if up:
            self._up.set()
            self.last_error = ""
        else:
            self._up.clear()
        self._metrics.amqp_connected.set(1 if up else 0)

    def _on_connection_lost(self, _sender: object, exc: BaseException | None = None) -> None:
        if self._up.is_set() and not self._closing:
            self.last_error = f"broker connection lost: {_describe(exc) if exc else 'closed'}"
            log.warning("broker down: %s; aio-pika reconnects every 1s", self.last_error)
        self._set_up(False)

    def _on_reconnected(self, _sender: object) -> None:
        self._failure_pause = 0.0
        self._metrics.amqp_connects.inc()
        self._set_up(True)
        log.info("broker up again url=%s", redact_url(self._settings.amqp_url))

    # -- publishing ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Publish from the spool until ``stop`` is set (the caller then calls ``drain``).

        Stop cancels this loop wherever it waits: one cancellation instead of racing
        every wait against the stop event (that race cost a task and a wait per event).
        """
        task = asyncio.current_task()
        assert task is not None
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda done: None if done.cancelled() else task.cancel())
        try:
            while True:
                if not self._up.is_set():
                    await self._up.wait()
                    continue
                if self._failure_pause:
                    await asyncio.sleep(self._failure_pause)
                await self._window.acquire()
                try:
                    if self._raw is None or self._raw.is_closed:
                        # aio-pika reopens channels after a reconnect; publish on the current one.
                        self._raw = await self._refresh_raw()
                    # One slot is held; every in-flight publish holds one until it is confirmed
                    # (released before it leaves _in_flight), so at least this many are free.
                    free = max(1, self._settings.confirm_window - len(self._in_flight))
                    batch = await self._source.get_batch(free)
                except BaseException:
                    self._window.release()
                    raise
                # Free by construction: these acquires never wait, so no cancellation lands
                # between taking the batch and handing every item to a publish task.
                for _ in batch[1:]:
                    await self._window.acquire()
                for item in batch:
                    publish = asyncio.create_task(self._publish(item))
                    self._in_flight.add(publish)
                    publish.add_done_callback(self._task_done)
                self._in_flight_gauge.set(len(self._in_flight))
                if not batch:
                    self._window.release()
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            task.uncancel()  # the stop we asked for, not a cancellation from outside
        finally:
            stopper.cancel()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if not self._in_flight:
            self._in_flight_gauge.set(0)

    async def _publish(self, item: Spooled) -> None:
        msg = item.msg
        raw = self._raw
        failure: PublishFailure | None = None
        timeout = self._settings.publish_timeout
        try:
            if raw is None or raw.is_closed:
                raise ConnectionError("not connected")
            if msg.kind == KIND_EVENT:
                result = await raw.basic_publish(
                    msg.body,
                    exchange=self.topology.exchange,
                    routing_key=msg.routing_key,
                    properties=amqp_properties(msg),
                    mandatory=True,
                    timeout=timeout,
                )
                if isinstance(result, DeliveredMessage):
                    # Returned: no queue and no alternate exchange took it.
                    self._metrics.events_unroutable.inc()
                    if self._settings.unroutable == "keep":
                        await self._keep_unrouted(raw, msg)
            else:
                await raw.basic_publish(
                    msg.body,
                    exchange="",
                    routing_key=self.topology.quarantine,
                    properties=amqp_properties(msg),
                    mandatory=True,
                    timeout=timeout,
                )
                self._metrics.events_quarantined.inc()
        except aiormq.exceptions.DeliveryError:
            failure = PublishFailure.NACK
        except TimeoutError:
            failure = PublishFailure.TIMEOUT
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError):
            failure = PublishFailure.CHANNEL
        except asyncio.CancelledError:
            self._source.release([item])
            raise
        finally:
            self._window.release()
        if failure is not None:
            self._failures[failure].inc()
            self._failure_pause = min(5.0, max(0.05, self._failure_pause * 2))
            self._source.release([item])
            return
        self._failure_pause = 0.0
        self._source.ack([item.id])
        self._metrics.publish_latency.observe(max(0.0, time.time() - msg.received_at))
        if msg.kind == KIND_EVENT:
            child = self._published.get(msg.label)
            if child is None:
                child = self._published[msg.label] = self._metrics.events_published.labels(msg.label)
            child.inc()

    async def _refresh_raw(self) -> RawChannel | None:
        channel = self._channel
        if channel is None or not self._up.is_set():
            return None
        try:
            return await asyncio.wait_for(channel.get_underlay_channel(), timeout=5)
        except (TimeoutError, aiormq.exceptions.AMQPError, RuntimeError):
            return None

    async def _keep_unrouted(self, raw: RawChannel, msg: Outbound) -> None:
        """Move a returned event to the unrouted queue, keeping its original routing key."""
        result = await raw.basic_publish(
            msg.body,
            exchange="",
            routing_key=self.topology.unrouted,
            properties=amqp_properties(msg, {"original_routing_key": msg.routing_key}),
            mandatory=True,
            timeout=self._settings.publish_timeout,
        )
        if isinstance(result, DeliveredMessage):
            raise aiormq.exceptions.DeliveryError(None, None)

    async def drain(self, grace: float) -> int:
        """Wait for outstanding confirms; what is still unconfirmed stays in the spool.

        Returns:
            How many publishes were still unconfirmed when the timeout ran out.
        """
        pending = set(self._in_flight)
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
            return len(still)
        return 0

    async def close(self) -> None:
        """Close the RabbitMQ connection."""
        self._closing = True
        connection = self._connection
        self._connection = None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()
        self._set_up(False)

    async def poll_queues(self, stop: asyncio.Event) -> None:
        """Export the depth of the unrouted and quarantine queues, on a channel of its own."""
        names = (self.topology.unrouted, self.topology.quarantine)
        while not stop.is_set():
            if self._up.is_set() and self._connection is not None:
                try:
                    channel = await self._connection.channel()
                    try:
                        for name in names:
                            if name == self.topology.unrouted and self._settings.unroutable != "keep":
                                continue
                            queue = await channel.declare_queue(name, passive=True)
                            count = queue.declaration_result.message_count or 0
                            self._metrics.queue_depth.labels(name.rsplit(".", 1)[1]).set(count)
                    finally:
                        await channel.close()
                except Exception:  # a depth gauge must never take the bridge down
                    log.debug("queue depth poll failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=_QUEUE_POLL_INTERVAL)


def _host_port(url: str) -> str:
    """``host:port`` of a broker URL: never the user name or password (shown in /readyz)."""
    parts = urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    host = parts.hostname or "?"
    return f"[{host}]:{parts.port or default}" if ":" in host else f"{host}:{parts.port or default}"


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
