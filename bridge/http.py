"""The HTTP endpoints: ``/metrics``, ``/healthz``, ``/readyz`` and the Explorer page at ``/`` (aiohttp).

Hardened for a port that may face an untrusted network:

- a connection must deliver a complete request head within ``header_timeout``
  seconds (aiohttp's keep-alive timer, which runs from the first byte and is
  not extended by partial data), so slow partial requests are closed;
- at most ``max_connections`` connections are open at once. At the cap a new
  connection takes the place of the oldest idle one (nothing or part of a head
  sent, or waiting between requests), which is closed; a connection with a
  request in a handler (an Explorer stream) is never closed for room. So a
  flood of held connections does not fail the supervisor's liveness probe,
  which would restart the bridge and drop the stream. When none is idle, a
  reserve of ``PROBE_RESERVE`` more answers only ``/healthz``, ``/readyz`` and
  ``/metrics``, one request each, and is closed after ``PROBE_LIFETIME``
  seconds whatever happens; more still are answered 503 and closed at accept
  time, so file descriptors stay for the broker and the stream;
- an Explorer page whose writes stay blocked ``_SSE_WRITE_TIMEOUT`` seconds is
  dropped at once (reset, unsent data discarded), not closed gracefully, which
  would hold its socket until it reads again;
- malformed requests (a 9 KB URL, bad headers) get their 4xx from aiohttp but
  log at most one WARNING line per ``_BAD_REQUEST_LOG_EVERY`` seconds, never a
  traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bridge.catalog import CATALOG, KNOWN_CHANNELS
from bridge.explorer.hub import ExplorerHub
from bridge.logs import RateLimitedWarning

__all__ = ["Readiness", "start_http"]

log = logging.getLogger(__name__)

Readiness = Callable[[], dict[str, Any]]
"""Returns ``{"ready": bool, "reasons": [...], ...}``; called on every /readyz."""

HEADER_TIMEOUT: Final = 10.0
MAX_CONNECTIONS: Final = 256
PROBE_RESERVE: Final = 8
PROBE_LIFETIME: Final = 5.0
_PROBE_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
_BAD_REQUEST_LOG_EVERY: Final = 60.0
_SSE_BATCH: Final = 0.1
_SSE_STATUS_EVERY: Final = 1.0
_SSE_WRITE_TIMEOUT: Final = 10.0
_EXPLORER_LOG_EVERY: Final = 60.0
_STATIC: Final = {
    "app.js": "text/javascript",
    "topic.js": "text/javascript",
    "style.css": "text/css",
}
_SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_PAGE_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


_EXPLORER_WARN = RateLimitedWarning(log, _EXPLORER_LOG_EVERY)
"""Explorer pages refused at the limit, or reset for not reading: one WARNING a minute at most."""


class _ServerLogger(logging.Logger):
    """aiohttp's server logger: client mistakes become a rate-limited one-line warning.

    aiohttp logs a malformed request (``LineTooLong`` for a 9 KB URL …) with
    ``logger.exception`` and a full traceback. Those are the client's fault and
    cheap for anyone to send, so they must not flood the log. Errors of our own
    handlers still log in full.
    """

    def __init__(self) -> None:
        super().__init__("bridge.http.server")
        self.parent = logging.getLogger("bridge.http")
        self.warn_bad = RateLimitedWarning(log, _BAD_REQUEST_LOG_EVERY)

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc, HttpProcessingError):
            peer = args[0] if args else "?"
            reason = (getattr(exc, "message", "") or type(exc).__name__).splitlines()[0][:60]
            self.warn_bad("http: bad request from %s refused (%s: %s)", peer, type(exc).__name__, reason)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


class _CappedSite(web.TCPSite):
    """A TCP site with a cap on connections: at the cap, a new connection takes the place of the oldest idle one;
    when none is idle, a small reserve beyond the cap answers probes; beyond that, refusal."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, max_connections: int,
                 reserve: set[asyncio.Protocol], busy: set[asyncio.Protocol]) -> None:  # fmt: skip
        super().__init__(runner, host, port, reuse_address=True)
        self.max_connections = max_connections
        self.refused = 0
        self.evicted = 0
        self.reserve = reserve  # connections accepted beyond the cap: probes only (see _probes_only)
        self.busy = busy  # connections with a request in a handler (see _track_busy)
        self._accepting: set[RequestHandler] = set()  # made, not yet told of their connection (not listed yet)
        self._warn = RateLimitedWarning(log, _BAD_REQUEST_LOG_EVERY)
        self._warn_evict = RateLimitedWarning(log, _BAD_REQUEST_LOG_EVERY)

    def _idle(self, handler: RequestHandler) -> bool:
        """No request in a handler or parsed and waiting for one, and the connection still open.

        That is: a connection that has not yet sent a whole request head (nothing, or part of one), one that
        waits between requests, or one whose handler is done but whose client does not read the answer.
        ``busy`` alone is not enough: a request is parsed in one turn of the event loop and reaches the
        handlers (and ``busy``) in a later one. So two of aiohttp's private fields are read too: its count of
        requests parsed on the connection, and the future ``start()`` awaits for the next one (the test its
        keep-alive timer closes idle connections on). Should a later aiohttp rename them, nothing is idle:
        no eviction (tests/test_http.py fails), never a request cut.
        """
        if handler in self.busy or handler.transport is None:
            return False
        if getattr(handler, "_request_count", None) == 0:
            return True
        waiter = getattr(handler, "_waiter", None)
        return (isinstance(waiter, asyncio.Future) and not waiter.done()) or handler.writing_paused

    def _evict(self, handler: RequestHandler, n: int) -> None:
        self.evicted += 1
        self._warn_evict("http: %d connections open, the cap; closing the oldest idle ones for new ones", n)
        self.reserve.discard(handler)
        _close_now(handler)

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        cap = self.max_connections
        loop = asyncio.get_running_loop()

        def expire(handler: RequestHandler) -> None:
            self.reserve.discard(handler)
            _close_now(handler)

        def accept() -> RequestHandler:
            # aiohttp lists a connection once told of it (connection_made, scheduled just after this returns):
            # count it meanwhile, or a burst of connections accepted in one turn of the loop all see room.
            handler = server()
            self._accepting.add(handler)
            loop.call_soon(self._accepting.discard, handler)
            return handler

        def reserved() -> asyncio.Protocol:
            handler = accept()
            self.reserve.add(handler)
            loop.call_later(PROBE_LIFETIME, expire, handler)
            return handler

        def factory() -> asyncio.Protocol:
            # Oldest first (aiohttp keeps them in the order they connected). One being closed still
            # holds its place until aiohttp forgets it, a turn or two later: not counted here.
            conns = [h for h in server.connections if h.transport is not None]
            n = len(conns) + len(self._accepting)
            if n < cap:
                return accept()
            idle = [h for h in conns if self._idle(h)]
            # An idle connection, oldest first, makes room: one that sent nothing, part of a head, or
            # that waits between requests. So a flood of held connections cannot lock the probes out.
            victim = next((h for h in idle if h not in self.reserve), None)
            if victim is not None:
                self._evict(victim, n)
                return accept()
            # All busy (Explorer streams, slow handlers): the reserve answers probes.
            if n < cap + PROBE_RESERVE:
                self._warn("http: %d connections open and busy, the cap; answering only /healthz, /readyz and "
                           "/metrics on up to %d more", n, PROBE_RESERVE)  # fmt: skip
                return reserved()
            if idle:  # an idle reserve connection makes room for another
                self._evict(idle[0], n)
                return reserved()
            self.refused += 1
            self._warn("http: %d connections open and busy, the cap and its probe reserve; refusing more", n)
            return _Refuse()

        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, reuse_address=True, backlog=self._backlog
        )


