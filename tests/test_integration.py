"""End to end: the simulator on loopback, the bridge, the real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry

from bridge.app import run_bridge
from bridge.catalog import metric_label
from bridge.config import Realm, Settings
from bridge.contract import message_id
from bridge.secrets import key_fingerprint
from bridge.simulator import Simulator
from bridge.spool import Spool
from tests.helpers import (
    KEY,
    BridgeProcess,
    RunningBridge,
    bind_queue,
    bridge_settings,
    collect,
    free_port,
    process_args,
    queue_of,
    running_bridge,
    seqs,
    simulator,
    wait_until,
)

pytestmark = pytest.mark.broker


async def test_binding_receives_exactly_its_events_in_order(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """A queue bound to transaction.# gets exactly the transaction events, in order; one bound to # gets all."""
    async with simulator(rate=0, count=300) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        tx = await bind_queue(amqp, settings, "transaction.#")
        every = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_sent(300, timeout=30)
            all_msgs = await collect(every, 300, timeout=30, settle=0.3)
            expected_tx = [e.seq for e in sim.sent if e.event.startswith("transaction.")]
            tx_msgs = await collect(tx, len(expected_tx), timeout=10, settle=0.3)
            assert await bridge.finish() == 0
    assert seqs(all_msgs) == [e.seq for e in sim.sent]
    assert expected_tx, "the simulator sent no transaction events"
    assert seqs(tx_msgs) == expected_tx
    assert all(m.routing_key is not None and m.routing_key.startswith("transaction.") for m in tx_msgs)


