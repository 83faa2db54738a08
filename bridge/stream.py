"""The Orangepill stream client: one WebSocket per realm, subscribe, keepalive, reconnect.

This is the I/O shell around ``bridge.wire``: it reads frames and the clock,
feeds them to the wire's handshake and liveness machines, and does what they
answer. Every frame read off the socket goes to the sink (the spool) before
anything else happens to it: notifications as events, broken frames as
quarantine messages. The only fatal outcome is a realm key the server rejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI, SecurityError
from websockets.protocol import State
from websockets.uri import parse_uri

from bridge import __version__
from bridge.backoff import Backoff, retry_after_seconds
from bridge.config import Realm, Settings
from bridge.contract import DETAIL_LIMIT, KIND_EVENT, Outbound, event_message, quarantine_message
from bridge.errors import ProtocolError, RealmRejected, StreamError
from bridge.logs import RateLimitedWarning
from bridge.metrics import DisconnectReason, Metrics
from bridge.secrets import clip, redact, redact_url
from bridge.tls import stream_ssl_context
from bridge.wire import (
    PING,
    ErrorFrame,
    Frame,
    Handshake,
    Info,
    LinkAction,
    Liveness,
    Notification,
    Other,
    Subscribed,
    SubscribeOutcome,
    Unsubscribed,
    parse_frames,
    subscribe_frame,
    unsubscribe_frame,
)

__all__ = ["EventSink", "FrameResult", "StreamClient", "StreamDial", "StreamHealth", "StreamState", "frame_messages"]

log = logging.getLogger(__name__)

# How long to wait for the error frame that follows info NONE, and for the
# answer to unsubscribe on shutdown.
_REJECT_GRACE = 2.0
_UNSUBSCRIBE_GRACE = 2.0
# Frames websockets may hold read but not yet consumed: each is at most max_frame_bytes.
_MAX_QUEUE = 4
# WebSocket close code of a message above max_size (RFC 6455 "message too big").
_CLOSE_TOO_BIG = 1009
_CLOSE_BAD_DATA = 1007  # websockets' answer to a text frame that is not UTF-8
# error frames: at most one log line per this many seconds (every one is counted).
_ERROR_LOG_EVERY = 1.0
_KEY_IN_BODY_LOG_EVERY = 600.0


@dataclass(frozen=True, slots=True)
class FrameResult:
    """What one raw frame became.

    Attributes:
        frames: the parsed frames (empty when the frame was quarantined).
        messages: what goes to the sink: events, or the one quarantine message.
        rejected: why the frame was quarantined, or None.
    """

    frames: list[Frame]
    messages: list[Outbound]
    rejected: ProtocolError | None


def frame_messages(
    raw: str | bytes,
    *,
    realm: str,
    realm_fp: str,
    secrets: tuple[str, ...],
    max_bytes: int,
    received_at: float,
) -> FrameResult:
    """Turn one raw frame into messages; total: any failure becomes a quarantine message.

    This is the frame boundary: whatever a frame holds, it never raises, so no
    frame can end the process. A frame with several notifications is kept whole
    in quarantine when any of them cannot be made into a message.
    """
    try:
        frames = parse_frames(raw, max_bytes=max_bytes)
        events = [
            event_message(frame, realm=realm, realm_fp=realm_fp, received_at=received_at, secrets=secrets)
            for frame in frames
            if isinstance(frame, Notification)
        ]
        return FrameResult(frames, events, None)
    except ProtocolError as exc:
        error = exc
    except Exception as exc:  # the frame boundary: quarantine, never crash
        error = ProtocolError("unencodable", f"{type(exc).__name__}: {str(exc)[:200]}")
    msg = quarantine_message(raw, error, realm=realm, secrets=secrets, received_at=received_at)
    return FrameResult([], [msg], error)


class EventSink(Protocol):
    """Where frames go once read: the spool."""

    async def put(self, msg: Outbound) -> None:
        """Store one message durably (may wait while the sink is full)."""

    @property
    def full(self) -> bool:
        """True while ``put`` is holding the reader back."""


@dataclass(frozen=True, slots=True)
class StreamHealth:
    """What /readyz shows of the stream links, by realm name."""

    connected: dict[str, bool]
    subscribed: dict[str, bool]


class StreamState:
    """Connection and subscription state of every realm, mirrored into gauges."""

    def __init__(self, realms: tuple[Realm, ...], metrics: Metrics) -> None:
        self._metrics = metrics
        self.connected: dict[str, bool] = {realm.label: False for realm in realms}
        self.subscribed: dict[str, bool] = {realm.label: False for realm in realms}
        self._retired: set[str] = set()  # realms whose key the stream rejected: no link is expected for them
        for realm in realms:
            metrics.subscribed(realm.label, False)
            metrics.realm_rejected(realm.label, False)
        metrics.stream_links(False)

    def set(self, realm: str, *, connected: bool, subscribed: bool) -> None:
        """Record one realm's state and update the gauges."""
        self.connected[realm] = connected
        self.subscribed[realm] = subscribed
        self._metrics.subscribed(realm, subscribed)
        self._links()

    def retire(self, realm: str) -> None:
        """The stream rejected this realm's key (not retried): ``stream_connected`` speaks of the other realms."""
        self._retired.add(realm)
        self._metrics.realm_rejected(realm)
        self._links()

    def _links(self) -> None:
        live = [up for realm, up in self.connected.items() if realm not in self._retired]
        self._metrics.stream_links(bool(live) and all(live))

    def health(self) -> StreamHealth:
        """Every realm's link and subscription, for /readyz."""
        return StreamHealth(connected=dict(self.connected), subscribed=dict(self.subscribed))


