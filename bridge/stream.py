"""The Orangepill stream client: one WebSocket per realm, subscribe, keepalive, reconnect.

Every frame read off the socket goes to the sink (the spool) before anything
else happens to it: notifications as events, broken frames as quarantine
messages. The only fatal outcome is a realm key the server rejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from bridge import __version__
from bridge.catalog import metric_labels
from bridge.config import Realm, Settings, redact_url
from bridge.errors import ProtocolError, RealmRejected, StreamError
from bridge.metrics import DisconnectReason, Metrics
from bridge.protocol import (
    PING,
    ErrorFrame,
    Frame,
    Info,
    Notification,
    Other,
    Outbound,
    Unsubscribed,
    event_message,
    parse_frames,
    quarantine_message,
    redact,
    subscribe_answer,
    subscribe_frame,
    unsubscribe_frame,
)

__all__ = ["Backoff", "EventSink", "StreamClient", "StreamState"]

log = logging.getLogger(__name__)

# How long to wait for the error frame that follows info NONE, and for the
# answer to unsubscribe on shutdown.
_REJECT_GRACE = 2.0
_UNSUBSCRIBE_GRACE = 2.0


class EventSink(Protocol):
    """Where frames go once read: the spool."""

    async def put(self, msg: Outbound) -> None:
        """Store one message durably (may wait while the sink is full)."""

    @property
    def full(self) -> bool:
        """True while ``put`` is holding the reader back."""


class Backoff:
    """Exponential reconnect delays with jitter, capped, reset only by a stable link.

    websockets' own reconnect iterator resets after any handshake, so a server
    that accepts and drops at once would make it spin; here only a link that
    stayed subscribed for ``reset_after`` seconds resets the delay.
    """

    def __init__(
        self,
        minimum: float,
        maximum: float,
        reset_after: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.reset_after = reset_after
        self._rand = rand
        self._attempt = 0

    def next_delay(self, subscribed_for: float | None) -> float:
        """The delay before the next attempt, given how long the last link stayed subscribed.

        Args:
            subscribed_for: seconds the last connection was subscribed, None if never.

        Returns:
            Seconds to wait: between half and all of ``min * 2**n``, capped at ``max``.
        """
        if subscribed_for is not None and subscribed_for >= self.reset_after:
            self._attempt = 0
        ceiling = min(self.maximum, self.minimum * (2.0**self._attempt))
        self._attempt = min(self._attempt + 1, 62)
        return ceiling * (0.5 + 0.5 * self._rand())


class StreamState:
    """Connection and subscription state of every realm, mirrored into gauges."""

    def __init__(self, realms: tuple[Realm, ...], metrics: Metrics) -> None:
        self._metrics = metrics
        self.connected: dict[str, bool] = {realm.label: False for realm in realms}
        self.subscribed: dict[str, bool] = {realm.label: False for realm in realms}
        for realm in realms:
            metrics.subscribed.labels(realm.label).set(0)
        metrics.stream_connected.set(0)

    def set(self, label: str, *, connected: bool, subscribed: bool) -> None:
        """Record one realm's state and update the gauges."""
        self.connected[label] = connected
        self.subscribed[label] = subscribed
        self._metrics.subscribed.labels(label).set(1 if subscribed else 0)
        self._metrics.stream_connected.set(1 if all(self.connected.values()) else 0)


