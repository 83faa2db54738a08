"""Per-realm leadership against the real RabbitMQ on 127.0.0.1:5672 (never restarted: connections are closed client-side)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from bridge.leadership import Leadership, RealmLock, Role, lock_queue_name
from bridge.nodes import NoNodeAvailable, connect_first, connect_robust_nodes
from tests.helpers import AMQP_URL, FreezableProxy, rabbitmqctl, wait_until

pytestmark = pytest.mark.broker


def realm(label: str) -> RealmLock:
    return RealmLock(label=label, fingerprint=f"fp-{uuid.uuid4().hex[:12]}")


@contextlib.asynccontextmanager
async def contender(exchange: str, realms: list[RealmLock], **kw: float) -> AsyncIterator[tuple[Leadership, asyncio.Event]]:
    kw.setdefault("poll", 0.2)
    kw.setdefault("heartbeat", 5.0)
    lead = Leadership(exchange, realms, [AMQP_URL], **kw)
    stop = asyncio.Event()
    task = asyncio.create_task(lead.run(stop))
    try:
        yield lead, stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_single_replica_leads_at_once() -> None:
    """A lone replica becomes leader of its realm on its first attempt."""
    r = realm("a")
    t0 = time.monotonic()
    async with contender(f"test.{uuid.uuid4().hex[:8]}", [r]) as (lead, _):
        assert await wait_until(lambda: lead.is_leader("a"), timeout=10)
        assert time.monotonic() - t0 < 10
        assert lead.health().connected and lead.health().node == "127.0.0.1:5672"
    assert not lead.is_leader("a"), "stopping gives the realm up"


async def test_two_contenders_one_leader_and_takeover() -> None:
    """Of two contenders exactly one leads; when the leader stops, the other takes over within poll + margin."""
    ex, r = f"test.{uuid.uuid4().hex[:8]}", realm("a")
    changes: list[tuple[str, str, Role]] = []
    async with contender(ex, [r]) as (one, stop_one), contender(ex, [r]) as (two, _):
        one.on_change(lambda label, role: changes.append(("one", label, role)))
        two.on_change(lambda label, role: changes.append(("two", label, role)))
        assert await wait_until(lambda: one.is_leader("a") or two.is_leader("a"), timeout=10)
        await asyncio.sleep(1.0)  # several polls of the standby
        assert [one.is_leader("a"), two.is_leader("a")].count(True) == 1
        leader, standby = (one, two) if one.is_leader("a") else (two, one)
        stop_leader = stop_one if leader is one else None
        if stop_leader is None:
            # `two` leads: close its lock connection from the client side
            assert two._raw is not None
            t0 = time.monotonic()
            await two._raw.close()
        else:
            t0 = time.monotonic()
            stop_leader.set()
        assert await wait_until(lambda: standby.is_leader("a"), timeout=10, interval=0.01)
        took = time.monotonic() - t0
        print(f"takeover after a client-side close: {took:.3f}s (poll 0.2s)")
        assert took < 0.2 + 2.0
        assert not leader.is_leader("a")
    assert ("one", "a", Role.LEADER) in changes or ("two", "a", Role.LEADER) in changes


async def test_a_resigned_realm_is_released_at_once_and_never_taken_again() -> None:
    """resign(): the leader lets the lock go within a moment (not after a poll), keeps its other realms, and never
    competes for the resigned one again, so the other contender leads it and keeps it."""
    ex, a, b = f"test.{uuid.uuid4().hex[:8]}", realm("a"), realm("b")
    async with contender(ex, [a, b]) as (one, _):
        assert await wait_until(lambda: one.is_leader("a") and one.is_leader("b"), timeout=15)
        async with contender(ex, [a, b]) as (two, _):
            await asyncio.sleep(0.5)
            assert not two.is_leader("a") and not two.is_leader("b")
            t0 = time.monotonic()
            one.resign("a", "its key was refused")
            assert await wait_until(lambda: two.is_leader("a"), timeout=10, interval=0.01)
            print(f"takeover after resign: {time.monotonic() - t0:.3f}s (poll 0.2s)")
            assert not one.is_leader("a") and one.is_leader("b") and not two.is_leader("b")
            await two._raw.close()  # type: ignore[union-attr]  # the new leader goes: the lock is free again
            await asyncio.sleep(1.5)  # several polls of `one`, which must not take "a" back
            assert not one.is_leader("a") and one.is_leader("b")


async def test_sigkill_of_lock_holder_frees_the_lock() -> None:
    """A process holding the lock is SIGKILLed: the broker frees the queue and the standby leads within poll + margin."""
    ex, r = f"test.{uuid.uuid4().hex[:8]}", realm("a")
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import asyncio, aio_pika, sys\n"
            "async def main():\n"
            f"    c = await aio_pika.connect({AMQP_URL!r})\n"
            "    ch = await c.channel()\n"
            f"    await ch.declare_queue({lock_queue_name(ex, r.fingerprint)!r}, exclusive=True, auto_delete=True)\n"
            "    print('held', flush=True)\n"
            "    await asyncio.sleep(600)\n"
            "asyncio.run(main())\n"
        )],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
        async with contender(ex, [r], poll=0.2) as (lead, _):
            await asyncio.sleep(1.0)
            assert not lead.is_leader("a"), "RESOURCE_LOCKED means standby"
            t0 = time.monotonic()
            holder.send_signal(signal.SIGKILL)
            assert await wait_until(lambda: lead.is_leader("a"), timeout=10, interval=0.01)
            print(f"takeover after SIGKILL: {time.monotonic() - t0:.3f}s (poll 0.2s)")
            assert time.monotonic() - t0 < 0.2 + 2.0
    finally:
        holder.kill()
        holder.wait()


async def test_two_realms_two_replicas_spread() -> None:
    """Two replicas and two realms end with one leader per realm, one realm each."""
    ex, ra, rb = f"test.{uuid.uuid4().hex[:8]}", realm("a"), realm("b")
    async with contender(ex, [ra, rb], poll=0.3) as (one, _), contender(ex, [ra, rb], poll=0.3) as (two, _):
        def settled() -> bool:
            return all([one.is_leader(x), two.is_leader(x)].count(True) == 1 for x in "ab")

        assert await wait_until(settled, timeout=15)
        await asyncio.sleep(1.5)
        assert settled()
        assert sum(one.is_leader(x) for x in "ab") == 1 and sum(two.is_leader(x) for x in "ab") == 1


MANY = 30  # realms of one replica: with the old per-realm spread delay its last realm led after about 29 s


def many_realms(n: int = MANY) -> list[RealmLock]:
    return [realm(f"r{i:02d}") for i in range(1, n + 1)]


async def close_on_the_broker(connection_name: str) -> None:
    """Close one connection (found by its client-provided name) from the broker's side, like a dropped link."""
    listed = await asyncio.to_thread(rabbitmqctl, "list_connections", "pid", "client_properties", "-q")
    pids = [line.split("\t", 1)[0] for line in listed.splitlines() if f'"{connection_name}"' in line]
    assert len(pids) == 1, listed
    await asyncio.to_thread(rabbitmqctl, "close_connection", pids[0], "test: lock connection dropped")