class _Closed(Exception):
    """Internal: the session ended, with the reason for the disconnect metric."""

    def __init__(self, reason: DisconnectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Ended:
    """How one connection ended: the disconnect reason, a detail, and when it got subscribed."""

    reason: DisconnectReason
    detail: str
    subscribed_at: float | None
    retry_after: float | None = None  # seconds a 429/503 answer to the handshake asked us to wait


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
        self._name = realm.label  # the realm's name in logs, headers and metrics
        self._sink = sink
        self._metrics = metrics
        self._state = state
        self._secrets = settings.secrets
        self._realm_fp = realm.fingerprint  # a SHA-256 of the key: once, not per event
        self._backoff = Backoff(
            settings.reconnect_min, settings.reconnect_max, settings.reconnect_reset_after
        )
        self._liveness = self._new_liveness()
        self._stopping = False
        self._dialing = False  # between the TCP dial and the end of the WebSocket opening handshake
        self._unsubscribed = asyncio.Event()
        self.accepted_once = False  # the stream accepted this realm's key at least once in this process
        self.on_first_accept: Callable[[], None] | None = None  # called once, at the first accepted subscribe
        self._warned_reasons: set[str] = set()
        self._error_log_at = -math.inf
        self._warn_key_in_body = RateLimitedWarning(log, _KEY_IN_BODY_LOG_EVERY)  # an upstream echoing the key
        self._errors_unlogged = 0

    @property
    def realm(self) -> Realm:
        """The realm this client holds."""
        return self._realm

    def _new_liveness(self) -> Liveness:
        return Liveness(
            ping_interval=self._settings.ping_interval,
            idle_timeout=self._settings.idle_timeout,
            now=time.monotonic(),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, subscribe and read until ``stop`` is set; reconnect on any failure.

        Raises:
            RealmRejected: the server refused the realm key (never retried).
        """
        while not stop.is_set():
            try:
                ended = await self._connection_until_stop(stop)
            finally:
                self._state.set(self._name, connected=False, subscribed=False)
            self._metrics.disconnected(ended.reason)
            if stop.is_set():
                log.info("stream closed realm=%s", self._name)
                return
            stayed = None if ended.subscribed_at is None else time.monotonic() - ended.subscribed_at
            delay = self._backoff.next_delay(stayed)
            asked = ""
            if ended.retry_after is not None and ended.retry_after > delay:
                # The server is shedding load: redialling sooner would only be refused again.
                delay = ended.retry_after
                asked = " (the server's Retry-After)"
            self._metrics.reconnect_delay(self._name, delay)
            log.warning(
                "stream disconnected realm=%s reason=%s detail=%s reconnect_in=%.2fs%s",
                self._name, ended.reason.value, ended.detail, delay, asked,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        self._metrics.reconnect_delay(self._name, 0)

    async def _connection_until_stop(self, stop: asyncio.Event) -> _Ended:
        """``_connection``, given up at once if the bridge stops while the link is still being dialled.

        A server that accepts TCP and never answers the upgrade holds the dial for up to
        ``--subscribe-timeout``: nothing was read yet and there is nothing to unsubscribe, so a stop
        need not wait for it. Once connected, a stop unsubscribes and closes (``_keepalive``).
        """
        connection = asyncio.ensure_future(self._connection(stop))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({connection, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not connection.done() and self._dialing:
                connection.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connection
                log.info("stream realm=%s: stopped while connecting (the server had not answered the handshake)",
                         self._name)  # fmt: skip
                return _Ended(DisconnectReason.SHUTDOWN, "stopped while connecting", None)
            return await connection
        finally:
            stopping.cancel()
            if not connection.done():  # this task itself was cancelled
                connection.cancel()

    async def _connection(self, stop: asyncio.Event) -> _Ended:
        """One connection from dial to close; says how it ended (raises only RealmRejected)."""
        handshake_done = False  # the WebSocket opening handshake, not the subscribe
        subscribed_at: float | None = None
        self._dialing = True
        try:
            async with self._dial() as ws:
                self._dialing, handshake_done = False, True
                self._metrics.stream_opened()
                self._state.set(self._name, connected=True, subscribed=False)
                self._metrics.reconnect_delay(self._name, 0)
                log.info("stream connected realm=%s url=%s", self._name, redact_url(self._settings.stream_url))
                subscribed_at = await self._subscribe(ws, stop)
                reason, detail = await self._session(ws, stop)
                return _Ended(reason, detail, subscribed_at)
        except _Closed as closed:
            return _Ended(closed.reason, str(closed), subscribed_at)
        except ConnectionClosed as exc:
            self._count_refused_frame(exc)
            return _Ended(DisconnectReason.CLOSED, redact(_close_detail(exc), self._secrets), subscribed_at)
        except (OSError, InvalidHandshake, TimeoutError, StreamError) as exc:
            reason = DisconnectReason.ERROR if handshake_done else DisconnectReason.CONNECT_FAILED
            detail = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, InvalidHandshake) and exc.__cause__ is not None:
                # "did not receive a valid HTTP response" says nothing of why: a reset, an EOF, a timeout.
                cause = exc.__cause__
                detail += f" ({type(cause).__name__}{': ' + str(cause) if str(cause) else ''})"
            retry_after = None
            if isinstance(exc, InvalidStatus) and exc.response.status_code in (429, 503):
                header = exc.response.headers.get("Retry-After")
                retry_after = retry_after_seconds(header, time.time())
                if retry_after is not None:
                    detail += f", Retry-After {header.strip() if header else ''}"
            return _Ended(reason, redact(detail, self._secrets), subscribed_at, retry_after)
        except UnicodeError:  # the IDNA codec refuses the host name ("a..b"): retried like a DNS failure
            return _Ended(DisconnectReason.CONNECT_FAILED, "invalid host name in the stream URL", subscribed_at)
        except InvalidURI as exc:  # pragma: no cover - config validation catches it first
            raise StreamError(f"invalid stream URL: {exc}") from None
        finally:
            self._dialing = False

    def _dial(self) -> connect:
        return StreamDial(
            self._settings.stream_url,
            open_timeout=self._settings.subscribe_timeout,
            ping_interval=None,  # keepalive is ours: text PING plus our own pings
            close_timeout=2,
            # Never read or buffer a frame above the limit: websockets closes with 1009 instead.
            max_size=self._settings.max_frame_bytes,
            max_queue=_MAX_QUEUE,
            user_agent_header=f"orangepill-bridge/{__version__}",
            ssl=stream_ssl_context(self._settings),
        )

    async def _subscribe(self, ws: ClientConnection, stop: asyncio.Event) -> float:
        """Send subscribe and read until the handshake ends; frames meanwhile are kept.

        Returns:
            When the subscription was accepted (monotonic seconds).
        """
        await ws.send(subscribe_frame(self._realm.key.reveal()))
        handshake = Handshake(
            now=time.monotonic(), timeout=self._settings.subscribe_timeout, reject_grace=_REJECT_GRACE
        )
        outcome = SubscribeOutcome.PENDING
        while outcome is SubscribeOutcome.PENDING:
            if stop.is_set():
                raise _Closed(DisconnectReason.SHUTDOWN, "stopped while subscribing")
            outcome = handshake.tick(time.monotonic())
            if outcome is not SubscribeOutcome.PENDING:
                break
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout=min(handshake.deadline - time.monotonic(), 0.25))
            except TimeoutError:
                continue
            except ConnectionClosed:
                if handshake.connection_closed() is SubscribeOutcome.KEY_REJECTED:
                    self._reject(handshake.detail)
                raise
            for frame in await self._handle(raw):
                outcome = handshake.receive(frame, time.monotonic())
        if outcome is SubscribeOutcome.KEY_REJECTED:
            self._reject(handshake.detail)
        if outcome is SubscribeOutcome.NO_ANSWER:
            raise _Closed(DisconnectReason.SUBSCRIBE_TIMEOUT, handshake.detail)
        if outcome is SubscribeOutcome.SERVER_ERROR:
            self._metrics.error_frame()
            detail = redact(handshake.detail, self._secrets)
            raise _Closed(DisconnectReason.ERROR, f"the server answered subscribe with an error: {detail}")
        now = time.monotonic()
        self._state.set(self._name, connected=True, subscribed=True)
        if not self.accepted_once:
            self.accepted_once = True
            if self.on_first_accept is not None:
                self.on_first_accept()
        log.info("stream subscribed realm=%s", self._name)
        self._liveness = self._new_liveness()
        return now

    def _reject(self, why: str) -> None:
        why = clip(redact(why, self._secrets), DETAIL_LIMIT)  # the server's text may echo the key
        raise RealmRejected(
            f"the stream rejected the realm key of realm {self._name!r} "
            f"({self._realm.fingerprint}): {why.rstrip('.')}. Check the key given (--realm-key, --realm-key-file, "
            "ORANGEPILL_REALM_KEY or ORANGEPILL_REALM_KEY_FILE); "
            "the bridge does not retry a key the server refuses."
        )

    async def _session(self, ws: ClientConnection, stop: asyncio.Event) -> tuple[DisconnectReason, str]:
        """Read frames until the link ends or the bridge stops."""
        self._stopping = False
        self._unsubscribed.clear()
        keeper = asyncio.create_task(self._keepalive(ws, stop), name=f"keepalive-{self._name}")
        closed: ConnectionClosed | None = None
        try:
            async for raw in ws:
                for frame in await self._handle(raw):
                    if self._stopping and isinstance(frame, (Unsubscribed, Info)):
                        self._unsubscribed.set()
        except ConnectionClosed as exc:
            closed = exc
            self._count_refused_frame(exc)
        finally:
            if not keeper.done():
                keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        if stop.is_set():
            return DisconnectReason.SHUTDOWN, "shutdown"
        if not keeper.cancelled() and (outcome := keeper.result()) is not None:
            return outcome
        if closed is None and ws.protocol.state is State.CLOSED:
            # A normal close (1000, 1001 "going away") ends the loop without an exception: the
            # code and reason are on the connection, and they tell a server restart apart.
            closed = ws.protocol.close_exc
        return DisconnectReason.CLOSED, redact(_close_detail(closed), self._secrets)

    async def _keepalive(
        self, ws: ClientConnection, stop: asyncio.Event
    ) -> tuple[DisconnectReason, str] | None:
        """Do what the liveness rules say (text PING plus a WebSocket ping, drop a silent link); handle stop."""
        liveness = self._liveness
        stop_wait = asyncio.create_task(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait({stop_wait}, timeout=liveness.check_every)
                if done:
                    await self._unsubscribe(ws)
                    return None
                now = time.monotonic()
                action = liveness.due(now, reader_paused=self._sink.full)
                if action is LinkAction.SILENT:
                    silent = liveness.silent_for(now)
                    log.warning(
                        "stream silent realm=%s for %.1fs (idle timeout %.1fs), redialling",
                        self._name, silent, liveness.idle_timeout,
                    )  # fmt: skip
                    if ws.transport is not None:
                        ws.transport.abort()
                    return DisconnectReason.SILENT, f"nothing heard for {silent:.1f}s"
                if action is LinkAction.PING:
                    await ws.send(PING)
                    pong = asyncio.ensure_future(await ws.ping())
                    pong.add_done_callback(self._on_pong)
        except ConnectionClosed:
            return None
        finally:
            stop_wait.cancel()

    def _on_pong(self, fut: asyncio.Future[float]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._liveness.heard(time.monotonic())

    async def _unsubscribe(self, ws: ClientConnection) -> None:
        """Unsubscribe, give the server a moment to answer, then close."""
        self._stopping = True
        try:
            await ws.send(unsubscribe_frame(self._realm.key.reveal()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unsubscribed.wait(), timeout=_UNSUBSCRIBE_GRACE)
            await ws.close()
        except ConnectionClosed:
            pass

    async def _handle(self, raw: str | bytes) -> list[Frame]:
        """Turn one frame into messages, hand them to the sink; return the parsed frames."""
        now = time.time()
        self._liveness.heard(time.monotonic())
        result = frame_messages(
            raw,
            realm=self._name,
            realm_fp=self._realm_fp,
            secrets=self._secrets,
            max_bytes=self._settings.max_frame_bytes,
            received_at=now,
        )
        if result.rejected is not None:
            self._log_rejected(result.rejected)
        for msg in result.messages:
            await self._sink.put(msg)
            if msg.kind == KIND_EVENT:
                self._metrics.event_received(msg.metric_kind, now)
                if msg.key_removed:
                    self._warn_key_in_body(
                        "stream realm=%s: a %s event carried the realm key in its body; it is published with the "
                        "key replaced by its fingerprint (the upstream echoes the key: tell Orangepill, and rotate "
                        "the key if consumers saw it before this bridge)",
                        self._name, msg.routing_key,
                    )  # fmt: skip
        for frame in result.frames:
            if isinstance(frame, Other):
                self._metrics.frame_other(frame.kind)
            elif isinstance(frame, ErrorFrame) and self._state.subscribed.get(self._name):
                self._error_frame(frame)
            elif isinstance(frame, (Info, Subscribed, Unsubscribed)) and self._state.subscribed.get(self._name):
                # An info/subscribe/unsubscribe answer once subscribed (a server that answers each PING with info).
                self._metrics.frame_other("answer")
        return result.frames

    def _error_frame(self, frame: ErrorFrame) -> None:
        """Count every error frame; log at most one line a second, with how many were not logged."""
        self._metrics.error_frame()
        now = time.monotonic()
        if now - self._error_log_at < _ERROR_LOG_EVERY:
            self._errors_unlogged += 1
            return
        log.warning(
            "stream error frame realm=%s message=%s (%d more since the last line)",
            self._name, clip(redact(frame.message, self._secrets), DETAIL_LIMIT), self._errors_unlogged,
        )  # fmt: skip
        self._error_log_at, self._errors_unlogged = now, 0

    def _log_rejected(self, exc: ProtocolError) -> None:
        self._metrics.rejected(exc.reason)
        level = logging.DEBUG if exc.reason in self._warned_reasons else logging.WARNING
        self._warned_reasons.add(exc.reason)
        log.log(
            level,
            "frame quarantined realm=%s reason=%s detail=%s (further ones of this reason at DEBUG)",
            self._name, exc.reason, clip(redact(exc.detail, self._secrets), DETAIL_LIMIT),
        )  # fmt: skip

    def _count_refused_frame(self, exc: ConnectionClosed) -> None:
        """A frame websockets refused to read, closing the link itself: count it and say why."""
        code = exc.sent.code if exc.sent is not None else None
        if code == _CLOSE_TOO_BIG:
            self._metrics.rejected("oversize")
            log.warning(
                "stream frame above the limit of %d bytes (--max-frame-bytes) realm=%s: not read, "
                "not kept; closing the connection (1009) and reconnecting",
                self._settings.max_frame_bytes, self._name,
            )  # fmt: skip
        elif code == _CLOSE_BAD_DATA:
            self._metrics.rejected("invalid_utf8")
            log.warning(
                "stream text frame that is not valid UTF-8 realm=%s: the WebSocket protocol (RFC 6455) requires "
                "closing the connection (1007), so the frame cannot be kept, and frames the server sent behind "
                "it are lost upstream; reconnecting. The server is sending broken text",
                self._name,
            )  # fmt: skip


class StreamDial(connect):
    """websockets' ``connect``, following a redirect of the handshake only within the configured origin.

    The realm key is sent right after the handshake, so it would go to wherever a redirect points.
    websockets follows cross-origin redirects (it only strips HTTP credentials); the bridge refuses
    them, and follows a redirect to another path of the same scheme, host and port with a WARNING.
    """

    def process_redirect(self, exc: Exception) -> Exception | str:
        target = super().process_redirect(exc)
        if not isinstance(target, str):
            return target
        old, new = self.ws_uri, parse_uri(target)
        if (old.secure, old.host, old.port) != (new.secure, new.host, new.port):
            return SecurityError(
                f"the stream server redirected the handshake to another origin ({redact_url(target)}); "
                "the realm key is only sent to the host of --stream-url: set --stream-url to that URL if you trust it"
            )
        log.warning("stream: the server redirected the handshake to %s; following it (same host and port), "
                    "set --stream-url to it to skip the redirect", redact_url(target))  # fmt: skip
        return target


def _close_detail(exc: ConnectionClosed | None) -> str:
    if exc is None:
        return "connection closed"
    rcvd, sent = exc.rcvd, exc.sent
    if rcvd is None and sent is not None:  # websockets failed the link itself (1007, 1009, ...)
        return f"the bridge closed the connection (code {sent.code}{', ' + sent.reason if sent.reason else ''})"
    if rcvd is None:
        return "connection lost without a close frame"
    return f"server closed the connection (code {rcvd.code}{', ' + rcvd.reason if rcvd.reason else ''})"