def _close_now(handler: RequestHandler) -> None:
    """Close a connection without waiting to flush what its client may never read."""
    transport = handler.transport
    handler.force_close()
    _abort(transport)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # By duck type: uvloop's TCP transport writes but is not registered as an asyncio.WriteTransport
        # (an isinstance assertion here logged an ERROR traceback per refused connection under uvloop).
        write = getattr(transport, "write", None)
        if callable(write):
            write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        transport.close()


def _track_busy(busy: set[asyncio.Protocol]) -> Middleware:
    """Middleware: the connections with a request in a handler (an Explorer stream, a slow one) are never evicted."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        protocol = request.protocol
        busy.add(protocol)
        try:
            return await handler(request)
        finally:
            busy.discard(protocol)

    return middleware


def _probes_only(reserve: set[asyncio.Protocol]) -> Middleware:
    """Middleware: on a connection of the probe reserve, answer the probes once and nothing else."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.protocol not in reserve:
            return await handler(request)
        if request.path in _PROBE_PATHS:
            response = await handler(request)
        else:
            response = web.Response(status=503, text="too many connections: only /healthz, /readyz and /metrics "
                                    "are answered now\n")  # fmt: skip
        response.force_close()
        return response

    return middleware


def _static(name: str) -> bytes:
    return (resources.files("bridge.explorer") / "static" / name).read_bytes()