async def all_lead(replica: Leadership, realms: list[RealmLock], since: float, timeout: float = 40) -> float:
    """Wait until ``replica`` leads every realm (asserted); the seconds from ``since`` until it did."""
    await wait_until(lambda: all(replica.is_leader(r.label) for r in realms), timeout=timeout, interval=0.05)
    took = time.monotonic() - since
    assert all(replica.is_leader(r.label) for r in realms), replica.roles()
    return took


async def started_together(realms: list[RealmLock], timeout: float) -> tuple[float, tuple[int, int]]:
    """Two replicas started together: seconds until every realm has exactly one leader (asserted, and still so
    1.5 s later), and how many each leads."""
    ex = f"test.{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    async with contender(ex, realms, poll=1.0) as (one, _), contender(ex, realms, poll=1.0) as (two, _):
        def settled() -> bool:
            return all([one.is_leader(r.label), two.is_leader(r.label)].count(True) == 1 for r in realms)

        assert await wait_until(settled, timeout=timeout, interval=0.05)
        took = time.monotonic() - t0
        await asyncio.sleep(1.5)
        assert settled()
        return took, (sum(one.is_leader(r.label) for r in realms), sum(two.is_leader(r.label) for r in realms))


async def test_a_lone_replica_leads_all_its_realms_after_settle() -> None:
    """One replica with many realms leads them all `settle` seconds after connecting, not one per poll.

    With no other replica to spread to, the per-realm spread delay (up to `poll` before each attempt) only
    delayed realms: 40 realms took 41 s and `OrangepillRealmWithoutLeader` (for: 30s) fired at every start.
    """
    realms = many_realms()
    t0 = time.monotonic()
    async with contender(f"test.{uuid.uuid4().hex[:8]}", realms, poll=1.0) as (lead, _):
        assert await wait_until(lambda: lead.is_leader("r01"), timeout=10)
        first = time.monotonic() - t0
        took = await all_lead(lead, realms, t0)
        print(f"lone replica, {MANY} realms: first led after {first:.2f}s, all after {took:.2f}s (settle 2s)")
        assert took < 2.0 + 3.0


