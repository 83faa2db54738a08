"""Stream servers written from the Orangepill WebSocket documentation alone may answer in any way it shows; the bridge copes with each."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus

import pytest
from aio_pika.abc import AbstractRobustConnection
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from bridge.check import KeyCheck, check_realm
from tests.helpers import bind_queue, bridge_settings, collect, queue_of, running_bridge, wait_until

pytestmark = pytest.mark.broker

Handler = Callable[[ServerConnection, str], Awaitable[None]]


@contextlib.asynccontextmanager
async def documented_server(on_subscribe: Handler) -> AsyncIterator[str]:
    """A minimal hand-written server: calls on_subscribe with the realm of each subscribe frame."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                if raw == "PING":
                    continue
                frame = json.loads(raw)
                if frame.get("type") == "subscribe":
                    await on_subscribe(ws, frame["realm"])
                    await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


def notification(seq: int, *, nested: bool = False) -> str:
    inner = {"event": "deposit.received", "data": f"{seq:024x}", "timestamp": 1671547687000 + seq, "seq": seq}
    if nested:
        return json.dumps({"type": "notification", "data": inner})
    return json.dumps({"type": "notification", **inner})


async def _events_arrive(amqp: AbstractRobustConnection, exchange: str, on_subscribe: Handler, n: int) -> list[int]:
    async with documented_server(on_subscribe) as url:
        settings = bridge_settings(url, exchange)
        queue = await bind_queue(amqp, settings, "deposit.#")
        async with running_bridge(settings) as bridge:
            msgs = await collect(queue, n, timeout=15)
            assert bridge.metric("orangepill_bridge_subscribed", {"realm": "test"}) == 1
            assert await bridge.finish() == 0
    return [json.loads(m.body)["seq"] for m in msgs]


