"""The bridge process: wires stream clients, spool, publisher and HTTP, and stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from prometheus_client import CollectorRegistry

from bridge.config import Settings
from bridge.errors import BridgeError, ConfigError
from bridge.explorer.hub import ExplorerHub
from bridge.http import start_http
from bridge.metrics import Metrics
from bridge.publisher import Publisher
from bridge.spool import Spool
from bridge.stream import StreamClient, StreamState

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
        self.publisher = Publisher(settings, spool, metrics)
        self.clients = [StreamClient(settings, r, spool, metrics, self.state) for r in settings.realms]
        self.explorer: ExplorerHub | None = None
        if settings.explorer == "on" and settings.metrics_host_port is not None:
            self.explorer = ExplorerHub(self.readiness)
            for client in self.clients:
                client.on_event = self.explorer.record

    def readiness(self) -> dict[str, Any]:
        """What /readyz reports: ready only while every realm is subscribed and the broker is up."""
        reasons: list[str] = []
        for label, subscribed in self.state.subscribed.items():
            if not subscribed:
                why = "awaiting answer" if self.state.connected.get(label) else "stream disconnected"
                reasons.append(f"realm {label} not subscribed ({why})")
        if not self.publisher.connected:
            reasons.append(f"broker not connected: {self.publisher.last_error or 'connecting'}")
        if self.spool.full:
            reasons.append("spool full: the stream is not being read")
        return {
            "ready": not reasons,
            "reasons": reasons,
            "stream": {
                "connected": dict(self.state.connected),
                "subscribed": dict(self.state.subscribed),
            },
            "broker": {"connected": self.publisher.connected, "error": self.publisher.last_error},
            "spool": {"depth": self.spool.depth, "bytes": self.spool.bytes, "full": self.spool.full},
            "publish": {"in_flight": self.publisher.in_flight},
        }

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set or something fatal happens; return the exit code."""
        settings = self.settings
        stream_stop = asyncio.Event()
        publish_stop = asyncio.Event()
        runner = None
        hostport = settings.metrics_host_port
        if hostport is not None:
            try:
                runner = await start_http(
                    hostport[0], hostport[1], self.metrics.registry, self.readiness, explorer=self.explorer
                )
            except OSError as exc:
                raise ConfigError(
                    f"--metrics-addr {settings.metrics_addr}: cannot listen ({exc.strerror or exc})"
                ) from None
        streams = [
            asyncio.create_task(c.run(stream_stop), name=f"stream-{c.realm.label}") for c in self.clients
        ]
        publisher = asyncio.create_task(self._publish(publish_stop), name="publisher")
        poller = asyncio.create_task(self.publisher.poll_queues(publish_stop), name="queue-poll")
        stop_wait = asyncio.create_task(stop.wait(), name="stop")
        fatal: BaseException | None = None
        try:
            watched: set[asyncio.Task[Any]] = {stop_wait, publisher, *streams}
            while not stop.is_set() and fatal is None:
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    watched.discard(task)
                    if task is not stop_wait and not task.cancelled() and task.exception() is not None:
                        fatal = task.exception()
                if not watched - {stop_wait}:
                    break
        finally:
            log.info("stopping: unsubscribing and closing the stream")
            stream_stop.set()
            _, late = await asyncio.wait(streams, timeout=_STREAM_STOP_GRACE) if streams else (set(), set())
            for task in late:
                task.cancel()
            with contextlib.suppress(Exception):
                # Bounded: a disk that refuses commits must not hang the shutdown.
                await asyncio.wait_for(self.spool.flush(), timeout=settings.drain_timeout)
            publish_stop.set()
            stop_wait.cancel()
            for task in (publisher, poller):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, timeout=settings.drain_timeout + 2)
            unconfirmed = await self.publisher.drain(settings.drain_timeout)
            await self.publisher.close()
            depth = self.spool.depth
            try:
                await asyncio.wait_for(self.spool.close(), timeout=settings.drain_timeout)
            except (TimeoutError, BridgeError) as exc:
                log.error("spool %s did not close cleanly: %s", settings.spool, exc or "timeout")
            if runner is not None:
                await runner.cleanup()
            if unconfirmed:
                log.warning("%d publishes were not confirmed in time; they stay in the spool", unconfirmed)
            if depth and settings.spool == "memory":
                log.error("%d events were not yet confirmed and are lost: the spool is in memory", depth)
            elif depth:
                log.info("%d events stay in the spool %s for the next start", depth, settings.spool)
        for task in (*streams, publisher):
            if task.done() and not task.cancelled() and task.exception() is not None and fatal is None:
                fatal = task.exception()
        if fatal is not None:
            if isinstance(fatal, BridgeError):
                log.error("%s", fatal)
                return fatal.exit_code
            log.error("fatal error: %s", fatal, exc_info=fatal)
            return 1
        log.info("stopped cleanly")
        return 0

    async def _publish(self, stop: asyncio.Event) -> None:
        if await self.publisher.connect(stop):
            await self.publisher.run(stop)


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
        spool = await Spool.open(settings.spool, max_bytes=settings.spool_max_bytes, metrics=metrics)
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