async def test_a_lone_replica_leads_all_its_realms_again_after_its_lock_connection_drops() -> None:
    """The broker closes the lock connection of a lone replica: it reconnects and leads every realm again
    within settle + margin (a broker blip used to cost one poll per realm again)."""
    realms = many_realms()
    name = f"test.{uuid.uuid4().hex[:8]}"
    kw = {"client_properties": {"connection_name": f"{name}.lock"}}
    lead = Leadership(name, realms, [AMQP_URL], poll=1.0, heartbeat=5.0, connect_kwargs=kw)
    stop = asyncio.Event()
    task = asyncio.create_task(lead.run(stop))
    try:
        assert await wait_until(lambda: all(lead.is_leader(r.label) for r in realms), timeout=40), lead.roles()
        first_raw = lead._raw
        t0 = time.monotonic()
        await close_on_the_broker(f"{name}.lock")
        assert await wait_until(lambda: lead._raw is not first_raw and lead.health().connected, timeout=10)
        took = await all_lead(lead, realms, t0)
        print(f"lone replica, {MANY} realms: all led again {took:.2f}s after the broker closed its lock connection")
        assert took < 0.5 + 2.0 + 3.0  # reconnect pause + settle + margin
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_a_lone_replica_is_not_slowed_down_by_its_own_old_lock_connection() -> None:
    """The lock link of a lone replica goes silent: it gives it up and reconnects at once, while RabbitMQ still holds
    the old connection and its locks until its own heartbeat detection. Those refusals come from this replica's
    previous connection, not from another replica: once RabbitMQ drops it, every realm is led again within a poll,
    not one realm per poll."""
    realms = many_realms()
    proxy = await FreezableProxy().start()
    lead = Leadership(f"test.{uuid.uuid4().hex[:8]}", realms, [proxy.url], poll=1.0, heartbeat=2.0)
    stop = asyncio.Event()
    task = asyncio.create_task(lead.run(stop))
    try:
        assert await wait_until(lambda: all(lead.is_leader(r.label) for r in realms), timeout=40), lead.roles()
        t0 = time.monotonic()
        proxy.freeze()
        assert await wait_until(lambda: proxy.links >= 2 and lead.health().connected, timeout=15)
        reconnected = time.monotonic() - t0
        took = await all_lead(lead, realms, t0, timeout=60)
        print(f"lone replica, {MANY} realms: reconnected {reconnected:.2f}s after its link went silent, all led again"
              f" after {took:.2f}s")  # fmt: skip
        # probe (<= H) + RabbitMQ's detection of the old connection (about 2 H, taken as 3 H) + a poll + margin
        assert took < 2.0 + 3 * 2.0 + 1.0 + 3.0
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await proxy.close()


