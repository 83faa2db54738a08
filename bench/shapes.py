"""What the message contract costs a consumer: the bench's consumer on the bridge's messages and on the Node peer's.

The bridge publishes the contract's eight properties and three headers (``realm``,
``entity_id``, ``received_at``); the 40-line Node peer publishes four properties and
no headers. The same consumer (aiormq, prefetch 5,000, no_ack, the body parsed with
orjson, as in ``bench.workers``) drains a queue of each shape; its CPU per message is
the part of the end-to-end figures that comes from the contract, not from the subject.
Both shapes carry the same body. The queue is transient and deleted afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiormq
import orjson
from pamqp.commands import Basic

from bench.workers import AMQP_URL
from bridge.contract import amqp_properties
from bridge.stream import frame_messages

BODY = (
    b'{"type":"notification","event":"deposit.received","data":"63967141191e9023f356df9f",'
    b'"timestamp":1671547687000,"seq":1,"sent_at":1700000000.0}'
)


def contract_properties() -> Basic.Properties:
    """The properties the bridge publishes for one event: the frame through its own parser and encoder."""
    result = frame_messages(
        BODY.decode(), realm="bench", realm_fp="fp-0123456789ab", secrets=(), max_bytes=1 << 20,
        received_at=1700000000.25,
    )  # fmt: skip
    return amqp_properties(result.messages[0])


def peer_properties() -> Basic.Properties:
    """What ``bench/node-peer/peer.js`` sets: persistent, JSON, its app id, a 32-hex message id."""
    return Basic.Properties(
        delivery_mode=2, content_type="application/json", app_id="orangepill-node-peer", message_id="0" * 32
    )


async def _fill(channel: aiormq.abc.AbstractChannel, queue: str, props: Basic.Properties, n: int) -> None:
    await channel.queue_declare(queue, durable=False, auto_delete=False)
    for start in range(0, n, 1000):
        await asyncio.gather(*(
            channel.basic_publish(BODY, routing_key=queue, properties=props) for _ in range(min(1000, n - start))
        ))  # fmt: skip


async def _drain(queue: str, n: int) -> tuple[float, float]:
    """Consume ``n`` messages as the bench's consumer does; (CPU seconds, wall seconds)."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=5000)
        got = 0
        done = asyncio.Event()
        loads = orjson.loads

        async def on_message(message: Any) -> None:
            nonlocal got
            loads(message.body)
            got += 1
            if got >= n:
                done.set()

        cpu, wall = time.process_time(), time.monotonic()
        await channel.basic_consume(queue, on_message, no_ack=True)
        await asyncio.wait_for(done.wait(), timeout=120)
        return time.process_time() - cpu, time.monotonic() - wall
    finally:
        await connection.close()


async def _measure(n: int, rounds: int) -> dict[str, Any]:
    shapes = {"contract": contract_properties(), "node_peer": peer_properties()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in shapes}
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for _ in range(rounds):
            for name, props in shapes.items():  # alternating, so a slow period hits both
                queue = f"bench.shapes.{name}.{uuid.uuid4().hex[:8]}"
                try:
                    await _fill(channel, queue, props, n)
                    cpu, wall = await _drain(queue, n)
                finally:
                    await channel.queue_delete(queue)
                runs[name].append({"consumer_cpu_us_per_msg": round(cpu / n * 1e6, 1), "msgs_per_s": round(n / wall)})
    finally:
        await connection.close()
    out: dict[str, Any] = {"count": n, "rounds": rounds, "runs": runs}
    for name, props in shapes.items():
        cpu = sorted(r["consumer_cpu_us_per_msg"] for r in runs[name])
        out[name] = {"consumer_cpu_us_per_msg": cpu[len(cpu) // 2], "header_frame_bytes": 8 + 12 + len(props.marshal())}
    out["contract_extra_us_per_msg"] = round(
        out["contract"]["consumer_cpu_us_per_msg"] - out["node_peer"]["consumer_cpu_us_per_msg"], 1
    )
    return out


def consumer_cost(n: int = 30_000, rounds: int = 3) -> dict[str, Any]:
    """The consumer's CPU per message for each shape (median of ``rounds`` alternating drains of ``n``)."""
    return asyncio.run(_measure(n, rounds))
