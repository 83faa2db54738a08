"""Metrics, health endpoints and logs, read from outside as an operator would."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    KEY,
    BridgeProcess,
    bind_queue,
    bridge_settings,
    collect,
    free_port,
    process_args,
    running_bridge,
    simulator,
    wait_until,
)

pytestmark = pytest.mark.broker


async def _get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _quarantined(registry: CollectorRegistry) -> float:
    return sum(s.value for m in registry.collect() if m.name == "orangepill_bridge_events_quarantined"
               for s in m.samples if s.name.endswith("_total"))  # fmt: skip


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def test_metrics_count_what_was_sent_published_and_rejected(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """After a run, /metrics counts exactly the events sent, published and rejected, by event and reason."""
    port = free_port()
    async with simulator(rate=0, count=200, malformed_every=20) as sim:
        settings = bridge_settings(sim.url, exchange_name, metrics_addr=f"127.0.0.1:{port}")
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_sent(200)
            await collect(queue, 200, timeout=20)
            assert await wait_until(lambda: _quarantined(bridge.registry) == len(sim.malformed))
            status, text = await _get(port, "/metrics")
            assert await bridge.finish() == 0
    assert status == 200
    samples = _samples(text)
    assert _total(samples, "orangepill_bridge_events_received_total") == 200
    assert _total(samples, "orangepill_bridge_events_published_total") == 200
    assert _total(samples, "orangepill_bridge_events_rejected_total") == len(sim.malformed) > 0
    # Each rejected frame is confirmed into the quarantine under its own reason; no event is poison.
    rejected = {dict(k[1])["reason"]: v for k, v in samples.items() if k[0] == "orangepill_bridge_events_rejected_total"}
    kept = {dict(k[1])["reason"]: v for k, v in samples.items() if k[0] == "orangepill_bridge_events_quarantined_total"}
    assert {r: v for r, v in kept.items() if v} == {r: v for r, v in rejected.items() if v}
    assert kept["unpublishable"] == 0
    by_event: dict[str, int] = {}
    for event in sim.sent:
        label = event.event if event.event in {"deposit.received", "transaction.done", "user.created"} else None
        if label:
            by_event[label] = by_event.get(label, 0) + 1
    for label, count in by_event.items():
        assert samples[("orangepill_bridge_events_received_total", (("event", label),))] == count
        assert samples[("orangepill_bridge_events_published_total", (("event", label),))] == count
    assert samples[("orangepill_bridge_publish_latency_seconds_count", ())] == 200 + len(sim.malformed)
    assert samples[("orangepill_bridge_subscribed", (("realm", "test"),))] == 1
    assert samples[("orangepill_bridge_amqp_connected", ())] == 1
    assert samples[("orangepill_bridge_last_event_timestamp_seconds", ())] > 1.7e9
    assert KEY not in text


async def test_readyz_follows_the_stream_link(exchange_name: str) -> None:
    """/readyz is 200 while subscribed, 503 with a reason when the simulator drops the link, 200 again after."""
    port = free_port()
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name, metrics_addr=f"127.0.0.1:{port}", reconnect_min=1.5, reconnect_max=2.0)
        async with running_bridge(settings) as bridge:
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_subscribed", {"realm": "test"}) == 1)
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_amqp_connected") == 1)
            status, _ = await _get(port, "/readyz")
            assert status == 200
            health, _ = await _get(port, "/healthz")
            assert health == 200
            await sim.drop_all()
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_stream_connected") == 0, timeout=5)
            status, body = await _get(port, "/readyz")
            assert status == 503
            reasons = json.loads(body)["reasons"]
            assert any("realm test not subscribed" in r for r in reasons)
            await sim.wait_subscribed(2, timeout=10)
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_subscribed", {"realm": "test"}) == 1)
            status, _ = await _get(port, "/readyz")
            assert status == 200
            assert await bridge.finish() == 0


async def test_logs_are_json_state_changes_without_secrets(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """Off a terminal the log is JSON lines, one per state change, never one per event, and never the key."""
    async with simulator(rate=0, count=500, drop_every=250) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(amqp, settings, "#")
        proc = BridgeProcess(process_args(sim.url, exchange_name, "memory"))
        try:
            await sim.wait_sent(500, timeout=30)
            await collect(queue, 500, timeout=30)
            proc.signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
            out = proc.output()
        finally:
            proc.close()
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    messages = [r["msg"] for r in records]
    assert sum("stream subscribed" in m for m in messages) >= 2
    assert any("stream disconnected" in m for m in messages)
    assert any("broker up" in m for m in messages)
    assert len(lines) < 60, "no per-event logging at the default level"
    assert KEY not in out
