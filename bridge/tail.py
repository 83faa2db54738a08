"""``orangepill-bridge tail``: bind a temporary queue to the exchange and print events live."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractIncomingMessage

from bridge.broker import connect_for_command, declare_topology
from bridge.config import Settings
from bridge.errors import TopologyError
from bridge.progress import Progress

__all__ = ["format_line", "tail"]


def format_line(message: AbstractIncomingMessage) -> str:
    """One line per event: time, routing key, the entity (``data``), realm and a short message id."""
    headers: dict[str, Any] = dict(message.headers or {})
    try:
        body = orjson.loads(message.body)
        data = body.get("data") if isinstance(body, dict) else None
    except orjson.JSONDecodeError:
        data = None
    stamp = time.strftime("%H:%M:%S")
    return (
        f"{stamp} {message.routing_key:<28} data={data!s:<26} realm={headers.get('realm')} "
        f"id={(message.message_id or '')[:12]}"
    )


async def tail(
    settings: Settings,
    patterns: Sequence[str],
    raw: bool,
    stop: asyncio.Event,
    bound: asyncio.Event | None = None,
    *,
    count: int = 0,
    progress: Progress | None = None,
    new_exchange_notice: bool = True,
) -> int:
    """Print every event matching the patterns until stopped, or until ``count`` events (the Explorer, on RabbitMQ).

    Args:
        settings: broker settings (URL, exchange, unroutable mode).
        patterns: binding keys.
        raw: print each body as received instead of one summary line.
        stop: set it to stop.
        bound: set once the queue is bound (the demo waits for it).
        count: stop after this many events; 0 = never. A bar on a terminal shows how far it is.
        progress: reports the ``count`` events (default: a :class:`Progress` on standard error).
        new_exchange_notice: say so when the exchange did not exist (a mistyped ``--exchange``).

    Returns:
        The exit code: 0, 1 when the broker cannot be reached, 2 when the exchange is of another kind.
    """
    connection = await connect_for_command(settings, "tail", robust=True)
    if connection is None:
        return 1
    _say_link_changes(connection)
    # One connection for the whole tail, and its channel lives as long: nothing is opened per message.
    async with connection:
        existed = await _exchange_exists(connection, settings.exchange)
        try:
            channel, exchange, _ = await declare_topology(connection, settings, confirms=False)
        except TopologyError as exc:  # an exchange of another kind: say so, as run and check do
            print(f"tail: {exc}", file=sys.stderr)
            return exc.exit_code
        if not existed and new_exchange_notice:
            print(
                f"tail: the exchange {settings.exchange!r} did not exist; declared it. If the bridge already "
                "runs, check --exchange (or BRIDGE_EXCHANGE): a bridge with another exchange publishes nothing here",
                file=sys.stderr,
            )
        # Named under the exchange, as the bridge's own queues: one permission pattern covers it.
        queue = await channel.declare_queue(f"{settings.exchange}.tail.{uuid.uuid4().hex[:8]}", exclusive=True,
                                            auto_delete=True)  # fmt: skip
        for pattern in patterns:
            await queue.bind(exchange, routing_key=pattern)
        print(f"tail: bound to {settings.exchange} with {', '.join(patterns)}", file=sys.stderr)
        if bound is not None:
            bound.set()
        if count and progress is None:
            progress = Progress("tail", count)
        shown = 0
        enough = asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal shown
            async with message.process():
                if count and shown >= count:
                    return  # already past N: the consumer is being cancelled
                text = message.body.decode("utf-8", "replace") if raw else format_line(message)
                print(text, flush=True)
                shown += 1
                if progress is not None:
                    progress.update()
                if count and shown >= count:
                    enough.set()

        await queue.consume(on_message)
        try:
            await _first(stop, enough)
        finally:
            if progress is not None:
                progress.close()
    return 0


def _say_link_changes(connection: aio_pika.abc.AbstractConnection) -> None:
    """A broker restart does not end the tail: say when the link goes and comes back (events in between are missed)."""
    if not isinstance(connection, aio_pika.abc.AbstractRobustConnection):
        return

    def lost(_sender: object, exc: BaseException | None = None) -> None:
        if isinstance(exc, Exception):  # our own close at the end passes a CancelledError (a BaseException)
            print(f"tail: lost the connection to RabbitMQ ({type(exc).__name__}); reconnecting; events published "
                  "until it is back are not shown", file=sys.stderr)  # fmt: skip

    def back(_sender: object) -> None:
        print("tail: reconnected to RabbitMQ; tailing again", file=sys.stderr)

    connection.close_callbacks.add(lost)
    connection.reconnect_callbacks.add(back)


async def _exchange_exists(connection: aio_pika.abc.AbstractConnection, name: str) -> bool:
    """True if the exchange is there (a passive declare, on a channel of its own: a miss closes it)."""
    channel = await connection.channel()
    try:
        await channel.get_exchange(name, ensure=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of the events is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
