"""Publishing from the spool to RabbitMQ with a window of unconfirmed publishes.

A message leaves the spool only when RabbitMQ confirmed it. Anything else (a
nack, a timeout, a channel closed by a broker outage) puts it back for a retry.
The connection, its state and the topology are ``bridge.broker``'s; this
module is only the confirm window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import aiormq
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage

from bridge.broker import Broker
from bridge.config import Settings
from bridge.contract import KIND_EVENT, Outbound, amqp_properties
from bridge.metrics import Metrics, PublishFailure
from bridge.spool import Spooled

__all__ = ["MessageSource", "Publisher"]


class MessageSource(Protocol):
    """The spool, as the publisher sees it."""

    async def get_batch(self, max_n: int) -> list[Spooled]:
        """Wait for committed messages and hand out up to ``max_n`` in order."""

    def ack(self, ids: Iterable[int]) -> None:
        """Confirmed: remove for good."""

    def release(self, items: Iterable[Spooled]) -> None:
        """Not confirmed: hand out again first."""


class Publisher:
    """Moves messages from the spool to RabbitMQ with a window of unconfirmed publishes."""

    def __init__(
        self,
        settings: Settings,
        source: MessageSource,
        metrics: Metrics,
        broker: Broker,
        *,
        on_confirmed: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_confirmed = on_confirmed  # called with each confirmed message_id (HA announcements)
        self._halted = False
        self._source = source
        self._metrics = metrics
        self._broker = broker
        self._exchange = broker.topology.exchange
        self._raw: RawChannel | None = None
        self._window = asyncio.Semaphore(settings.confirm_window)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._failure_pause = 0.0
        broker.reconnected_callbacks.append(self._on_reconnected)

    @property
    def in_flight(self) -> int:
        """Publishes awaiting a confirm."""
        return len(self._in_flight)

    def _on_reconnected(self) -> None:
        self._failure_pause = 0.0

    def halt(self) -> None:
        """Stop publishing now (demotion): no new publish leaves, whatever is already handed out goes back.

        Publishes already written to the channel settle as usual (acked when confirmed, else released).
        The caller also cancels ``run``; the next ``run`` publishes again.
        """
        self._halted = True

    async def run(self, stop: asyncio.Event) -> None:
        """Publish from the spool until ``stop`` is set (the caller then calls ``drain``).

        Stop cancels this loop wherever it waits: one cancellation instead of racing
        every wait against the stop event (that race cost a task and a wait per event).
        """
        task = asyncio.current_task()
        assert task is not None
        self._halted = False
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda done: None if done.cancelled() else task.cancel())
        try:
            while True:
                if not self._broker.connected:
                    await self._broker.wait_up()
                    continue
                if self._failure_pause:
                    await asyncio.sleep(self._failure_pause)
                await self._publish_batch()
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            task.uncancel()  # the stop we asked for, not a cancellation from outside
        finally:
            stopper.cancel()

    async def _publish_batch(self) -> None:
        """Take as many messages as the window has room for and start a publish task for each."""
        await self._window.acquire()
        try:
            if self._raw is None or self._raw.is_closed:
                # aio-pika reopens channels after a reconnect; publish on the current one.
                self._raw = await self._broker.raw_channel()
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
        self._metrics.in_flight(len(self._in_flight))
        if not batch:
            self._window.release()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if not self._in_flight:
            self._metrics.in_flight(0)

    async def _publish(self, item: Spooled) -> None:
        """Publish one message and settle it with the spool: ack when confirmed, release otherwise."""
        failure: PublishFailure | None = None
        if self._halted:  # demoted after the batch was taken: this one never leaves
            self._window.release()
            self._source.release([item])
            return
        try:
            await self._send(self._raw, item.msg)
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
            self._metrics.publish_failed(failure)
            self._failure_pause = min(5.0, max(0.05, self._failure_pause * 2))
            self._source.release([item])
            return
        self._failure_pause = 0.0
        self._source.ack([item.id])
        msg = item.msg
        if self._on_confirmed is not None:
            self._on_confirmed(msg.message_id)
        latency = max(0.0, time.time() - msg.received_at)
        if msg.kind == KIND_EVENT:
            self._metrics.published(1, msg.metric_kind, latency)
        else:
            self._metrics.quarantined(latency)

    async def _send(self, raw: RawChannel | None, msg: Outbound) -> None:
        """Publish and wait for the confirm; raises when it was not confirmed."""
        if raw is None or raw.is_closed:
            raise ConnectionError("not connected")
        is_event = msg.kind == KIND_EVENT
        result = await raw.basic_publish(
            msg.body,
            exchange=self._exchange if is_event else "",
            routing_key=msg.routing_key if is_event else self._broker.topology.quarantine,
            properties=amqp_properties(msg),
            mandatory=True,
            timeout=self._settings.publish_timeout,
        )
        if is_event and isinstance(result, DeliveredMessage):
            # Returned: no queue and no alternate exchange took it.
            self._metrics.unroutable()
            if self._settings.unroutable == "keep":
                await self._keep_unrouted(raw, msg)

    async def _keep_unrouted(self, raw: RawChannel, msg: Outbound) -> None:
        """Move a returned event to the unrouted queue, keeping its original routing key."""
        result = await raw.basic_publish(
            msg.body,
            exchange="",
            routing_key=self._broker.topology.unrouted,
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