class _Closed(Exception):
    """Internal: the session ended, with the reason for the disconnect metric."""

    def __init__(self, reason: DisconnectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class StreamClient:
    """Holds one realm's subscription for as long as the bridge runs."""

    def __init__(
        self,
        settings: Settings,
        realm: Realm,
        sink: EventSink,
        metrics: Metrics,
        state: StreamState,
    ) -> None:
        self._settings = settings
        self._realm = realm
        self._sink = sink
        self._metrics = metrics
        self._state = state
        self._secrets = settings.secrets
        self._realm_fp = realm.fingerprint  # a SHA-256 of the key: once, not per event
        self._backoff = Backoff(
            settings.reconnect_min, settings.reconnect_max, settings.reconnect_reset_after
        )
        self._last_heard = time.monotonic()
        self._last_ping = 0.0
        self._stopping = False
        self._unsubscribed = asyncio.Event()
        self._warned_reasons: set[str] = set()
        # Called per accepted event (after the sink took it): the Explorer's ExplorerHub.record.
        self.on_event: Callable[[float, str, str, str, str], None] | None = None
        # Label children cached once: no label lookups per event.
        self._received = {
            label: metrics.events_received.labels(label) for label in metric_labels()
        }

    @property
    def realm(self) -> Realm:
        """The realm this client holds."""
        return self._realm

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, subscribe and read until ``stop`` is set; reconnect on any failure.

        Raises:
            RealmRejected: the server refused the realm key (never retried).
        """
        label = self._realm.label
        delay_gauge = self._metrics.stream_reconnect_delay.labels(label)
        url = self._settings.stream_url
        while not stop.is_set():
            subscribed_at: float | None = None
            reason = DisconnectReason.CONNECT_FAILED
            detail = ""
            try:
                async with connect(
                    url,
                    open_timeout=self._settings.subscribe_timeout,
                    ping_interval=None,  # keepalive is ours: text PING plus our own pings
                    close_timeout=2,
                    max_size=max(self._settings.max_frame_bytes * 16, 16 * 1024 * 1024),
                    max_queue=64,
                    user_agent_header=f"orangepill-bridge/{__version__}",
                ) as ws:
                    self._metrics.stream_connects.inc()
                    self._state.set(label, connected=True, subscribed=False)
                    delay_gauge.set(0)
                    log.info("stream connected realm=%s url=%s", label, redact_url(url))
                    reason, detail = DisconnectReason.CLOSED, "closed"
                    subscribed_at = await self._subscribe(ws, stop)
                    reason, detail = await self._session(ws, stop)
            except _Closed as closed:
                reason, detail = closed.reason, str(closed)
            except RealmRejected:
                self._state.set(label, connected=False, subscribed=False)
                raise
            except ConnectionClosed as exc:
                reason, detail = DisconnectReason.CLOSED, _close_detail(exc)
            except (OSError, InvalidHandshake, TimeoutError, StreamError) as exc:
                if reason is not DisconnectReason.CONNECT_FAILED:
                    reason = DisconnectReason.ERROR
                detail = redact(f"{type(exc).__name__}: {exc}", self._secrets)
            except InvalidURI as exc:  # pragma: no cover - config validation catches it first
                raise StreamError(f"invalid stream URL: {exc}") from None
            finally:
                self._state.set(label, connected=False, subscribed=False)
            self._metrics.stream_disconnects.labels(reason.value).inc()
            if stop.is_set():
                log.info("stream closed realm=%s", label)
                return
            stayed = None if subscribed_at is None else time.monotonic() - subscribed_at
            delay = self._backoff.next_delay(stayed)
            delay_gauge.set(delay)
            log.warning(
                "stream disconnected realm=%s reason=%s detail=%s reconnect_in=%.2fs",
                label, reason.value, detail, delay,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        delay_gauge.set(0)

    async def _subscribe(self, ws: ClientConnection, stop: asyncio.Event) -> float:
        """Send subscribe and read until the server answers; frames meanwhile are kept."""
        label = self._realm.label
        await ws.send(subscribe_frame(self._realm.key))
        deadline = time.monotonic() + self._settings.subscribe_timeout
        refused = False
        while True:
            if stop.is_set():
                raise _Closed(DisconnectReason.SHUTDOWN, "stopped while subscribing")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if refused:
                    self._reject("the server answered info NONE")
                raise _Closed(DisconnectReason.SUBSCRIBE_TIMEOUT, "no answer to subscribe")
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout=min(remaining, 0.25))
            except TimeoutError:
                continue
            except ConnectionClosed:
                if refused:
                    self._reject("the server answered info NONE and closed the connection")
                raise
            for frame in await self._handle(raw):
                answer = subscribe_answer(frame, refused=refused)
                if answer == "rejected":
                    message = frame.message if isinstance(frame, ErrorFrame) else ""
                    self._reject(redact(message, self._secrets) or "error frame")
                elif answer == "refused":
                    # The seed sends info NONE and then error; wait briefly for the error's text.
                    refused = True
                    deadline = min(deadline, time.monotonic() + _REJECT_GRACE)
                elif answer == "accepted":
                    self._state.set(label, connected=True, subscribed=True)
                    log.info("stream subscribed realm=%s", label)
                    self._last_heard = time.monotonic()
                    return time.monotonic()

    def _reject(self, why: str) -> None:
        raise RealmRejected(
            f"the stream rejected the realm key of realm {self._realm.label!r} "
            f"({self._realm.fingerprint}): {why.rstrip('.')}. Check ORANGEPILL_REALM_KEY / --realm-key; "
            "the bridge does not retry a key the server refuses."
        )

    async def _session(self, ws: ClientConnection, stop: asyncio.Event) -> tuple[DisconnectReason, str]:
        """Read frames until the link ends or the bridge stops."""
        self._stopping = False
        self._unsubscribed.clear()
        keeper = asyncio.create_task(self._keepalive(ws, stop), name=f"keepalive-{self._realm.label}")
        closed: ConnectionClosed | None = None
        try:
            async for raw in ws:
                for frame in await self._handle(raw):
                    if self._stopping and isinstance(frame, (Unsubscribed, Info)):
                        self._unsubscribed.set()
        except ConnectionClosed as exc:
            closed = exc
        finally:
            if not keeper.done():
                keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        if stop.is_set():
            return DisconnectReason.SHUTDOWN, "shutdown"
        if not keeper.cancelled() and keeper.result() is not None:
            outcome = keeper.result()
            assert outcome is not None
            return outcome
        return DisconnectReason.CLOSED, _close_detail(closed)

    async def _keepalive(
        self, ws: ClientConnection, stop: asyncio.Event
    ) -> tuple[DisconnectReason, str] | None:
        """Send the seed's text PING, ping at the WebSocket level, drop a silent link, handle stop."""
        interval = self._settings.ping_interval
        idle = self._settings.idle_timeout
        stop_wait = asyncio.create_task(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait({stop_wait}, timeout=min(interval, idle / 3))
                if done:
                    await self._unsubscribe(ws)
                    return None
                now = time.monotonic()
                if self._sink.full:
                    # We stopped reading ourselves (spool full): silence is ours, not the link's.
                    self._last_heard = now
                if now - self._last_heard > idle:
                    log.warning(
                        "stream silent realm=%s for %.1fs (idle timeout %.1fs), redialling",
                        self._realm.label, now - self._last_heard, idle,
                    )  # fmt: skip
                    if ws.transport is not None:
                        ws.transport.abort()
                    return DisconnectReason.SILENT, f"nothing heard for {now - self._last_heard:.1f}s"
                if now - self._last_ping >= interval:
                    self._last_ping = now
                    await ws.send(PING)
                    pong = asyncio.ensure_future(await ws.ping())
                    pong.add_done_callback(self._on_pong)
        except ConnectionClosed:
            return None
        finally:
            stop_wait.cancel()

    def _on_pong(self, fut: asyncio.Future[float]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._last_heard = time.monotonic()

    async def _unsubscribe(self, ws: ClientConnection) -> None:
        """Unsubscribe, give the server a moment to answer, then close."""
        self._stopping = True
        try:
            await ws.send(unsubscribe_frame(self._realm.key))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unsubscribed.wait(), timeout=_UNSUBSCRIBE_GRACE)
            await ws.close()
        except ConnectionClosed:
            pass

    async def _handle(self, raw: str | bytes) -> list[Frame]:
        """Parse one frame and hand what must be kept to the sink; return the parsed frames."""
        now = time.time()
        self._last_heard = time.monotonic()
        try:
            frames = parse_frames(raw, max_bytes=self._settings.max_frame_bytes)
        except ProtocolError as exc:
            self._metrics.events_rejected.labels(exc.reason).inc()
            msg = quarantine_message(
                raw, exc, realm=self._realm.label, secrets=self._secrets, received_at=now
            )
            level = logging.DEBUG if exc.reason in self._warned_reasons else logging.WARNING
            self._warned_reasons.add(exc.reason)
            log.log(
                level,
                "frame quarantined realm=%s reason=%s detail=%s (further ones of this reason at DEBUG)",
                self._realm.label, exc.reason, redact(exc.detail, self._secrets),
            )  # fmt: skip
            await self._sink.put(msg)
            return []
        for frame in frames:
            if isinstance(frame, Notification):
                msg = event_message(
                    frame, realm=self._realm.label, realm_fp=self._realm_fp, received_at=now
                )
                await self._sink.put(msg)
                if self.on_event is not None:
                    entity = msg.headers.get("entity_id", "")
                    self.on_event(now, msg.routing_key, str(entity), self._realm.label, msg.message_id)
                child = self._received.get(msg.label)
                if child is None:
                    child = self._received[msg.label] = self._metrics.events_received.labels(msg.label)
                child.inc()
                self._metrics.last_event_timestamp.set(now)
            elif isinstance(frame, Other):
                self._metrics.frames_other.labels(frame.kind).inc()
            elif isinstance(frame, ErrorFrame) and self._state.subscribed.get(self._realm.label):
                self._metrics.stream_errors.inc()
                log.warning(
                    "stream error frame realm=%s message=%s",
                    self._realm.label, redact(frame.message, self._secrets),
                )  # fmt: skip
        return frames


def _close_detail(exc: ConnectionClosed | None) -> str:
    if exc is None:
        return "connection closed"
    rcvd = exc.rcvd
    if rcvd is None:
        return "connection lost without a close frame"
    return f"server closed the connection (code {rcvd.code}{', ' + rcvd.reason if rcvd.reason else ''})"

