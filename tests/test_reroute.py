"""`orangepill-bridge reroute`: the events kept in <exchange>.unrouted go to the exchange again once bound."""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from bridge.broker import declare_topology
from bridge.contract import KIND_EVENT, Outbound, Topology
from bridge.reroute import reroute
from bridge.spool import Spool
from tests.helpers import (
    AMQP_URL,
    KEY,
    bind_queue,
    bridge_settings,
    collect,
    free_port,
    queue_of,
    running_bridge,
    simulator,
    wait_until,
)
from tests.test_faults import broker_lock, broker_stopped, fresh_collect

pytestmark = pytest.mark.broker


async def _depth(amqp: AbstractRobustConnection, name: str) -> int:
    queue = await queue_of(amqp, name)
    return queue.declaration_result.message_count or 0


async def _peek(amqp: AbstractRobustConnection, name: str) -> list[AbstractIncomingMessage]:
    """Every message of a queue, left in place (received unacknowledged, requeued when the channel closes)."""
    channel = await amqp.channel()
    queue = await channel.declare_queue(name, passive=True)
    got: list[AbstractIncomingMessage] = []
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        got.append(message)
    await channel.close()
    await asyncio.sleep(0.2)
    return got


async def _cli(*argv: str) -> int:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bridge", *argv)
    return await asyncio.wait_for(proc.wait(), timeout=60)


def _published(registry: CollectorRegistry) -> float:
    return sum(s.value for m in registry.collect() if m.name == "orangepill_bridge_events_published"
               for s in m.samples if s.name.endswith("_total"))  # fmt: skip


def _as_published(message: AbstractIncomingMessage) -> dict[str, Any]:
    return {
        "body": message.body, "headers": dict(message.headers or {}), "message_id": message.message_id,
        "timestamp": message.timestamp, "type": message.type, "app_id": message.app_id,
        "content_type": message.content_type, "delivery_mode": message.delivery_mode,
    }  # fmt: skip


async def _unrouted_events(amqp: AbstractRobustConnection, exchange_name: str, count: int) -> None:
    """Run the bridge over ``count`` simulated events with no queue bound: all of them land in .unrouted."""
    async with simulator(rate=0, count=count) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        async with running_bridge(settings) as bridge:
            await sim.wait_sent(count)
            assert await wait_until(lambda: _published(bridge.registry) == count, 20)
            assert await bridge.finish() == 0
    assert await _depth(amqp, Topology(exchange_name).unrouted) == count