async def test_a_standby_takes_over_all_realms_of_a_stopped_leader_within_a_poll() -> None:
    """A standby polls each lock held elsewhere every `poll` seconds with no spread delay, so when the leader of
    many realms stops it leads them all within about a poll (the spread delay made that one realm per poll)."""
    ex, realms = f"test.{uuid.uuid4().hex[:8]}", many_realms()
    async with contender(ex, realms, poll=1.0) as (one, stop_one):
        assert await wait_until(lambda: all(one.is_leader(r.label) for r in realms), timeout=40), one.roles()
        async with contender(ex, realms, poll=1.0) as (two, _):
            await asyncio.sleep(2.5)  # every lock refused at least twice: `two` has seen another replica
            assert not any(two.is_leader(r.label) for r in realms)
            t0 = time.monotonic()
            stop_one.set()
            took = await all_lead(two, realms, t0)
            print(f"standby took over {MANY} realms {took:.2f}s after the leader stopped (poll 1s)")
            assert took < 1.0 + 2.0


async def test_six_realms_two_replicas_started_together_spread() -> None:
    """Two replicas started together with six realms: each ends with at least two (each takes its share of two
    replicas, three, at once; beyond it an attempt waits a poll), and every realm has exactly one leader."""
    _, counts = await started_together(many_realms(6), timeout=20)
    print(f"two replicas, six realms: {counts[0]} + {counts[1]}")
    assert min(counts) >= 2, counts


async def test_many_realms_two_replicas_started_together_all_lead_soon_and_spread() -> None:
    """Two replicas started together with 40 realms: every realm has a leader within settle + a few seconds (it took
    37 s when each attempt after the fourth realm waited a poll, and OrangepillRealmWithoutLeader fires at 30 s), and
    neither replica takes them all."""
    took, counts = await started_together(many_realms(40), timeout=40)
    print(f"two replicas, 40 realms: every realm led after {took:.2f}s, split {counts[0]} + {counts[1]}")
    assert took < 2.0 + 6.0, took
    assert min(counts) >= 10, counts


async def test_failed_attempts_do_not_leak_callbacks() -> None:
    """A standby's repeated RESOURCE_LOCKED attempts keep the lock connection's close-callback and channel counts flat."""
    ex, r = f"test.{uuid.uuid4().hex[:8]}", realm("a")
    async with contender(ex, [r], poll=0.05) as (one, _):
        assert await wait_until(lambda: one.is_leader("a"), timeout=10)
        async with contender(ex, [r], poll=0.05) as (two, _):
            assert await wait_until(lambda: two._raw is not None, timeout=10)
            raw = two._raw
            assert raw is not None
            await asyncio.sleep(1.0)
            before = (len(raw._closing._callbacks), len(raw.channels))  # type: ignore[attr-defined]
            await asyncio.sleep(3.0)  # about 60 more failed declares
            after = (len(raw._closing._callbacks), len(raw.channels))  # type: ignore[attr-defined]
            print(f"close callbacks / channels before {before}, after {after}")
            assert not two.is_leader("a")
            assert after[0] <= before[0] + 1 and after[1] <= before[1] + 1