def _catalog_json() -> bytes:
    entries = []
    for spec in CATALOG:
        names = [spec.name]
        if spec.name.startswith("CHANNEL."):
            rest = spec.name.removeprefix("CHANNEL")
            names += [ch + rest for ch in sorted(KNOWN_CHANNELS)]
        entries.append({"name": spec.name, "description": spec.description, "infobip": spec.infobip,
                        "candidates": names})  # fmt: skip
    return orjson.dumps(entries)


@web.middleware
async def _security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:
        response.headers.update(_SECURITY_HEADERS)
    return response


def _explorer_routes(app: web.Application, hub: ExplorerHub) -> None:
    page = _static("index.html")
    files = {name: _static(name) for name in _STATIC}
    catalog = _catalog_json()

    async def index(_request: web.Request) -> web.Response:
        return web.Response(
            body=page,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache"},
        )

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        return web.Response(body=files[name], content_type=_STATIC[name], charset="utf-8",
                            headers={"Cache-Control": "no-cache"})  # fmt: skip

    async def catalog_json(_request: web.Request) -> web.Response:
        return web.Response(body=catalog, content_type="application/json")

    async def snapshot(_request: web.Request) -> web.Response:
        body = {"status": hub.status(), "rates": hub.rates(), "recent": hub.recent()}
        return web.Response(body=orjson.dumps(body), content_type="application/json",
                            headers={"Cache-Control": "no-store"})  # fmt: skip

    async def events(request: web.Request) -> web.StreamResponse:
        return await _sse(request, hub)

    app.router.add_get("/", index)
    app.router.add_get("/explorer/catalog.json", catalog_json)
    app.router.add_get("/explorer/snapshot.json", snapshot)
    app.router.add_get("/explorer/events", events)
    app.router.add_get("/explorer/{name}", static)