async def test_message_contract(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """Body, routing key, message_id, persistence, properties and headers follow the contract."""
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            sent = await sim.send_event("deposit.received", "63967141191e9023f356df9f", timestamp="162553625262")
            (msg,) = await collect(queue, 1, timeout=10)
            assert await bridge.finish() == 0
    body = orjson.loads(msg.body)
    assert msg.routing_key == "deposit.received"
    assert body["type"] == "notification"
    assert (body["event"], body["data"], body["timestamp"]) == ("deposit.received", sent.data, "162553625262")
    assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert msg.content_type == "application/json"
    assert msg.type == "deposit.received"
    assert msg.app_id == "orangepill-bridge"
    assert msg.timestamp is not None
    extra = {k: v for k, v in body.items() if k not in ("type", "event", "data", "timestamp")}
    assert set(extra) == {"seq", "sent_at"}, "the simulator's extra fields are kept"
    assert msg.message_id == message_id(key_fingerprint(KEY), "deposit.received", sent.data, "162553625262", extra)
    headers = dict(msg.headers or {})
    assert headers["realm"] == "test"
    assert headers["entity_id"] == sent.data
    assert abs(int(headers["received_at"]) - time.time() * 1000) < 60_000  # type: ignore[call-overload]
    everything = repr(msg.properties) + repr(headers) + msg.body.decode()
    assert KEY not in everything


async def test_nested_and_flat_envelopes_give_the_same_message(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """The same event in the flat and the nested envelope produces the same body and message_id."""
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            await sim.send_raw('{"type":"notification","event":"account.created","data":"abc","timestamp":"1700000000000"}')
            await sim.send_raw(
                '{"type":"notification","data":{"event":"account.created","data":"abc","timestamp":"1700000000000"}}'
            )
            flat, nested = await collect(queue, 2, timeout=10)
            assert await bridge.finish() == 0
    assert flat.body == nested.body
    assert flat.message_id == nested.message_id
    assert flat.routing_key == nested.routing_key == "account.created"


async def test_name_outside_catalogue_is_routed(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """An event name the Orangepill WebSocket documentation does not list (its own example's transaction.processed) is still routed."""
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(amqp, settings, "transaction.*")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            await sim.send_event("transaction.processed", "63967141191e9023f356df9f")
            (msg,) = await collect(queue, 1, timeout=10)
            await wait_until(lambda: bridge.metric("orangepill_bridge_events_received_total", {"event": "other"}) == 1)
            assert bridge.metric("orangepill_bridge_events_received_total", {"event": "other"}) == 1
            assert await bridge.finish() == 0
    assert msg.routing_key == "transaction.processed"
    assert metric_label("transaction.processed") == "other"


async def test_rejected_realm_key_exits_2_without_showing_the_key(exchange_name: str) -> None:
    """A key the stream refuses makes run exit 2 within seconds, and its output never shows the key."""
    async with simulator(realm_keys=("some-other-key",)) as sim:
        proc = BridgeProcess(process_args(sim.url, exchange_name, "memory"))
        try:
            started = time.monotonic()
            code = await asyncio.to_thread(proc.wait, 20)
            elapsed = time.monotonic() - started
            out = proc.output()
        finally:
            proc.close()
        assert sim.rejected >= 1
        assert sim.subscribes == 0
    assert code == 2, out
    assert elapsed < 15
    assert "Invalid Realm Key" in out
    assert "rejected the realm key" in out
    assert KEY not in out
    assert sim.connections == 1, "a rejected key must not be retried"


async def test_a_key_revoked_while_running_stops_only_its_realm_while_the_others_go_on(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With two realms, one key revoked while the bridge runs (accepted, then refused after a reconnect): the
    other realm's events keep flowing (exiting would stop them, and the stream has no replay), the revoked
    realm is not retried and what it received before is published; realm_rejected is 1 for it and 0 for the
    other, /readyz says why, the ERROR line never shows the key, and a stop exits 0."""
    from tests.ha_support import KEY2
    from tests.test_faults import readyz

    port = free_port()
    async with simulator(paused=True, realm_keys=(KEY, KEY2)) as sim:
        settings = bridge_settings(
            sim.url, exchange_name, realms=(Realm(label="good", key=KEY), Realm(label="revoked", key=KEY2)),
            metrics_addr=f"127.0.0.1:{port}",
        )
        queue = await bind_queue(amqp, settings, "#")
        with caplog.at_level(logging.INFO):
            async with running_bridge(settings) as bridge:
                await sim.wait_subscribed(2)
                for n in range(3):
                    await sim.send_event("deposit.received", f"before-{n}", realm=KEY2)
                assert len(await collect(queue, 3, timeout=15)) == 3
                assert sim.revoke(KEY2) == 1
                rejected = "orangepill_bridge_realm_rejected"
                assert await wait_until(lambda: bridge.metric(rejected, {"realm": "revoked"}) == 1, 15)
                for n in range(5):
                    await sim.send_event("deposit.received", f"dep-{n}", realm=KEY)
                got = await collect(queue, 5, timeout=15)
                assert sorted(orjson.loads(m.body)["data"] for m in got) == [f"dep-{n}" for n in range(5)]
                assert {(m.headers or {}).get("realm") for m in got} == {"good"}
                assert bridge.metric(rejected, {"realm": "good"}) == 0
                assert bridge.metric("orangepill_bridge_subscribed", {"realm": "good"}) == 1
                assert bridge.metric("orangepill_bridge_stream_connected") == 1  # the realms still expected
                # Its spool published, the replica gives the realm's lock up (another replica whose
                # subscription works would lead it at once) and keeps leading the other realm.
                leader = "orangepill_bridge_leader"
                assert await wait_until(lambda: bridge.metric(leader, {"realm": "revoked"}) == 0, 10)
                assert bridge.metric(leader, {"realm": "good"}) == 1
                await asyncio.sleep(1.0)  # longer than reconnect_max: a retry would have come by now
                assert sim.rejected == 1, "a rejected key must not be retried"
                assert not bridge.task.done()
                status, readiness = await readyz(port)
                assert status == 503
                assert readiness["reasons"] == [
                    "realm revoked stopped: the stream rejected its key (not retried; fix it and restart)"
                ]
                assert await bridge.finish() == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        "rejected the realm key of realm 'revoked'" in e and "refuses; the bridge goes on with its other 1 realm(s)" in e
        for e in errors
    ), errors
    assert "leadership: realm revoked lock released for another replica" in caplog.text
    assert KEY2 not in caplog.text


async def test_a_key_refused_at_the_first_answer_is_bad_configuration_even_beside_good_ones(
    exchange_name: str,
) -> None:
    """A key the stream never accepted is a mistyped key: run exits 2 at once, as with a single realm, so that a
    deploy with it fails where it is seen, even while another realm's key works."""
    from tests.ha_support import KEY2

    async with simulator(realm_keys=(KEY,)) as sim:
        settings = bridge_settings(
            sim.url, exchange_name, realms=(Realm(label="good", key=KEY), Realm(label="typo", key=KEY2))
        )
        code = await asyncio.wait_for(run_bridge(settings, asyncio.Event(), registry=CollectorRegistry()), 30)
        assert sim.rejected == 1
    assert code == 2


async def test_when_every_realm_key_is_rejected_the_bridge_exits_2_naming_each(
    exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every key refused: run ends with exit code 2, and the log names each refused realm (not only the first),
    so that one restart after fixing them is enough."""
    from tests.ha_support import KEY2

    key3 = "test-realm-key-third-5c83d0"
    async with simulator(realm_keys=("some-other-key",)) as sim:
        settings = bridge_settings(sim.url, exchange_name, realms=(
            Realm(label="a", key=KEY), Realm(label="b", key=KEY2), Realm(label="c", key=key3)
        ))  # fmt: skip
        with caplog.at_level(logging.INFO):
            code = await asyncio.wait_for(run_bridge(settings, asyncio.Event(), registry=CollectorRegistry()), 30)
        assert sim.rejected == 3
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for label in "abc":
        assert any(f"rejected the realm key of realm '{label}'" in e for e in errors), errors


async def test_reconnects_and_resubscribes_after_drops(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """When the server drops the link mid-stream the bridge reconnects, resubscribes, and every event arrives."""
    async with simulator(rate=500, count=400, drop_every=60) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_sent(400, timeout=60)
            msgs = await collect(queue, 400, timeout=30, settle=0.3)
            assert sim.subscribes >= 6
            assert bridge.metric("orangepill_bridge_stream_connects_total") >= 6
            assert bridge.metric("orangepill_bridge_stream_disconnects_total", {"reason": "closed"}) >= 6
            assert await bridge.finish() == 0
    assert sorted(set(seqs(msgs))) == list(range(1, 401))


async def test_silent_link_is_detected_and_redialled(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """A link that goes silent (no frames, no pongs) is dropped after the idle timeout and redialled."""
    async with simulator(rate=50, count=0, silent_after=20) as sim:
        settings = bridge_settings(sim.url, exchange_name, ping_interval=0.3, idle_timeout=1.5)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(3, timeout=30)
            assert bridge.metric("orangepill_bridge_stream_disconnects_total", {"reason": "silent"}) >= 1
            sim.pause()
            n = len(sim.sent)
            msgs = await collect(queue, n, timeout=20, settle=0.3)
            assert await bridge.finish() == 0
    assert sorted(set(seqs(msgs))) == [e.seq for e in sim.sent]


async def test_unroutable_event_is_kept(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """An event no queue is bound to ends up in <exchange>.unrouted, not dropped."""
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        bound = await bind_queue(amqp, settings, "deposit.#")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            await sim.send_event("currency.issued", "c0ffee00c0ffee00c0ffee00")
            await sim.send_event("deposit.received", "d0d0d0d0d0d0d0d0d0d0d0d0")
            got = await collect(bound, 1, timeout=10)
            unrouted = await queue_of(amqp, f"{exchange_name}.unrouted")
            kept = await collect(unrouted, 1, timeout=10)
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_events_unroutable_total") == 1)
            assert await bridge.finish() == 0
    assert [m.routing_key for m in got] == ["deposit.received"]
    assert [m.routing_key for m in kept] == ["currency.issued"]
    assert orjson.loads(kept[0].body)["data"] == "c0ffee00c0ffee00c0ffee00"


@contextlib.asynccontextmanager
async def _leader_then_standby(
    sim: Simulator, settings: Settings, settle: float
) -> AsyncIterator[tuple[RunningBridge, RunningBridge]]:
    """Two in-process replicas of one realm ("test"): the first leads, the second subscribed and standby after
    ``settle`` seconds."""
    leader_of = "orangepill_bridge_leader"
    async with running_bridge(settings) as leader:
        await sim.wait_subscribed(1)
        assert await wait_until(lambda: leader.metric(leader_of, {"realm": "test"}) == 1, 20)
        async with running_bridge(settings) as standby:
            await sim.wait_subscribed(2)
            await asyncio.sleep(settle)
            assert standby.metric(leader_of, {"realm": "test"}) == 0
            yield leader, standby


async def test_only_the_replica_that_leads_the_realm_counts_its_unroutable_events(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """Every replica's tap on the alternate exchange sees every copy: a standby counting them too raised the
    unroutable alert on it and doubled the sum over replicas."""
    unroutable = "orangepill_bridge_events_unroutable_total"
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        await bind_queue(amqp, settings, "deposit.#")
        async with _leader_then_standby(sim, settings, settle=1.5) as (leader, standby):  # the standby's tap bound
            for n in range(5):
                await sim.send_event("currency.issued", f"{n:024x}")
            assert await wait_until(lambda: leader.metric(unroutable) == 5, 20)
            await asyncio.sleep(1)
            assert standby.metric(unroutable) == 0
            assert await standby.finish() == 0
            assert await leader.finish() == 0


async def test_a_standby_with_a_memory_spool_stops_cleanly_while_its_leader_is_heard(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A standby's window in memory (events the leader has not announced yet) is not its loss while the leader
    is heard: a routine stop exits 0 with a WARNING, where it said "accepted events are lost" and exited 1."""
    async with simulator(rate=200.0) as sim:
        settings = bridge_settings(sim.url, exchange_name, spool="memory")
        await bind_queue(amqp, settings, "#")
        async with _leader_then_standby(sim, settings, settle=2) as (leader, standby):
            with caplog.at_level(logging.INFO):
                assert await standby.finish() == 0
            assert await leader.finish() == 0
    said = [r.getMessage() for r in caplog.records if r.name == "bridge.app"]
    assert not [m for m in said if "accepted events are lost" in m], said
    assert [m for m in said if "events of this standby's window were in memory only" in m], said


async def test_existing_exchange_without_alternate_still_keeps_unroutable(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """If the exchange already exists without an alternate exchange, returned events still reach .unrouted."""
    channel = await amqp.channel()
    await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            await sim.send_event("alias.deleted", "a11a5a11a5a11a5a11a5a11a")
            await wait_until(lambda: bridge.metric("orangepill_bridge_events_unroutable_total") >= 1)
            unrouted = await queue_of(amqp, f"{exchange_name}.unrouted")
            kept = await collect(unrouted, 1, timeout=10)
            assert bridge.metric("orangepill_bridge_events_unroutable_total") == 1
            assert await bridge.finish() == 0
    assert len(kept) == 1
    assert dict(kept[0].headers or {})["original_routing_key"] == "alias.deleted"


@pytest.mark.parametrize(
    ("kind", "durable", "said"),
    [
        (aio_pika.ExchangeType.FANOUT, True, "a fanout exchange"),
        (aio_pika.ExchangeType.DIRECT, True, "a direct exchange"),
        (aio_pika.ExchangeType.TOPIC, False, "a transient (not durable) exchange"),
    ],
)
async def test_an_existing_exchange_of_another_kind_stops_the_bridge(
    amqp: AbstractRobustConnection,
    exchange_name: str,
    caplog: pytest.LogCaptureFixture,
    kind: aio_pika.ExchangeType,
    durable: bool,
    said: str,
) -> None:
    """An exchange that exists as fanout, direct or transient is refused (exit 2, named), not used as it is."""
    channel = await amqp.channel()
    await channel.declare_exchange(exchange_name, kind, durable=durable)
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        code = await asyncio.wait_for(run_bridge(settings, asyncio.Event(), registry=CollectorRegistry()), 30)
    assert code == 2
    assert f"exchange {exchange_name} already exists as {said}" in caplog.text
    assert "durable topic exchange" in caplog.text


async def test_malformed_frames_are_quarantined_and_bridge_lives(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """Malformed frames land in <exchange>.quarantine with a reason, and valid events keep flowing."""
    async with simulator(rate=0, count=50, malformed_every=10) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_sent(50)
            events = await collect(queue, 50, timeout=20)
            quarantine = await queue_of(amqp, f"{exchange_name}.quarantine")
            bad = await collect(quarantine, len(sim.malformed), timeout=20, settle=0.3)
            rejected = sum(
                bridge.metric("orangepill_bridge_events_rejected_total", {"reason": r})
                for r in ("bad_json", "not_object", "missing_event", "invalid_routing_key", "oversize")
            )
            assert not bridge.task.done()
            assert await bridge.finish() == 0
    assert sorted(seqs(events)) == list(range(1, 51))
    assert len(sim.malformed) >= 4
    assert len(bad) == len(sim.malformed) == rejected
    assert sorted(m.body.decode() for m in bad) == sorted(frame for _, frame in sim.malformed)
    reasons = {dict(m.headers or {})["reason"] for m in bad}
    assert {"bad_json", "missing_event", "invalid_routing_key", "not_object"} <= reasons


async def test_sigterm_exits_0_with_nothing_outstanding(amqp: AbstractRobustConnection, exchange_name: str, tmp_path: Path) -> None:
    """SIGTERM unsubscribes, waits for confirms and exits 0; every event read is on RabbitMQ, the spool empty."""
    spool = tmp_path / "spool.db"
    async with simulator(rate=200, count=0) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(amqp, settings, "#")
        proc = BridgeProcess(process_args(sim.url, exchange_name, str(spool)))
        try:
            await sim.wait_sent(200, timeout=30)
            proc.signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
            out = proc.output()
        finally:
            proc.close()
        assert sim.unsubscribes == 1
        sim.pause()
        sent = [e.seq for e in sim.sent]
    msgs = await collect(queue, len(sent), timeout=20, settle=0.3)
    assert code == 0, out
    assert sorted(set(seqs(msgs))) == sent
    reopened = await Spool.open(str(spool))
    try:
        assert reopened.depth == 0
    finally:
        await reopened.close()


async def test_nacked_events_stay_in_the_spool_and_are_retried(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """Events RabbitMQ nacks (a full queue with reject-publish) are retried from the spool until they are confirmed."""
    from bridge.broker import declare_topology

    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        _, exchange, _ = await declare_topology(amqp, settings, confirms=False)
        channel = await amqp.channel()
        tight = await channel.declare_queue(
            f"{exchange_name}.tight", arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await tight.bind(exchange, routing_key="#")
        try:
            async with running_bridge(settings) as bridge:
                await sim.wait_subscribed(1)
                for n in range(5):
                    await sim.send_event("deposit.received", f"{n:024x}")
                assert await wait_until(
                    lambda: bridge.metric("orangepill_bridge_publish_failures_total", {"reason": "nack"}) >= 1
                )
                assert bridge.metric("orangepill_bridge_spool_depth") >= 1
                msgs = await collect(tight, 5, timeout=60)
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_spool_depth") == 0, timeout=30)
                assert await bridge.finish() == 0
        finally:
            await tight.delete(if_unused=False, if_empty=False)
    assert sorted(orjson.loads(m.body)["data"] for m in msgs) == [f"{n:024x}" for n in range(5)]


async def test_unroutable_drop_counts_and_lets_go(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """With --unroutable drop there is no alternate exchange; a returned event is counted and leaves the spool."""
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name, unroutable="drop")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            await sim.send_event("currency.destroyed", "dddddddddddddddddddddddd")
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_events_unroutable_total") == 1)
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_spool_depth") == 0)
            assert await bridge.finish() == 0
    channel = await amqp.channel()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await channel.declare_exchange(f"{exchange_name}.unrouted", passive=True)


async def test_spool_sync_full_publishes_everything_and_readyz_says_the_level(
    amqp: AbstractRobustConnection, exchange_names: Callable[[str], str], tmp_path: Path
) -> None:
    """--spool-sync full (an fsync per group commit, for a crash of the host): events flow as usual, and
    /readyz reports the level SQLite applies to the spool file ("normal" by default)."""
    from tests.test_faults import readyz

    for level in ("full", "normal"):
        port = free_port()
        async with simulator(rate=400, count=300) as sim:
            settings = bridge_settings(
                sim.url, exchange_names(f"sync-{level}"), spool=str(tmp_path / f"{level}.db"),
                metrics_addr=f"127.0.0.1:{port}", **({"spool_sync": level} if level == "full" else {}),
            )
            queue = await bind_queue(amqp, settings, "#")
            async with running_bridge(settings) as bridge:
                got = await collect(queue, 300, timeout=30)
                status, body = await readyz(port)
                assert status == 200, body
                assert body["spool"]["sync"] == level  # type: ignore[index]
                assert await bridge.finish() == 0
        assert sorted(seqs(got)) == list(range(1, 301))
        await queue.delete(if_unused=False, if_empty=False)


async def test_a_key_revoked_before_a_restart_stops_only_its_realm_at_the_next_start(
    amqp: AbstractRobustConnection, exchange_name: str, tmp_path: Path
) -> None:
    """A key the stream accepted in an earlier run and refuses now was revoked, not mistyped: a restart (a crash,
    a reboot, a deploy) must not stop the other realms over it. The fingerprints of accepted keys are kept next to
    the spool (never a key); a key refused at its first answer and never accepted still exits 2."""
    from tests.ha_support import KEY2

    realms = (Realm(label="good", key=KEY), Realm(label="revoked", key=KEY2))
    async with simulator(paused=True, realm_keys=(KEY, KEY2)) as sim:
        settings = bridge_settings(sim.url, exchange_name, spool=str(tmp_path / "spool.db"), realms=realms)
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(2)
            assert await bridge.finish() == 0
    accepted = (tmp_path / "spool.db.accepted").read_text()
    assert sorted(accepted.split()) == sorted([key_fingerprint(KEY), key_fingerprint(KEY2)])
    assert KEY not in accepted and KEY2 not in accepted

    async with simulator(paused=True, realm_keys=(KEY,)) as sim:  # KEY2 revoked while the bridge was down
        queue = await bind_queue(amqp, settings, "#")
        settings = replace(settings, stream_url=sim.url)
        async with running_bridge(settings) as bridge:
            rejected = "orangepill_bridge_realm_rejected"
            assert await wait_until(lambda: bridge.metric(rejected, {"realm": "revoked"}) == 1, 15)
            await sim.wait_subscribed(1)
            await sim.send_event("deposit.received", "after-restart", realm=KEY)
            (got,) = await collect(queue, 1, timeout=15)
            assert (got.headers or {}).get("realm") == "good"
            assert not bridge.task.done()
            assert await bridge.finish() == 0

    (tmp_path / "spool.db.accepted").unlink()  # a key never accepted here: a mistyped one, bad configuration
    async with simulator(realm_keys=(KEY,)) as sim:
        code = await asyncio.wait_for(
            run_bridge(replace(settings, stream_url=sim.url), asyncio.Event(), registry=CollectorRegistry()), 30
        )
    assert code == 2


async def test_a_key_revoked_while_rabbitmq_is_unreachable_still_has_its_events_published(
    amqp: AbstractRobustConnection, exchange_name: str, tmp_path: Path
) -> None:
    """The revoked realm's events read before the revocation wait in the spool while RabbitMQ is unreachable (the
    outage demoted every realm); the replica gives that realm's lock up only once they are published, so they go
    out when RabbitMQ is back, not at the next start (a probe found 139 of them held until a restart)."""
    from tests.ha_support import KEY2
    from tests.helpers import FreezableProxy

    proxy = await FreezableProxy().start()
    try:
        async with simulator(paused=True, realm_keys=(KEY, KEY2)) as sim:
            settings = bridge_settings(
                sim.url, exchange_name, spool=str(tmp_path / "spool.db"), amqp_url=proxy.url,
                realms=(Realm(label="good", key=KEY), Realm(label="revoked", key=KEY2)),
            )  # fmt: skip
            queue = await bind_queue(amqp, settings, "#")
            async with running_bridge(settings) as bridge:
                await sim.wait_subscribed(2)
                leader = "orangepill_bridge_leader"
                assert await wait_until(lambda: bridge.metric(leader, {"realm": "revoked"}) == 1, 20)
                await proxy.cut()
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_amqp_connected") == 0, 20)
                for n in range(3):
                    await sim.send_event("deposit.received", f"before-revoke-{n}", realm=KEY2)
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_spool_depth") >= 3, 10)
                sim.revoke(KEY2)
                rejected = "orangepill_bridge_realm_rejected"
                assert await wait_until(lambda: bridge.metric(rejected, {"realm": "revoked"}) == 1, 15)
                await asyncio.sleep(1.5)  # the lock loop polls meanwhile: the realm must not be given up yet
                await proxy.restore()
                got = await collect(queue, 3, timeout=40)
                assert sorted(orjson.loads(m.body)["data"] for m in got) == [f"before-revoke-{n}" for n in range(3)]
                assert await wait_until(lambda: bridge.metric(leader, {"realm": "revoked"}) == 0, 15)
                assert bridge.metric(leader, {"realm": "good"}) == 1
                assert await bridge.finish() == 0
    finally:
        await proxy.close()