async def test_a_standby_whose_lock_link_goes_silent_reconnects_and_can_lead() -> None:
    """A standby's lock connection goes silent (partition): it gives that link up, reconnects, and takes over later.

    Its attempts at the lock are RPCs that a silent link never answers; they must not wait for ever.
    """
    ex, r = f"test.{uuid.uuid4().hex[:8]}", realm("a")
    proxy = await FreezableProxy().start()
    try:
        async with contender(ex, [r]) as (one, stop_one):
            assert await wait_until(lambda: one.is_leader("a"), timeout=10)
            two = Leadership(ex, [r], [proxy.url], poll=0.2, heartbeat=2.0)
            stop_two = asyncio.Event()
            task = asyncio.create_task(two.run(stop_two))
            try:
                assert await wait_until(lambda: two.health().connected and proxy.links == 1, timeout=10)
                await asyncio.sleep(0.5)  # a few refused attempts at the lock
                proxy.freeze()
                # The probe notices within the heartbeat; the standby then opens a new link.
                assert await wait_until(lambda: proxy.links >= 2 and two.health().connected, timeout=15), (
                    proxy.links, two.health()
                )
                assert not two.is_leader("a")
                stop_one.set()  # the leader goes away: the standby, on its new link, takes the lock
                assert await wait_until(lambda: two.is_leader("a"), timeout=10), two.health()
            finally:
                stop_two.set()
                await asyncio.wait_for(task, 15)
    finally:
        await proxy.close()


async def test_a_standby_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """A replica that starts as standby logs it once per lock connection, not once per poll."""
    ex, r = f"test.{uuid.uuid4().hex[:8]}", realm("a")
    caplog.set_level(logging.INFO, logger="bridge.leadership")
    async with contender(ex, [r]) as (one, _):
        assert await wait_until(lambda: one.is_leader("a"), timeout=10)
        async with contender(ex, [r]) as (two, _):
            await asyncio.sleep(1.5)  # about seven refused attempts at poll 0.2 s
            assert not two.is_leader("a")
    said = [rec.getMessage() for rec in caplog.records if "is standby (another replica holds the lock)" in rec.getMessage()]
    assert said == ["leadership: realm a is standby (another replica holds the lock)"]


@contextlib.asynccontextmanager
async def accept_and_close() -> AsyncIterator[str]:
    """A loopback 'broker' that accepts each TCP connection and closes it at once (a load balancer with no backend)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readexactly(8)  # the client's protocol header: it then waits for Connection.Start
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"amqp://guest:guest@127.0.0.1:{server.sockets[0].getsockname()[1]}/"


async def test_a_node_that_accepts_and_closes_is_a_node_that_did_not_answer() -> None:
    """aiormq raises StopAsyncIteration out of such a handshake: connect_first says 'no node answered' instead."""
    async with accept_and_close() as url:
        with pytest.raises(NoNodeAvailable, match="no RabbitMQ node answered"):
            await connect_first([url], attempt_timeout=2)
        with pytest.raises(NoNodeAvailable):
            await connect_robust_nodes([url], attempt_timeout=2, single_attempt=True)


async def test_leadership_keeps_retrying_a_node_that_accepts_and_closes() -> None:
    """The lock loop waits for a usable node instead of ending the process (it used to exit 1)."""
    async with accept_and_close() as url:
        lead = Leadership("test.x", [realm("a")], [url], poll=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(lead.run(stop))
        await asyncio.sleep(1.5)  # several attempts
        assert not task.done(), task
        stop.set()
        await asyncio.wait_for(task, 10)  # ends cleanly: no exception
        assert not lead.health().connected


async def test_any_exception_of_a_connect_attempt_means_no_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the accept-and-close race ends in a reset (AMQPConnectionError) or an EOF before the first frame
    (aiormq's StopAsyncIteration, seen from a proxy with no backend) depends on timing: both mean 'no node'."""

    async def eof_before_the_first_frame(*args: object, **kwargs: object) -> None:
        raise StopAsyncIteration

    monkeypatch.setattr("bridge.nodes.aio_pika.connect", eof_before_the_first_frame)
    with pytest.raises(NoNodeAvailable, match=r"127\.0\.0\.1:1 \(StopAsyncIteration\)"):
        await connect_first(["amqp://guest:guest@127.0.0.1:1/"])
    lead = Leadership("test.x", [realm("a")], ["amqp://guest:guest@127.0.0.1:1/"], poll=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(lead.run(stop))
    await asyncio.sleep(0.5)
    assert not task.done(), task
    stop.set()
    await asyncio.wait_for(task, 10)
