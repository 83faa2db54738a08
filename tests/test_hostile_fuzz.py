"""Stream fuzzing end to end: random and mutated frames mixed with valid events, through the simulator and the bridge.

The default is 5,000 frames; ``HOSTILE_FUZZ_FRAMES=100000`` runs the full size
(``HOSTILE_FUZZ_SEED`` picks the random seed).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable

import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from bridge.contract import KIND_EVENT, Topology
from bridge.secrets import key_fingerprint
from bridge.stream import frame_messages
from bridge.wire import REJECT_REASONS
from tests.helpers import KEY, bind_queue, bridge_settings, queue_of, running_bridge, simulator, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FRAMES = int(os.environ.get("HOSTILE_FUZZ_FRAMES", "5000"))
SEED = int(os.environ.get("HOSTILE_FUZZ_SEED", "20261126"))
MAX_FRAME = 65_536

_TOKENS = [
    "NaN", "Infinity", "-Infinity", "1e400", "123456789012345678901234567890", "-18446744073709551617",
    '"\\ud800"', '"\\udfff"', "null", "true", "[]", "{}", '"é"', '"\\u0000"', "}", "{", "]", ",", ":", '"',
    '"event"', '"data"', '"type":"error"', '"type":"info"', '"a..b"', '"*.#"',
]  # fmt: skip


def _valid(n: int) -> str:
    return orjson.dumps(
        {"type": "notification", "event": "fuzz.valid", "data": f"v{n:07d}", "timestamp": 1700000000000 + n, "fz": n}
    ).decode()


def _mutate(rng: random.Random, text: str) -> str:
    def flip(s: str) -> str:
        i = rng.randrange(len(s))
        return s[:i] + chr(rng.randrange(32, 0x3000)) + s[i + 1 :]

    def insert(s: str) -> str:
        i = rng.randrange(len(s))
        return s[:i] + rng.choice(_TOKENS) + s[i:]

    def delete(s: str) -> str:
        i = rng.randrange(len(s))
        return s[:i] + s[rng.randrange(i, len(s)) :]

    def nest(s: str) -> str:
        depth = rng.randrange(50, 400)
        return s[:-1] + ',"deep":' + "[" * depth + "1" + "]" * depth + "}"

    ops: list[Callable[[str], str]] = [
        lambda s: s[: rng.randrange(len(s))],  # truncate
        flip,
        insert,
        delete,
        nest,
        lambda s: s.replace('"v', rng.choice(_TOKENS) + ',"x":"', 1),  # break the data value
        lambda s: s[:-1] + f',"fz":{rng.choice(_TOKENS)}' + "}",  # duplicate key with a hostile value
        lambda s: s.replace("fuzz.valid", rng.choice(["", "a b", "x" * 300, "a.*", "é.ü", "a..b"]), 1),
        lambda s: '{"type":"notification","data":' + s + "}",  # re-wrapped (nested envelope)
    ]
    for _ in range(rng.randrange(1, 4)):
        if text:
            text = rng.choice(ops)(text)
    return text


def _random_frame(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 200)))
    if kind == 1:
        return "".join(chr(rng.choice([rng.randrange(1, 0xD800), rng.randrange(0xE000, 0x110000)])) for _ in range(50))
    if kind == 2:
        return json.dumps(rng.choice([[1, 2], "s", 3, None, {"type": "notification"}, {"event": 5}]))
    return "".join(rng.choice(_TOKENS) for _ in range(rng.randrange(1, 30)))


def _frames(rng: random.Random, n: int) -> tuple[list[str], list[int]]:
    """``n`` frames: about a third valid events (their numbers returned), the rest random or mutated."""
    frames: list[str] = []
    valid: list[int] = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.35:
            frames.append(_valid(i))
            valid.append(i)
        elif roll < 0.85:
            frames.append(_mutate(rng, _valid(i)))
        else:
            frames.append(_random_frame(rng))
    return [f[:MAX_FRAME // 4] or "x" for f in frames], valid


async def _drain(queue: AbstractQueue, expected: int, timeout: float) -> list[AbstractIncomingMessage]:
    got: list[AbstractIncomingMessage] = []
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        got.append(message)
        if len(got) >= expected:
            done.set()

    await queue.channel.set_qos(prefetch_count=2000)  # type: ignore[attr-defined]
    tag = await queue.consume(on_message, no_ack=True)
    try:
        if expected:
            await asyncio.wait_for(done.wait(), timeout)
        await asyncio.sleep(0.5)  # anything beyond the expected count would show up now
    finally:
        await queue.cancel(tag)
    return got


async def test_fuzzed_stream_keeps_the_bridge_alive_and_accounts_for_every_frame(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """The bridge survives the fuzz; every valid event is in the # queue; every refused frame is in quarantine and counted."""
    rng = random.Random(SEED)
    frames, valid = _frames(rng, FRAMES)
    # What each frame must become, by the frame boundary the bridge runs (quarantine is the only failure).
    expected_events = 0
    expected_quarantine = 0
    for raw in frames:
        result = frame_messages(
            raw, realm="test", realm_fp=key_fingerprint(KEY), secrets=(KEY,), max_bytes=MAX_FRAME, received_at=0.0
        )
        expected_events += sum(1 for m in result.messages if m.kind == KIND_EVENT)
        expected_quarantine += result.rejected is not None
    assert expected_quarantine > FRAMES // 4, "the fuzzer made too few invalid frames to mean anything"

    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name, max_frame_bytes=MAX_FRAME, idle_timeout=30.0)
        everything = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            started = time.monotonic()
            for raw in frames:
                assert await sim.send_raw(raw) == 1, "the bridge is no longer subscribed"
            rejected = "orangepill_bridge_events_rejected_total"
            def refused() -> float:
                return sum(bridge.metric(rejected, {"reason": r}) for r in REJECT_REASONS)

            assert await wait_until(lambda: refused() == expected_quarantine, timeout=120), refused()
            events = await _drain(everything, expected_events, timeout=120)
            quarantine = await _drain(await queue_of(amqp, Topology(exchange_name).quarantine), expected_quarantine, 120)
            took = time.monotonic() - started
            assert not bridge.task.done(), "the bridge ended during the fuzz"
            assert sim.subscribes == 1, "the bridge reconnected: a frame broke the link"
            assert await bridge.finish() == 0
    print(f"\nfuzz: {FRAMES} frames (seed {SEED}) all delivered in {took:.1f}s; {len(valid)} planted valid, "
          f"{expected_events} events, {expected_quarantine} quarantined")  # fmt: skip
    bodies = [json.loads(m.body) for m in events if m.routing_key == "fuzz.valid"]
    arrived = {body["fz"] for body in bodies if type(body.get("fz")) is int}
    assert set(valid) <= arrived
    assert len(events) == expected_events
    assert len(quarantine) == expected_quarantine
    assert all((m.headers or {}).get("reason") in REJECT_REASONS for m in quarantine)
