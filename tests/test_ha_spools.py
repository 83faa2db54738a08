"""Per-realm spools of a replica: file names, events of earlier runs published first, leader evidence, heartbeats."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import aio_pika
import orjson
import pytest

from bridge.config import Realm
from bridge.contract import KIND_EVENT, Outbound
from bridge.ha import Announcer, Follower, LeaderEvidence, spool_paths
from bridge.secrets import key_fingerprint
from bridge.spool import Spool
from tests.ha_support import KEY2
from tests.helpers import (
    AMQP_URL,
    KEY,
    bind_queue,
    bridge_settings,
    collect,
    free_port,
    running_bridge,
    simulator,
    wait_until,
)


def test_spool_paths_keep_the_single_realm_file() -> None:
    """One realm uses --spool PATH itself; several realms get <stem>.<fp><suffix>; memory stays memory."""
    assert spool_paths("/var/lib/b/spool.db", ["fp-a"]) == {"fp-a": "/var/lib/b/spool.db"}
    assert spool_paths("/var/lib/b/spool.db", ["fp-a", "fp-b"]) == {
        "fp-a": "/var/lib/b/spool.fp-a.db",
        "fp-b": "/var/lib/b/spool.fp-b.db",
    }
    assert spool_paths("spool", ["fp-a", "fp-b"]) == {"fp-a": "spool.fp-a", "fp-b": "spool.fp-b"}
    assert spool_paths("memory", ["fp-a", "fp-b"]) == {"fp-a": "memory", "fp-b": "memory"}


def test_leader_evidence_expires() -> None:
    """A realm's leader counts as alive only within max_age seconds of its last announcement."""
    evidence = LeaderEvidence(max_age=3.0)
    assert not evidence.alive("fp-a", 100.0)
    evidence.heard("fp-a", 100.0)
    assert evidence.alive("fp-a", 102.9)
    assert not evidence.alive("fp-a", 103.1)
    assert not evidence.alive("fp-b", 100.0)


@pytest.mark.broker
async def test_a_follower_skips_the_announcements_of_its_own_process(exchange_names: Callable[[str], str]) -> None:
    """Announcements carry the sending process's replica id; that process's follower skips them (read after a
    demotion, they passed for another leader), while another replica's follower hears them."""
    exchange = exchange_names("ha.self")
    connection = await aio_pika.connect_robust(AMQP_URL)
    own: list[tuple[str, list[str]]] = []
    other: list[tuple[str, list[str]]] = []
    stop = asyncio.Event()
    announcer = Announcer(connection, exchange, leading=lambda: ["fp-led"], heartbeat=0.2, replica="r-one")
    followers = [
        Follower(connection, exchange, lambda fp, ids: own.append((fp, ids)), replica="r-one"),
        Follower(connection, exchange, lambda fp, ids: other.append((fp, ids)), replica="r-two"),
    ]
    tasks = [asyncio.create_task(f.run(stop)) for f in followers]
    try:
        for f in followers:
            await asyncio.wait_for(f.ready.wait(), 10)
        tasks.append(asyncio.create_task(announcer.run(stop)))
        announcer.confirmed("fp-led", ["m1"])
        assert await wait_until(lambda: ("fp-led", ["m1"]) in other and len(other) >= 3, timeout=10)
        assert own == []
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await connection.close()


@pytest.mark.broker
async def test_announcer_sends_heartbeats_only_for_healthy_realms(exchange_names: Callable[[str], str]) -> None:
    """With no confirmed ids, the announcer still sends an empty announcement each second for the realms it leads."""
    exchange = exchange_names("ha.hb")
    connection = await aio_pika.connect_robust(AMQP_URL)
    heard: list[tuple[str, list[str]]] = []
    stop = asyncio.Event()
    announcer = Announcer(connection, exchange, leading=lambda: ["fp-led"], heartbeat=0.2)
    follower = Follower(connection, exchange, lambda fp, ids: heard.append((fp, ids)))
    tasks = [asyncio.create_task(follower.run(stop))]
    try:
        await asyncio.wait_for(follower.ready.wait(), 10)
        tasks.append(asyncio.create_task(announcer.run(stop)))
        assert await wait_until(lambda: len(heard) >= 3, timeout=10)
        assert {fp for fp, _ in heard} == {"fp-led"}
        assert all(ids == [] for _, ids in heard)
        announcer.confirmed("fp-led", ["m1", "m2"])
        assert await wait_until(lambda: ("fp-led", ["m1", "m2"]) in heard, timeout=10)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await connection.close()


def _legacy(n: int, realm: str) -> Outbound:
    body = orjson.dumps({"event": "transaction.done", "data": f"legacy-{realm}-{n}", "seq": n})
    return Outbound(
        kind=KIND_EVENT,
        routing_key="transaction.done",
        message_id=f"legacy-{realm}-{n}",
        body=body,
        headers={"realm": realm, "received_at": 1700000000000 + n},
        received_at=1700000000.5 + n,
        metric_kind="transaction.done",
    )


