"""``orangepill-bridge reroute``: publish the events kept in ``<exchange>.unrouted`` to the exchange again.

An event no binding took is kept in ``<exchange>.unrouted`` (through the alternate exchange, or
moved there by the bridge with the header ``original_routing_key``). Once a queue is bound for it,
``reroute`` gives the events waiting there a second chance: each is published to the exchange
with its own routing key, body, properties and headers (same ``message_id``, so consumers that
de-duplicate stay correct), and taken off the unrouted queue only once RabbitMQ has confirmed it.
A crash or a broker failure in the middle leaves an event in the unrouted queue, never nowhere:
at worst it is delivered twice, with the same ``message_id``.

Only the messages in the queue at the start are handled (events that still match no binding come
straight back, and are not moved again). ``--dry-run`` counts the events by routing key and moves
nothing, to see which bindings are missing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
from collections.abc import Awaitable
from typing import Any, Final

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue

from bridge.broker import connect_for_command, declare_topology
from bridge.config import Settings
from bridge.contract import Topology
from bridge.errors import TopologyError
from bridge.progress import Progress

__all__ = ["ORIGINAL_ROUTING_KEY", "RerouteResult", "reroute", "routing_key_of"]

ORIGINAL_ROUTING_KEY: Final = "original_routing_key"
WINDOW: Final = 256
"""Messages taken off the unrouted queue and not yet confirmed on the exchange, at most."""
_SHOWN_KEYS: Final = 12
_SETTLE_TIMEOUT: Final = 5.0
"""Seconds an acknowledgement (or a cancel) may take before the link is taken for dead."""


def routing_key_of(message: AbstractIncomingMessage) -> str:
    """The event name: the routing key kept by the alternate exchange, or the header the bridge set."""
    original = (message.headers or {}).get(ORIGINAL_ROUTING_KEY)
    if isinstance(original, bytes):
        original = original.decode("utf-8", "replace")
    return original if isinstance(original, str) and original else message.routing_key or ""


def _republished(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The same event as it was first published: body, properties and headers (less the bridge's own note)."""
    headers = {k: v for k, v in (message.headers or {}).items() if k != ORIGINAL_ROUTING_KEY}
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=message.delivery_mode or aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
        # user_id is left out: RabbitMQ refuses a user_id other than the connection's own user.
    )


class RerouteResult:
    """What one reroute did, by routing key."""

    def __init__(self, at_start: int) -> None:
        self.at_start = at_start
        self.moved: collections.Counter[str] = collections.Counter()
        self.unroutable: collections.Counter[str] = collections.Counter()  # returned: the exchange has no AE
        self.failed = 0
        self.seen: collections.Counter[str] = collections.Counter()

    @staticmethod
    def keys(counts: collections.Counter[str]) -> str:
        shown = ", ".join(f"{key} {n:,}" for key, n in counts.most_common(_SHOWN_KEYS))
        rest = len(counts) - _SHOWN_KEYS
        return shown + (f" and {rest} more routing keys" if rest > 0 else "")


