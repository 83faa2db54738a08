"""Poison messages against the real RabbitMQ: an event the broker refuses never blocks the ones behind it."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from bridge.contract import KIND_EVENT, Outbound, Topology
from bridge.spool import Spool
from tests.helpers import (
    bind_queue,
    bridge_settings,
    collect,
    queue_of,
    running_bridge,
    seqs,
    simulator,
    wait_until,
)
from tests.test_faults import _ctl, broker_lock

pytestmark = pytest.mark.broker


async def test_event_with_200kb_data_is_published_and_does_not_block_the_rest(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """A 200 KB data string gets no entity_id header (headers stay below frame_max); it and every later event arrive."""
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            big = await sim.send_event("account.updated", "d" * 200_000)
            normal = [await sim.send_event("deposit.received", f"{n:024x}") for n in range(20)]
            got = await collect(queue, 21, timeout=30, settle=0.3)
            assert await bridge.finish() == 0
    assert seqs(got) == [big.seq] + [e.seq for e in normal]
    first = got[0]
    assert orjson.loads(first.body)["data"] == "d" * 200_000
    assert "entity_id" not in (first.headers or {})
    assert got[1].headers["entity_id"] == f"{0:024x}"


def _event(n: int, headers: dict[str, str | int] | None = None) -> Outbound:
    return Outbound(
        kind=KIND_EVENT,
        routing_key="deposit.received",
        message_id=f"id-{n}",
        body=orjson.dumps({"type": "notification", "event": "deposit.received", "data": f"e{n}", "seq": n}),
        headers={"realm": "test", **(headers or {})},
        received_at=time.time(),
    )


async def _spool_with_poison_first(path: Path) -> None:
    spool = await Spool.open(str(path))
    await spool.put(_event(0, {"huge": "h" * 200_000}))  # a header frame RabbitMQ refuses (frame_max 131072)
    for n in range(1, 11):
        await spool.put(_event(n))
    report = await spool.close()
    assert report.lost == 0


@pytest.mark.parametrize("precheck", [True, False], ids=["frame_max_checked", "broker_refuses"])
async def test_message_the_broker_refuses_for_good_goes_to_quarantine(
    amqp: AbstractRobustConnection,
    exchange_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    precheck: bool,
) -> None:
    """A spooled event whose header frame exceeds frame_max is quarantined (reason unpublishable); the rest flow on.

    Without the frame_max check, RabbitMQ closes the connection (501 FRAME_ERROR) each
    time; the publisher resends the suspects alone and quarantines the one that causes it.
    """
    if not precheck:
        monkeypatch.setattr("bridge.publisher._header_size", lambda properties: 0)
    path = tmp_path / "spool.db"
    await _spool_with_poison_first(path)
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name, spool=str(path))
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            got = await collect(queue, 10, timeout=60, settle=0.3)
            quarantine = await queue_of(amqp, Topology(exchange_name).quarantine)
            (poison,) = await collect(quarantine, 1, timeout=30)
            assert bridge.metric("orangepill_bridge_events_quarantined_total", {"reason": "unpublishable"}) == 1
            assert await bridge.finish() == 0
    assert [orjson.loads(m.body)["seq"] for m in got] == list(range(1, 11))
    headers = dict(poison.headers or {})
    assert headers["reason"] == "unpublishable"
    assert headers["original_routing_key"] == "deposit.received"
    assert "huge" not in headers
    assert ("frame_max" in str(headers["detail"])) if precheck else ("FRAME_ERROR" in str(headers["detail"]))
    assert poison.message_id == "id-0"
    assert orjson.loads(poison.body)["seq"] == 0


def _max_message_size() -> int:
    out = subprocess.run(["rabbitmqctl", "eval", "application:get_env(rabbit, max_message_size)."],
                         check=True, capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    found = re.search(r"\{ok,(\d+)\}", out)
    assert found is not None, out
    return int(found.group(1))


def _set_max_message_size(size: int) -> None:
    _ctl("eval", f"application:set_env(rabbit, max_message_size, {size}).")


@pytest.mark.fault  # lowers the broker-wide max_message_size (restored in a finally)
async def test_an_event_above_max_message_size_waits_in_the_spool_and_goes_out_once_the_limit_is_raised(
    amqp: AbstractRobustConnection, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ refuses an event above its max_message_size, and the quarantine copy (same body) too. The
    event stays in the spool and is tried again alone, each time later; the events behind it are published
    meanwhile (before, each retry closed the channel over them: none went out); once the limit is raised,
    it goes out to its queue as any event, never to the quarantine."""
    monkeypatch.setattr("bridge.publisher._PARK_FIRST", 3.0)
    quarantined, failures = "orangepill_bridge_events_quarantined_total", "orangepill_bridge_publish_failures_total"
    async with broker_lock():
        limit = _max_message_size()
        try:
            _set_max_message_size(65536)
            async with simulator(paused=True) as sim:
                settings = bridge_settings(sim.url, exchange_name)
                queue = await bind_queue(amqp, settings, "#")
                async with running_bridge(settings) as bridge:
                    await sim.wait_subscribed(1)
                    big = await sim.send_event("deposit.received", "d" * 100_000)
                    rest = [await sim.send_event("deposit.received", f"{n:024x}") for n in range(5)]
                    got = await collect(queue, 5, timeout=30, settle=0.5)
                    assert seqs(got) == [e.seq for e in rest]  # not held up behind it
                    assert await wait_until(lambda: bridge.metric(failures, {"reason": "refused"}) >= 1, 30)
                    assert bridge.metric("orangepill_bridge_spool_depth") == 1  # kept, not dropped
                    _set_max_message_size(limit)
                    (late,) = await collect(queue, 1, timeout=30, settle=0.5)
                    assert bridge.metric(quarantined, {"reason": "unpublishable"}) == 0
                    assert await bridge.finish() == 0
        finally:
            _set_max_message_size(limit)
    assert seqs([late]) == [big.seq]
    assert orjson.loads(late.body)["data"] == "d" * 100_000
    assert late.routing_key == "deposit.received" and "entity_id" not in (late.headers or {})
    assert (await queue_of(amqp, Topology(exchange_name).quarantine)).declaration_result.message_count == 0
