"""The simulated Orangepill stream, driven by a plain websockets client on loopback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedOK

from bridge.catalog import lookup
from bridge.errors import ConfigError, ProtocolError
from bridge.secrets import key_fingerprint
from bridge.simulator import (
    MALFORMED_KINDS,
    Simulator,
    SimulatorConfig,
    add_simulate_arguments,
    config_from_args,
    serve,
)
from bridge.wire import Notification, parse_frame, subscribe_frame, unsubscribe_frame

KEY = "demo-realm-key-0123456789"
OBJECT_ID = re.compile(r"^[0-9a-f]{24}$")
HAPPY_PATH = [
    "user.created",
    "identity.created",
    "account.creating",
    "account.created",
    "deposit.pending",
    "deposit.received",
    "deposit.processing",
    "deposit.processed",
    "account.incoming",
    "transaction.processing",
    "transaction.done",
]
# The bridge's quarantine reason for each malformed kind.
EXPECTED_REASON = {
    "bad_json": "bad_json",
    "seed_stray_brace": "bad_json",
    "missing_event": "missing_event",
    "invalid_routing_key": "invalid_routing_key",
    "not_object": "not_object",
}


@asynccontextmanager
async def simulator(**settings: Any) -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(port=0, **settings)) as sim:
        yield sim


@asynccontextmanager
async def client(sim: Simulator, **options: Any) -> AsyncIterator[ClientConnection]:
    options.setdefault("ping_interval", None)
    options.setdefault("close_timeout", 0.5)
    # A flooded client with a full queue stops reading and would miss the server's
    # close reply until close_timeout; an unbounded queue keeps teardown instant.
    options.setdefault("max_queue", None)
    async with connect(sim.url, **options) as ws:
        yield ws


async def recv(ws: ClientConnection, timeout: float = 5.0) -> str:
    async with asyncio.timeout(timeout):
        frame = await ws.recv()
    assert isinstance(frame, str)
    return frame


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Any:
    return orjson.loads(await recv(ws, timeout))


async def subscribe(ws: ClientConnection, key: str = KEY, answers: int = 2) -> list[Any]:
    await ws.send(subscribe_frame(key))
    return [await recv_json(ws) for _ in range(answers)]


async def notifications(ws: ClientConnection, n: int) -> list[str]:
    return [await recv(ws) for _ in range(n)]


async def read_until_closed(ws: ClientConnection) -> tuple[list[str], ConnectionClosedOK]:
    frames: list[str] = []
    while True:
        try:
            frames.append(await recv(ws))
        except ConnectionClosedOK as closed:
            return frames, closed


def seq_of(frame: str) -> int:
    obj = orjson.loads(frame)
    inner = obj["data"] if isinstance(obj["data"], dict) else obj
    seq = inner["seq"]
    assert isinstance(seq, int)
    return seq


@pytest.mark.parametrize(
    ("ack", "expected"),
    [("info", ["info"]), ("subscribe", ["subscribe"]), ("both", ["info", "subscribe"])],
)
async def test_accepted_key_gets_configured_answers(ack: str, expected: list[str]) -> None:
    """An accepted subscribe is answered per `ack`, echoing the key, before any notification."""
    async with simulator(ack=ack, rate=0) as sim, client(sim) as ws:
        answers = await subscribe(ws, answers=len(expected))
        assert [a["type"] for a in answers] == expected
        assert all(a["realm"] == KEY and isinstance(a["timestamp"], int) for a in answers)
        assert (await recv_json(ws))["type"] == "notification"
        assert sim.subscribes == 1


async def test_unknown_key_gets_info_none_then_error_and_no_events() -> None:
    """An unknown key gets info NONE then error, stays open, and receives no notification."""
    async with simulator(pong=True, rate=0) as sim, client(sim) as good, client(sim) as bad:
        await bad.send(subscribe_frame("wrong-key"))
        info, error = await recv_json(bad), await recv_json(bad)
        assert (info["type"], info["realm"]) == ("info", "NONE")
        assert (error["type"], error["realm"]) == ("error", "Invalid Realm Key.")
        assert isinstance(info["timestamp"], int)
        await subscribe(good)
        await sim.wait_sent(50)
        await bad.send("PING")
        # PONG comes right after the error: no notification was ever sent to `bad`.
        assert await recv(bad) == "PONG"
        assert sim.rejected == 1
        assert sim.subscribes == 1


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("flat", ["flat"] * 4),
        ("nested", ["nested"] * 4),
        ("mixed", ["flat", "nested", "flat", "nested"]),
    ],
)
async def test_notification_shapes(shape: str, expected: list[str]) -> None:
    """Notifications come in the configured envelope; mixed alternates flat and nested."""
    async with simulator(shape=shape, rate=0, count=4) as sim, client(sim) as ws:
        await subscribe(ws)
        frames = await notifications(ws, 4)
    parsed = [parse_frame(frame) for frame in frames]
    assert all(isinstance(p, Notification) for p in parsed)
    assert [p.shape for p in parsed if isinstance(p, Notification)] == expected
    assert [e.shape for e in sim.sent] == expected
    for frame, kind in zip(frames, expected, strict=True):
        obj = orjson.loads(frame)
        # The JavaScript example of the Orangepill WebSocket documentation reads notification.data.event (nested envelope).
        event = obj["data"]["event"] if kind == "nested" else obj["event"]
        assert lookup(event) is not None


async def test_seq_is_contiguous_and_sent_matches_what_the_client_received() -> None:
    """At full speed every event has the next seq and `sent` holds exactly the frames received."""
    async with simulator(rate=0, count=3000) as sim, client(sim) as ws:
        await subscribe(ws)
        frames = await notifications(ws, 3000)
        await sim.wait_sent(3000)
        assert [e.frame for e in sim.sent] == frames
    assert [seq_of(f) for f in frames] == list(range(1, 3001))
    assert all(lookup(e.event) is not None for e in sim.sent)
    assert all(OBJECT_ID.match(e.data) for e in sim.sent)
    assert {e.realm for e in sim.sent} == {key_fingerprint(KEY)}


async def test_sequence_opens_with_the_onboarding_happy_path() -> None:
    """A stream opens with user.created through transaction.done on stable entity ids."""
    async with simulator(rate=0, count=11) as sim, client(sim) as ws:
        await subscribe(ws)
        await notifications(ws, 11)
    assert [e.event for e in sim.sent] == HAPPY_PATH
    by_event = {e.event: e.data for e in sim.sent}
    assert by_event["account.creating"] == by_event["account.created"] == by_event["account.incoming"]
    assert by_event["deposit.pending"] == by_event["deposit.processed"]
    assert by_event["transaction.processing"] == by_event["transaction.done"]


async def test_sequence_is_deterministic_for_a_seed() -> None:
    """The same seed gives the same events and ids; another seed gives others."""

    async def run(seed: int) -> list[tuple[str, str]]:
        async with simulator(rate=0, count=300, seed=seed) as sim, client(sim) as ws:
            await subscribe(ws)
            await notifications(ws, 300)
            return [(e.event, e.data) for e in sim.sent]

    first, again, other = await run(7), await run(7), await run(8)
    assert first == again
    assert first != other


async def test_every_subscriber_of_a_realm_gets_every_event() -> None:
    """Two connections on one realm receive the same frames."""
    async with simulator(rate=0, count=200) as sim, client(sim) as one, client(sim) as two:
        sim.pause()
        await subscribe(one)
        await subscribe(two)
        await sim.wait_subscribed(2)
        sim.resume()
        assert await notifications(one, 200) == await notifications(two, 200)
        assert len(sim.sent) == 200


async def test_realms_have_independent_sequences() -> None:
    """Each realm key has its own contiguous seq, recorded under its fingerprint."""
    async with simulator(realm_keys=("key-a", "key-b"), rate=0, count=20) as sim, client(sim) as ws:
        await subscribe(ws, "key-a")
        await subscribe(ws, "key-b")
        await notifications(ws, 40)
    for key in ("key-a", "key-b"):
        seqs = [e.seq for e in sim.sent if e.realm == key_fingerprint(key)]
        assert seqs == list(range(1, 21))


async def test_an_abruptly_lost_subscriber_leaves_no_gap_in_seq() -> None:
    """When a connection dies mid-stream, seq in `sent` stays contiguous and the next subscriber continues it."""
    async with simulator(rate=0, count=5000) as sim:
        async with client(sim) as lost:
            await subscribe(lost)
            await notifications(lost, 10)
            lost.transport.abort()
        async with asyncio.timeout(5):
            while sim.open_connections:
                await asyncio.sleep(0.01)
        before = len(sim.sent)
        async with client(sim) as heir:
            await subscribe(heir)
            frames = await notifications(heir, 100)
        assert [seq_of(f) for f in frames] == list(range(before + 1, before + 101))
        assert [e.seq for e in sim.sent] == list(range(1, len(sim.sent) + 1))
        assert [e.frame for e in sim.sent[before : before + 100]] == frames


async def test_drop_every_closes_after_exactly_n_events_and_all_arrive() -> None:
    """With drop_every=7 a connection gets exactly 7 events then a clean close, and seq resumes."""
    async with simulator(rate=0, drop_every=7) as sim:
        received: list[int] = []
        for _ in range(2):
            async with client(sim) as ws:
                await subscribe(ws)
                frames, closed = await read_until_closed(ws)
                received.extend(seq_of(f) for f in frames)
                assert closed.rcvd is not None
                assert closed.rcvd.code == 1001
            assert len(received) % 7 == 0
        assert received == list(range(1, 15))
        assert [e.seq for e in sim.sent] == received


async def test_malformed_frames_are_sent_with_their_kinds() -> None:
    """malformed_every=2 sends one frame of each kind in turn, and they take no seq."""
    async with simulator(rate=0, count=10, malformed_every=2) as sim, client(sim) as ws:
        await subscribe(ws)
        frames = await notifications(ws, 15)
    assert [kind for kind, _ in sim.malformed] == list(MALFORMED_KINDS)
    bad = [frames[i] for i in range(2, 15, 3)]
    assert bad == [frame for _, frame in sim.malformed]
    for kind, frame in sim.malformed:
        with pytest.raises(ProtocolError) as rejected:
            parse_frame(frame)
        assert rejected.value.reason == EXPECTED_REASON[kind]
    good = [f for i, f in enumerate(frames) if i % 3 != 2]
    assert [seq_of(f) for f in good] == list(range(1, 11))
    assert sim.malformed[1][1].endswith("} }")


async def test_silent_after_stops_answering_websocket_pings() -> None:
    """After silent_after events the server answers no WebSocket ping and sends nothing more."""
    async with simulator(rate=200, silent_after=3) as sim, client(sim) as ws:
        await subscribe(ws)
        assert [seq_of(f) for f in await notifications(ws, 3)] == [1, 2, 3]
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pong, 0.5)
        assert len(sim.sent) == 3


async def test_go_silent_stops_pongs_and_events_on_an_open_connection() -> None:
    """A link that answered pings stops answering them, and stops getting events, after go_silent."""
    async with simulator(rate=100) as sim, client(sim) as ws:
        await subscribe(ws)
        await notifications(ws, 2)
        await asyncio.wait_for(await ws.ping(), 5.0)
        sim.go_silent()
        sent = len(sim.sent)
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pong, 0.5)
        assert len(sim.sent) == sent


async def test_silent_connection_is_released_when_the_client_gives_up() -> None:
    """The server frees a silent connection once the client closes its end."""
    async with simulator(rate=100) as sim:
        async with client(sim, close_timeout=0.2) as ws:
            await subscribe(ws)
            sim.go_silent()
        async with asyncio.timeout(5):
            while sim.open_connections:
                await asyncio.sleep(0.05)


async def test_unsubscribe_stops_delivery() -> None:
    """After the unsubscribe answers, a connection gets no more notifications of that realm."""
    async with simulator(rate=0, pong=True) as sim, client(sim) as leaver, client(sim) as stayer:
        await subscribe(leaver)
        await subscribe(stayer)
        await recv(leaver)
        await leaver.send(unsubscribe_frame(KEY))
        answers: list[str] = []
        while len(answers) < 2:
            obj = await recv_json(leaver)
            if obj["type"] != "notification":
                answers.append(obj["type"])
        assert answers == ["info", "unsubscribe"]
        await sim.wait_sent(len(sim.sent) + 100)
        await leaver.send("PING")
        assert await recv(leaver) == "PONG"
        assert sim.unsubscribes == 1


@pytest.mark.parametrize("pong", [False, True])
async def test_text_ping_is_counted_and_answered_only_when_enabled(pong: bool) -> None:
    """A text PING is counted, and answered with PONG only when `pong` is on."""
    async with simulator(pong=pong) as sim, client(sim) as ws:
        await ws.send("PING")
        await ws.send(subscribe_frame("wrong-key"))
        first = await recv(ws)
        if pong:
            assert first == "PONG"
            first = await recv(ws)
        assert orjson.loads(first)["realm"] == "NONE"
        assert sim.pings == 1


async def test_send_event_delivers_a_chosen_event_and_records_it() -> None:
    """send_event sends the chosen event with the next seq and records its exact frame."""
    async with simulator() as sim, client(sim) as ws:
        sim.pause()
        await subscribe(ws)
        record = await sim.send_event(
            "sms.message.sent", "63967141191e9023f356df9f", timestamp="162553625262", extra={"to": "x"}
        )
        nested = await sim.send_event("transaction.done", "63967141191e9023f356dfa0", shape="nested")
        first, second = await notifications(ws, 2)
    assert first == record.frame
    assert orjson.loads(first) == {
        "type": "notification",
        "event": "sms.message.sent",
        "data": "63967141191e9023f356df9f",
        "timestamp": "162553625262",
        "seq": 1,
        "sent_at": record.sent_at,
        "to": "x",
    }
    assert orjson.loads(second)["data"]["event"] == "transaction.done"
    assert (nested.seq, nested.shape) == (2, "nested")
    assert sim.sent == [record, nested]


async def test_send_event_without_a_subscriber_raises() -> None:
    """send_event refuses to send to nobody."""
    async with simulator() as sim:
        with pytest.raises(RuntimeError):
            await sim.send_event("user.created", "63967141191e9023f356df9f")
        assert sim.sent == []


async def test_send_raw_reaches_every_subscribed_connection() -> None:
    """send_raw sends any text to each subscribed connection and is not recorded as an event."""
    async with simulator() as sim, client(sim) as one, client(sim) as two, client(sim) as idle:
        sim.pause()
        await subscribe(one)
        await subscribe(two)
        assert await sim.send_raw('{"type":"notification" oops') == 2
        assert await recv(one) == await recv(two) == '{"type":"notification" oops'
        await idle.send(subscribe_frame("wrong-key"))
        assert (await recv_json(idle))["realm"] == "NONE"
        assert sim.sent == []


async def test_bad_client_frames_are_ignored_and_the_connection_survives() -> None:
    """Garbage from a client never breaks the connection or the server."""
    async with simulator(ack="subscribe") as sim, client(sim) as ws:
        sim.pause()
        for frame in ("not json", "[1, 2]", '{"type":"hello"}', "{}", '{"type": "subscribe"}'):
            await ws.send(frame)
        await ws.send(b"\x00\x01binary")
        assert (await recv_json(ws))["realm"] == "NONE"  # the subscribe without a realm
        await recv_json(ws)
        answers = await subscribe(ws, answers=1)
        assert answers[0] == {"type": "subscribe", "realm": KEY, "timestamp": answers[0]["timestamp"]}
        assert sim.rejected == 1


async def test_pause_stops_generated_events_until_resume() -> None:
    """While paused no generated event is sent; resume restarts the stream."""
    async with simulator(rate=200) as sim, client(sim) as ws:
        await subscribe(ws)
        await sim.wait_sent(5)
        sim.pause()
        await asyncio.sleep(0.1)
        paused_at = len(sim.sent)
        await asyncio.sleep(0.3)
        assert len(sim.sent) == paused_at
        sim.resume()
        await sim.wait_sent(paused_at + 5)


async def test_drop_all_closes_every_connection_cleanly() -> None:
    """drop_all sends a close frame to each client after everything already sent."""
    async with simulator(rate=0) as sim, client(sim) as ws:
        await subscribe(ws)
        await sim.wait_sent(10)
        await sim.drop_all()
        frames, _ = await read_until_closed(ws)
        assert [seq_of(f) for f in frames] == [e.seq for e in sim.sent]


async def test_wait_subscribed_times_out() -> None:
    """wait_subscribed raises TimeoutError when nobody subscribes."""
    async with simulator() as sim:
        with pytest.raises(TimeoutError):
            await sim.wait_subscribed(1, timeout=0.2)


def test_config_from_args_prefers_flags_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags win, SIM_* and ORANGEPILL_REALM_KEY fill the rest, defaults after that."""
    monkeypatch.setenv("ORANGEPILL_REALM_KEY", "env-a, env-b")
    monkeypatch.setenv("SIM_DROP_EVERY", "5")
    monkeypatch.setenv("SIM_RATE", "3")
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    config = config_from_args(parser.parse_args(["--rate", "0", "--shape", "nested", "--pong"]))
    assert config.realm_keys == ("env-a", "env-b")
    assert (config.rate, config.shape, config.pong, config.drop_every, config.ack) == (
        0.0,
        "nested",
        True,
        5,
        "both",
    )
    flagged = config_from_args(parser.parse_args(["--realm-key", "k1", "--realm-key", "k2"]))
    assert flagged.realm_keys == ("k1", "k2")


