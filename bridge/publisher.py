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
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiormq
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import ChannelFrame, ConfirmationFrameType, DeliveredMessage
from aiormq.channel import Channel, Returning
from pamqp import commands as spec

from bridge.broker import Broker, connection_blocked
from bridge.config import Settings
from bridge.contract import (
    KIND_EVENT,
    ORIGINAL_ROUTING_KEY,
    UNPUBLISHABLE,
    Outbound,
    amqp_properties,
    header_frame_bytes,
    properties_bytes,
    publish_frames,
    unpublishable_message,
)
from bridge.metrics import Metrics, PublishFailure
from bridge.spool import Spooled

__all__ = ["ConfirmRouter", "MessageSource", "Publisher"]

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
# A nack is never the message's own fault (a queue bound to it refuses it: full with x-overflow
# reject-publish, or a quorum queue without a majority), so it is retried for as long as it takes,
# each time later (per message: other messages' confirms do not shorten it). Retried at once, one
# event refused by one full queue went out ~30 times a second, and every copy reached the queues
# that did accept it.
_NACK_RETRY_FIRST: Final = 0.25
_NACK_RETRY_MAX: Final = 30.0
_NACK_WARN_AFTER: Final = 60.0  # a WARNING once a message has been refused this long
# An event refused for good whose quarantine copy is refused too (its body is above the broker's
# max_message_size, say) can go nowhere on this broker: it stays in the spool and is tried again,
# alone, each time later. Tried at once it closed the channel every 3 s, and every publish in flight
# on it was refused with it, so the events behind it never went out.
_PARK_FIRST: Final = 30.0
_PARK_MAX: Final = 600.0


class _Unpublishable(Exception):
    """Internal: this message cannot be sent as it is (found before sending it)."""


@dataclass(slots=True)
class _Strikes:
    """Refusals of one spooled message, and when the first one came."""

    count: int
    since: float
    warned: bool = False
    parked: int = 0  # times its quarantine copy was refused for good too
    move_warned: bool = False  # a WARNING said its move to the quarantine failed (link down, channel reopening)
    logged: float = 0.0  # monotonic time of the last ERROR about it


class MessageSource(Protocol):
    """The spool, as the publisher sees it."""

    async def get_batch(self, max_n: int) -> list[Spooled]:
        """Wait for committed messages and hand out up to ``max_n`` in order."""

    def ack(self, ids: Iterable[int]) -> None:
        """Confirmed: remove for good."""

    def release(self, items: Iterable[Spooled]) -> None:
        """Not confirmed: hand out again first."""


class _Slot:
    """One publish written to the channel and not settled yet.

    It stands in aiormq's ``confirmations`` map where ``basic_publish`` would put a
    future: aiormq calls ``set_result`` (ack, or the returned message) or
    ``set_exception`` (nack), and skips it once ``done()``. No future, no task.
    """

    __slots__ = ("batch", "done_", "item", "owner", "tag")

    def __init__(self, owner: Publisher, item: Spooled, batch: _Batch, tag: int) -> None:
        self.owner = owner
        self.item = item
        self.batch = batch
        self.tag = tag
        self.done_ = False

    def done(self) -> bool:
        return self.done_

    def cancelled(self) -> bool:  # aiormq logs a late confirm of a settled slot at DEBUG only then
        return self.done_

    def set_result(self, result: object) -> None:
        self.owner._settle(self, result)

    def set_exception(self, exc: BaseException) -> None:
        self.owner._settle(self, exc)

    def cancel(self) -> bool:
        return False


class _Batch:
    """Publishes written in one transport write: one timeout timer for all of them."""

    __slots__ = ("blocked", "left", "raw", "timer")

    def __init__(self, raw: Channel, left: int) -> None:
        self.raw = raw
        self.left = left
        self.timer: asyncio.TimerHandle | None = None
        self.blocked = False  # its timeout ran out while RabbitMQ blocked the connection