async def _sse(request: web.Request, hub: ExplorerHub) -> web.StreamResponse:
    """Server-sent events: a ``hello`` snapshot, then ``rows`` and ``status`` as they come."""
    client = hub.subscribe()
    if client is None:
        _EXPLORER_WARN("explorer: %d pages open, the limit; refusing another (503)", hub.max_clients)
        raise web.HTTPServiceUnavailable(text="too many Explorer pages open\n")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    loop = asyncio.get_running_loop()

    async def send(kind: str, data: Any) -> None:
        frame = b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        # A browser that stops reading blocks this write, not the bridge: record() only
        # fills the client's bounded buffer. One that never reads again is closed.
        await asyncio.wait_for(response.write(frame), timeout=_SSE_WRITE_TIMEOUT)

    try:
        await response.prepare(request)
        await send("hello", {"status": hub.status(), "rates": hub.rates(), "recent": hub.recent()})
        client.take()  # those rows are in the snapshot already
        next_status = loop.time() + _SSE_STATUS_EVERY
        while True:
            timeout = max(0.0, next_status - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.wake.wait(), timeout=timeout)
            if client.buffer:
                await asyncio.sleep(_SSE_BATCH)  # batch rows: a few writes a second, not one per event
                dropped, client.dropped = client.dropped, 0
                await send("rows", {"rows": client.take(), "dropped": dropped})
            if loop.time() >= next_status:
                rates = hub.rates(2)
                await send("status", {"status": hub.status(), "last": rates[-1] if rates else None})
                next_status = loop.time() + _SSE_STATUS_EVERY
    except (ConnectionError, TimeoutError) as exc:
        if isinstance(exc, TimeoutError):
            _EXPLORER_WARN("explorer: a page stopped reading for %g s; its connection was reset", _SSE_WRITE_TIMEOUT)
        else:
            log.debug("explorer: a browser went away; closing its connection")
        # Not a graceful close: that would wait (with no end) to flush megabytes to a peer that does not read,
        # holding the socket, its file descriptor and the buffers. aiohttp then ends the response quietly
        # (its write_eof meets a closed transport: a ConnectionError it ignores).
        _abort(request.transport)
    finally:
        hub.unsubscribe(client)
    return response


def _abort(transport: asyncio.Transport | None) -> None:
    """Drop a connection at once: unsent data discarded, the peer reset, the file descriptor freed."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0: the kernel drops its send queue and resets, instead of keeping an orphan socket
        # with megabytes queued that it retries to a zero window.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _app(
    registry: CollectorRegistry,
    readiness: Readiness,
    explorer: ExplorerHub | None,
    reserve: set[asyncio.Protocol],
    busy: set[asyncio.Protocol],
) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        # Liveness: 503 only for what a restart can mend (a spool that stopped working);
        # a broker or stream outage is readiness, and a restart would not help it.
        state = readiness()
        if state.get("alive", True):
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "failing", "reasons": state.get("fatal", [])}, status=503)

    async def readyz(_request: web.Request) -> web.Response:
        state = readiness()
        return web.json_response(state, status=200 if state.get("ready") else 503)

    app = web.Application(middlewares=[_track_busy(busy), _probes_only(reserve), _security_headers])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if explorer is not None:
        _explorer_routes(app, explorer)
    return app


async def start_http(
    host: str,
    port: int,
    registry: CollectorRegistry,
    readiness: Readiness,
    *,
    explorer: ExplorerHub | None = None,
    header_timeout: float = HEADER_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> web.AppRunner:
    """Serve the endpoints on ``host:port``; the caller cleans up the returned runner.

    Args:
        host: address to listen on.
        port: TCP port (0 picks a free one; read it from the runner's addresses).
        registry: the metrics registry.
        readiness: what /readyz reports.
        explorer: serve the Explorer page at ``/`` from this hub (None: no page).
        header_timeout: seconds a connection may take to send a complete request
            head, and to stay idle between requests.
        max_connections: open connections at once; at the cap a new one closes the oldest idle one.
            With none idle, ``PROBE_RESERVE`` more answer only the probes (one request each, for at most
            ``PROBE_LIFETIME`` s); more still are refused with 503.

    Raises:
        OSError: the address cannot be bound (in use, not local).
    """
    reserve: set[asyncio.Protocol] = set()
    busy: set[asyncio.Protocol] = set()
    runner = web.AppRunner(
        _app(registry, readiness, explorer, reserve, busy),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=header_timeout,
        # No handler reads a request body: after the answer, close rather than read on for up to 10 s
        # (aiohttp's default), which made a connection that trickles a body unevictable that long.
        lingering_time=0,
        logger=_ServerLogger(),
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = _CappedSite(runner, host, port, max_connections, reserve, busy)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    pages = " /" if explorer is not None else ""
    log.info("http listening on %s:%d (/metrics /healthz /readyz%s)", host, port, pages)
    return runner
