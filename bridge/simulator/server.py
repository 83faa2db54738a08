"""The simulated Orangepill stream server: connections, realms, the emitters and the fault controls."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import orjson
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from bridge.errors import ConfigError
from bridge.secrets import key_fingerprint
from bridge.simulator import frames
from bridge.simulator.faults import DROP_CODE, MalformedPicker, RejectPlan, release_when_gone, stop_reading
from bridge.simulator.flows import BURST, EventSource, RateSchedule, Step
from bridge.simulator.settings import SHAPES, SimulatorConfig, control_host_port
from bridge.wire import PING

__all__ = ["SentEvent", "Simulator", "load_tls"]

log = logging.getLogger(__name__)

# Close handshakes wait at most this long for the client's answer.
_CLOSE_TIMEOUT: Final = 5.0
# Data values of the malformed frames of a burst (they are not part of any flow).
_BURST_EVENT: Final = ("user.created", "63967141000000000000beef")


@dataclass(frozen=True, slots=True)
class SentEvent:
    """One notification the simulator delivered to at least one connection.

    Attributes:
        seq: position in its realm's sequence (contiguous from 1).
        realm: the realm's key fingerprint (``key_fingerprint``), never the key.
        event: the event name.
        data: the entity id (padded to ``data_bytes`` when set).
        timestamp: the ``timestamp`` value of the frame.
        sent_at: the ``sent_at`` value of the frame (unix seconds).
        shape: ``flat`` or ``nested``.
        frame: the exact text frame sent.
    """

    seq: int
    realm: str
    event: str
    data: str
    timestamp: str | int
    sent_at: float
    shape: str
    frame: str


def load_tls(config: SimulatorConfig) -> ssl.SSLContext | None:
    """The server-side TLS context of ``tls_cert``/``tls_key``, or None for plain ``ws://``.

    Raises:
        ConfigError: the certificate or key cannot be loaded.
    """
    if not config.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key: cannot load the certificate and key ({exc})") from None
    return context


class _Conn:
    """One client connection and its fault state."""

    __slots__ = ("closing", "events", "id", "peer", "realms", "silent", "ws")

    def __init__(self, ws: ServerConnection, ident: int) -> None:
        self.ws = ws
        self.id = ident
        self.peer = _peer(ws)
        self.realms: set[str] = set()
        self.events = 0
        self.silent = False
        self.closing = False

    @property
    def quiet(self) -> bool:
        """Nothing more may be written to it (silent or closing)."""
        return self.silent or self.closing


class _Pending:
    """An event built for delivery but not yet delivered; its frame is built once per seq."""

    __slots__ = ("data", "event", "extra", "frame", "resolved", "sent_at", "seq", "shape", "timestamp")

    def __init__(
        self, event: str, data: str, timestamp: str | int | None, shape: str, extra: dict[str, object] | None
    ) -> None:
        now = time.time()
        self.event = event
        self.data = data
        self.timestamp = str(int(now * 1000)) if timestamp is None else timestamp
        self.sent_at = now
        self.shape = shape
        self.extra = extra
        self.seq = 0
        self.frame = ""
        self.resolved = shape

    def frame_for(self, seq: int) -> str:
        """The frame carrying ``seq``; ``mixed`` is flat for odd and nested for even seq."""
        if self.seq != seq:
            self.seq = seq
            self.resolved = ("flat" if seq % 2 else "nested") if self.shape == "mixed" else self.shape
            body: dict[str, object] = {
                "event": self.event,
                "data": self.data,
                "timestamp": self.timestamp,
                "seq": seq,
                "sent_at": self.sent_at,
            }
            if self.extra:
                body.update(self.extra)
            self.frame = frames.notification(body, self.resolved)
        return self.frame

    def record(self, realm: str) -> SentEvent:
        return SentEvent(
            self.seq, realm, self.event, self.data, self.timestamp, self.sent_at, self.resolved, self.frame
        )


class _Realm:
    """One accepted realm key: its subscribers, sequence and emitter state."""

    __slots__ = (
        "buffer",
        "fp",
        "generated",
        "key",
        "lock",
        "pending",
        "picker",
        "seq",
        "source",
        "subscribers",
        "wake",
    )

    def __init__(self, key: str, index: int, seed: int) -> None:
        self.key = key
        self.fp = key_fingerprint(key)
        self.source = EventSource(seed, index)
        self.picker = MalformedPicker(seed)
        self.buffer: list[Step] = []
        self.subscribers: dict[_Conn, None] = {}
        self.seq = 0
        self.generated = 0
        self.pending: _Pending | None = None
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()

    def next_step(self) -> Step:
        if not self.buffer:
            # Precompute in chunks, reversed so pop() is O(1).
            self.buffer = self.source.take(BURST * 4)[::-1]
        return self.buffer.pop()


def _peer(ws: ServerConnection) -> str:
    try:
        address = ws.remote_address
    except Exception:  # the transport may already be gone
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


class Simulator:
    """An Orangepill stream server on a real socket, with fault injection.

    Use as ``async with Simulator(config) as sim:``; read ``sim.url``.

    Args:
        config: the settings.
        on_sent: called with each delivered event (progress display, live accounting).
    """

    def __init__(self, config: SimulatorConfig, on_sent: Callable[[SentEvent], None] | None = None) -> None:
        self.config = config
        self.port = config.port
        self.on_sent = on_sent
        self.sent: list[SentEvent] = []
        self.malformed: list[tuple[str, str]] = []
        self.sent_total = 0
        self.malformed_total = 0
        self.connections = 0
        self.subscribes = 0
        self.rejected = 0
        self.unsubscribes = 0
        self.pings = 0
        self._realms: dict[str, _Realm] = {}
        self._conns: dict[_Conn, None] = {}
        self._server: Server | None = None
        self._control: Any = None
        self._emitters: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._changed: asyncio.Event | None = None
        self._paused = False
        self._rejects = RejectPlan()
        self._picker = MalformedPicker(config.seed + 1)

    # -- lifecycle

    @property
    def url(self) -> str:
        """The ``ws://host:port`` (``wss://`` with TLS) URL clients connect to."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'wss' if self.config.tls else 'ws'}://{host}:{self.port}"

    @property
    def control_url(self) -> str | None:
        """The ``http://host:port`` of the control API, or None without one."""
        return None if self._control is None else str(self._control.url)

    @property
    def open_connections(self) -> int:
        """Connections currently open (``connections`` counts every one ever accepted)."""
        return len(self._conns)

    @property
    def paused(self) -> bool:
        """Whether generated events are held back."""
        return self._paused

    async def start(self) -> None:
        """Bind the socket(s) and start one emitter per realm.

        Raises:
            OSError: an address cannot be bound.
            ConfigError: the TLS certificate or key cannot be loaded.
        """
        if self._server is not None:
            return
        cfg = self.config
        self._changed = asyncio.Event()
        self._realms = {key: _Realm(key, index, cfg.seed) for index, key in enumerate(cfg.realm_keys)}
        # No server-side keepalive: a silent link must not send pings either, and
        # Orangepill leaves keepalive to the client (the documentation's text PING).
        # No compression: it would dominate the cost per event at full speed.
        # max_queue=None: no flow control of our reads, so a silent link stays unread (faults.stop_reading).
        self._server = await ws_serve(
            self._handle,
            cfg.host,
            cfg.port,
            ssl=load_tls(cfg),
            ping_interval=None,
            close_timeout=_CLOSE_TIMEOUT,
            compression=None,
            max_size=2**16,
            max_queue=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        for realm in self._realms.values():
            task = asyncio.create_task(self._run_emitter(realm), name=f"sim-emitter-{realm.fp}")
            task.add_done_callback(_emitter_done)
            self._emitters.append(task)
        if cfg.control_addr:
            await self._start_control(*control_host_port(cfg.control_addr))
        log.info(
            "simulator listening on %s (%d realm(s), rate=%s/s, shape=%s, ack=%s)",
            self.url,
            len(self._realms),
            cfg.rate or "max",
            cfg.shape,
            cfg.ack,
        )

    async def _start_control(self, host: str, port: int) -> None:
        from bridge.simulator.control import ControlServer

        control = ControlServer(self)
        await control.start(host, port)
        self._control = control

    async def stop(self) -> None:
        """Stop emitting, close every connection, the control API and the listening socket."""
        server = self._server
        if server is None:
            return
        self._server = None
        if self._control is not None:
            await self._control.stop()
            self._control = None
        for task in self._emitters:
            task.cancel()
        for conn in tuple(self._conns):
            if conn.silent:
                # A silent connection will never answer the close handshake.
                conn.ws.transport.abort()
        server.close()
        await server.wait_closed()
        tasks = (*self._emitters, *self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._emitters.clear()
        self._background.clear()
        log.info("simulator stopped after %d event(s) on %d connection(s)", self.sent_total, self.connections)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- waiting and reading

    # The timeout parameters are part of the published interface (tests read better).
    async def wait_subscribed(self, n: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until ``subscribes`` (accepted subscribes) reaches ``n``.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds.
        """
        await self._wait_for(lambda: self.subscribes >= n, timeout)

    async def wait_sent(self, n: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until ``sent_total`` (events delivered, recorded or not) reaches ``n``.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds.
        """
        await self._wait_for(lambda: self.sent_total >= n, timeout)

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        changed = self._changed
        if changed is None:
            raise RuntimeError("the simulator is not started")
        async with asyncio.timeout(timeout):
            while not predicate():
                changed.clear()
                await changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def stats(self) -> dict[str, Any]:
        """Counters for the control API: connections, subscribes, and the last seq per realm fingerprint."""
        return {
            "open_connections": self.open_connections,
            "connections": self.connections,
            "subscribes": self.subscribes,
            "rejected": self.rejected,
            "unsubscribes": self.unsubscribes,
            "pings": self.pings,
            "sent_total": self.sent_total,
            "malformed_total": self.malformed_total,
            "paused": self._paused,
            "rejects_pending": self._rejects.left,
            "realms": {realm.fp: {"last_seq": realm.seq} for realm in self._realms.values()},
        }

    # -- faults and controls

    async def drop_all(self) -> int:
        """Close every client connection now with a clean close frame (silent ones: TCP abort).

        Returns once every close frame is written after what was already sent; the
        closing handshakes finish in the background (aborted after 5 s without an answer).

        Returns:
            How many connections were dropped.
        """
        dropped = 0
        for conn in tuple(self._conns):
            if conn.silent:
                conn.ws.transport.abort()
                dropped += 1
            elif not conn.closing:
                self._drop(conn, "drop_all")
                dropped += 1
        # Let each close task run up to its first suspension: the close frame is written then.
        await asyncio.sleep(0)
        return dropped

    def pause(self) -> None:
        """Stop emitting generated events (``send_event`` and ``send_raw`` still work)."""
        if not self._paused:
            self._paused = True
            log.info("simulator paused")

    def resume(self) -> None:
        """Restart emitting generated events, on a fresh rate schedule."""
        if self._paused:
            self._paused = False
            log.info("simulator resumed")
            for realm in self._realms.values():
                realm.wake.set()

    def go_silent(self) -> int:
        """Make every open connection silent now: no more frames sent, no more bytes read.

        Returns:
            How many connections went silent.
        """
        quiet = [conn for conn in tuple(self._conns) if not conn.quiet]
        for conn in quiet:
            self._silence(conn, "go_silent")
        return len(quiet)

    def reject_next(self, n: int, text: str | None = None, *, key_error: bool = True) -> None:
        """Refuse the next ``n`` subscribes, even with a good key; the connections stay open.

        Args:
            n: how many subscribes to refuse (0 cancels a plan).
            text: the error text; default "Invalid Realm Key." or, for a non-key error,
                "Service temporarily unavailable".
            key_error: answer ``info`` realm NONE then the error, as for a bad key;
                otherwise only the error frame.
        """
        self._rejects.arm(n, text, key_error=key_error)
        log.info("simulator: the next %d subscribe(s) will be refused", n)

    def revoke(self, key: str) -> int:
        """Revoke a realm key, as Orangepill's console does: its subscribers are dropped, and each subscribe with it
        from now on is refused as an unknown key (``info`` NONE, then the error).

        Returns:
            How many connections subscribed to it were dropped.
        """
        realm = self._realms.pop(key, None)
        if realm is None:
            return 0
        dropped = list(realm.subscribers)
        for conn in dropped:
            self._drop(conn, "revoked key")
        log.info("simulator: realm %s revoked; %d connection(s) dropped", realm.fp, len(dropped))
        return len(dropped)

    async def send_malformed(self, n: int, kind: str | None = None) -> int:
        """Send ``n`` malformed frames (of ``kind``, else random kinds) to every subscribed connection.

        Returns:
            How many of them reached at least one connection.
        """
        kinds = [kind] * n if kind is not None else self._picker.at_random(n)
        delivered = 0
        for each in kinds:
            if await self._broadcast_malformed(self._subscribed(), each, *_BURST_EVENT):
                delivered += 1
        return delivered

    async def send_event(
        self,
        event: str,
        data: str,
        *,
        timestamp: str | int | None = None,
        shape: str | None = None,
        extra: dict[str, object] | None = None,
        realm: str | None = None,
    ) -> SentEvent:
        """Emit one chosen event to every connection subscribed to a realm.

        It takes the realm's next ``seq`` and is recorded in ``sent``.

        Args:
            event: the event name (anything, even an invalid routing key).
            data: the entity id.
            timestamp: the frame's timestamp; default ``Date.now()`` ms as a string.
            shape: ``flat`` or ``nested``; default the configured shape.
            extra: more fields, merged into the notification (overriding).
            realm: the realm key; default the first configured key.

        Returns:
            The delivered event.

        Raises:
            KeyError: ``realm`` is not a configured key.
            ValueError: ``shape`` is not flat, nested or mixed.
            RuntimeError: no connection is subscribed to the realm.
        """
        target = self._realm(realm)
        if shape is not None and shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
        pending = _Pending(event, data, timestamp, shape or self.config.shape, extra)
        async with target.lock:
            delivered = await self._deliver(target, pending)
        if not delivered:
            raise RuntimeError(f"no connection is subscribed to realm {target.fp}")
        return pending.record(target.fp)

    async def send_raw(self, frame: str | bytes) -> int:
        """Send any text frame to every subscribed connection (each once).

        ``bytes`` go out as a text frame as they are, unchecked: a server that sends broken UTF-8.

        Returns:
            How many connections got it.
        """
        delivered = 0
        for conn in self._subscribed():
            if await self._send(conn, frame):
                delivered += 1
        return delivered

    def _subscribed(self) -> list[_Conn]:
        targets: dict[_Conn, None] = {}
        for realm in self._realms.values():
            targets.update(realm.subscribers)
        return list(targets)

    def _realm(self, key: str | None) -> _Realm:
        if key is None:
            return next(iter(self._realms.values()))
        try:
            return self._realms[key]
        except KeyError:
            raise KeyError(f"realm {key_fingerprint(key)} is not configured") from None

    def _drop(self, conn: _Conn, reason: str) -> None:
        if conn.quiet:
            return
        conn.closing = True
        self._forget(conn)
        self._spawn(self._close(conn, reason))

    async def _close(self, conn: _Conn, reason: str) -> None:
        log.info("connection %d: closing (%s) after %d event(s)", conn.id, reason, conn.events)
        try:
            await conn.ws.close(DROP_CODE, f"simulated {reason}")
        except Exception:
            log.debug("connection %d: close failed", conn.id, exc_info=True)

    def _silence(self, conn: _Conn, reason: str) -> None:
        if conn.quiet:
            return
        conn.silent = True
        self._forget(conn)
        stop_reading(conn.ws)
        log.info("connection %d: silent (%s) after %d event(s)", conn.id, reason, conn.events)
        self._spawn(release_when_gone(conn.ws, conn.id))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- connections

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        conn = _Conn(ws, self.connections)
        self._conns[conn] = None
        log.info("connection %d open from %s", conn.id, conn.peer)
        try:
            while True:
                message = await ws.recv()
                if conn.silent:
                    # Stop consuming: a silent link reads nothing more (faults.stop_reading).
                    await ws.wait_closed()
                    break
                try:
                    await self._on_message(conn, message)
                except ConnectionClosed:
                    raise
                except Exception:
                    log.warning("connection %d: failed to handle a client frame", conn.id, exc_info=True)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else exc.sent.code if exc.sent else "none"
            silent = " while silent" if conn.silent else ""
            log.info("connection %d closed (code %s) after %d event(s)%s", conn.id, code, conn.events, silent)
        finally:
            self._forget(conn)
            self._conns.pop(conn, None)
            self._notify()

    async def _on_message(self, conn: _Conn, message: str | bytes) -> None:
        if isinstance(message, bytes):
            log.debug("connection %d: ignored a binary frame of %d bytes", conn.id, len(message))
            return
        if message.strip() == PING:
            self.pings += 1
            self._notify()
            if self.config.pong:
                await self._send(conn, "PONG")
            return
        try:
            obj = orjson.loads(message)
        except orjson.JSONDecodeError:
            log.debug("connection %d: ignored a frame that is not JSON (%d chars)", conn.id, len(message))
            return
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind not in ("subscribe", "unsubscribe"):
            log.debug("connection %d: ignored a frame of type %.40r", conn.id, kind)
            return
        key = obj.get("realm")
        realm = self._realms.get(key) if isinstance(key, str) else None
        if realm is None:
            await self._refuse_unknown(conn, kind, key)
        elif kind == "unsubscribe":
            await self._unsubscribe(conn, realm)
        else:
            await self._subscribe(conn, realm)
        self._notify()

    async def _refuse_unknown(self, conn: _Conn, kind: str, key: object) -> None:
        self.rejected += 1
        shown = key_fingerprint(key) if isinstance(key, str) else "(not a string)"
        log.info("connection %d: %s refused, unknown realm key %s", conn.id, kind, shown)
        # Exactly the documented failure; the connection stays open.
        now = int(time.time())
        await self._send(conn, frames.answer("info", "NONE", now))
        await self._send(conn, frames.error(frames.INVALID_KEY_TEXT, now))

    async def _unsubscribe(self, conn: _Conn, realm: _Realm) -> None:
        # Removed before the answer, so nothing of this realm follows the answer.
        realm.subscribers.pop(conn, None)
        conn.realms.discard(realm.key)
        await self._ack(conn, "unsubscribe", realm.key)
        self.unsubscribes += 1
        log.info("connection %d unsubscribed from realm %s", conn.id, realm.fp)

    async def _subscribe(self, conn: _Conn, realm: _Realm) -> None:
        rejection = self._rejects.take()
        if rejection is not None:
            self.rejected += 1
            log.info("connection %d: subscribe to realm %s refused on request", conn.id, realm.fp)
            now = int(time.time())
            if rejection.key_error:
                await self._send(conn, frames.answer("info", "NONE", now))
            await self._send(conn, frames.error(rejection.text, now))
            return
        await self._ack(conn, "subscribe", realm.key)
        if conn.quiet:
            return
        conn.realms.add(realm.key)
        realm.subscribers[conn] = None
        realm.wake.set()
        self.subscribes += 1
        log.info("connection %d subscribed to realm %s", conn.id, realm.fp)

    async def _ack(self, conn: _Conn, kind: str, key: str) -> None:
        ack, now = self.config.ack, int(time.time())
        if ack in ("info", "both"):
            await self._send(conn, frames.answer("info", key, now))
        if ack in ("subscribe", "both"):
            await self._send(conn, frames.answer(kind, key, now))

    def _forget(self, conn: _Conn) -> None:
        for key in conn.realms:
            realm = self._realms.get(key)
            if realm is not None:
                realm.subscribers.pop(conn, None)

    async def _send(self, conn: _Conn, frame: str | bytes) -> bool:
        if conn.quiet:
            return False
        try:
            await conn.ws.send(frame, text=True)
        except ConnectionClosed:
            self._forget(conn)
            return False
        return True

    # -- emitting

    def _may_emit(self, realm: _Realm) -> bool:
        return bool(realm.subscribers) and not self._paused

    async def _run_emitter(self, realm: _Realm) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        schedule = RateSchedule(cfg.rate)
        fresh = True
        while cfg.count == 0 or realm.generated < cfg.count:
            if not self._may_emit(realm):
                while not self._may_emit(realm):
                    realm.wake.clear()
                    await realm.wake.wait()
                fresh = True
                continue
            if fresh:
                # A new schedule after a pause: no burst to catch up on idle time.
                schedule.restart(loop.time(), realm.generated)
                fresh = False
            burst = schedule.due(loop.time(), realm.generated)
            if burst == 0:
                await asyncio.sleep(schedule.delay(loop.time(), realm.generated))
                continue
            if cfg.count:
                burst = min(burst, cfg.count - realm.generated)
            await self._emit_burst(realm, burst)
            # Yield even when every send completed without suspending.
            await asyncio.sleep(0)
        log.info("realm %s: emitted all %d generated event(s)", realm.fp, realm.generated)

    async def _emit_burst(self, realm: _Realm, burst: int) -> None:
        cfg = self.config
        async with realm.lock:
            for _ in range(burst):
                if not self._may_emit(realm):
                    break
                pending = realm.pending
                if pending is None:
                    event, data = realm.next_step()
                    if cfg.data_bytes:
                        data = frames.padded(data, cfg.data_bytes)
                    pending = realm.pending = _Pending(event, data, None, cfg.shape, None)
                if not await self._deliver(realm, pending):
                    break  # nobody took it: retried on the next subscriber
                realm.pending = None
                realm.generated += 1

    async def _deliver(self, realm: _Realm, pending: _Pending) -> bool:
        """Fan one event out to the realm's subscribers; False if nobody took it."""
        frame = pending.frame_for(realm.seq + 1)
        if not await self._fan_out(realm, frame):
            return False
        realm.seq = pending.seq
        self.sent_total += 1
        cfg = self.config
        if cfg.record or self.on_sent is not None:
            record = pending.record(realm.fp)
            if cfg.record:
                self.sent.append(record)
            if self.on_sent is not None:
                self.on_sent(record)
        self._notify()
        if cfg.malformed_every and realm.seq % cfg.malformed_every == 0:
            await self._broadcast_malformed(
                list(realm.subscribers), realm.picker.in_turn(), pending.event, pending.data
            )
        return True

    async def _fan_out(self, realm: _Realm, frame: str) -> bool:
        delivered = False
        cfg = self.config
        for conn in tuple(realm.subscribers):
            if conn not in realm.subscribers:
                continue  # unsubscribed, dropped or silenced during this fan-out
            try:
                await conn.ws.send(frame)
            except ConnectionClosed:
                self._forget(conn)
                continue
            delivered = True
            conn.events += 1
            if cfg.drop_every and conn.events >= cfg.drop_every:
                self._drop(conn, f"drop_every={cfg.drop_every}")
            elif cfg.silent_after and conn.events >= cfg.silent_after:
                self._silence(conn, f"silent_after={cfg.silent_after}")
        return delivered

    async def _broadcast_malformed(self, targets: list[_Conn], kind: str, event: str, data: str) -> bool:
        frame = frames.malformed(kind, event, data)
        delivered = False
        for conn in targets:
            if not conn.quiet and await self._send(conn, frame):
                delivered = True
        if delivered:
            self.malformed_total += 1
            if self.config.record:
                self.malformed.append((kind, frame))
            self._notify()
        return delivered


def _emitter_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("simulator emitter failed", exc_info=task.exception())
