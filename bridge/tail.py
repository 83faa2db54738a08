"""``orangepill-bridge tail``: bind a temporary queue to the exchange and print events live."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from bridge.broker import declare_topology
from bridge.config import Settings
from bridge.secrets import LogScrubber
from bridge.tls import amqp_connect_kwargs

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
) -> int:
    """Print every event matching the patterns until stopped (the Event Stream Explorer, on RabbitMQ).

    Args:
        settings: broker settings (URL, exchange, unroutable mode).
        patterns: binding keys.
        raw: print each body as received instead of one summary line.
        stop: set it to stop.
        bound: set once the queue is bound (the demo waits for it).

    Returns:
        The exit code: 0, or 1 when the broker cannot be reached.
    """
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10, **amqp_connect_kwargs(settings))
    except Exception as exc:
        scrub = LogScrubber(settings.realm_keys, settings.passwords)
        print(f"tail: cannot reach the broker: {scrub(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 1
    # One connection for the whole tail, and its channel lives as long: nothing is opened per message.
    async with connection:
        channel, exchange, _ = await declare_topology(connection, settings, confirms=False)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        for pattern in patterns:
            await queue.bind(exchange, routing_key=pattern)
        print(f"tail: bound to {settings.exchange} with {', '.join(patterns)}", file=sys.stderr)
        if bound is not None:
            bound.set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            async with message.process():
                text = message.body.decode("utf-8", "replace") if raw else format_line(message)
                print(text, flush=True)

        await queue.consume(on_message)
        await stop.wait()
    return 0
