"""The bridge process: wires stream clients, spool, broker, publisher and HTTP, and stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from bridge.backlog import watch_backlog
from bridge.broker import Broker
from bridge.config import Settings
from bridge.contract import KIND_EVENT, Outbound
from bridge.errors import BridgeError, ConfigError
from bridge.explorer.hub import ExplorerHub
from bridge.http import start_http
from bridge.metrics import Metrics
from bridge.publisher import Publisher
from bridge.spool import CloseReport, Spool
from bridge.stream import EventSink, StreamClient, StreamState

__all__ = ["Bridge", "run_bridge"]

log = logging.getLogger(__name__)

_STREAM_STOP_GRACE = 5.0


class Bridge:
    """One running bridge: everything that lives between start and stop."""

    def __init__(self, settings: Settings, metrics: Metrics, spool: Spool) -> None:
        self.settings = settings
        self.metrics = metrics
        self.spool = spool
        self.state = StreamState(settings.realms, metrics)
        self.broker = Broker(settings, metrics)
        self.publisher = Publisher(settings, spool, metrics, self.broker)
        self.explorer: ExplorerHub | None = None
        sink: EventSink = spool
        if settings.explorer == "on" and settings.metrics_host_port is not None:
            self.explorer = ExplorerHub(self.readiness)
            sink = _ShownSink(spool, self.explorer)
        self.clients = [StreamClient(settings, r, sink, metrics, self.state) for r in settings.realms]
        self._stream_stop = asyncio.Event()
        self._publish_stop = asyncio.Event()
        self._streams: list[asyncio.Task[None]] = []
        self._publisher: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._backlog: asyncio.Task[None] | None = None
        self._http: web.AppRunner | None = None
        self._lost = 0  # accepted events the spool could not keep (set at shutdown)

    # -- health ---------------------------------------------------------------------

    def _spool_health(self) -> dict[str, Any]:
        health = self.spool.health()
        return {
            "ok": health.ok,
            "reason": health.reason,
            "depth": self.spool.depth,
            "bytes": self.spool.bytes,
            "full": self.spool.full,
        }

    def readiness(self) -> dict[str, Any]:
        """What /readyz reports: ready only while every realm is subscribed and the broker is up.

        It combines the health of each component: the stream links, the broker
        link and the spool.
        """
        stream, broker, spool = self.state.health(), self.broker.health(), self._spool_health()
        reasons: list[str] = []
        for realm, subscribed in stream.subscribed.items():
            if not subscribed:
                why = "awaiting answer" if stream.connected.get(realm) else "stream disconnected"
                reasons.append(f"realm {realm} not subscribed ({why})")
        if not broker.connected:
            reasons.append(f"broker not connected: {broker.error or 'connecting'}")
        if spool["full"]:
            reasons.append("spool full: the stream is not being read")
        fatal = [] if spool["ok"] else [f"spool not working: {spool['reason']}"]
        reasons += fatal
        return {
            "ready": not reasons,
            "reasons": reasons,
            "alive": not fatal,
            "fatal": fatal,
            "stream": {"connected": stream.connected, "subscribed": stream.subscribed},
            "broker": {"connected": broker.connected, "error": broker.error},
            "spool": spool,
            "publish": {"in_flight": self.publisher.in_flight},
        }

    # -- run --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set or something fatal happens; return the exit code."""
        self.metrics.watch_tasks(asyncio.get_running_loop())
        await self._start_http()
        self._start_tasks()
        fatal: BaseException | None = None
        try:
            fatal = await self._watch(stop)
        finally:
            await self._shutdown()
        return self._exit_code(fatal)

    async def _start_http(self) -> None:
        hostport = self.settings.metrics_host_port
        if hostport is None:
            return
        try:
            self._http = await start_http(
                hostport[0], hostport[1], self.metrics.registry, self.readiness, explorer=self.explorer
            )
        except OSError as exc:
            raise ConfigError(
                f"--metrics-addr {self.settings.metrics_addr}: cannot listen ({exc.strerror or exc})"
            ) from None

    def _start_tasks(self) -> None:
        self._streams = [
            asyncio.create_task(c.run(self._stream_stop), name=f"stream-{c.realm.label}") for c in self.clients
        ]
        self._publisher = asyncio.create_task(self._publish(self._publish_stop), name="publisher")
        self._poller = asyncio.create_task(self.broker.poll_queues(self._publish_stop), name="queue-poll")
        self._backlog = asyncio.create_task(
            watch_backlog(lambda: self.spool.depth, lambda: self.broker.connected, self._publish_stop),
            name="backlog-progress",
        )

    async def _publish(self, stop: asyncio.Event) -> None:
        if await self.broker.connect(stop):
            await self.publisher.run(stop)

    async def _watch(self, stop: asyncio.Event) -> BaseException | None:
        """Wait for ``stop``, or for a stream or the publisher to end; return what made it fatal."""
        assert self._publisher is not None
        stop_wait = asyncio.create_task(stop.wait(), name="stop")
        watched: set[asyncio.Task[Any]] = {stop_wait, self._publisher, *self._streams}
        try:
            while not stop.is_set():
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                watched -= done
                for task in done - {stop_wait}:
                    if not task.cancelled() and task.exception() is not None:
                        return task.exception()
                if not watched - {stop_wait}:
                    break
            return None
        finally:
            stop_wait.cancel()

    # -- shutdown, in order -------------------------------------------------------------

    async def _shutdown(self) -> None:
        log.info("stopping: unsubscribing and closing the stream")
        await self._stop_streams()
        await self._flush_spool()
        await self._stop_publishing()
        unconfirmed = await self.publisher.drain(self.settings.drain_timeout)
        await self.broker.close()
        report = await self.spool.close(give_up_after=self.settings.drain_timeout)
        self._lost = report.lost
        if self._http is not None:
            await self._http.cleanup()
        self._report_leftovers(unconfirmed, report)

    async def _stop_streams(self) -> None:
        """Unsubscribe every realm; cancel the ones that do not finish in time."""
        self._stream_stop.set()
        if not self._streams:
            return
        _, late = await asyncio.wait(self._streams, timeout=_STREAM_STOP_GRACE)
        for task in late:
            task.cancel()

    async def _flush_spool(self) -> None:
        """Commit what the stream read last. Bounded: a disk that refuses commits must not hang the shutdown."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.spool.flush(), timeout=self.settings.drain_timeout)

    async def _stop_publishing(self) -> None:
        self._publish_stop.set()
        for task in (self._publisher, self._poller, self._backlog):
            if task is None:
                continue
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=self.settings.drain_timeout + 2)

    def _report_leftovers(self, unconfirmed: int, report: CloseReport) -> None:
        spool = self.settings.spool
        if unconfirmed:
            log.warning("%d publishes were not confirmed in time; they stay in the spool", unconfirmed)
        if report.error:
            log.error("spool %s did not close cleanly: %s", spool, report.error)
        if report.lost:
            where = "the spool is in memory" if spool == "memory" else "they were never written to disk"
            log.error(
                "%d accepted events are lost (%s); %d stay in the spool %s", report.lost, where, report.kept, spool
            )
        elif report.kept:
            log.info("%d events stay in the spool %s for the next start", report.kept, spool)

    def _exit_code(self, fatal: BaseException | None) -> int:
        tasks = [*self._streams, *([self._publisher] if self._publisher else [])]
        for task in tasks:
            if fatal is None and task.done() and not task.cancelled() and task.exception() is not None:
                fatal = task.exception()
        if fatal is None and self._lost:
            return 1
        if fatal is None:
            log.info("stopped cleanly")
            return 0
        if isinstance(fatal, BridgeError):
            log.error("%s", fatal)
            return fatal.exit_code
        log.error("fatal error: %s", fatal, exc_info=fatal)
        return 1


class _ShownSink:
    """The spool, plus the Explorer page's live list: each accepted event is shown once it is spooled."""

    def __init__(self, spool: Spool, explorer: ExplorerHub) -> None:
        self._spool = spool
        self._explorer = explorer

    @property
    def full(self) -> bool:
        return self._spool.full

    async def put(self, msg: Outbound) -> None:
        await self._spool.put(msg)
        if msg.kind == KIND_EVENT:
            headers = msg.headers
            self._explorer.record(
                msg.received_at, msg.routing_key, str(headers.get("entity_id", "")), str(headers.get("realm", "")),
                msg.message_id,
            )  # fmt: skip


async def run_bridge(
    settings: Settings,
    stop: asyncio.Event,
    *,
    registry: CollectorRegistry | None = None,
) -> int:
    """Run the bridge until ``stop`` is set.

    Args:
        settings: validated settings.
        stop: set it to stop the bridge gracefully.
        registry: where metrics are registered (a fresh one by default).

    Returns:
        The process exit code: 0 clean stop, 2 bad configuration or rejected
        realm key, 1 anything else fatal.
    """
    metrics = Metrics(registry)
    log.info("starting orangepill-bridge %s", settings.describe())
    try:
        spool = await Spool.open(
            settings.spool,
            max_bytes=settings.spool_max_bytes,
            on_stats=lambda stats: metrics.spool_state(stats.depth, stats.size_bytes, stats.full),
        )
    except BridgeError as exc:
        log.error("%s", exc)
        return exc.exit_code
    if spool.depth:
        log.info(
            "spool %s holds %d events from an earlier run; publishing them first",
            settings.spool, spool.depth,
        )  # fmt: skip
    bridge = Bridge(settings, metrics, spool)
    try:
        return await bridge.run(stop)
    except BridgeError as exc:
        log.error("%s", exc)
        with contextlib.suppress(Exception):
            await spool.close()
        return exc.exit_code
