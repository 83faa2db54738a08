"""The batched publisher against the real RabbitMQ: confirms, nacks, returns and a channel closed mid-batch."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiormq.abc import ChannelFrame
from aiormq.channel import Channel
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

import bridge.publisher as publisher_module
from bridge.broker import Broker
from bridge.config import Settings
from bridge.contract import KIND_EVENT, Outbound, Topology, quarantine_message
from bridge.errors import ProtocolError
from bridge.metrics import Metrics
from bridge.publisher import Publisher
from bridge.spool import Spool, Spooled
from tests.helpers import bridge_settings, collect, queue_of, wait_until

pytestmark = pytest.mark.broker


def _event(n: int, key: str = "deposit.received") -> Outbound:
    return Outbound(
        kind=KIND_EVENT,
        routing_key=key,
        message_id=f"id-{n:06d}",
        body=orjson.dumps({"type": "notification", "event": key, "data": f"e{n}", "seq": n}),
        headers={"realm": "test", "received_at": int(time.time() * 1000), "entity_id": f"{n:024x}"},
        received_at=time.time(),
    )


class _Recording:
    """The spool as the publisher sees it, recording every ack and release."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.acked: list[int] = []
        self.released: list[int] = []

    async def get_batch(self, max_n: int) -> list[Spooled]:
        return await self.spool.get_batch(max_n)

    def ack(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        self.acked.extend(ids)
        self.spool.ack(ids)

    def release(self, items: Iterable[Spooled]) -> None:
        items = list(items)
        self.released.extend(item.id for item in items)
        self.spool.release(items)


class _Lane:
    def __init__(self, settings: Settings, source: _Recording, publisher: Publisher, broker: Broker) -> None:
        self.settings, self.source, self.publisher, self.broker = settings, source, publisher, broker


@contextlib.asynccontextmanager
async def _lane(
    settings: Settings, events: list[Outbound], publisher_class: type[Publisher] = Publisher,
    on_confirmed: Callable[[str], None] | None = None,
) -> AsyncIterator[_Lane]:  # fmt: skip
    """A broker link, a memory spool holding ``events`` and a running publisher; all closed afterwards."""
    metrics = Metrics()
    broker = Broker(settings, metrics)
    stop = asyncio.Event()
    assert await broker.connect(stop)
    spool = await Spool.open("memory")
    for msg in events:
        await spool.put(msg)
    await spool.flush()
    source = _Recording(spool)
    publisher = publisher_class(settings, source, metrics, broker, on_confirmed=on_confirmed)
    task = asyncio.create_task(publisher.run(stop))
    try:
        yield _Lane(settings, source, publisher, broker)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await publisher.drain(2.0)
        await spool.close()
        await broker.close()


async def _bound_queue(
    amqp: AbstractRobustConnection, exchange: str, arguments: dict[str, Any] | None = None
) -> aio_pika.abc.AbstractQueue:
    channel = await amqp.channel()
    # x-expires: the broker outlives the suite; an unused test queue goes by itself.
    queue = await channel.declare_queue(
        f"{exchange}.q", durable=True, arguments={"x-expires": 600_000, **(arguments or {})}
    )
    await queue.bind(exchange, "#")
    return queue


def _seqs(messages: list[AbstractIncomingMessage]) -> list[int]:
    return [orjson.loads(m.body)["seq"] for m in messages]


async def test_many_publishes_go_out_in_few_writes_and_every_confirm_acks_its_message(
    amqp: AbstractRobustConnection, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 events reach the queue in order through far fewer transport writes than events, and each is acked once."""
    writes: list[int] = []

    class Counted(ChannelFrame):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            writes.append(len(kwargs["payload"]))

    monkeypatch.setattr(publisher_module, "ChannelFrame", Counted)
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name)
    n = 2000
    async with _lane(settings, []) as lane:
        queue = await _bound_queue(amqp, exchange_name)
        for i in range(n):
            await lane.source.spool.put(_event(i))
        got = await collect(queue, n, timeout=60, settle=0.3)
        assert await wait_until(lambda: lane.source.spool.depth == 0, timeout=10)
        assert lane.publisher.in_flight == 0
        raw = lane.publisher._raw
        assert raw is not None
        # Confirms went through the publisher's router (not aiormq's scan), and it left no tag behind.
        assert isinstance(raw._on_confirm_frame.__self__, publisher_module.ConfirmRouter)  # type: ignore[attr-defined]
        assert not raw.confirmations
    assert _seqs(got) == list(range(n))
    assert len(set(lane.source.acked)) == len(lane.source.acked) == n
    assert lane.source.released == []
    assert 0 < len(writes) < n // 4, f"{len(writes)} writes for {n} publishes"


async def test_nacked_publishes_stay_in_the_spool_and_go_out_once_the_queue_has_room(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """A queue with x-overflow=reject-publish nacks what it has no room for: those are released, not acked, and arrive later."""
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name, publish_timeout=10.0)
    # Topology first (the lane declares the exchange), then the small queue, then the events.
    async with _lane(settings, []) as lane:
        queue = await _bound_queue(amqp, exchange_name, {"x-max-length": 5, "x-overflow": "reject-publish"})
        for i in range(20):
            await lane.source.spool.put(_event(i))
        assert await wait_until(lambda: len(set(lane.source.released)) >= 15, timeout=20)
        assert len(lane.source.acked) == 5  # only what the queue took was acked
        assert lane.source.spool.depth == 15
        failures = lane.publisher._metrics.publish_failures.labels(reason="nack")._value.get()
        assert failures >= 15
        got = await collect(queue, 20, timeout=60, settle=0.3)  # consuming makes room: the rest follow
        assert await wait_until(lambda: lane.source.spool.depth == 0, timeout=20)
    assert sorted(set(_seqs(got))) == list(range(20))
    assert len(lane.source.acked) == 20


async def test_an_event_one_full_queue_refuses_is_retried_later_each_time_not_at_once(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """One event nacked by a full queue while others flow: retried with a growing delay, so the queue that took it gets few copies."""
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name, publish_timeout=10.0)
    async with _lane(settings, []) as lane:
        everything = await _bound_queue(amqp, exchange_name)
        channel = await amqp.channel()
        refusing = await channel.declare_queue(
            f"{exchange_name}.full", durable=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish", "x-expires": 600_000},
        )  # fmt: skip
        await refusing.bind(exchange_name, "zz.#")
        await lane.source.spool.put(_event(0, "zz.refused"))
        for i in range(1, 31):  # other events keep being confirmed meanwhile
            await lane.source.spool.put(_event(i))
            await asyncio.sleep(0.1)
        assert lane.source.spool.depth == 1  # still in the spool, not quarantined, not acked
    nacks = lane.publisher._metrics.publish_failures.labels(reason="nack")._value.get()
    got = await collect(everything, 200, timeout=1.0)
    copies = [m for m in got if m.routing_key == "zz.refused"]
    # 3 s of retries: at 0, 0.25, 0.75, 1.75 s (then 3.75 s): 4 or 5 tries, where "at once" made ~90.
    assert 3 <= nacks <= 6, nacks
    assert len(copies) == nacks and len({m.message_id for m in copies}) == 1
    assert sorted(_seqs([m for m in got if m.routing_key != "zz.refused"])) == list(range(1, 31))


@pytest.mark.parametrize("mode", ["keep", "drop"])
async def test_returned_event_on_an_exchange_without_alternate_exchange(
    amqp: AbstractRobustConnection, exchange_name: str, mode: str
) -> None:
    """Without the alternate exchange the bridge publishes mandatory: a returned event is moved to the unrouted queue (keep) or counted and dropped (drop), and the routed ones arrive."""
    channel = await amqp.channel()
    await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)  # no alternate exchange
    queue = await _bound_queue(amqp, exchange_name)
    await queue.unbind(exchange_name, "#")
    await queue.bind(exchange_name, "deposit.#")
    if mode == "keep":
        await channel.declare_queue(Topology(exchange_name).unrouted, durable=True)
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name, unroutable=mode)
    events = [_event(0), _event(1, "nobody.listens"), _event(2)]
    async with _lane(settings, events) as lane:
        assert not lane.broker.alternate_exchange
        got = await collect(queue, 2, timeout=30, settle=0.3)
        assert await wait_until(lambda: lane.source.spool.depth == 0, timeout=20)
        unroutable = lane.publisher._metrics.events_unroutable._value.get()
    assert _seqs(got) == [0, 2]
    assert unroutable == 1
    assert len(set(lane.source.acked)) == len(lane.source.acked) == 3
    if mode == "keep":
        unrouted = await queue_of(amqp, Topology(exchange_name).unrouted)
        (kept,) = await collect(unrouted, 1, timeout=20, settle=0.3)
        assert _seqs([kept]) == [1]
        assert kept.headers["original_routing_key"] == "nobody.listens"


async def test_with_the_alternate_exchange_events_are_not_published_mandatory(
    amqp: AbstractRobustConnection, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the alternate exchange attached (keep), the mandatory bit is off and an unroutable event still lands in the unrouted queue."""
    flags: list[bool] = []
    real = publisher_module.publish_frames

    def spy(*args: Any, mandatory: bool, max_content: int) -> bytes:
        flags.append(mandatory)
        return real(*args, mandatory=mandatory, max_content=max_content)

    monkeypatch.setattr(publisher_module, "publish_frames", spy)
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name)
    async with _lane(settings, [_event(7, "nobody.listens")]) as lane:
        assert lane.broker.alternate_exchange
        unrouted = await queue_of(amqp, Topology(exchange_name).unrouted)
        (kept,) = await collect(unrouted, 1, timeout=20)
        assert await wait_until(lambda: lane.source.spool.depth == 0, timeout=10)
    assert _seqs([kept]) == [7]
    assert flags == [False]


class _BreaksChannel(Publisher):
    """Writes a publish to a missing exchange right behind the first large batch: RabbitMQ closes the channel (404)."""

    broke = False

    async def _write(self, raw: Channel, batch: list[Spooled]) -> None:
        await super()._write(raw, batch)
        if not self.broke and len(batch) >= 50:
            self.broke = True
            bad = ChannelFrame.marshall(
                raw.number,
                [Basic.Publish(exchange="no.such.exchange.anywhere", routing_key="x"),
                 ContentHeader(0, 1, Basic.Properties()), ContentBody(b"x")],
            )  # fmt: skip
            raw.write_queue.put_nowait(bad)


async def test_channel_closed_in_the_middle_of_a_batch_loses_nothing_and_acks_only_what_was_confirmed(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """Everything unconfirmed when RabbitMQ closes the channel goes back to the spool and is republished; every acked event was delivered."""
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name, confirm_window=512)
    n = 3000
    delivered: list[AbstractIncomingMessage] = []
    async with _lane(settings, [], publisher_class=_BreaksChannel) as lane:
        queue = await _bound_queue(amqp, exchange_name)
        for i in range(n):
            await lane.source.spool.put(_event(i))
        delivered = await collect(queue, n, timeout=90, settle=0.5)
        assert await wait_until(lambda: lane.source.spool.depth == 0, timeout=30)
        publisher = lane.publisher
        assert isinstance(publisher, _BreaksChannel) and publisher.broke
        failures = publisher._metrics.publish_failures.labels(reason="channel")._value.get()
    seen = set(_seqs(delivered))
    assert seen == set(range(n))  # nothing lost
    assert failures > 0 and lane.source.released  # the close caught publishes in flight; they went back
    acked = lane.source.acked
    assert len(set(acked)) == n  # each message acked, after its republish if needed
    by_id = {i + 1: i for i in range(n)}  # memory spool ids count from 1 in put order
    assert {by_id[i] for i in acked} <= seen  # nothing acked that RabbitMQ did not take


async def test_every_settled_message_is_reported_to_the_ha_announcer_quarantine_included(exchange_name: str) -> None:
    """on_confirmed gets the message_id of each confirmed event and of a quarantine message (the standby drops them)."""
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name)
    bad = quarantine_message("{not json", ProtocolError("malformed", "expected a value"), realm="test",
                             secrets=(), received_at=time.time())  # fmt: skip
    events = [_event(0), bad, _event(1)]
    reported: list[str] = []
    async with _lane(settings, events, on_confirmed=reported.append) as lane:
        assert await wait_until(lambda: lane.source.spool.depth == 0, timeout=10)
        assert await wait_until(lambda: len(reported) == 3, timeout=5)
        assert sorted(reported) == sorted(m.message_id for m in events)