async def test_reroute_moves_what_is_now_bound_unchanged_and_leaves_the_rest(
    amqp: AbstractRobustConnection, exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once a queue is bound for deposit.#, reroute publishes the unrouted deposit events to it with the same
    body, message_id, properties and headers; the others come back to .unrouted, and are not moved twice."""
    await _unrouted_events(amqp, exchange_name, 80)
    unrouted = Topology(exchange_name).unrouted
    before = {m.message_id: _as_published(m) for m in await _peek(amqp, unrouted)}
    deposits = {i: p for i, p in before.items() if (p["type"] or "").startswith("deposit.")}
    assert len(before) == 80 and 0 < len(deposits) < 80

    settings = bridge_settings("ws://127.0.0.1:9", exchange_name)
    queue = await bind_queue(amqp, settings, "deposit.#")
    assert await reroute(settings, asyncio.Event()) == 0

    got = await collect(queue, len(deposits), timeout=15, settle=0.3)
    assert {m.message_id: _as_published(m) for m in got} == deposits
    rest = await _peek(amqp, unrouted)
    assert sorted(m.message_id or "" for m in rest) == sorted(i for i in before if i not in deposits)
    out = capsys.readouterr().out
    assert "took 80 of the 80 events" in out, out
    assert "80 published to" in out, out  # all confirmed; the alternate exchange took back what no binding wants
    assert f"    {len(deposits)} reached a bound queue: " in out, out  # counted copy by copy on the AE
    assert f"    {80 - len(deposits)} still match no binding and came back" in out, out
    assert f"holds {80 - len(deposits)} now" in out, out


async def test_dry_run_counts_by_routing_key_and_moves_nothing(
    amqp: AbstractRobustConnection, exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run names the routing keys waiting in .unrouted with their counts and leaves every message there."""
    await _unrouted_events(amqp, exchange_name, 40)
    unrouted = Topology(exchange_name).unrouted
    keys: dict[str, int] = {}
    for message in await _peek(amqp, unrouted):
        keys[message.routing_key or ""] = keys.get(message.routing_key or "", 0) + 1
    settings = bridge_settings("ws://127.0.0.1:9", exchange_name)
    queue = await bind_queue(amqp, settings, "#")
    assert await reroute(settings, asyncio.Event(), dry_run=True) == 0
    await asyncio.sleep(0.3)
    assert await _depth(amqp, unrouted) == 40
    assert await collect(queue, 1, timeout=0.5) == []
    out = capsys.readouterr().out
    assert "holds 40 events" in out and "Nothing was moved" in out, out
    listed = dict(re.findall(r"^  (\S+) +(\d+)$", out, re.MULTILINE))
    assert {k: int(v) for k, v in listed.items()} == keys, out


async def test_an_exchange_without_the_alternate_exchange_uses_the_header_and_keeps_the_returned(
    amqp: AbstractRobustConnection, exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Events the bridge moved itself (header original_routing_key, exchange declared without the alternate
    exchange) go back under their own routing key; one no binding takes is returned and stays, counted."""
    channel = await amqp.channel()
    await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)  # no AE
    settings = bridge_settings("ws://127.0.0.1:9", exchange_name)
    _, _, with_ae = await declare_topology(amqp, settings, confirms=False)
    assert not with_ae
    unrouted = Topology(exchange_name).unrouted
    for n, key in enumerate(["deposit.received", "user.created", "deposit.failed"]):
        message = aio_pika.Message(f'{{"n":{n}}}'.encode(), message_id=f"id-{n}", type=key,
                                   headers={"original_routing_key": key, "realm": "test"})  # fmt: skip
        await channel.default_exchange.publish(message, routing_key=unrouted)
    queue = await bind_queue(amqp, settings, "deposit.#")
    assert await reroute(settings, asyncio.Event()) == 0
    got = await collect(queue, 2, timeout=10, settle=0.3)
    assert sorted((m.routing_key, m.message_id) for m in got) == [("deposit.failed", "id-2"), ("deposit.received", "id-0")]
    assert all("original_routing_key" not in (m.headers or {}) for m in got)
    (left,) = await _peek(amqp, unrouted)
    assert (left.message_id, (left.headers or {}).get("original_routing_key")) == ("id-1", "user.created")
    assert "1 still match no binding (returned" in capsys.readouterr().out


async def test_limit_and_the_command_line(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """`reroute --limit N` moves N events and exits 0; an empty queue is nothing to do, exit 0 as well."""
    await _unrouted_events(amqp, exchange_name, 30)
    settings = bridge_settings("ws://127.0.0.1:9", exchange_name)
    queue = await bind_queue(amqp, settings, "#")
    argv = ["reroute", "--amqp-url", settings.amqp_url, "--exchange", exchange_name, "--log-level", "warning"]
    assert await _cli(*argv, "--limit", "10") == 0
    assert len(await collect(queue, 10, timeout=10, settle=0.5)) == 10  # and no more within the settle
    assert await _depth(amqp, Topology(exchange_name).unrouted) == 20
    assert await _cli(*argv) == 0
    assert len(await collect(queue, 20, timeout=10, settle=0.3)) == 20
    assert await _depth(amqp, Topology(exchange_name).unrouted) == 0
    assert await _cli(*argv) == 0


async def test_events_the_broker_refuses_stay_in_unrouted_and_the_exit_code_says_so(
    amqp: AbstractRobustConnection, exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event is taken off .unrouted only once RabbitMQ confirmed it: with the bound queue full
    (x-overflow=reject-publish) the nacked ones stay there, and reroute exits 1 saying how many."""
    await _unrouted_events(amqp, exchange_name, 12)
    settings = bridge_settings("ws://127.0.0.1:9", exchange_name)
    _, exchange, _ = await declare_topology(amqp, settings, confirms=False)
    channel = await amqp.channel()
    full = await channel.declare_queue(
        f"{exchange_name}.full", arguments={"x-max-length": 5, "x-overflow": "reject-publish", "x-expires": 600_000}
    )
    await full.bind(exchange, routing_key="#")
    assert await reroute(settings, asyncio.Event()) == 1
    assert await _depth(amqp, full.name) == 5
    assert await _depth(amqp, Topology(exchange_name).unrouted) == 7
    err = capsys.readouterr().err
    assert "5 published to" in err and "7 were refused by RabbitMQ" in err, err
    assert "run reroute again" in err, err


async def test_a_reroute_killed_in_the_middle_loses_nothing(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """SIGKILL of reroute half-way: every event is in the bound queue or still in .unrouted (at least once)."""
    count = 3000
    await _unrouted_events(amqp, exchange_name, count)
    unrouted = Topology(exchange_name).unrouted
    expected = {m.message_id for m in await _peek(amqp, unrouted)}
    assert len(expected) == count
    settings = bridge_settings("ws://127.0.0.1:9", exchange_name)
    queue = await bind_queue(amqp, settings, "#")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "reroute", "--amqp-url", settings.amqp_url, "--exchange", exchange_name,
        "--log-level", "warning", stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(400):
            if await _depth(amqp, queue.name) >= 300:
                break
            await asyncio.sleep(0.01)
        proc.kill()
    finally:
        await proc.wait()
    await asyncio.sleep(0.5)
    moved = await collect(queue, await _depth(amqp, queue.name), timeout=10, settle=0.3)
    left = await _peek(amqp, unrouted)
    assert 300 <= len(moved) < count, "the kill came too late to test anything"
    assert {m.message_id for m in moved} | {m.message_id for m in left} == expected


async def test_a_broker_that_cannot_be_reached_is_said_without_the_password(
    exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """reroute (and tail, through the same helper) exits 1 naming the failure, never the password."""
    port = free_port()
    settings = bridge_settings("ws://127.0.0.1:9", exchange_name, amqp_url=f"amqp://guest:s3cret-pw@127.0.0.1:{port}/")
    assert await reroute(settings, asyncio.Event()) == 1
    err = capsys.readouterr().err
    assert "reroute: cannot reach the broker" in err, err
    assert "s3cret-pw" not in err


@pytest.mark.fault
@pytest.mark.slow
async def test_a_broker_stopped_in_the_middle_ends_reroute_with_exit_1_and_loses_nothing(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """RabbitMQ's app stopped while reroute runs: it ends (no hang on acknowledgements of the dead link)
    with exit 1, and after the restart every event is in the bound queue or still in .unrouted."""
    count = 4000
    await _unrouted_events(amqp, exchange_name, count)
    unrouted = Topology(exchange_name).unrouted
    expected = {m.message_id for m in await _peek(amqp, unrouted)}
    settings = bridge_settings("ws://127.0.0.1:9", exchange_name)
    queue_name = (await bind_queue(amqp, settings, "#")).name
    async with broker_lock():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "reroute", "--amqp-url", settings.amqp_url, "--exchange", exchange_name,
            "--log-level", "error", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(400):
                if await _depth(amqp, queue_name) >= 300:
                    break
                await asyncio.sleep(0.01)
            async with broker_stopped():
                code = await asyncio.wait_for(proc.wait(), timeout=60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert code == 1
    moved = await fresh_collect(queue_name, await _depth(amqp, queue_name), timeout=10)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        left = await _peek(connection, unrouted)  # type: ignore[arg-type]
    assert 0 < len(moved) < count, "the stop came too late to test anything"
    assert {m.message_id for m in moved} | {m.message_id for m in left} == expected


async def test_without_the_alternate_exchange_every_event_is_tried_once(
    amqp: AbstractRobustConnection, exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no alternate exchange, the returned ones are put back at the end, not at the head: every bound
    event behind them is moved in the same run (a requeue at the head used them up again and again)."""
    channel = await amqp.channel()
    await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)  # no AE
    settings = bridge_settings("ws://127.0.0.1:9", exchange_name)
    await declare_topology(amqp, settings, confirms=False)
    unrouted = Topology(exchange_name).unrouted
    for n in range(400):
        key = "deposit.received" if n % 2 else "user.created"
        message = aio_pika.Message(b"{}", message_id=f"id-{n}", headers={"original_routing_key": key})
        await channel.default_exchange.publish(message, routing_key=unrouted)
    queue = await bind_queue(amqp, settings, "deposit.#")
    assert await reroute(settings, asyncio.Event()) == 0
    got = await collect(queue, 200, timeout=10, settle=0.3)
    assert sorted(m.message_id or "" for m in got) == sorted(f"id-{n}" for n in range(1, 400, 2))
    left = await _peek(amqp, unrouted)
    assert sorted(m.message_id or "" for m in left) == sorted(f"id-{n}" for n in range(0, 400, 2))
    out = capsys.readouterr().out
    assert "200 published to" in out and "200 still match no binding" in out, out


async def test_a_mistyped_exchange_is_said_and_nothing_is_declared(
    amqp: AbstractRobustConnection, exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """reroute --exchange with a name that does not exist exits 2 saying so, and declares nothing."""
    settings = bridge_settings("ws://127.0.0.1:9", exchange_name)
    assert await reroute(settings, asyncio.Event()) == 2
    assert f"there is no exchange {exchange_name}" in capsys.readouterr().err
    channel = await amqp.channel()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await channel.get_exchange(exchange_name, ensure=True)


async def test_refused_republishes_the_events_rabbitmq_refused_and_leaves_the_quarantined_frames(
    amqp: AbstractRobustConnection, exchange_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event RabbitMQ refused for good (quarantined as unpublishable) goes to its routing key again with the
    contract's properties and headers once the cause is gone; the quarantined frames stay, unchanged, and a
    second run moves nothing twice."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(str(path))
    body = orjson.dumps({"type": "notification", "event": "deposit.received", "data": "ent-7", "timestamp": "1"})
    poison = Outbound(KIND_EVENT, "deposit.received", "id-poison", body,
                      {"realm": "test", "received_at": 1764150000987, "huge": "h" * 200_000}, 1764150000.987)  # fmt: skip
    await spool.put(poison)  # a header frame above frame_max: quarantined as unpublishable
    assert (await spool.close()).lost == 0
    names = Topology(exchange_name)
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name, spool=str(path))
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            assert await sim.send_malformed(2, "bad_json") == 2
            quarantined = "orangepill_bridge_events_quarantined_total"
            assert await wait_until(lambda: bridge.metric(quarantined, {"reason": "bad_json"}) == 2, 30)
            assert await wait_until(lambda: bridge.metric(quarantined, {"reason": "unpublishable"}) == 1, 30)
            assert await bridge.finish() == 0
    before = [_as_published(m) for m in await _peek(amqp, names.quarantine)]
    frames = [p for p in before if p["headers"]["reason"] == "bad_json"]  # the same frame twice: same message_id
    assert len(before) == 3 and len(frames) == 2

    queue = await bind_queue(amqp, settings, "deposit.#")
    assert await reroute(settings, asyncio.Event(), dry_run=True, refused=True) == 0
    out = capsys.readouterr().out
    assert "holds 3 messages; 1 events RabbitMQ refused, by routing key:\n  deposit.received " in out, out
    assert "2 quarantined frames, not events (reroute leaves them), by reason:\n  bad_json " in out, out
    assert await _depth(amqp, names.quarantine) == 3

    assert await reroute(settings, asyncio.Event(), refused=True) == 0
    (got,) = await collect(queue, 1, timeout=15, settle=0.3)
    assert _as_published(got) == {
        "body": body, "message_id": "id-poison", "type": "deposit.received", "app_id": "orangepill-bridge",
        "headers": {"realm": "test", "received_at": 1764150000987, "entity_id": "ent-7"},
        "timestamp": got.timestamp, "content_type": "application/json", "delivery_mode": 2,
    }  # fmt: skip
    assert got.timestamp is not None and got.timestamp.timestamp() == 1764150000
    after = [_as_published(m) for m in await _peek(amqp, names.quarantine)]
    assert after == frames  # the frames, byte for byte, with their headers
    out = capsys.readouterr().out
    assert "took 3 of the 3 messages" in out and "    1 reached a bound queue: deposit.received 1" in out, out
    assert "2 quarantined frames, not events, were put back unchanged" in out, out

    assert await reroute(settings, asyncio.Event(), refused=True) == 0  # nothing more to publish
    third = capsys.readouterr().out
    assert "published" not in third and "2 quarantined frames, not events, were put back" in third, third
    assert await _depth(amqp, names.quarantine) == 2
    assert await _depth(amqp, queue.name) == 0



async def test_refused_leaves_out_an_entity_id_that_holds_a_configured_realm_key(
    amqp: AbstractRobustConnection, exchange_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The entity_id of a refused event is read from its body again: with the realm keys configured (the run
    command's settings) one holding a key is left out, as run leaves it out; without them it is published and
    reroute says the check could not be made."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(str(path))
    body = orjson.dumps({"type": "notification", "event": "deposit.received", "data": KEY, "timestamp": "1"})
    for mid in ("id-no-keys", "id-keys"):
        await spool.put(Outbound(KIND_EVENT, "deposit.received", mid, body,
                                 {"realm": "test", "received_at": 1764150000987, "huge": "h" * 200_000},
                                 1764150000.987))  # fmt: skip
    assert (await spool.close()).lost == 0
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name, spool=str(path))
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            quarantined = "orangepill_bridge_events_quarantined_total"
            assert await wait_until(lambda: bridge.metric(quarantined, {"reason": "unpublishable"}) == 2, 30)
            assert await bridge.finish() == 0
    queue = await bind_queue(amqp, settings, "deposit.#")
    capsys.readouterr()

    assert await reroute(replace(settings, realms=()), asyncio.Event(), refused=True, limit=1) == 0
    (first,) = await collect(queue, 1, timeout=15, settle=0.3)
    assert first.message_id == "id-no-keys" and (first.headers or {}).get("entity_id") == KEY
    assert "no realm key is configured" in capsys.readouterr().err

    assert await reroute(settings, asyncio.Event(), refused=True) == 0
    (second,) = await collect(queue, 1, timeout=15, settle=0.3)
    assert second.message_id == "id-keys" and second.body == body
    assert set(second.headers or {}) == {"realm", "received_at"}, second.headers
    assert "no realm key" not in capsys.readouterr().err
