"""A fake Orangepill stream server for demos, tests and benchmarks, with fault injection.

It speaks the seed's protocol (``seed/orangepill-websocket-subscriptions.txt``):
``subscribe``/``unsubscribe`` frames answered with ``info`` and/or ``subscribe``
frames, the ``info NONE`` + ``error`` failure, the text ``PING`` keepalive, and
``notification`` frames in the flat ("Event data") or nested (JavaScript example)
envelope. Every notification also carries ``seq`` (contiguous per realm, from 1)
and ``sent_at`` (unix seconds) so that a test can account for every event.

Faults: clean drops after N events (``drop_every``), a dead-but-open link that
neither sends nor reads (``silent_after``, ``go_silent``), and malformed frames
(``malformed_every``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeAlias

import orjson
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from bridge.errors import ConfigError
from bridge.protocol import PING, key_fingerprint

__all__ = [
    "MALFORMED_KINDS",
    "SentEvent",
    "Simulator",
    "SimulatorConfig",
    "add_simulate_arguments",
    "config_from_args",
    "serve",
]

log = logging.getLogger(__name__)

Shape: TypeAlias = Literal["flat", "nested", "mixed"]
Ack: TypeAlias = Literal["info", "subscribe", "both"]

SHAPES: Final[tuple[str, ...]] = ("flat", "nested", "mixed")
ACKS: Final[tuple[str, ...]] = ("info", "subscribe", "both")
MALFORMED_KINDS: Final[tuple[str, ...]] = (
    "bad_json",
    "seed_stray_brace",
    "missing_event",
    "invalid_routing_key",
    "not_object",
)

# Events per scheduling burst: the emitter yields to the loop at least this often.
_BURST: Final = 256
# How often a silent connection checks whether the client has given up.
_SILENT_POLL: Final = 0.25
# A silent link whose client never gives up is cut after this long ("the TCP link dies").
_SILENT_MAX: Final = 300.0
# Close handshakes wait at most this long for the client's answer.
_CLOSE_TIMEOUT: Final = 5.0
_DROP_CODE: Final = 1001
_TCP_ESTABLISHED: Final = 1


# -- settings ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class SimulatorConfig:
    """Settings of the simulated stream server; validated on creation.

    Attributes:
        host: address to listen on.
        port: TCP port; 0 picks a free one (read ``Simulator.port``).
        realm_keys: realm keys the server accepts.
        rate: events per second per realm; 0 means as fast as possible.
        count: stop emitting generated events after this many per realm (0 = never).
        shape: notification envelope; ``mixed`` alternates flat (odd seq) and nested (even seq).
        ack: what answers a successful subscribe/unsubscribe: ``info``, the echo, or both.
        pong: answer the text ``PING`` with a text ``PONG``.
        drop_every: close a connection cleanly after N events sent on it (0 = never).
        silent_after: after N events on a connection, stop sending and reading (0 = never).
        malformed_every: after every N events of a realm, also send one malformed frame.
        seed: RNG seed of the event sequences.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    realm_keys: tuple[str, ...] = ("demo-realm-key",)
    rate: float = 20.0
    count: int = 0
    shape: Shape = "flat"
    ack: Ack = "both"
    pong: bool = False
    drop_every: int = 0
    silent_after: int = 0
    malformed_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("simulator setting 'host' must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"simulator setting 'port' must be 0..65535, got {self.port}")
        if not isinstance(self.realm_keys, tuple) or not self.realm_keys:
            raise ConfigError("simulator setting 'realm_keys' must be a non-empty tuple")
        if not all(isinstance(key, str) and key for key in self.realm_keys):
            raise ConfigError("simulator setting 'realm_keys' holds an empty or non-string key")
        if not math.isfinite(self.rate) or self.rate < 0:
            raise ConfigError(f"simulator setting 'rate' must be a finite number >= 0, got {self.rate}")
        for name in ("count", "drop_every", "silent_after", "malformed_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"simulator setting {name!r} must be an integer >= 0, got {value!r}")
        if self.shape not in SHAPES:
            raise ConfigError(f"simulator setting 'shape' must be one of {SHAPES}, got {self.shape!r}")
        if self.ack not in ACKS:
            raise ConfigError(f"simulator setting 'ack' must be one of {ACKS}, got {self.ack!r}")


@dataclass(frozen=True, slots=True)
class SentEvent:
    """One notification the simulator delivered to at least one connection.

    Attributes:
        seq: position in its realm's sequence (contiguous from 1).
        realm: the realm's key fingerprint (``key_fingerprint``), never the key.
        event: the event name.
        data: the entity id.
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


# -- event sequences -----------------------------------------------------------------

Step: TypeAlias = tuple[str, str]
Flow: TypeAlias = Iterator[Step]


class _EventSource:
    """Deterministic, realistic event sequences: entity lifecycles, interleaved.

    Entity ids look like the seed's MongoDB ObjectIds (24 hex) and stay the same
    through an entity's lifecycle.
    """

    def __init__(self, seed: int, index: int) -> None:
        self._rng = random.Random(f"orangepill-sim:{seed}:{index}")
        self._serial = 0
        self._accounts: list[str] = []
        self._users: list[str] = []
        self._identities: list[str] = []
        # The first flow runs alone so a demo opens with the readable happy path.
        self._flows: list[Flow] = [self._onboarding(first_deposit=True)]
        self._solo = True
        self._kinds: tuple[tuple[Callable[[], Flow], int], ...] = (
            (self._onboarding, 8),
            (self._deposit, 22),
            (self._withdrawal, 10),
            (self._transfer, 14),
            (self._currency, 3),
            (self._alias, 4),
            (self._apps_payment, 12),
            (self._apps_deposit, 8),
            (self._messaging, 8),
            (self._persons_sync, 3),
            (self._maintenance, 6),
        )
        self._weights = [weight for _, weight in self._kinds]

    def take(self, n: int) -> list[Step]:
        """Return the next ``n`` (event, entity id) steps."""
        rng = self._rng
        flows = self._flows
        out: list[Step] = []
        while len(out) < n:
            if not flows or (not self._solo and len(flows) < 6 and rng.random() < 0.2):
                factory = rng.choices(self._kinds, weights=self._weights)[0][0]
                flows.append(factory())
            index = rng.randrange(len(flows)) if not self._solo else 0
            step = next(flows[index], None)
            if step is None:
                flows.pop(index)
                self._solo = False
                continue
            out.append(step)
        return out

    def _oid(self) -> str:
        self._serial += 1
        return f"{(0x63967141 + self._serial * 7) & 0xFFFFFFFF:08x}{self._rng.getrandbits(64):016x}"

    def _chance(self, p: float) -> bool:
        return self._rng.random() < p

    def _account(self) -> str:
        return self._rng.choice(self._accounts) if self._accounts else self._oid()

    def _onboarding(self, first_deposit: bool = False) -> Flow:
        user, identity, account = self._oid(), self._oid(), self._oid()
        yield "user.created", user
        self._users.append(user)
        yield "identity.created", identity
        self._identities.append(identity)
        if self._chance(0.2):
            person = self._oid()
            yield "person.created", person
            yield "person.assigned", person
        yield "account.creating", account
        if not first_deposit and self._chance(0.06):
            yield "account.failed", account
            return
        yield "account.created", account
        self._accounts.append(account)
        if first_deposit:
            yield from self._deposit(account, happy=True)
        elif self._chance(0.3):
            yield "sms.message.sent", self._oid()

    def _deposit(self, account: str | None = None, happy: bool = False) -> Flow:
        account = account or self._account()
        deposit = self._oid()
        yield "deposit.pending", deposit
        yield "deposit.received", deposit
        yield "deposit.processing", deposit
        if not happy and self._chance(0.25):
            yield "deposit.gas", deposit
        if not happy and self._chance(0.05):
            yield "deposit.failed", deposit
            return
        yield "deposit.processed", deposit
        yield "account.incoming", account
        transaction = self._oid()
        yield "transaction.processing", transaction
        if not happy and self._chance(0.03):
            yield "transaction.failed", transaction
            return
        yield "transaction.done", transaction

    def _withdrawal(self) -> Flow:
        account, withdrawal, transaction = self._account(), self._oid(), self._oid()
        yield "withdrawal.creating", withdrawal
        yield "transaction.processing", transaction
        if self._chance(0.06):
            yield "transaction.failed", transaction
            yield "withdrawal.failed", withdrawal
            return
        yield "account.outgoing", account
        yield "transaction.done", transaction
        yield "withdrawal.processed", withdrawal

    def _transfer(self) -> Flow:
        source, target, transaction = self._account(), self._account(), self._oid()
        yield "transaction.processing", transaction
        if self._chance(0.2):
            yield "transaction.updated", transaction
        if self._chance(0.04):
            yield "transaction.failed", transaction
            return
        yield "account.outgoing", source
        yield "account.incoming", target
        yield "transaction.done", transaction

    def _currency(self) -> Flow:
        currency = self._oid()
        if self._chance(0.08):
            yield "currency.failed", currency
            return
        yield "currency.created", currency
        yield "currency.issued", currency
        if self._chance(0.3):
            yield "currency.destroyed", currency

    def _alias(self) -> Flow:
        alias = self._oid()
        yield "alias.created", alias
        if self._chance(0.5):
            yield "alias.updated", alias
        if self._chance(0.2):
            yield "alias.deleted", alias

    def _apps_payment(self) -> Flow:
        payment, transaction = self._oid(), self._oid()
        yield "apps.payment.pending", payment
        yield "apps.payment.status", payment
        yield "apps.payment.processing", payment
        if self._chance(0.07):
            yield "apps.payment.failed", payment
            return
        yield "apps.payment.done", payment
        yield ("apps.forward.done" if self._chance(0.9) else "apps.forward.failed"), transaction

    def _apps_deposit(self) -> Flow:
        account, deposit = self._account(), self._oid()
        yield "apps.deposit.pending", deposit
        yield "apps.deposit.processing", deposit
        if self._chance(0.06):
            yield "apps.deposit.failed", deposit
            return
        yield "apps.deposit.done", deposit
        yield "account.incoming", account

    def _messaging(self) -> Flow:
        channel = self._rng.choice(("sms", "whatsapp", "html"))
        outcome = "sent" if self._chance(0.85) else "failed"
        yield f"{channel}.message.{outcome}", self._oid()

    def _persons_sync(self) -> Flow:
        sync = self._oid()
        yield "persons.sync.started", sync
        for _ in range(self._rng.randint(1, 3)):
            yield ("person.created" if self._chance(0.5) else "person.updated"), self._oid()
        yield ("company.created" if self._chance(0.5) else "company.updated"), self._oid()
        yield "persons.sync.done", sync

    def _maintenance(self) -> Flow:
        rng = self._rng
        roll = rng.random()
        if roll < 0.3 and self._users:
            yield "user.updated", rng.choice(self._users)
        elif roll < 0.55 and self._identities:
            yield "identity.updated", rng.choice(self._identities)
        elif roll < 0.8:
            yield "account.updated", self._account()
        elif roll < 0.85:
            yield "person.unassigned", self._oid()
        elif roll < 0.88:
            yield "person.deleted", self._oid()
        elif roll < 0.91:
            yield "company.deleted", self._oid()
        elif roll < 0.95 and self._identities:
            yield "identity.deleted", self._identities.pop(rng.randrange(len(self._identities)))
        elif self._users:
            yield "user.deleted", self._users.pop(rng.randrange(len(self._users)))
        else:
            yield "user.updated", self._oid()


# -- server state ----------------------------------------------------------------------


class _Conn:
    """One client connection and its fault counters."""

    __slots__ = ("closing", "events", "id", "peer", "realms", "silent", "ws")

    def __init__(self, ws: ServerConnection, ident: int) -> None:
        self.ws = ws
        self.id = ident
        self.peer = _peer(ws)
        self.realms: set[str] = set()
        self.events = 0
        self.silent = False
        self.closing = False


class _Pending:
    """An event built for delivery but not yet delivered."""

    __slots__ = ("data", "event", "extra", "frame", "resolved", "sent_at", "seq", "shape", "timestamp")

    def __init__(
        self,
        event: str,
        data: str,
        timestamp: str | int,
        sent_at: float,
        shape: str,
        extra: dict[str, object] | None,
    ) -> None:
        self.event = event
        self.data = data
        self.timestamp = timestamp
        self.sent_at = sent_at
        self.shape = shape
        self.extra = extra
        self.seq = 0
        self.frame = ""
        self.resolved = shape


class _Realm:
    """One accepted realm key: its subscribers, sequence and emitter state."""

    __slots__ = (
        "buffer",
        "fp",
        "generated",
        "key",
        "lock",
        "malformed",
        "pending",
        "seq",
        "source",
        "subscribers",
        "wake",
    )

    def __init__(self, key: str, index: int, seed: int) -> None:
        self.key = key
        self.fp = key_fingerprint(key)
        self.source = _EventSource(seed, index)
        self.buffer: list[Step] = []
        self.subscribers: dict[_Conn, None] = {}
        self.seq = 0
        self.generated = 0
        self.malformed = 0
        self.pending: _Pending | None = None
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()

    def next_step(self) -> Step:
        if not self.buffer:
            # Precompute in chunks, reversed so pop() is O(1).
            self.buffer = self.source.take(_BURST * 4)[::-1]
        return self.buffer.pop()


def _peer(ws: ServerConnection) -> str:
    try:
        address = ws.remote_address
    except Exception:  # the transport may already be gone
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _noop() -> None:
    return None


def _tcp_established(ws: ServerConnection) -> bool | None:
    """Whether the kernel still sees the TCP link as established (None: cannot tell)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    sock = ws.transport.get_extra_info("socket")
    if tcp_info is None or sock is None:
        return None
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)
    except OSError:
        return False
    # First byte of struct tcp_info is tcpi_state; CLOSE_WAIT etc. mean the peer left.
    return bool(info) and info[0] == _TCP_ESTABLISHED


def _dumps(obj: dict[str, object] | list[object]) -> str:
    return orjson.dumps(obj).decode()


# -- the server --------------------------------------------------------------------------


class Simulator:
    """An Orangepill stream server on a real socket, with fault injection.

    Use as ``async with Simulator(config) as sim:``; read ``sim.url``.
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.port = config.port
        self.sent: list[SentEvent] = []
        self.malformed: list[tuple[str, str]] = []
        self.connections = 0
        self.subscribes = 0
        self.rejected = 0
        self.unsubscribes = 0
        self.pings = 0
        self._realms: dict[str, _Realm] = {}
        self._conns: dict[_Conn, None] = {}
        self._server: Server | None = None
        self._emitters: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._changed: asyncio.Event | None = None
        self._paused = False

    # -- lifecycle

    @property
    def url(self) -> str:
        """The ``ws://host:port`` URL clients connect to."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"ws://{host}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Connections currently open (``connections`` counts every one ever accepted)."""
        return len(self._conns)

    async def start(self) -> None:
        """Bind the socket and start one emitter per realm.

        Raises:
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            return
        cfg = self.config
        self._changed = asyncio.Event()
        self._realms = {key: _Realm(key, index, cfg.seed) for index, key in enumerate(cfg.realm_keys)}
        # No server-side keepalive: a silent link must not send pings either, and
        # Orangepill leaves keepalive to the client (the seed's text PING).
        # No compression: it would dominate the cost per event at full speed.
        self._server = await ws_serve(
            self._handle,
            cfg.host,
            cfg.port,
            ping_interval=None,
            close_timeout=_CLOSE_TIMEOUT,
            compression=None,
            max_size=2**16,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        for realm in self._realms.values():
            task = asyncio.create_task(self._run_emitter(realm), name=f"sim-emitter-{realm.fp}")
            task.add_done_callback(self._emitter_done)
            self._emitters.append(task)
        log.info(
            "simulator listening on %s (%d realm(s), rate=%s/s, shape=%s, ack=%s)",
            self.url,
            len(self._realms),
            cfg.rate or "max",
            cfg.shape,
            cfg.ack,
        )

    async def stop(self) -> None:
        """Stop emitting, close every connection and the listening socket."""
        server = self._server
        if server is None:
            return
        self._server = None
        for task in self._emitters:
            task.cancel()
        for conn in tuple(self._conns):
            if conn.silent:
                # A silent connection will never answer the close handshake.
                conn.ws.transport.abort()
        server.close()
        await server.wait_closed()
        for task in (*self._emitters, *self._background):
            task.cancel()
        await asyncio.gather(*self._emitters, *self._background, return_exceptions=True)
        self._emitters.clear()
        self._background.clear()
        log.info("simulator stopped after %d event(s) on %d connection(s)", len(self.sent), self.connections)

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

    # -- waiting

    # The timeout parameters are part of the published interface (tests read better).
    async def wait_subscribed(self, n: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until ``subscribes`` (accepted subscribes) reaches ``n``.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds.
        """
        await self._wait_for(lambda: self.subscribes >= n, timeout)

    async def wait_sent(self, n: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until ``len(sent)`` reaches ``n``.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds.
        """
        await self._wait_for(lambda: len(self.sent) >= n, timeout)

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

    # -- faults and controls

    async def drop_all(self) -> None:
        """Close every client connection now with a clean close frame (silent ones: TCP abort).

        Returns once every close frame is written after what was already sent; the
        closing handshakes finish in the background (aborted after 5 s without an answer).
        """
        for conn in tuple(self._conns):
            if conn.silent:
                conn.ws.transport.abort()
            elif not conn.closing:
                conn.closing = True
                self._forget(conn)
                self._spawn(self._close(conn, "drop_all"))
        # Let each close task run up to its first suspension: the close frame is written then.
        await asyncio.sleep(0)

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

    def go_silent(self) -> None:
        """Make every open connection silent now: no more frames sent, no more bytes read."""
        for conn in tuple(self._conns):
            self._silence(conn, "go_silent")

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
        async with target.lock:
            now = time.time()
            pending = _Pending(
                event,
                data,
                str(int(now * 1000)) if timestamp is None else timestamp,
                now,
                shape or self.config.shape,
                extra,
            )
            record = await self._deliver(target, pending)
        if record is None:
            raise RuntimeError(f"no connection is subscribed to realm {target.fp}")
        return record

    async def send_raw(self, frame: str) -> int:
        """Send any text frame to every subscribed connection (each once).

        Returns:
            How many connections got it.
        """
        targets: dict[_Conn, None] = {}
        for realm in self._realms.values():
            targets.update(realm.subscribers)
        delivered = 0
        for conn in targets:
            if await self._send(conn, frame):
                delivered += 1
        return delivered

    def _realm(self, key: str | None) -> _Realm:
        if key is None:
            return next(iter(self._realms.values()))
        try:
            return self._realms[key]
        except KeyError:
            raise KeyError(f"realm {key_fingerprint(key)} is not configured") from None

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
                    # Stop consuming so the assembler never resumes the paused transport.
                    await ws.wait_closed()
                    break
                try:
                    await self._on_message(conn, message)
                except ConnectionClosed:
                    raise
                except Exception:
                    log.warning("connection %d: failed to handle a client frame", conn.id, exc_info=True)
        except ConnectionClosed as exc:
            log.info(
                "connection %d closed (code %s) after %d event(s)%s",
                conn.id,
                exc.rcvd.code if exc.rcvd is not None else exc.sent.code if exc.sent else "none",
                conn.events,
                " while silent" if conn.silent else "",
            )
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
        now = int(time.time())
        if realm is None:
            self.rejected += 1
            self._notify()
            log.info(
                "connection %d: %s refused, unknown realm key %s",
                conn.id,
                kind,
                key_fingerprint(key) if isinstance(key, str) else "(not a string)",
            )
            # Exactly the seed's failure; the connection stays open.
            await self._send(conn, _dumps({"type": "info", "realm": "NONE", "timestamp": now}))
            await self._send(conn, _dumps({"type": "error", "realm": "Invalid Realm Key.", "timestamp": now}))
            return
        if kind == "unsubscribe":
            # Removed before the answer, so nothing of this realm follows the answer.
            realm.subscribers.pop(conn, None)
            conn.realms.discard(realm.key)
            await self._ack(conn, "unsubscribe", realm.key, now)
            self.unsubscribes += 1
            log.info("connection %d unsubscribed from realm %s", conn.id, realm.fp)
        else:
            await self._ack(conn, "subscribe", realm.key, now)
            if conn.silent or conn.closing:
                return
            conn.realms.add(realm.key)
            realm.subscribers[conn] = None
            realm.wake.set()
            self.subscribes += 1
            log.info("connection %d subscribed to realm %s", conn.id, realm.fp)
        self._notify()

    async def _ack(self, conn: _Conn, kind: str, key: str, now: int) -> None:
        ack = self.config.ack
        if ack in ("info", "both"):
            await self._send(conn, _dumps({"type": "info", "realm": key, "timestamp": now}))
        if ack in ("subscribe", "both"):
            await self._send(conn, _dumps({"type": kind, "realm": key, "timestamp": now}))

    def _forget(self, conn: _Conn) -> None:
        for key in conn.realms:
            realm = self._realms.get(key)
            if realm is not None:
                realm.subscribers.pop(conn, None)

    async def _send(self, conn: _Conn, frame: str) -> bool:
        if conn.silent or conn.closing:
            return False
        try:
            await conn.ws.send(frame)
        except ConnectionClosed:
            self._forget(conn)
            return False
        return True

    async def _close(self, conn: _Conn, reason: str) -> None:
        log.info("connection %d: closing (%s) after %d event(s)", conn.id, reason, conn.events)
        try:
            await conn.ws.close(_DROP_CODE, f"simulated {reason}")
        except Exception:
            log.debug("connection %d: close failed", conn.id, exc_info=True)

    def _drop(self, conn: _Conn) -> None:
        if conn.closing or conn.silent:
            return
        conn.closing = True
        self._forget(conn)
        self._spawn(self._close(conn, f"drop_every={self.config.drop_every}"))

    def _silence(self, conn: _Conn, reason: str) -> None:
        if conn.silent or conn.closing:
            return
        conn.silent = True
        self._forget(conn)
        ws = conn.ws
        # WebSocket pongs are written from data_received(); with reading paused the
        # client's pings sit unread in the kernel buffer and are never answered.
        # The handler stops calling recv(), and the assembler's resume hook is
        # disarmed, so nothing turns reading back on.
        ws.recv_messages.resume = _noop
        ws.transport.pause_reading()
        log.info("connection %d: silent (%s) after %d event(s)", conn.id, reason, conn.events)
        self._spawn(self._watch_silent(conn))

    async def _watch_silent(self, conn: _Conn) -> None:
        # Reading is paused, so the FIN or RST of a client that gave up goes
        # unnoticed by asyncio; ask the kernel instead.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SILENT_MAX
        transport = conn.ws.transport
        while not transport.is_closing():
            established = _tcp_established(conn.ws)
            if established is False or loop.time() >= deadline:
                why = "the client went away" if established is False else "silence cap reached"
                log.info("connection %d: %s, dropping the silent link", conn.id, why)
                transport.abort()
                return
            await asyncio.sleep(_SILENT_POLL)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- emitting

    def _emitter_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator emitter failed", exc_info=task.exception())

    async def _gate(self, realm: _Realm) -> None:
        while not realm.subscribers or self._paused:
            realm.wake.clear()
            await realm.wake.wait()

    async def _run_emitter(self, realm: _Realm) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        rate = cfg.rate
        t0 = 0.0
        base = 0
        fresh = True
        while cfg.count == 0 or realm.generated < cfg.count:
            if not realm.subscribers or self._paused:
                await self._gate(realm)
                fresh = True
                continue
            if fresh:
                # A new schedule after a pause: no burst to catch up on idle time.
                t0, base, fresh = loop.time(), realm.generated, False
            if rate > 0:
                # Deadline-based: event k is due at t0 + k/rate; burst when behind.
                due = base + int((loop.time() - t0) * rate) + 1 - realm.generated
                if due <= 0:
                    await asyncio.sleep(t0 + (realm.generated - base) / rate - loop.time())
                    continue
                burst = min(due, _BURST)
            else:
                burst = _BURST
            if cfg.count:
                burst = min(burst, cfg.count - realm.generated)
            async with realm.lock:
                for _ in range(burst):
                    if not realm.subscribers or self._paused:
                        break
                    pending = realm.pending
                    if pending is None:
                        event, data = realm.next_step()
                        now = time.time()
                        pending = realm.pending = _Pending(event, data, str(int(now * 1000)), now, cfg.shape, None)
                    if await self._deliver(realm, pending) is None:
                        break  # nobody took it: retried on the next subscriber
                    realm.pending = None
                    realm.generated += 1
            # Yield even when every send completed without suspending.
            await asyncio.sleep(0)
        log.info("realm %s: emitted all %d generated event(s)", realm.fp, realm.generated)

    @staticmethod
    def _frame(pending: _Pending, seq: int) -> str:
        shape = pending.shape
        if shape == "mixed":
            shape = "flat" if seq % 2 else "nested"
        pending.resolved = shape
        body: dict[str, object] = {
            "event": pending.event,
            "data": pending.data,
            "timestamp": pending.timestamp,
            "seq": seq,
            "sent_at": pending.sent_at,
        }
        if pending.extra:
            body.update(pending.extra)
        if shape == "nested":
            return _dumps({"type": "notification", "data": body})
        return _dumps({"type": "notification", **body})

    async def _deliver(self, realm: _Realm, pending: _Pending) -> SentEvent | None:
        """Fan one event out to the realm's subscribers; None if nobody took it."""
        seq = realm.seq + 1
        if pending.seq != seq:
            pending.seq = seq
            pending.frame = self._frame(pending, seq)
        frame = pending.frame
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
                self._drop(conn)
            elif cfg.silent_after and conn.events >= cfg.silent_after:
                self._silence(conn, f"silent_after={cfg.silent_after}")
        if not delivered:
            return None
        realm.seq = seq
        record = SentEvent(
            seq,
            realm.fp,
            pending.event,
            pending.data,
            pending.timestamp,
            pending.sent_at,
            pending.resolved,
            frame,
        )
        self.sent.append(record)
        self._notify()
        if cfg.malformed_every and seq % cfg.malformed_every == 0:
            await self._send_malformed(realm, record)
        return record

    async def _send_malformed(self, realm: _Realm, after: SentEvent) -> None:
        kind = MALFORMED_KINDS[realm.malformed % len(MALFORMED_KINDS)]
        realm.malformed += 1
        frame = _malformed_frame(kind, after.event, after.data)
        delivered = False
        for conn in tuple(realm.subscribers):
            if conn in realm.subscribers and await self._send(conn, frame):
                delivered = True
        if delivered:
            self.malformed.append((kind, frame))
            self._notify()


def _malformed_frame(kind: str, event: str, data: str) -> str:
    """A frame that is not a valid notification, of the given kind (no ``seq``)."""
    base: dict[str, object] = {
        "type": "notification",
        "event": event,
        "data": data,
        "timestamp": str(int(time.time() * 1000)),
    }
    if kind == "bad_json":
        text = _dumps(base)
        return text[: len(text) // 2]
    if kind == "seed_stray_brace":
        # The seed's own examples end in a stray brace: '{ ... } }'.
        return _dumps(base) + " }"
    if kind == "missing_event":
        del base["event"]
        return _dumps(base)
    if kind == "invalid_routing_key":
        head, _, tail = event.partition(".")
        base["event"] = f"{head}..{tail}" if tail else f"{event}..x"
        return _dumps(base)
    if kind == "not_object":
        return _dumps(["notification", event, data])
    raise ValueError(f"unknown malformed kind {kind!r}")


# -- command line ------------------------------------------------------------------------


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` flags; each falls back to ``SIM_*`` in the environment.

    Realm keys fall back to ``ORANGEPILL_REALM_KEY`` (comma-separated), then to
    ``demo-realm-key``.
    """
    parser.add_argument("--host", help="address to listen on (SIM_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port; 0 = any free port (SIM_PORT, default 8765)")
    parser.add_argument(
        "--realm-key",
        action="append",
        metavar="KEY",
        help="accepted realm key, repeatable (ORANGEPILL_REALM_KEY, comma-separated; default demo-realm-key)",
    )
    parser.add_argument("--rate", type=float, help="events per second per realm, 0 = max (SIM_RATE, default 20)")
    parser.add_argument("--count", type=int, help="stop after N events per realm, 0 = never (SIM_COUNT)")
    parser.add_argument("--shape", choices=SHAPES, help="notification envelope (SIM_SHAPE, default flat)")
    parser.add_argument("--ack", choices=ACKS, help="answer to a subscribe (SIM_ACK, default both)")
    parser.add_argument(
        "--pong",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="answer the text PING with PONG (SIM_PONG, default no)",
    )
    parser.add_argument("--drop-every", type=int, help="close a connection after N events (SIM_DROP_EVERY)")
    parser.add_argument("--silent-after", type=int, help="go silent on a connection after N events (SIM_SILENT_AFTER)")
    parser.add_argument(
        "--malformed-every",
        type=int,
        help="send a malformed frame after every N events (SIM_MALFORMED_EVERY)",
    )
    parser.add_argument("--seed", type=int, help="RNG seed of the event sequences (SIM_SEED, default 0)")


def config_from_args(ns: argparse.Namespace) -> SimulatorConfig:
    """Build the simulator settings from flags, then the environment, then defaults.

    Raises:
        ConfigError: a value is invalid; the message names the setting.
    """
    values: dict[str, Any] = {}
    for name, parse in (
        ("host", str),
        ("port", int),
        ("rate", float),
        ("count", int),
        ("shape", str),
        ("ack", str),
        ("pong", _parse_bool),
        ("drop_every", int),
        ("silent_after", int),
        ("malformed_every", int),
        ("seed", int),
    ):
        value = getattr(ns, name, None)
        if value is None:
            env = f"SIM_{name.upper()}"
            raw = os.environ.get(env, "").strip()
            if not raw:
                continue
            try:
                value = parse(raw)
            except ValueError:
                raise ConfigError(f"{env}={raw!r} is not a valid value for {name!r}") from None
        values[name] = value
    keys = getattr(ns, "realm_key", None)
    if not keys:
        keys = [k.strip() for k in os.environ.get("ORANGEPILL_REALM_KEY", "").split(",") if k.strip()]
    if keys:
        if any(not key.strip() for key in keys):
            raise ConfigError("--realm-key must not be empty")
        values["realm_keys"] = tuple(dict.fromkeys(key.strip() for key in keys))
    return SimulatorConfig(**values)


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


async def serve(config: SimulatorConfig, stop: asyncio.Event) -> None:
    """Run the simulator until ``stop`` is set, logging its state.

    Raises:
        OSError: the address cannot be bound.
    """
    async with Simulator(config) as sim:
        log.info(
            "simulated Orangepill stream at %s accepting %d realm key(s): %s",
            sim.url,
            len(config.realm_keys),
            ", ".join(key_fingerprint(key) for key in config.realm_keys),
        )
        last = (-1, -1, -1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):
                    await stop.wait()
            state = (sim.open_connections, sim.subscribes, len(sim.sent))
            if state != last:
                log.info(
                    "simulator: %d open connection(s), %d subscribe(s), %d rejected, %d event(s) sent",
                    state[0],
                    state[1],
                    sim.rejected,
                    state[2],
                )
                last = state
