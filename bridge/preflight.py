"""``orangepill-bridge check``: each dependency checked once, one line each, before going live."""

from __future__ import annotations

import asyncio
import sys

import aio_pika
import aiormq
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bridge.bindings import declare_bindings
from bridge.config import Realm, Settings, redact_url
from bridge.errors import BridgeError, ProtocolError
from bridge.protocol import (
    ErrorFrame,
    parse_frames,
    redact,
    subscribe_answer,
    subscribe_frame,
    unsubscribe_frame,
)
from bridge.publisher import declare_topology

__all__ = ["check_realm", "preflight"]


def _say(ok: bool, what: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {what}", flush=True)


async def check_realm(settings: Settings, realm: Realm) -> tuple[bool | None, str]:
    """Subscribe once and unsubscribe.

    Returns:
        (True, detail) when accepted, (False, detail) when the key is rejected,
        (None, detail) when the stream could not be asked.
    """
    try:
        async with connect(settings.stream_url, open_timeout=settings.subscribe_timeout, ping_interval=None) as ws:
            await ws.send(subscribe_frame(realm.key))
            refused = False
            async with asyncio.timeout(settings.subscribe_timeout):
                while True:
                    try:
                        frames = parse_frames(await ws.recv(), max_bytes=settings.max_frame_bytes)
                    except ProtocolError:
                        continue
                    for frame in frames:
                        answer = subscribe_answer(frame, refused=refused)
                        if answer == "rejected" and isinstance(frame, ErrorFrame):
                            return False, redact(frame.message, settings.secrets)
                        if answer == "refused":
                            refused = True
                        elif answer == "accepted":
                            await ws.send(unsubscribe_frame(realm.key))
                            return True, "subscribed and unsubscribed"
    except ConnectionClosed:
        if refused:
            return False, "the server answered info NONE and closed the connection"
        return None, "the server closed the connection before answering"
    except TimeoutError:
        if refused:
            return False, "the server answered info NONE"
        return None, f"no answer to subscribe within {settings.subscribe_timeout:g}s"
    except (OSError, InvalidHandshake) as exc:
        return None, redact(f"{type(exc).__name__}: {exc}", settings.secrets)


async def preflight(settings: Settings) -> int:
    """Run every check; exit code 0 all good, 2 a realm key rejected, 1 anything else failed."""
    code = 0
    url = redact_url(settings.stream_url)
    for realm in settings.realms:
        accepted, detail = await check_realm(settings, realm)
        if accepted is None:
            _say(False, f"stream {url} realm {realm.label}: unreachable ({detail})")
            code = max(code, 1)
        elif accepted:
            _say(True, f"stream {url} realm {realm.label}: key accepted")
        else:
            _say(False, f"stream {url} realm {realm.label} ({realm.fingerprint}): key REJECTED ({detail})")
            code = 2
    broker = redact_url(settings.amqp_url)
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    except (aiormq.exceptions.AMQPError, OSError, ConnectionError, TimeoutError) as exc:
        _say(False, f"broker {broker}: unreachable ({type(exc).__name__}: {exc})")
        return max(code, 1)
    _say(True, f"broker {broker}: reachable")
    try:
        async with connection:
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
        code = max(code, 1)
    print("all checks passed" if code == 0 else "some checks failed", file=sys.stderr)
    return code
