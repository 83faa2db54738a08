"""Publishing from the spool to RabbitMQ with a window of unconfirmed publishes.

A message leaves the spool only when RabbitMQ confirmed it. Anything else (a
nack, a timeout, a channel closed by a broker outage) puts it back for a retry,
except a poison message: one RabbitMQ refuses for a reason a retry cannot fix
(headers above ``frame_max``, a 501/502/505 connection close or a 406 channel
close that follows it when sent alone, or nacks while others are confirmed).
That one is moved to the quarantine queue, so the events behind it flow on.
The connection, its state and the topology are ``bridge.broker``'s; this
module is only the confirm window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

import aiormq
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage

from bridge.broker import Broker
from bridge.config import Settings
from bridge.contract import KIND_EVENT, Outbound, amqp_properties, header_frame_bytes, unpublishable_message
from bridge.metrics import Metrics, PublishFailure
from bridge.spool import Spooled

__all__ = ["MessageSource", "Publisher"]

log = logging.getLogger(__name__)

# Refusals that a message itself can cause and a retry cannot fix: the broker closed the
# connection over a frame (501 FRAME_ERROR, 502 SYNTAX_ERROR, 505 UNEXPECTED_FRAME) or the
# channel over a precondition (406, e.g. a message above max_message_size).
_REFUSED_FOR_GOOD: Final = (
    aiormq.exceptions.ConnectionFrameError,
    aiormq.exceptions.ConnectionSyntaxError,
    aiormq.exceptions.ConnectionUnexpectedFrame,
    aiormq.exceptions.ChannelPreconditionFailed,
)
# Nacks of one message, while others were confirmed, before it counts as poison; and
# for at least this long, so that a queue that is full for a while (x-overflow
# reject-publish) is waited out rather than quarantined.
_POISON_NACKS: Final = 5
_POISON_NACK_SPAN: Final = 60.0


class _Unpublishable(Exception):
    """Internal: this message cannot be sent as it is (found before sending it)."""


@dataclass(slots=True)
class _Strikes:
    """Refusals of one spooled message, and how many confirms there had been at the first."""

    count: int
    confirmed_at: int
    since: float


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
        self._confirmed = 0  # confirms so far: "others get confirmed" for the nack rule
        self._strikes: dict[int, _Strikes] = {}  # spool id -> refusals, while it is retried
        self._suspects: set[int] = set()  # in flight when the broker refused for good: resent alone
        self._condemned: dict[int, str] = {}  # poison, to quarantine when handed out again: why

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
        """Take as many messages as the window has room for and start a publish task for each.

        After a refusal for good, the messages that were in flight are resent one
        at a time, so the one that causes it is known (and quarantined).
        """
        if self._suspects and self._in_flight:
            await asyncio.wait(set(self._in_flight))
        await self._window.acquire()
        try:
            if self._raw is None or self._raw.is_closed:
                # aio-pika reopens channels after a reconnect; publish on the current one.
                self._raw = await self._broker.raw_channel()
            # One slot is held; every in-flight publish holds one until it is confirmed
            # (released before it leaves _in_flight), so at least this many are free.
            free = 1 if self._suspects else max(1, self._settings.confirm_window - len(self._in_flight))
            batch = await self._source.get_batch(free)
            if self._suspects and batch and batch[0].id not in self._suspects:
                # Released messages come back first: the suspects are all settled (or gone).
                self._suspects.clear()
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
        poison: str | None = None
        alone = len(self._in_flight) <= 1
        isolated = item.id in self._suspects
        condemned = self._condemned.pop(item.id, None)
        if condemned is not None:
            self._window.release()
            await self._quarantine(item, condemned)
            return
        try:
            await self._send(self._raw, item.msg)
        except _Unpublishable as exc:
            poison = str(exc)
        except aiormq.exceptions.DeliveryError:
            failure = PublishFailure.NACK
            poison = self._strike(item.id, "nacked", nack=True)
        except TimeoutError:
            failure = PublishFailure.TIMEOUT
        except _REFUSED_FOR_GOOD as exc:
            failure = PublishFailure.CHANNEL
            self._suspects.add(item.id)
            poison = self._strike(item.id, f"refused ({type(exc).__name__}: {exc})", alone=alone)
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError):
            failure = PublishFailure.CHANNEL
        except asyncio.CancelledError:
            self._source.release([item])
            raise
        finally:
            self._window.release()
            if isolated and failure is None and poison is None:
                self._suspects.discard(item.id)
        if failure is not None:
            self._metrics.publish_failed(failure)
        if poison is not None and failure is PublishFailure.CHANNEL:
            # The refusal closed the connection or channel: quarantine it once reconnected.
            self._condemned[item.id] = poison
            self._source.release([item])
            return
        if poison is not None:
            await self._quarantine(item, poison)
            return
        if failure is not None:
            self._failure_pause = min(5.0, max(0.05, self._failure_pause * 2))
            self._source.release([item])
            return
        self._failure_pause = 0.0
        self._confirmed += 1
        self._strikes.pop(item.id, None)
        self._source.ack([item.id])
        msg = item.msg
        if self._on_confirmed is not None:
            self._on_confirmed(msg.message_id)
        latency = max(0.0, time.time() - msg.received_at)
        if msg.kind == KIND_EVENT:
            self._metrics.published(1, msg.metric_kind, latency)
        else:
            self._metrics.quarantined(latency)

    def _strike(self, spool_id: int, what: str, *, nack: bool = False, alone: bool = False) -> str | None:
        """Count one refusal of a message; returns why it is poison, or None to retry it.

        A refusal for good that happens again while the message is the only one in
        flight is the message's own doing; a nack is, after ``_POISON_NACKS`` of them
        over at least ``_POISON_NACK_SPAN`` seconds while other messages were confirmed.
        """
        strikes = self._strikes.setdefault(spool_id, _Strikes(0, self._confirmed, time.monotonic()))
        strikes.count += 1
        if nack:
            lasted = time.monotonic() - strikes.since
            others_confirmed = self._confirmed > strikes.confirmed_at
            if strikes.count >= _POISON_NACKS and lasted >= _POISON_NACK_SPAN and others_confirmed:
                return f"{what} {strikes.count} times in a row while other messages were confirmed"
            return None
        if alone and strikes.count >= 2:
            return f"{what}, {strikes.count} times, the last time alone in flight"
        return None

    async def _quarantine(self, item: Spooled, why: str) -> None:
        """Move a poison message to the quarantine queue (bounded headers, body as it was)."""
        msg = item.msg
        copy = unpublishable_message(msg, why)
        try:
            await self._send(self._raw, copy)
        except (_Unpublishable, aiormq.exceptions.AMQPError, TimeoutError, ConnectionError, OSError, RuntimeError):
            log.warning(
                "could not move a poison message to quarantine yet (message_id=%s)", msg.message_id, exc_info=True
            )
            self._condemned[item.id] = why
            self._source.release([item])
            return
        self._strikes.pop(item.id, None)
        self._suspects.discard(item.id)
        self._condemned.pop(item.id, None)
        self._source.ack([item.id])
        self._metrics.quarantined(max(0.0, time.time() - msg.received_at))
        log.error(
            "RabbitMQ refuses an event for good: moved to the quarantine queue %s "
            "(routing key %s, message_id=%s, %d body bytes): %s",
            self._broker.topology.quarantine, msg.routing_key, msg.message_id, len(msg.body), why,
        )  # fmt: skip

    async def _send(self, raw: RawChannel | None, msg: Outbound) -> None:
        """Publish and wait for the confirm; raises when it was not confirmed.

        Raises:
            _Unpublishable: the header frame would exceed the connection's frame_max.
        """
        if raw is None or raw.is_closed:
            raise ConnectionError("not connected")
        is_event = msg.kind == KIND_EVENT
        properties = amqp_properties(msg)
        frame_max = _frame_max(raw)
        if frame_max and (size := header_frame_bytes(properties)) > frame_max:
            raise _Unpublishable(
                f"its AMQP header frame of {size} bytes exceeds the connection's frame_max of {frame_max}"
            )
        result = await raw.basic_publish(
            msg.body,
            exchange=self._exchange if is_event else "",
            routing_key=msg.routing_key if is_event else self._broker.topology.quarantine,
            properties=properties,
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


def _frame_max(raw: RawChannel) -> int:
    """The frame_max negotiated on the channel's connection (0: unknown or unlimited)."""
    tune = getattr(getattr(raw, "connection", None), "connection_tune", None)
    value = getattr(tune, "frame_max", 0)
    return value if isinstance(value, int) else 0