class ConfirmRouter:
    """Settles the publisher confirms of one channel in O(confirmed), synchronously.

    aiormq's own handler answers an ack with ``multiple=True`` by scanning every
    unconfirmed delivery tag of the channel and scheduling a loop callback per tag
    it covers (again for a tag a previous frame of the same read already covered).
    With 256 publishes in flight and RabbitMQ acking every second or third publish,
    a profile at full speed counted 165,383 settle calls for 60,000 events, and 1.53 s
    of confirm handling where this router takes 0.72 s. This one pops the covered
    tags from the front of the channel's ``confirmations`` map (tags go in in
    increasing order) and settles each at once, with aiormq's rules: a ``Returning``
    marker is dropped, a settled slot or future is skipped, an ack sets the result,
    a nack sets ``DeliveryError``.

    aiormq re-inserts a returned publish's tag at the end of the map (as a
    ``Returning`` marker), out of order; after a return, confirms scan the whole
    map until no marker is left.
    """

    __slots__ = ("_confirmations", "_on_return", "returning")

    def __init__(self, raw: Channel) -> None:
        self._confirmations = raw.confirmations
        self._on_return = raw._on_return_frame
        self.returning = False  # a Returning marker may sit out of order in the map
        # aiormq's channel reader awaits these two through the instance: these replace them.
        raw._on_confirm_frame = self.on_confirm  # type: ignore[method-assign]
        raw._on_return_frame = self.on_return  # type: ignore[method-assign]

    async def on_return(self, frame: spec.Basic.Return) -> None:
        """A publish came back (mandatory, unroutable): aiormq's handler, then mark the map."""
        self.returning = True
        await self._on_return(frame)

    async def on_confirm(self, frame: ConfirmationFrameType) -> None:
        """An ack or nack from RabbitMQ, for one tag or (``multiple``) every tag up to it."""
        self.settle(frame)

    def settle(self, frame: ConfirmationFrameType) -> None:
        """Settle what ``frame`` covers (synchronous: no callback per tag)."""
        confirmations = self._confirmations
        tag = frame.delivery_tag
        if tag not in confirmations:
            log.error("Unexpected confirmation frame %r from broker", frame)
            return
        if not getattr(frame, "multiple", False):
            self._deliver(tag, frame)
            return
        while confirmations:
            first = next(iter(confirmations))
            if first > tag:
                break
            self._deliver(first, frame)
        if self.returning:
            covered = [t for t in confirmations if t <= tag]
            for t in covered:
                self._deliver(t, frame)
            self.returning = any(isinstance(c, Returning) for c in confirmations.values())

    def _deliver(self, tag: int, frame: ConfirmationFrameType) -> None:
        confirmation = self._confirmations.pop(tag)
        if isinstance(confirmation, Returning):
            return
        if confirmation.done():  # a publish timeout or a cancellation came first
            level = logging.DEBUG if confirmation.cancelled() else logging.WARNING
            log.log(level, "Delivery tag %r confirmed %r was ignored", tag, frame)
            return
        if isinstance(frame, spec.Basic.Ack):
            confirmation.set_result(frame)
        else:
            confirmation.set_exception(aiormq.exceptions.DeliveryError(None, frame))