def test_in_flight_gauge_sums_every_publisher_of_the_process() -> None:
    """One gauge, several publishers (one per realm): it shows their sum when scraped, not the last one's count."""
    import gc

    class _Source:
        def __init__(self, n: int) -> None:
            self.in_flight = n

    metrics = Metrics()
    first, second = _Source(3), _Source(4)
    metrics.count_in_flight(first)
    metrics.count_in_flight(second)

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("orangepill_bridge_publish_in_flight")

    assert gauge() == 7
    first.in_flight = 0
    assert gauge() == 4
    del second
    gc.collect()
    assert gauge() == 0  # a publisher that is gone drops out


async def test_a_queue_refusing_many_events_is_said_once_a_minute_not_once_per_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full reject-publish queue refused thousands of events: one WARNING per event once each had been refused
    for a minute (444 lines in 9 s in a probe). Now one line a minute, which counts the others."""
    import logging

    from prometheus_client import CollectorRegistry

    class Source:
        def __init__(self) -> None:
            self.released: list[Spooled] = []

        def release(self, items: object) -> None:
            self.released.extend(items)  # type: ignore[call-overload]

    settings = bridge_settings("ws://127.0.0.1:9", "test.nack-log")
    metrics = Metrics(CollectorRegistry())
    publisher = Publisher(settings, Source(), metrics, Broker(settings, metrics))  # type: ignore[arg-type]
    items = [Spooled(n, _event(n)) for n in range(50)]
    long_ago = time.monotonic() - 61
    with caplog.at_level(logging.WARNING, logger="bridge.publisher"):
        for item in items:
            publisher._hold_nacked(item)  # first refusal
            publisher._strikes[item.id].since = long_ago  # refused for over a minute
        for item in items:
            publisher._hold_nacked(item)
    lines = [r.getMessage() for r in caplog.records if "refused (nacked)" in r.getMessage()]
    assert len(lines) == 1, lines
    publisher._release_held()
