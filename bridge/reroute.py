"""``orangepill-bridge reroute``: publish the events kept in ``<exchange>.unrouted`` to the exchange again.

An event no binding took is kept in ``<exchange>.unrouted`` (through the alternate exchange, or
moved there by the bridge with the header ``original_routing_key``). Once a queue is bound for it,
``reroute`` gives the events waiting there a second chance: each is published to the exchange
with its own routing key, body, properties and headers (same ``message_id``, so consumers that
de-duplicate stay correct), and taken off the unrouted queue only once RabbitMQ has confirmed it.
A crash or a broker failure in the middle leaves an event in the unrouted queue, never nowhere:
at worst it is delivered twice, with the same ``message_id``.

Only the messages in the queue at the start are handled, in queue order. One that still matches no
binding goes back to the end of the queue: through the alternate exchange, or (an exchange without
one returns it) as a copy the command puts there itself before it lets go of the original; so does
one RabbitMQ refuses (a nack). Nothing is put back at the head, where it would be taken again in
place of the events behind it. Nothing is declared: a mistyped ``--exchange`` is said, not created.
``--dry-run`` counts the events by routing key and moves nothing, to see which bindings are missing.

``--refused`` does the same for the events RabbitMQ refused for good, kept in ``<exchange>.quarantine``
with ``reason=unpublishable`` (a poison message: say a body above the broker's ``max_message_size``),
once the cause is fixed: each is rebuilt as the contract publishes it (``contract.refused_event``: the
body, ``message_id``, ``realm`` and ``received_at`` it was kept with, ``entity_id`` read from the body
again and left out when it holds a realm key given in the settings, as ``run`` does) and published to its
original routing key. The frames quarantined because they were not valid
notifications are not events: they go back to the end of the quarantine unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from bridge.broker import connect_for_command, message_copy
from bridge.config import Settings
from bridge.contract import ORIGINAL_ROUTING_KEY, Outbound, Topology, amqp_properties, header_text, refused_event
from bridge.progress import Progress

__all__ = ["Outcome", "RerouteResult", "reroute", "routing_key_of"]

WINDOW: Final = 256
"""Messages taken off the unrouted queue and not yet settled, at most."""
_SHOWN_KEYS: Final = 12
_TRACK_MAX: Final = 500_000
"""Message ids remembered to count what comes back through the alternate exchange (about 150 B each)."""
_SETTLE_TIMEOUT: Final = 5.0
"""Seconds an acknowledgement (or a cancel, or a close) may take before the link is taken for dead."""


def routing_key_of(message: AbstractIncomingMessage) -> str:
    """The event name: the routing key kept by the alternate exchange, or the header the bridge set."""
    return header_text((message.headers or {}).get(ORIGINAL_ROUTING_KEY)) or message.routing_key or ""


def _reason(message: AbstractIncomingMessage) -> str:
    """The ``reason`` header of a quarantined message."""
    return header_text((message.headers or {}).get("reason")) or "no reason"


def _contract(event: Outbound) -> aio_pika.Message:
    """``event`` with the properties and headers of the contract (``contract.amqp_properties``)."""
    props = amqp_properties(event)
    return aio_pika.Message(
        event.body,
        headers=props.headers,
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=props.message_id,
        timestamp=props.timestamp,
        type=props.message_type,
        app_id=props.app_id,
    )


class Outcome(enum.Enum):
    """How one event taken off the unrouted queue ended."""

    PUBLISHED = "published"  # confirmed on the exchange (a binding took it, or the AE brought it back)
    RETURNED = "returned"  # the exchange has no AE and no binding took it: put back at the end
    REFUSED = "refused"  # RabbitMQ nacked it or did not confirm it: put back at the end
    LEFT = "left"  # could not be settled (the link went): back in the queue with the channel
    KEPT = "kept"  # --refused: a quarantined frame, not an event: put back at the end unchanged


class RerouteResult:
    """What one reroute did."""

    def __init__(self, at_start: int, total: int) -> None:
        self.at_start = at_start
        self.total = total
        self.taken = 0
        self.by: dict[Outcome, collections.Counter[str]] = {o: collections.Counter() for o in Outcome}
        self.seen: collections.Counter[str] = collections.Counter()  # --dry-run
        self.frames: collections.Counter[str] = collections.Counter()  # --dry-run --refused: not events, by reason
        self.came_back: collections.Counter[str] = collections.Counter()  # published, then back through the AE
        self.exact = False  # came_back was counted copy by copy (a tap on the alternate exchange)
        self.lost_link = ""
        self.stopped = False

    def count(self, outcome: Outcome) -> int:
        return sum(self.by[outcome].values())

    @property
    def settled(self) -> int:
        return sum(self.count(o) for o in Outcome)

    @staticmethod
    def keys(counts: collections.Counter[str], most: int | None = _SHOWN_KEYS) -> str:
        shown = ", ".join(f"{key} {n:,}" for key, n in counts.most_common(most))
        rest = len(counts) - most if most is not None else 0
        return shown + (f" and {rest} more routing keys" if rest > 0 else "")


async def reroute(
    settings: Settings,
    stop: asyncio.Event,
    *,
    dry_run: bool = False,
    limit: int = 0,
    progress: Progress | None = None,
    refused: bool = False,
) -> int:
    """Move the events of ``<exchange>.unrouted`` back to the exchange (or only count them, ``dry_run``).

    Args:
        settings: broker settings (URL, TLS, exchange).
        stop: set it to stop early; what was not confirmed stays in the unrouted queue.
        dry_run: count the events by routing key, move nothing.
        limit: handle at most this many events (0: every one in the queue at the start).
        progress: reports the events handled (default: a :class:`Progress` on standard error).
        refused: move the events RabbitMQ refused for good, from ``<exchange>.quarantine``, instead.

    Returns:
        The exit code: 0 every event taken was published, or nothing to do; 1 the broker is unreachable,
        the link was lost, the command was stopped, or RabbitMQ refused some; 2 no such exchange.
    """
    names = Topology(settings.exchange)
    kept = names.quarantine if refused else names.unrouted
    connection = await connect_for_command(settings, "reroute")
    if connection is None:
        return 1
    async with connection:
        try:
            queue = await _open(connection, names, kept)
        except _Missing as exc:
            print(f"reroute: {exc}", file=sys.stderr if exc.exit_code else sys.stdout)
            return exc.exit_code
        source, at_start = queue.channel, queue.declaration_result.message_count or 0
        total = min(at_start, limit) if limit else at_start
        if total == 0:
            print(f"reroute: {kept} is empty: nothing to move")
            return 0
        if refused and not dry_run and not settings.realm_keys:
            print(
                "reroute --refused: no realm key is configured, so an entity_id read again from a body is not "
                "checked for one (give the run command's --realm-key-file or ORANGEPILL_REALM_KEY)",
                file=sys.stderr,
            )
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=False)
        exchange = await publisher.get_exchange(names.exchange, ensure=False)  # checked to exist by _open
        result = RerouteResult(at_start, total)
        verb = "reroute --refused" if refused else "reroute"
        progress = progress or Progress(f"{verb} --dry-run" if dry_run else verb, total)
        try:
            mover = None if dry_run else _Mover(
                publisher, exchange, kept, settings.publish_timeout, result, refused, settings.realm_keys
            )
            tap = None if mover is None else await _tap(connection, names.unrouted, mover.came_back)
            await _take(queue, publisher, stop, result, progress, mover, refused)
            if tap is not None and mover is not None and not result.lost_link:
                result.exact = mover.track and await _drained(*tap)
        finally:
            progress.close("stopped" if result.stopped or result.lost_link else "finished")
            with contextlib.suppress(Exception):  # anything delivered and not settled goes back to the queue
                await asyncio.wait_for(source.close(), _SETTLE_TIMEOUT)
        if dry_run:
            print(_dry_run_report(kept, result, refused))
            return 0
        return await _report(connection, names, kept, result, refused)


def _dry_run_report(kept: str, result: RerouteResult, refused: bool) -> str:
    def rows(counts: collections.Counter[str]) -> str:
        return "".join(f"  {key:<32} {n:>9,}\n" for key, n in counts.most_common())

    counted = f" (the first {result.total:,} counted)" if result.total < result.at_start else ""
    if not refused:
        return (
            f"reroute --dry-run: {kept} holds {result.at_start:,} events{counted}; by routing key:\n"
            + rows(result.seen)
            + "Bind a queue for the ones you need (--bind QUEUE=PATTERN on the bridge, or your own binding), "
            "then run reroute without --dry-run. Nothing was moved"
        )
    events, frames = sum(result.seen.values()), sum(result.frames.values())
    text = f"reroute --refused --dry-run: {kept} holds {result.at_start:,} messages{counted}"
    text += f"; {events:,} events RabbitMQ refused, by routing key:\n" + rows(result.seen) if events else (
        "; no event RabbitMQ refused\n")  # fmt: skip
    if frames:
        text += f"and {frames:,} quarantined frames, not events (reroute leaves them), by reason:\n" + rows(
            result.frames
        )
    return text + (
        "Fix what made RabbitMQ refuse them (the detail header says), then run reroute --refused without "
        "--dry-run. Nothing was moved"
    )


class _Missing(LookupError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def _open(connection: AbstractConnection, names: Topology, kept: str) -> AbstractQueue:
    """The queue ``kept`` (unrouted or quarantine), on a channel of its own to consume it, with how many
    messages wait there; the exchange and the queue are checked passively (nothing is declared).

    Raises:
        _Missing: the exchange (exit 2: a mistyped name) or the queue (exit 0: nothing kept) does not exist.
    """
    channel = await connection.channel(publisher_confirms=False)  # only consumes
    try:
        await channel.get_exchange(names.exchange, ensure=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise _Missing(
            f"there is no exchange {names.exchange}: check --exchange (or BRIDGE_EXCHANGE); nothing was declared", 2
        ) from None
    try:
        queue = await channel.declare_queue(kept, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        why = f"there is no queue {kept}" + (" (--unroutable drop keeps none)" if kept == names.unrouted else "")
        raise _Missing(f"{why}: nothing to move", 0) from None
    return queue


def _event_key(message: AbstractIncomingMessage, refused: bool) -> str | None:
    """The routing key ``message`` is published to again; None for a quarantined frame that is not an event."""
    if not refused:
        return routing_key_of(message)
    try:
        return refused_event(message.body, message.headers or {}, message.message_id or "").routing_key
    except ValueError:
        return None


class _Mover:
    """Publishes one taken event to the exchange, or back to the end of its queue, and settles it."""

    def __init__(self, channel: AbstractChannel, exchange: AbstractExchange, kept: str, confirm_timeout: float,
                 result: RerouteResult, refused: bool, secrets: tuple[str, ...] = ()) -> None:  # fmt: skip
        self._channel = channel
        self._exchange = exchange
        self._kept = kept
        self.confirm_timeout = confirm_timeout
        self._result = result
        self._refused = refused
        self._secrets = secrets  # an entity_id read again from a refused event's body never carries a realm key
        self.tracked: collections.Counter[str] = collections.Counter()  # message ids published, not yet seen back
        self.track = True

    def came_back(self, message: AbstractIncomingMessage) -> None:
        """A copy the alternate exchange took (seen on the tap): count it if it is one of ours."""
        mid = message.message_id
        if mid is not None and self.tracked[mid] > 0:
            self.tracked[mid] -= 1
            self._result.came_back[routing_key_of(message)] += 1

    def _outgoing(self, message: AbstractIncomingMessage) -> tuple[str, aio_pika.Message] | None:
        """The routing key and the message to publish, or None for a quarantined frame (not an event)."""
        if not self._refused:
            headers = dict(message.headers or {})
            headers.pop(ORIGINAL_ROUTING_KEY, None)
            return routing_key_of(message), message_copy(message, headers)
        try:
            event = refused_event(message.body, message.headers or {}, message.message_id or "", self._secrets)
        except ValueError:
            return None
        return event.routing_key, _contract(event)

    async def move(self, message: AbstractIncomingMessage) -> None:
        outgoing = self._outgoing(message)
        if outgoing is None:  # a frame the bridge quarantined: it stays, behind the rest
            key = _reason(message)
            outcome = Outcome.KEPT if await self._put_back(message, key) else Outcome.LEFT
        else:
            key, copy = outgoing
            if self.track and message.message_id is not None:
                self.tracked[message.message_id] += 1  # before the publish: its copy may reach the tap first
                self.track = len(self.tracked) < _TRACK_MAX  # beyond, only bounds are reported (memory)
            try:
                confirmation: Any = await self._exchange.publish(
                    copy, routing_key=key, mandatory=True, timeout=self.confirm_timeout
                )
            except Exception:  # nacked, no confirm in time, or the channel went
                outcome = Outcome.REFUSED
            else:
                returned = isinstance(confirmation, aiormq.abc.DeliveredMessage)
                outcome = Outcome.RETURNED if returned else Outcome.PUBLISHED
            if outcome is not Outcome.PUBLISHED and not await self._put_back(message, key):
                outcome = Outcome.LEFT
        if outcome is not Outcome.LEFT and not await _settle(message.ack()):
            outcome = Outcome.LEFT  # done, but still in the queue too: taken again by a later run (same id)
        self._result.by[outcome][key] += 1

    async def _put_back(self, message: AbstractIncomingMessage, key: str) -> bool:
        """A confirmed copy at the end of its queue: an unrouted event as the bridge keeps a returned one
        (``original_routing_key``), a quarantined message unchanged."""
        headers = dict(message.headers or {})
        if not self._refused:
            headers[ORIGINAL_ROUTING_KEY] = key
        try:
            await self._channel.default_exchange.publish(
                message_copy(message, headers), routing_key=self._kept, mandatory=True, timeout=self.confirm_timeout
            )
        except Exception:
            return False
        return True


async def _tap(
    connection: AbstractConnection, unrouted: str, on_copy: Callable[[AbstractIncomingMessage], None]
) -> tuple[AbstractChannel, AbstractQueue] | None:
    """A private queue on the alternate exchange ``unrouted``: a copy of every event it takes, for counting.

    None when there is no such exchange (the events exchange then returns what no binding takes).
    """
    channel = await connection.channel()
    try:
        source = await channel.get_exchange(unrouted, ensure=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    queue = await channel.declare_queue(f"{unrouted}.reroute.{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True)
    await queue.bind(source)

    async def copy(message: AbstractIncomingMessage) -> None:
        on_copy(message)

    await queue.consume(copy, no_ack=True)
    return channel, queue


async def _drained(channel: AbstractChannel, queue: AbstractQueue) -> bool:
    """Wait until the tap has handed over every copy (a confirmed publish is already routed); True if so."""
    deadline = asyncio.get_running_loop().time() + _SETTLE_TIMEOUT
    try:
        while asyncio.get_running_loop().time() < deadline:
            declared = await asyncio.wait_for(channel.declare_queue(queue.name, passive=True), _SETTLE_TIMEOUT)
            if not declared.declaration_result.message_count:
                await asyncio.sleep(0.2)  # deliveries already on the wire
                return True
            await asyncio.sleep(0.05)
        return False
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), _SETTLE_TIMEOUT)


async def _settle(ack: Awaitable[Any]) -> bool:
    """Acknowledge, bounded: on a connection that has just died an acknowledgement can wait for ever."""
    try:
        await asyncio.wait_for(ack, _SETTLE_TIMEOUT)
    except Exception:
        return False
    return True


async def _take(
    queue: AbstractQueue,
    publisher: AbstractChannel,
    stop: asyncio.Event,
    result: RerouteResult,
    progress: Progress,
    mover: _Mover | None,
    refused: bool = False,
) -> None:
    """Consume ``result.total`` deliveries and move (or, without a mover, count) each.

    Ends early on ``stop`` or when a channel closes (a broker or link failure); what was taken
    and not settled goes back to the queue with the channel.
    """
    # Without acknowledgements a dry run sees every message once; a move keeps WINDOW unsettled.
    source = queue.channel
    await source.set_qos(prefetch_count=0 if mover is None else WINDOW)
    done = asyncio.Event()
    pending: set[asyncio.Task[None]] = set()
    finished = 0

    def one_done(_: object = None) -> None:
        nonlocal finished
        finished += 1
        progress.update()
        if finished >= result.total:
            done.set()

    async def on_message(message: AbstractIncomingMessage) -> None:
        if result.taken >= result.total:
            return  # past the count (new arrivals): left unacknowledged, back in the queue at the close
        result.taken += 1
        if mover is None:
            key = _event_key(message, refused)
            if key is None:
                result.frames[_reason(message)] += 1
            else:
                result.seen[key] += 1
            one_done()
            return
        task = asyncio.create_task(mover.move(message))
        pending.add(task)
        task.add_done_callback(pending.discard)
        task.add_done_callback(one_done)

    tag = await queue.consume(on_message)
    ends = {
        asyncio.ensure_future(done.wait()): "",
        asyncio.ensure_future(stop.wait()): "stopped",
        asyncio.ensure_future(source.closed()): "lost",
        asyncio.ensure_future(publisher.closed()): "lost",
    }
    try:
        first, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        why = {ends[f] for f in first}
        result.stopped = "stopped" in why and not done.is_set()
        if "lost" in why and not done.is_set():
            result.lost_link = "the connection to RabbitMQ was lost"
    finally:
        for waiter in ends:
            waiter.cancel()
        if not source.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(queue.cancel(tag), _SETTLE_TIMEOUT)
        if pending:  # a live link gets the confirm timeout; a dead one nothing more
            grace = 0.0 if result.lost_link else (mover.confirm_timeout if mover else 0.0) + _SETTLE_TIMEOUT
            _, hanging = await asyncio.wait(pending, timeout=grace) if grace else (set(), set(pending))
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)


async def _report(
    connection: AbstractConnection, names: Topology, kept: str, result: RerouteResult, refused: bool
) -> int:
    exchange = names.exchange
    published = result.count(Outcome.PUBLISHED)
    put_back = result.count(Outcome.RETURNED) + result.count(Outcome.REFUSED) + result.count(Outcome.KEPT)
    left = result.count(Outcome.LEFT) + (result.taken - result.settled)  # cancelled ones count as left
    untried = result.total - result.taken
    now = None if result.lost_link else await _depth(connection, kept)
    what = "messages" if refused else "events"
    lines = [f"reroute: took {result.taken:,} of the {result.at_start:,} {what} of {kept}"]
    if published and result.exact:
        back_n = sum(result.came_back.values())
        reached = result.by[Outcome.PUBLISHED] - result.came_back
        lines.append(f"  {published:,} published to {exchange} again and confirmed:")
        lines.append(
            f"    {published - back_n:,} reached a bound queue" + (f": {result.keys(reached)}" if reached else "")
        )
        if back_n:
            went = f"went to {names.unrouted}" if refused else f"came back to {names.unrouted}"
            lines.append(f"    {back_n:,} {'' if refused else 'still '}match no binding and {went}: "
                         f"{result.keys(result.came_back)}")  # fmt: skip
    elif published:
        line = (
            f"  {published:,} published to {exchange} again and confirmed ({result.keys(result.by[Outcome.PUBLISHED])})"
        )
        if now is not None and not refused:
            # What came back through the alternate exchange (no binding yet) is in the queue now, beside
            # the events not taken, those put back, and any the bridge sent meanwhile: a bound, not a count.
            back = max(0, min(published, now - (result.at_start - result.taken) - put_back - left))
            if back < published:
                line += (f"; at least {published - back:,} reached a bound queue, at most {back:,} matched no "
                         f"binding and came back to {names.unrouted}")  # fmt: skip
            else:  # as many events arrived meanwhile as were published: the depth tells nothing
                line += (f"; how many a binding took cannot be told from the depth of {names.unrouted} (events "
                         "arrived there meanwhile): `reroute --dry-run` shows what waits there now")  # fmt: skip
        lines.append(line)
    if result.count(Outcome.RETURNED):
        lines.append(f"  {result.count(Outcome.RETURNED):,} {'' if refused else 'still '}match no binding (returned: "
                     f"the exchange has no alternate exchange) and were put back at the end of {kept}: "
                     f"{result.keys(result.by[Outcome.RETURNED])}")  # fmt: skip
    if result.count(Outcome.REFUSED):
        lines.append(f"  {result.count(Outcome.REFUSED):,} were refused by RabbitMQ (nacked, or no confirm within "
                     f"--publish-timeout) and were put back at the end of {kept}: "
                     f"{result.keys(result.by[Outcome.REFUSED])}")  # fmt: skip
    if result.count(Outcome.KEPT):
        lines.append(f"  {result.count(Outcome.KEPT):,} quarantined frames, not events, were put back unchanged at "
                     f"the end of {kept}: {result.keys(result.by[Outcome.KEPT])}")  # fmt: skip
    if left:
        lines.append(f"  {left:,} could not be settled and stay in {kept} (some may have been published "
                     "too: same message_id)")  # fmt: skip
    if untried:
        why = result.lost_link or ("stopped" if result.stopped else "not reached")
        lines.append(f"  {untried:,} were not tried ({why}) and stay in {kept}")
    lines.append(f"  {kept} holds {f'{now:,}' if now is not None else '?'} now")
    trouble = bool(result.lost_link or result.stopped or left or result.count(Outcome.REFUSED))
    if trouble:
        lines.append("reroute: not every event was moved; run reroute again" + (
            f" once RabbitMQ is back ({result.lost_link})" if result.lost_link else ""))  # fmt: skip
    print("\n".join(lines), file=sys.stderr if trouble else sys.stdout)
    return 1 if trouble else 0


async def _depth(connection: AbstractConnection, queue: str) -> int | None:
    async def read() -> int | None:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count
        finally:
            await channel.close()

    with contextlib.suppress(Exception):
        return await asyncio.wait_for(read(), _SETTLE_TIMEOUT)
    return None