async def test_documented_subscribe_reply_with_stray_brace(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """A server answering with the documentation's subscribe example verbatim (stray brace included) is understood."""

    async def on_subscribe(ws: ServerConnection, realm: str) -> None:
        await ws.send(f'{{ "type":"subscribe", "realm":"{realm}", "timestamp": 1671547687 }} }}')
        for seq in range(1, 4):
            await ws.send(notification(seq))

    assert await _events_arrive(amqp, exchange_name, on_subscribe, 3) == [1, 2, 3]


async def test_server_that_never_answers_but_streams(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """A server that sends notifications without answering subscribe is taken as subscribed."""

    async def on_subscribe(ws: ServerConnection, realm: str) -> None:
        for seq in range(1, 4):
            await ws.send(notification(seq, nested=True))

    assert await _events_arrive(amqp, exchange_name, on_subscribe, 3) == [1, 2, 3]


async def _rejected_exit_code(exchange: str, on_subscribe: Handler) -> int:
    async with documented_server(on_subscribe) as url:
        settings = bridge_settings(url, exchange)
        async with running_bridge(settings) as bridge:
            return await asyncio.wait_for(bridge.task, timeout=15)


async def test_info_none_and_error_in_one_frame_is_a_rejection(exchange_name: str) -> None:
    """info NONE and error sent together in one frame still reject the key (exit 2)."""

    async def on_subscribe(ws: ServerConnection, realm: str) -> None:
        await ws.send(
            '{ "type":"info", "realm":"NONE", "timestamp": 1671547687 }\n'
            '{ "type":"error", "realm":"Invalid Realm Key.", "timestamp": 1671547687 } }'
        )

    assert await _rejected_exit_code(exchange_name, on_subscribe) == 2


async def test_info_none_then_close_is_a_rejection(exchange_name: str) -> None:
    """info NONE followed by the server closing the connection rejects the key instead of looping."""

    async def on_subscribe(ws: ServerConnection, realm: str) -> None:
        await ws.send('{"type":"info","realm":"NONE","timestamp":1671547687}')
        await ws.close()

    assert await _rejected_exit_code(exchange_name, on_subscribe) == 2


async def test_error_frame_alone_is_a_rejection(exchange_name: str) -> None:
    """An error frame without the info NONE before it rejects the key."""

    async def on_subscribe(ws: ServerConnection, realm: str) -> None:
        await ws.send('{"type":"error","realm":"Invalid Realm Key.","timestamp":1671547687}')

    assert await _rejected_exit_code(exchange_name, on_subscribe) == 2


async def test_info_only_answer_and_numeric_timestamps(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """An info-only success answer, a PONG text reply and numeric timestamps are all accepted."""

    async def on_subscribe(ws: ServerConnection, realm: str) -> None:
        await ws.send(json.dumps({"type": "info", "realm": realm, "timestamp": 1671547687}))
        await ws.send("PONG")
        for seq in range(1, 3):
            await ws.send(notification(seq))

    assert await _events_arrive(amqp, exchange_name, on_subscribe, 2) == [1, 2]


async def test_type_case_and_an_event_under_another_type(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """"Notification" is published; an event under an unknown type goes to quarantine; a bare unknown type is counted."""
    odd = '{"type":"event","event":"deposit.received","data":"odd","timestamp":"1671547687000"}'

    async def on_subscribe(ws: ServerConnection, realm: str) -> None:
        await ws.send(json.dumps({"type": "subscribe", "realm": realm, "timestamp": 1671547687}))
        await ws.send(notification(1).replace('"type": "notification"', '"type": "Notification"'))
        await ws.send(odd)
        await ws.send('{"type":"pong"}')
        await ws.send(notification(2))

    async with documented_server(on_subscribe) as url:
        settings = bridge_settings(url, exchange_name)
        queue = await bind_queue(amqp, settings, "deposit.#")
        async with running_bridge(settings) as bridge:
            msgs = await collect(queue, 2, timeout=15, settle=0.5)
            quarantined = await collect(await queue_of(amqp, f"{exchange_name}.quarantine"), 1, timeout=15)
            assert bridge.metric("orangepill_bridge_events_rejected_total", {"reason": "unknown_type"}) == 1
            assert bridge.metric("orangepill_bridge_frames_other_total", {"kind": "unknown_type"}) == 1
            assert await bridge.finish() == 0
    assert [json.loads(m.body)["seq"] for m in msgs] == [1, 2]
    assert json.loads(msgs[0].body)["type"] == "notification"
    assert [(m.body.decode(), (m.headers or {}).get("reason")) for m in quarantined] == [(odd, "unknown_type")]


@pytest.mark.parametrize("code", [1000, 1001, 1011])
async def test_a_close_names_its_code_and_reason_in_the_log(
    amqp: AbstractRobustConnection, exchange_name: str, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that closes after its events (1001: going away, as on a restart) is logged with the code and
    reason it sent, normal closes included; the events before the close are published."""
    caplog.set_level(logging.INFO, logger="bridge.stream")

    async def on_subscribe(ws: ServerConnection, realm: str) -> None:
        await ws.send(json.dumps({"type": "info", "realm": realm, "timestamp": 1671547687}))
        await ws.send(notification(1))
        await ws.close(code, "server restart")

    async with documented_server(on_subscribe) as url:
        settings = bridge_settings(url, exchange_name)
        queue = await bind_queue(amqp, settings, "deposit.#")
        async with running_bridge(settings) as bridge:
            # The bridge redials after the close and the server sends the same event again: a duplicate.
            msg = (await collect(queue, 1, timeout=15))[0]
            lines = [r.getMessage() for r in caplog.records if "stream disconnected" in r.getMessage()]
            for _ in range(50):
                if lines:
                    break
                await asyncio.sleep(0.1)
                lines = [r.getMessage() for r in caplog.records if "stream disconnected" in r.getMessage()]
            assert await bridge.finish() == 0
    assert json.loads(msg.body)["seq"] == 1
    assert lines, "no disconnect line"
    assert f"server closed the connection (code {code}, server restart)" in lines[0], lines[0]


@contextlib.asynccontextmanager
async def redirecting_server(location: Callable[[int], str]) -> AsyncIterator[str]:
    """A server that answers every handshake on /old with 301 to ``location(its own port)``."""

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path != "/old":
            return None
        port = connection.local_address[1]
        response = connection.respond(HTTPStatus.MOVED_PERMANENTLY, "moved\n")
        response.headers["Location"] = location(port)
        return response

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                frame = json.loads(raw) if raw != "PING" else {}
                if frame.get("type") == "subscribe":
                    await ws.send(json.dumps({"type": "info", "realm": frame["realm"], "timestamp": 1}))
                    await ws.send(notification(1))

    async with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/old"


async def test_a_redirect_to_another_origin_is_refused_and_the_key_stays_home(
    exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 301 to another host or port is not followed (the key is sent right after the handshake):
    the target never sees a subscribe, the bridge says why and keeps redialling the configured URL;
    `check` reports it too."""
    caplog.set_level(logging.WARNING, logger="bridge.stream")
    subscribes: list[str] = []

    async def on_subscribe(ws: ServerConnection, realm: str) -> None:
        subscribes.append(realm)
        await ws.send(json.dumps({"type": "info", "realm": realm, "timestamp": 1}))

    async with documented_server(on_subscribe) as target, redirecting_server(lambda _: target + "/") as url:
        settings = bridge_settings(url, exchange_name, reconnect_min=0.2, reconnect_max=0.5)
        async with running_bridge(settings) as bridge:
            refused = {"reason": "connect_failed"}
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_stream_disconnects_total", refused) >= 2)
            assert bridge.metric("orangepill_bridge_subscribed", {"realm": "test"}) == 0
            assert await bridge.finish() == 0
        check = await check_realm(settings, settings.realms[0])
    assert subscribes == []
    assert check.result is KeyCheck.UNREACHABLE and "another origin" in check.detail, check
    lines = [r.getMessage() for r in caplog.records if "stream disconnected" in r.getMessage()]
    assert lines and "redirected the handshake to another origin" in lines[0], lines[:1]


async def test_a_redirect_to_another_path_of_the_same_origin_is_followed_with_a_warning(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 301 to another path on the same host and port is followed (events flow), with a WARNING naming it."""
    caplog.set_level(logging.WARNING, logger="bridge.stream")
    async with redirecting_server(lambda port: "/new") as url:
        settings = bridge_settings(url, exchange_name)
        queue = await bind_queue(amqp, settings, "deposit.#")
        async with running_bridge(settings) as bridge:
            (msg,) = await collect(queue, 1, timeout=15)
            assert await bridge.finish() == 0
    assert json.loads(msg.body)["seq"] == 1
    assert any("redirected the handshake to" in r.getMessage() and "/new" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("answers", "result", "says"),
    [
        ([{"type": "error", "realm": "Service temporarily unavailable.", "timestamp": 1}], KeyCheck.SERVER_ERROR,
         "Service temporarily unavailable"),
        ([], KeyCheck.CLOSED, "closed"),
    ],
    ids=["an error not about the key", "closed unanswered"],
)
async def test_check_tells_a_server_error_and_a_close_from_an_unreachable_stream(
    answers: list[dict[str, object]], result: KeyCheck, says: str
) -> None:
    """`check` reached the server: a service error or a close before any answer is said as such, not "unreachable"."""

    async def on_subscribe(ws: ServerConnection, realm: str) -> None:
        for answer in answers:
            await ws.send(json.dumps(answer))
        await ws.close()

    async with documented_server(on_subscribe) as url:
        settings = bridge_settings(url, "x")
        check = await check_realm(settings, settings.realms[0])
    assert check.result is result, check
    assert says in check.detail, check


async def test_info_answers_to_each_ping_are_counted_as_answers(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """A server that answers every text PING with an info frame: counted (frames_other_total{kind="answer"}), events flow."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                if raw == "PING":
                    await ws.send(json.dumps({"type": "info", "realm": "x", "timestamp": 1}))
                elif json.loads(raw).get("type") == "subscribe":
                    await ws.send(json.dumps({"type": "info", "realm": json.loads(raw)["realm"], "timestamp": 1}))
                    await ws.send(notification(1))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        settings = bridge_settings(f"ws://127.0.0.1:{port}", exchange_name, ping_interval=0.2, idle_timeout=2.0)
        queue = await bind_queue(amqp, settings, "deposit.#")
        async with running_bridge(settings) as bridge:
            (msg,) = await collect(queue, 1, timeout=15)
            answers = {"kind": "answer"}
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_frames_other_total", answers) >= 3)
            assert bridge.metric("orangepill_bridge_stream_disconnects_total", {"reason": "error"}) == 0
            assert await bridge.finish() == 0
    assert json.loads(msg.body)["seq"] == 1
