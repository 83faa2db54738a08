"""``orangepill-bridge check``: each dependency checked once, one line each, before going live."""

from __future__ import annotations

import asyncio
import enum
import sys
import time
from dataclasses import dataclass
from typing import Final

import aio_pika
import aiormq
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bridge.bindings import declare_bindings
from bridge.broker import declare_topology
from bridge.config import Realm, Settings
from bridge.contract import DETAIL_LIMIT
from bridge.errors import BridgeError, ProtocolError
from bridge.secrets import LogScrubber, clip, redact, redact_url
from bridge.stream import StreamDial
from bridge.tls import amqp_connect_kwargs, stream_ssl_context
from bridge.wire import Handshake, SubscribeOutcome, parse_frames, subscribe_frame, unsubscribe_frame

__all__ = ["KeyCheck", "RealmCheck", "check_realm", "preflight"]


class KeyCheck(enum.Enum):
    """What the stream said about a realm key."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    UNREACHABLE = "unreachable"  # the stream could not be asked
    NO_ANSWER = "no_answer"  # connected and subscribed, but the server said nothing in time
    SERVER_ERROR = "server_error"  # the server answered subscribe with an error that is not about the key
    CLOSED = "closed"  # the server closed the link before it answered subscribe


@dataclass(frozen=True, slots=True)
class RealmCheck:
    """The result of subscribing once with one realm key."""

    result: KeyCheck
    detail: str


_NOT_ANSWERED: Final = {
    KeyCheck.UNREACHABLE: "unreachable ({detail})",
    KeyCheck.SERVER_ERROR: "connected, but the server answered subscribe with an error not about the key ({detail}); "
    "the bridge retries such answers",
    KeyCheck.CLOSED: "connected, but the server closed the link before it answered subscribe ({detail})",
    KeyCheck.NO_ANSWER: "connected, but {detail} (the server neither accepted nor rejected the key)",
}
"""What ``check`` says of a key the stream neither accepted nor rejected (exit 1), by result."""


def _say(ok: bool, what: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {what}", flush=True)


async def check_realm(settings: Settings, realm: Realm) -> RealmCheck:
    """Subscribe once and unsubscribe, driving the same handshake machine as the bridge."""
    handshake = Handshake(now=time.monotonic(), timeout=settings.subscribe_timeout)
    try:
        async with StreamDial(
            settings.stream_url,
            open_timeout=settings.subscribe_timeout,
            ping_interval=None,
            ssl=stream_ssl_context(settings),
        ) as ws:
            await ws.send(subscribe_frame(realm.key.reveal()))
            outcome = await _await_answer(ws, handshake, settings)
            if outcome is SubscribeOutcome.ACCEPTED:
                await ws.send(unsubscribe_frame(realm.key.reveal()))
    except ConnectionClosed:
        outcome = handshake.connection_closed()
    except (OSError, InvalidHandshake) as exc:
        return RealmCheck(KeyCheck.UNREACHABLE, redact(f"{type(exc).__name__}: {exc}", settings.secrets))
    except UnicodeError:  # the IDNA codec refuses the host name (an empty label: "a..b")
        return RealmCheck(KeyCheck.UNREACHABLE, f"invalid host name in {redact_url(settings.stream_url)}")
    if outcome is SubscribeOutcome.ACCEPTED:
        return RealmCheck(KeyCheck.ACCEPTED, "subscribed and unsubscribed")
    if outcome is SubscribeOutcome.KEY_REJECTED:
        return RealmCheck(KeyCheck.REJECTED, clip(redact(handshake.detail, settings.secrets), DETAIL_LIMIT))
    if outcome is SubscribeOutcome.NO_ANSWER:
        return RealmCheck(KeyCheck.NO_ANSWER, f"no answer to subscribe within {settings.subscribe_timeout:g}s")
    detail = clip(redact(handshake.detail, settings.secrets), DETAIL_LIMIT)
    if outcome is SubscribeOutcome.SERVER_ERROR:
        return RealmCheck(KeyCheck.SERVER_ERROR, detail)
    return RealmCheck(KeyCheck.CLOSED, detail)


async def _await_answer(ws: ClientConnection, handshake: Handshake, settings: Settings) -> SubscribeOutcome:
    """Read frames until the handshake ends (a broken frame says nothing about the key)."""
    while (outcome := handshake.tick(time.monotonic())) is SubscribeOutcome.PENDING:
        try:
            raw = await asyncio.wait_for(ws.recv(), timeout=max(0.0, handshake.deadline - time.monotonic()))
        except TimeoutError:
            continue
        try:
            frames = parse_frames(raw, max_bytes=settings.max_frame_bytes)
        except ProtocolError:
            continue
        for frame in frames:
            handshake.receive(frame, time.monotonic())
    return outcome


async def _check_stream(settings: Settings) -> int:
    code = 0
    url = redact_url(settings.stream_url)
    for realm in settings.realms:
        check = await check_realm(settings, realm)
        if check.result is KeyCheck.ACCEPTED:
            _say(True, f"stream {url} realm {realm.label}: key accepted")
        elif check.result is KeyCheck.REJECTED:
            _say(False, f"stream {url} realm {realm.label} ({realm.fingerprint}): key REJECTED ({check.detail})")
            code = 2
        else:
            _say(False, f"stream {url} realm {realm.label}: " + _NOT_ANSWERED[check.result].format(detail=check.detail))
            code = max(code, 1)
    return code


async def _check_broker(settings: Settings) -> int:
    broker = redact_url(settings.amqp_url)
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10, **amqp_connect_kwargs(settings))
    except UnicodeError:  # the IDNA codec refuses the host name (an empty label: "a..b")
        _say(False, f"broker {broker}: invalid host name")
        return 1
    except (aiormq.exceptions.AMQPError, OSError, ConnectionError, TimeoutError) as exc:
        scrub = LogScrubber(settings.realm_keys, settings.passwords)
        _say(False, f"broker {broker}: unreachable ({scrub(f'{type(exc).__name__}: {exc}')})")
        return 1
    _say(True, f"broker {broker}: reachable")
    try:
        async with connection:  # one short-lived connection: its channels go with it
            _, _, alternate = await declare_topology(connection, settings, confirms=True)
            extra = "with alternate exchange" if alternate else "WITHOUT alternate exchange (returns handled)"
            _say(True, f"topology: exchange {settings.exchange} declared {extra}")
            if settings.bindings:
                side = await connection.channel()
                for binding, kind in await declare_bindings(side, settings.exchange, settings.bindings):
                    what = "quorum queue" if kind == "quorum" else "existing queue (kept as it is)"
                    _say(True, f"binding: {what} {binding.queue} <- {', '.join(binding.patterns)}")
    except (BridgeError, aiormq.exceptions.AMQPError) as exc:
        _say(False, f"topology: {exc}")
        return 1
    return 0


async def preflight(settings: Settings) -> int:
    """Run every check; exit code 0 all good, 2 a realm key rejected, 1 anything else failed."""
    code = await _check_stream(settings)
    code = max(code, await _check_broker(settings))
    print("all checks passed" if code == 0 else "some checks failed", file=sys.stderr)
    return code