class Publisher:
    """Moves messages from the spool to RabbitMQ with a window of unconfirmed publishes.

    The publishes of one batch are encoded by ``bridge.contract.publish_frames`` and
    go to aiormq's connection writer as one write; each holds a ``_Slot`` in the
    channel's ``confirmations`` map, so aiormq's reader settles them (multiple=True
    acks included) without a future or a task per message. A channel that closes
    settles every slot still open as a failure: those go back to the spool.
    """

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
        self._raw: Channel | None = None
        self._open: dict[_Slot, None] = {}  # written, not settled, in tag order
        self._room = asyncio.Event()  # the window has room
        self._room.set()
        self._idle = asyncio.Event()  # nothing open
        self._idle.set()
        self._side: set[asyncio.Task[None]] = set()  # quarantine / unrouted moves (rare)
        self._acks: list[Spooled] = []  # confirmed, to settle with the spool in one call
        self._flush_scheduled = False
        self._failure_pause = 0.0
        broker.reconnected_callbacks.append(self._on_reconnected)
        self._strikes: dict[int, _Strikes] = {}  # spool id -> refusals, while it is retried
        self._held: dict[int, tuple[asyncio.TimerHandle, Spooled]] = {}  # nacked, waiting for their retry
        self._suspects: set[int] = set()  # in flight when the broker refused for good: resent alone
        self._condemned: dict[int, str] = {}  # poison, to quarantine when handed out again: why
        self._blocked_said = False  # a WARNING said RabbitMQ blocks the connection (since the last confirm)
        self._nack_said_at = -_NACK_WARN_AFTER  # when the last "refused (nacked) … for a minute" line was logged
        self._nack_unsaid = 0  # events refused that long since, not named in a line
        metrics.count_in_flight(self)

    @property
    def in_flight(self) -> int:
        """Publishes awaiting a confirm."""
        return len(self._open) + len(self._side)

    def _on_reconnected(self) -> None:
        self._failure_pause = 0.0

    def halt(self) -> None:
        """Stop publishing now (demotion): no new publish leaves, whatever is already handed out goes back.

        Publishes already written to the channel settle as usual (acked when confirmed, else released).
        The caller also cancels ``run``; the next ``run`` publishes again.
        """
        self._halted = True
        self._release_held()

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

    # -- sending -------------------------------------------------------------------------

    async def _publish_batch(self) -> None:
        """Take as many messages as the window has room for and write them to the channel at once.

        After a refusal for good, the messages that were in flight are resent one
        at a time, so the one that causes it is known (and quarantined).
        """
        if self._suspects and self._open:
            await self._idle.wait()
        await self._room.wait()
        raw = self._raw
        if raw is None or raw.is_closed:
            # aio-pika reopens channels after a reconnect; publish on the current one.
            underlay = await self._broker.raw_channel()
            if not isinstance(underlay, Channel):
                await asyncio.sleep(0.05)
                return
            raw = self._raw = underlay
            raw.closing.add_done_callback(functools.partial(self._channel_closed, raw))
            ConfirmRouter(raw)
        free = 1 if self._suspects else max(1, self._settings.confirm_window - len(self._open))
        batch = await self._source.get_batch(free)
        if self._suspects and batch and batch[0].id not in self._suspects:
            # Released messages come back first: the suspects are all settled (or gone).
            self._suspects.clear()
        if self._halted:  # demoted while waiting for the batch: none of it leaves
            self._source.release(batch)
            return
        await self._write(raw, batch)

    async def _write(self, raw: Channel, batch: list[Spooled]) -> None:
        """Encode ``batch`` and hand it to the connection's writer as one write, with a slot per publish."""
        frame_max = _frame_max(raw)
        max_content = (frame_max or 131072) - 8
        # mandatory only where it does something: with the alternate exchange attached the
        # broker never returns an event (it routes it to <exchange>.unrouted instead).
        mandatory = not (self._broker.alternate_exchange and self._settings.unroutable == "keep")
        exchange, number = self._exchange, raw.number
        parts: list[bytes] = []
        sent: list[Spooled] = []
        for item in batch:
            msg = item.msg
            condemned = self._condemned.pop(item.id, None)
            if condemned is not None:
                self._spawn(self._quarantine(item, condemned))
            elif msg.kind != KIND_EVENT:
                self._spawn(self._send_alone(item))
            else:
                props = properties_bytes(msg)
                if frame_max and (size := _header_size(props)) > frame_max:
                    self._spawn(self._quarantine(item, _too_big(size, frame_max)))
                    continue
                parts.append(publish_frames(number, exchange, msg.routing_key, props, msg.body,
                                            mandatory=mandatory, max_content=max_content))  # fmt: skip
                sent.append(item)
        if not sent:
            return
        frame = ChannelFrame(payload=b"".join(parts), should_close=False)
        try:
            # The lock keeps aiormq's own basic_publish (quarantine moves) from taking a
            # delivery tag between our write and our tags; tags follow the write order.
            async with raw.lock:
                if raw.is_closed:  # closed while we waited for the lock: the batch goes back
                    self._source.release(sent)
                    return
                await raw.write_queue.put(frame)  # nothing was queued if this is cancelled
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):  # the channel closed meanwhile
            self._source.release(sent)
            return
        except BaseException:
            self._source.release(sent)
            raise
        # No await from the put to here: the broker numbers these publishes next.
        group = _Batch(raw, len(sent))
        confirmations = raw.confirmations
        by_message_id = raw.message_id_delivery_tag if mandatory else None
        tag = raw.delivery_tag
        open_ = self._open
        for item in sent:
            tag += 1
            slot = _Slot(self, item, group, tag)
            confirmations[tag] = slot  # type: ignore[assignment]  # duck-typed future (_Slot)
            if by_message_id is not None:
                by_message_id[item.msg.message_id] = tag
            open_[slot] = None
        raw.delivery_tag = tag
        group.timer = asyncio.get_running_loop().call_later(self._settings.publish_timeout, self._expire, group)
        self._idle.clear()
        if len(open_) >= self._settings.confirm_window:
            self._room.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    # -- settling ------------------------------------------------------------------------

    def _close_slot(self, slot: _Slot) -> bool:
        """Mark a slot settled; False when it already was."""
        if slot.done_:
            return False
        slot.done_ = True
        self._open.pop(slot, None)
        group = slot.batch
        group.left -= 1
        if group.left <= 0 and group.timer is not None:
            group.timer.cancel()
        by_message_id = group.raw.message_id_delivery_tag
        if by_message_id:
            message_id = slot.item.msg.message_id
            if by_message_id.get(message_id) == slot.tag:
                del by_message_id[message_id]
        if len(self._open) < self._settings.confirm_window:
            self._room.set()
        if not self._open:
            self._idle.set()
        return True

    def _settle(self, slot: _Slot, result: object) -> None:
        """aiormq's reader settled one publish: an ack, a nack, or the returned message."""
        if not self._close_slot(slot):
            return
        item = slot.item
        if isinstance(result, DeliveredMessage):
            # Returned: no queue and no alternate exchange took it.
            self._metrics.unroutable()
            if self._settings.unroutable == "keep":
                self._spawn(self._move_unrouted(item))
            else:
                self._confirmed_one(item)
            return
        if isinstance(result, BaseException):
            self._metrics.publish_failed(PublishFailure.NACK)
            self._hold_nacked(item)
            return
        self._confirmed_one(item)

    def _hold_nacked(self, item: Spooled) -> None:
        """Give a nacked message back to the spool later, each time later (see ``_NACK_RETRY_FIRST``)."""
        strikes = self._count_refusal(item.id)
        now = time.monotonic()
        refused_for = now - strikes.since
        if refused_for >= _NACK_WARN_AFTER and not strikes.warned:
            strikes.warned = True
            # One line a minute at most, however many events a full queue refuses (it was one per event).
            if now - self._nack_said_at >= _NACK_WARN_AFTER:
                others, self._nack_unsaid = self._nack_unsaid, 0
                self._nack_said_at = now
                log.warning(
                    "RabbitMQ has refused (nacked) the event %s (message_id=%s) %d times over %.0f s%s: a queue "
                    "bound to it refuses it (full with x-overflow=reject-publish, or a quorum queue without a "
                    "majority). It stays in the spool and is retried every %.0f s; each retry reaches again the "
                    "queues that took it (same message_id)",
                    item.msg.routing_key, item.msg.message_id, strikes.count, refused_for,
                    f", and {others} more events for over a minute since the last such line" if others else "",
                    _NACK_RETRY_MAX,
                )  # fmt: skip
            else:
                self._nack_unsaid += 1
        delay = min(_NACK_RETRY_MAX, _NACK_RETRY_FIRST * 2 ** min(strikes.count - 1, 16))
        self._hold(item, delay)

    def _retry_held(self, spool_id: int, alone: bool = False) -> None:
        entry = self._held.pop(spool_id, None)
        if entry is not None:
            if alone:  # sent on its own: a refusal then closes the channel over nothing else
                self._suspects.add(spool_id)
            self._source.release([entry[1]])

    def _release_held(self) -> None:
        """Every nacked message waiting for its retry goes back to the spool now (stop, demotion)."""
        held, self._held = self._held, {}
        for timer, _ in held.values():
            timer.cancel()
        if held:
            self._source.release(item for _, item in held.values())

    def _confirmed_one(self, item: Spooled) -> None:
        self._failure_pause = 0.0
        if self._strikes:
            self._strikes.pop(item.id, None)
        if self._suspects:
            self._suspects.discard(item.id)
        self._acks.append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)
        self._announce(item)

    def _announce(self, item: Spooled) -> None:
        """Tell the HA announcer a message is settled (confirmed, or confirmed into the quarantine)."""
        if self._on_confirmed is not None:
            self._on_confirmed(item.msg.message_id)

    def _flush_acks(self) -> None:
        """Settle the confirms of one reader pass with the spool and the metrics in one go."""
        self._flush_scheduled = False
        acks, self._acks = self._acks, []
        if not acks:
            return
        self._blocked_said = False  # confirms flow: a later block is told again
        self._source.ack([item.id for item in acks])
        now = time.time()
        counts: dict[str, int] = {}
        for item in acks:
            msg = item.msg
            counts[msg.metric_kind] = counts.get(msg.metric_kind, 0) + 1
            self._metrics.confirm_latency(max(0.0, now - msg.received_at))
        for kind, n in counts.items():
            self._metrics.published(n, kind)

    def _failed(self, item: Spooled) -> None:
        self._failure_pause = min(5.0, max(0.05, self._failure_pause * 2))
        self._source.release([item])

    def _expire(self, group: _Batch) -> None:
        """The publish timeout of a batch ran out: what is still open goes back to the spool.

        Not while RabbitMQ blocks the connection (a memory or disk alarm): the publishes wait in
        the socket, unread, and are confirmed once the alarm clears; sent again meanwhile, each
        would be delivered once more per timeout (a 40 s disk alarm with a 5 s timeout delivered
        one event 9 times). The batch keeps its slots (the window stays full: nothing more is sent)
        and waits another timeout, and one more after the alarm cleared (its timer may fire just then).
        """
        raw = group.raw
        blocked = not raw.is_closed and connection_blocked(raw.connection)
        if blocked or (group.blocked and not raw.is_closed):
            # Blocked, or unblocked since the last look: a whole timeout from now for the confirms.
            group.blocked = blocked
            if blocked and not self._blocked_said:
                self._blocked_said = True
                log.warning(
                    "RabbitMQ has blocked publishing on this connection (a memory or disk alarm on the broker: "
                    "aiormq's 'was blocked by' line says which): %d publishes wait for its confirms and are not "
                    "sent again; events wait in the spool until the alarm clears",
                    len(self._open),
                )  # fmt: skip
            group.timer = asyncio.get_running_loop().call_later(self._settings.publish_timeout, self._expire, group)
            return
        for slot in [slot for slot in self._open if slot.batch is group]:
            if self._close_slot(slot):
                self._metrics.publish_failed(PublishFailure.TIMEOUT)
                self._failed(slot.item)

    def _channel_closed(self, raw: Channel, closing: asyncio.Future[Any]) -> None:
        """The channel closed: every publish still open on it goes back (the poison rule may pick one)."""
        exc = None if closing.cancelled() else closing.exception()
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity) and "exchange" in str(exc):
            self._broker.exchange_gone(exc)
        slots = [slot for slot in self._open if slot.batch.raw is raw]
        if raw is self._raw:
            self._raw = None
        # A quarantine move in flight (not a slot) may be what the broker refused: then none is alone.
        alone = len(slots) <= 1 and not self._side
        for slot in slots:
            if not self._close_slot(slot):
                continue
            item = slot.item
            self._metrics.publish_failed(PublishFailure.CHANNEL)
            if isinstance(exc, _REFUSED_FOR_GOOD):
                self._suspects.add(item.id)
                poison = self._strike(item.id, f"refused ({type(exc).__name__}: {exc})", alone=alone)
                if poison is not None and self._strikes[item.id].parked:
                    # Its quarantine copy was refused before: it waits again, as an event (a channel opened
                    # before the broker's limit was raised refuses it once more; the next one takes it).
                    self._park(item, poison, exc)
                    continue
                if poison is not None:
                    # The refusal closed the connection or channel: quarantine it once reconnected.
                    self._condemned[item.id] = poison
            self._failed(item)

    async def _send_alone(self, item: Spooled) -> None:
        """Publish a quarantine message on its own (the slow, general path) and settle it."""
        try:
            await self._send(self._raw, item.msg)
        except _Unpublishable as exc:
            await self._quarantine(item, str(exc))
            return
        except (aiormq.exceptions.AMQPError, TimeoutError, ConnectionError, OSError, RuntimeError):
            self._metrics.publish_failed(PublishFailure.CHANNEL)
            self._failed(item)
            return
        except asyncio.CancelledError:
            self._source.release([item])
            raise
        self._failure_pause = 0.0
        self._source.ack([item.id])
        self._announce(item)
        self._metrics.quarantined(item.msg.routing_key, max(0.0, time.time() - item.msg.received_at))

    async def _move_unrouted(self, item: Spooled) -> None:
        """A returned event (exchange without the alternate exchange): keep it in the unrouted queue."""
        raw = self._raw
        try:
            if raw is None or raw.is_closed:
                raise ConnectionError("not connected")
            await self._keep_unrouted(raw, item.msg)
        except (aiormq.exceptions.AMQPError, TimeoutError, ConnectionError, OSError, RuntimeError):
            self._metrics.publish_failed(PublishFailure.CHANNEL)
            self._failed(item)
            return
        except asyncio.CancelledError:
            self._source.release([item])
            raise
        self._confirmed_one(item)

    def _hold(self, item: Spooled, delay: float, *, alone: bool = False) -> None:
        """Give ``item`` back to the spool in ``delay`` seconds (``alone``: to be sent on its own then)."""
        timer = asyncio.get_running_loop().call_later(delay, self._retry_held, item.id, alone)
        self._held[item.id] = (timer, item)

    def _strikes_of(self, spool_id: int) -> _Strikes:
        """The refusals noted for a spooled message (a fresh record at its first)."""
        return self._strikes.setdefault(spool_id, _Strikes(0, time.monotonic()))

    def _count_refusal(self, spool_id: int) -> _Strikes:
        strikes = self._strikes_of(spool_id)
        strikes.count += 1
        return strikes

    def _strike(self, spool_id: int, what: str, *, alone: bool = False) -> str | None:
        """Count one refusal for good of a message; returns why it is poison, or None to retry it.

        A refusal for good that happens again while the message is the only one in
        flight is the message's own doing.
        """
        strikes = self._count_refusal(spool_id)
        if alone and strikes.count >= 2:
            return f"{what}, {strikes.count} times, the last time alone in flight"
        return None

    async def _quarantine(self, item: Spooled, why: str) -> None:
        """Move a poison message to the quarantine queue (bounded headers, body as it was)."""
        msg = item.msg
        copy = unpublishable_message(msg, why)
        raw: RawChannel | None = self._raw
        try:
            if raw is None or raw.is_closed:  # the refusal closed the channel a moment ago: take the new one
                raw = await self._broker.raw_channel()
            await self._send(raw, copy)
        except (_Unpublishable, *_REFUSED_FOR_GOOD) as exc:
            self._park(item, why, exc)
            return
        except (aiormq.exceptions.AMQPError, TimeoutError, ConnectionError, OSError, RuntimeError) as exc:
            strikes = self._strikes_of(item.id)
            if not strikes.move_warned:  # once per event: a channel reopening after each refusal says it again
                strikes.move_warned = True
                log.warning(
                    "could not move a poison message to quarantine yet (message_id=%s): %s; trying again",
                    msg.message_id, str(exc) or type(exc).__name__,
                )  # fmt: skip
            self._condemned[item.id] = why
            self._hold(item, _NACK_RETRY_FIRST)  # not at once: the link is down or the channel reopening
            return
        self._strikes.pop(item.id, None)
        self._suspects.discard(item.id)
        self._condemned.pop(item.id, None)
        self._source.ack([item.id])
        self._announce(item)
        self._metrics.quarantined(UNPUBLISHABLE, max(0.0, time.time() - msg.received_at))
        log.error(
            "RabbitMQ refuses an event for good: moved to the quarantine queue %s "
            "(routing key %s, message_id=%s, %d body bytes): %s",
            self._broker.topology.quarantine, msg.routing_key, msg.message_id, len(msg.body), why,
        )  # fmt: skip

    def _park(self, item: Spooled, why: str, exc: BaseException) -> None:
        """The quarantine refuses the poison event too: it stays in the spool, tried again alone later."""
        msg = item.msg
        self._metrics.publish_failed(PublishFailure.REFUSED)
        self._failure_pause = 0.0  # the cause is found and set aside: the events behind it go now
        self._suspects.discard(item.id)
        self._condemned.pop(item.id, None)
        strikes = self._strikes_of(item.id)
        strikes.parked += 1
        delay = min(_PARK_MAX, _PARK_FIRST * 2 ** min(strikes.parked - 1, 16))
        now = time.monotonic()
        if strikes.parked == 1 or now - strikes.logged >= _PARK_MAX:
            strikes.logged = now
            log.error(
                "RabbitMQ refuses the event %s (message_id=%s, %d body bytes) for good, and its copy for the "
                "quarantine queue too: %s; %s. It stays in the spool (not lost) and is sent again, alone, in %.0f s, "
                "then each time twice as late, up to every %.0f s; the events behind it are published meanwhile. "
                "Fix the cause on the broker (a max_message_size below the event's size, say) and it goes out on the "
                "next try",
                msg.routing_key, msg.message_id, len(msg.body), why, str(exc) or type(exc).__name__, delay, _PARK_MAX,
            )  # fmt: skip
        self._hold(item, delay, alone=True)

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
            raise _Unpublishable(_too_big(size, frame_max))
        result = await raw.basic_publish(
            msg.body,
            exchange=self._exchange if is_event else "",
            routing_key=msg.routing_key if is_event else self._broker.topology.quarantine,
            properties=properties,
            mandatory=True,
            timeout=self._settings.publish_timeout,
        )
        if isinstance(result, DeliveredMessage) and not is_event:
            # A quarantine copy comes back only when the quarantine queue is gone: it was kept nowhere.
            await self._own_queue_gone(self._broker.topology.quarantine)
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
            properties=amqp_properties(msg, {ORIGINAL_ROUTING_KEY: msg.routing_key}),
            mandatory=True,
            timeout=self._settings.publish_timeout,
        )
        if isinstance(result, DeliveredMessage):
            await self._own_queue_gone(self._broker.topology.unrouted)

    async def _own_queue_gone(self, name: str) -> None:
        """A publish to one of the bridge's own queues came back: the queue is gone. Declare it again; raise,
        so that the message goes back to the spool and is sent again (it was not kept anywhere)."""
        with contextlib.suppress(Exception):
            await self._broker.restore_own_queues()
        raise ConnectionError(f"queue {name} is gone; declared again, the message is sent again")

    async def drain(self, grace: float) -> int:
        """Wait for outstanding confirms; what is still unconfirmed stays in the spool.

        Returns:
            How many publishes were still unconfirmed when the timeout ran out.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._open and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, deadline - loop.time()))
        self._release_held()
        still = len(self._open)
        for slot in list(self._open):
            if self._close_slot(slot):
                self._source.release([slot.item])
        side = set(self._side)
        if side:
            _, pending = await asyncio.wait(side, timeout=max(0.01, deadline - loop.time()))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
            still += len(pending)
        self._flush_acks()
        return still


def _frame_max(raw: RawChannel) -> int:
    """The frame_max negotiated on the channel's connection (0: unknown or unlimited)."""
    tune = getattr(getattr(raw, "connection", None), "connection_tune", None)
    value = getattr(tune, "frame_max", 0)
    return value if isinstance(value, int) else 0


def _too_big(size: int, frame_max: int) -> str:
    return f"its AMQP header frame of {size} bytes exceeds the connection's frame_max of {frame_max}"


def _header_size(properties: bytes) -> int:
    """Size of the content-header frame of these encoded properties (see ``header_frame_bytes``)."""
    return 8 + 12 + len(properties)