@pytest.mark.broker
async def test_legacy_spool_of_several_realms_is_published_first(
    tmp_path: Path, exchange_names: Callable[[str], str]
) -> None:
    """A --spool file holding events of two realms (one shared spool) is published at start, then removed."""
    path = tmp_path / "spool.db"
    legacy = await Spool.open(str(path))
    for n in range(1, 6):
        await legacy.put(_legacy(n, "test"))
        await legacy.put(_legacy(n, "second"))
    await legacy.flush()
    assert (await legacy.close()).kept == 10
    exchange = exchange_names("ha.legacy")
    async with simulator(paused=True, realm_keys=(KEY, KEY2)) as sim:
        settings = bridge_settings(
            sim.url,
            exchange,
            spool=str(path),
            realms=(Realm(label="test", key=KEY), Realm(label="second", key=KEY2)),
        )
        connection = await aio_pika.connect_robust(AMQP_URL)
        try:
            queue = await bind_queue(connection, settings, "#")
            async with running_bridge(settings):
                got = await collect(queue, 10, timeout=30)
                assert sorted(m.message_id or "" for m in got) == sorted(
                    f"legacy-{r}-{n}" for r in ("test", "second") for n in range(1, 6)
                )
                assert await wait_until(lambda: not list(tmp_path.glob("spool.db.carry-*")), timeout=10)
            for realm in (KEY, KEY2):
                assert (tmp_path / f"spool.{key_fingerprint(realm)}.db").exists()
        finally:
            await connection.close()


async def _two_realm_files(tmp_path: Path) -> dict[str, str]:
    """The realm files an earlier run with two realms (KEY, KEY2) left next to ``spool.db``, 3 events each."""
    two = spool_paths(str(tmp_path / "spool.db"), [key_fingerprint(KEY), key_fingerprint(KEY2)])
    for label, path in zip(("test", "second"), two.values(), strict=True):
        earlier = await Spool.open(path)
        for n in range(1, 4):
            await earlier.put(_legacy(n, label))
        await earlier.flush()
        assert (await earlier.close()).kept == 3
    return two


async def test_realm_files_of_an_earlier_layout_are_carried_not_stranded(tmp_path: Path) -> None:
    """Two realms before, one now: both realm files next to --spool are set aside and published first."""
    from bridge.app import _set_aside_earlier_runs

    two = await _two_realm_files(tmp_path)
    (tmp_path / "spool.fp-notarealmfile.db").write_bytes(b"not matched: the fingerprint is not 12 hex digits")
    settings = bridge_settings("ws://127.0.0.1:9", "test.x", spool=str(tmp_path / "spool.db"))  # one realm: KEY
    carry = await _set_aside_earlier_runs(settings)
    assert len(carry) == 2, carry
    assert sorted(carry.values()) == [3, 3]  # what each holds: counted in spool_depth until published
    assert all(".carry-" in c for c in carry)
    assert not any(Path(p).exists() for p in two.values())  # moved aside, to be published first
    assert (tmp_path / "spool.fp-notarealmfile.db").exists()
    # A crash before they were published: the next start finds the carry files again.
    assert sorted(await _set_aside_earlier_runs(settings)) == sorted(carry)


async def test_shutdown_names_the_realm_files_that_keep_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With two realms and no broker, the stop line names each realm's spool file, not only --spool."""
    exchange = f"test.ha.left.{uuid.uuid4().hex[:6]}"
    async with simulator(rate=200, count=0, realm_keys=(KEY, KEY2)) as sim:
        settings = bridge_settings(
            sim.url,
            exchange,
            amqp_urls=(f"amqp://guest:guest@127.0.0.1:{free_port()}/",),  # nothing listens: no broker
            spool=str(tmp_path / "spool.db"),
            realms=(Realm(label="test", key=KEY), Realm(label="second", key=KEY2)),
        )
        with caplog.at_level("INFO", logger="bridge.app"):
            async with running_bridge(settings):
                assert await wait_until(lambda: len(sim.sent) >= 100, timeout=30)
    line = next(r.getMessage() for r in caplog.records if "for the next start" in r.getMessage())
    for key in (KEY, KEY2):
        assert str(tmp_path / f"spool.{key_fingerprint(key)}.db") in line


async def test_events_waiting_in_carry_files_count_in_spool_depth(tmp_path: Path) -> None:
    """spool_depth said 0 while 1,529 events waited in carry files (broker unreachable, realms changed): an
    operator deleting the spool "when spool_depth was 0 at the stop" would have lost them."""
    from tests.helpers import free_port, running_bridge

    await _two_realm_files(tmp_path)
    closed = free_port()  # nothing listens: the carry files cannot be published
    settings = bridge_settings("ws://127.0.0.1:9", "test.x", spool=str(tmp_path / "spool.db"),
                               amqp_url=f"amqp://guest:guest@127.0.0.1:{closed}/")  # fmt: skip
    async with running_bridge(settings) as bridge:
        assert await wait_until(lambda: bridge.metric("orangepill_bridge_spool_depth") == 6, 20)
        assert await bridge.finish() == 0


async def test_unroutable_events_of_a_realm_no_longer_configured_are_counted(
    tmp_path: Path, exchange_names: Callable[[str], str]
) -> None:
    """Events of a carry file whose realm was removed from the configuration, published with no queue bound for
    them: no replica leads that realm, so the replica publishing the file counts them (it counted none)."""
    await _two_realm_files(tmp_path)  # realms "test" (KEY, still configured) and "second" (removed now)
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_names("ha.gone"), spool=str(tmp_path / "spool.db"))
        async with running_bridge(settings) as bridge:
            unroutable = "orangepill_bridge_events_unroutable_total"
            assert await wait_until(lambda: bridge.metric(unroutable) == 6, 20), bridge.metric(unroutable)
            assert await bridge.finish() == 0