async def reroute(
    settings: Settings,
    stop: asyncio.Event,
    *,
    dry_run: bool = False,
    limit: int = 0,
    progress: Progress | None = None,
) -> int:
    """Move the events of ``<exchange>.unrouted`` back to the exchange (or only count them, ``dry_run``).

    Args:
        settings: broker settings (URL, TLS, exchange).
        stop: set it to stop early; what was not confirmed stays in the unrouted queue.
        dry_run: count the events by routing key, move nothing.
        limit: handle at most this many events (0: every one in the queue at the start).
        progress: reports the events handled (default: a :class:`Progress` on standard error).

    Returns:
        The exit code: 0 done, 1 broker unreachable or events that could not be moved, 2 an exchange
        of another kind.
    """
    names = Topology(settings.exchange)
    connection = await connect_for_command(settings, "reroute")
    if connection is None:
        return 1
    async with connection:
        try:
            publisher, exchange, _ = await declare_topology(connection, settings, confirms=True)
        except TopologyError as exc:
            print(f"reroute: {exc}", file=sys.stderr)
            return exc.exit_code
        source = await connection.channel()
        try:
            queue = await source.declare_queue(names.unrouted, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            print(f"reroute: there is no queue {names.unrouted} (--unroutable drop keeps none): nothing to move")
            return 0
        at_start = queue.declaration_result.message_count or 0
        total = min(at_start, limit) if limit else at_start
        if total == 0:
            print(f"reroute: {names.unrouted} is empty: nothing to move")
            return 0
        result = RerouteResult(at_start)
        if progress is None:
            progress = Progress("reroute --dry-run" if dry_run else "reroute", total)
        try:
            target = None if dry_run else exchange
            ends = (stop.wait(), source.closed(), publisher.closed())  # stopped, or a broker or channel failure
            await _take(queue, total, ends, result, progress, target, settings.publish_timeout)
        finally:
            progress.close()
            with contextlib.suppress(Exception):  # anything delivered and not acknowledged goes back to the queue
                await asyncio.wait_for(source.close(), _SETTLE_TIMEOUT)
        if dry_run:
            print(
                f"reroute --dry-run: {names.unrouted} holds {at_start:,} events"
                f"{f' (the first {total:,} counted)' if total < at_start else ''}: {result.keys(result.seen)}. "
                "Bind a queue for the ones you need (--bind QUEUE=PATTERN on the bridge, or your own binding), "
                "then run reroute without --dry-run; nothing was moved"
            )
            return 0
        return await _report(connection, names, settings.exchange, result)


async def _take(
    queue: AbstractQueue,
    total: int,
    ends: tuple[Awaitable[Any], ...],
    result: RerouteResult,
    progress: Progress,
    target: AbstractExchange | None,
    confirm_timeout: float,
) -> None:
    """Consume ``total`` deliveries; publish each to ``target`` and acknowledge it once confirmed.

    Ends early when one of ``ends`` completes (stop, or a channel closed): what was taken and not
    confirmed counts as failed (it goes back to the queue with the channel).
    """
    # Without acknowledgements a dry run sees every message once; a move keeps WINDOW in flight.
    await queue.channel.set_qos(prefetch_count=0 if target is None else WINDOW)
    taken = 0
    done = asyncio.Event()
    pending: set[asyncio.Task[None]] = set()
    finished = 0

    def one_done() -> None:
        nonlocal finished
        finished += 1
        progress.update()
        if finished >= total:
            done.set()

    async def move(message: AbstractIncomingMessage, exchange: AbstractExchange) -> None:
        key = routing_key_of(message)
        try:
            confirmation: Any = await exchange.publish(
                _republished(message), routing_key=key, mandatory=True, timeout=confirm_timeout
            )
        except Exception:  # nack, timeout, channel closed: the event stays where it was
            result.failed += 1
            with contextlib.suppress(Exception):
                await asyncio.wait_for(message.nack(requeue=True), _SETTLE_TIMEOUT)
            one_done()
            return
        if isinstance(confirmation, aiormq.abc.DeliveredMessage):  # returned: routes nowhere yet
            result.unroutable[key] += 1
            with contextlib.suppress(Exception):
                await asyncio.wait_for(message.nack(requeue=True), _SETTLE_TIMEOUT)
        else:
            try:
                # Bounded: on a connection that has just died the acknowledgement can wait for ever.
                await asyncio.wait_for(message.ack(), _SETTLE_TIMEOUT)
            except Exception:  # the channel went: published, yet back in the queue (a duplicate if moved again)
                result.failed += 1
            else:
                result.moved[key] += 1
        one_done()

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal taken
        if taken >= total:
            return  # past the count: left unacknowledged, back in the queue when the channel closes
        taken += 1
        if target is None:
            result.seen[routing_key_of(message)] += 1
            one_done()
            return
        task = asyncio.create_task(move(message, target))
        pending.add(task)
        task.add_done_callback(pending.discard)

    tag = await queue.consume(on_message)
    waits = [asyncio.ensure_future(done.wait()), *(asyncio.ensure_future(end) for end in ends)]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(queue.cancel(tag), _SETTLE_TIMEOUT)
        if pending:  # each is bounded by the confirm timeout; what a dead link leaves hanging is given up
            _, hanging = await asyncio.wait(pending, timeout=confirm_timeout + _SETTLE_TIMEOUT)
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)
    if target is not None:
        result.failed += taken - finished  # taken, never confirmed: back in the queue


async def _report(connection: aio_pika.abc.AbstractConnection, names: Topology, exchange: str,
                  result: RerouteResult) -> int:  # fmt: skip
    moved = sum(result.moved.values())
    now = await _depth(connection, names.unrouted)
    print(
        f"reroute: published {moved:,} of the {result.at_start:,} events of {names.unrouted} to {exchange} again"
        f"{' (by routing key: ' + result.keys(result.moved) + ')' if moved else ''}. Those that still match no "
        f"binding came back to {names.unrouted}, which held {result.at_start:,} at the start and holds "
        f"{f'{now:,}' if now is not None else '?'} now (with any the bridge sent there meanwhile)"
    )
    if result.unroutable:
        print(
            f"reroute: {sum(result.unroutable.values()):,} were returned (the exchange has no alternate exchange and "
            f"no binding takes them) and stay in {names.unrouted}: {result.keys(result.unroutable)}"
        )
    if result.failed:
        print(f"reroute: {result.failed:,} could not be published now (refused or no confirm) and stay in "
              f"{names.unrouted}; run reroute again", file=sys.stderr)  # fmt: skip
        return 1
    return 0


async def _depth(connection: aio_pika.abc.AbstractConnection, queue: str) -> int | None:
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