def test_invalid_settings_raise_config_error_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value fails loudly and names the setting."""
    with pytest.raises(ConfigError, match="rate"):
        SimulatorConfig(rate=-1)
    with pytest.raises(ConfigError, match="drop_every"):
        SimulatorConfig(drop_every=-3)
    monkeypatch.setenv("SIM_PORT", "eighty")
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    with pytest.raises(ConfigError, match="SIM_PORT"):
        config_from_args(parser.parse_args([]))


async def test_realm_keys_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Neither an accepted nor a refused realm key appears in the logs, at any level."""
    # Only our logger: websockets' own DEBUG frame dumps show frames, keys included.
    caplog.set_level(logging.DEBUG, logger="bridge.simulator")
    secret, wrong = "secret-realm-key-1234", "wrong-realm-key-5678"
    async with simulator(realm_keys=(secret,), rate=0, drop_every=3) as sim, client(sim) as ws:
        await ws.send(subscribe_frame(wrong))
        await recv(ws)
        await recv(ws)
        await subscribe(ws, secret)
        await read_until_closed(ws)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(SimulatorConfig(port=0, realm_keys=(secret,)), stop))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert key_fingerprint(secret) in caplog.text
    assert secret not in caplog.text
    assert wrong not in caplog.text


async def test_data_bytes_pads_generated_events_to_about_n_bytes() -> None:
    """With data_bytes=100000 every generated event's data is 100,000 characters starting with its entity id."""
    async with simulator(rate=0, count=3, data_bytes=100_000) as sim, client(sim, max_size=2**20) as ws:
        await subscribe(ws)
        frames = await notifications(ws, 3)
    for frame, sent in zip(frames, sim.sent, strict=True):
        parsed = parse_frame(frame)
        assert isinstance(parsed, Notification)
        assert len(sent.data) == 100_000
        assert OBJECT_ID.match(sent.data[:24])
        assert orjson.loads(frame)["data"] == sent.data
    assert [e.event for e in sim.sent] == HAPPY_PATH[:3]


async def test_on_sent_hook_sees_every_event_and_record_off_keeps_nothing() -> None:
    """on_sent is called once per delivered event in order; with record=False `sent` stays empty but is counted."""
    seen: list[int] = []
    config = SimulatorConfig(port=0, rate=0, count=50, record=False)
    async with Simulator(config, on_sent=lambda e: seen.append(e.seq)) as sim, client(sim) as ws:
        await subscribe(ws)
        await notifications(ws, 50)
        await sim.wait_sent(50)
        assert sim.sent == []
        assert sim.sent_total == 50
    assert seen == list(range(1, 51))


async def test_a_silent_link_stays_unread_even_with_frames_queued() -> None:
    """Frames the client sends after go_silent are never read: no PONG, no pong, no subscribe answer."""
    async with simulator(pong=True) as sim, client(sim) as ws:
        sim.pause()
        await subscribe(ws)
        await ws.send("PING")
        assert await recv(ws) == "PONG"
        assert sim.go_silent() == 1
        for _ in range(200):
            await ws.send("PING")
        await ws.send(subscribe_frame(KEY))
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pong, 0.5)
        with pytest.raises(TimeoutError):
            await recv(ws, timeout=0.3)
        assert sim.pings == 1
        assert sim.subscribes == 1
