"""The HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz`` (aiohttp)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["Readiness", "start_http"]

log = logging.getLogger(__name__)

Readiness = Callable[[], dict[str, Any]]
"""Returns ``{"ready": bool, "reasons": [...], ...}``; called on every /readyz."""


def _app(registry: CollectorRegistry, readiness: Readiness) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        state = readiness()
        return web.json_response(state, status=200 if state.get("ready") else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_http(
    host: str, port: int, registry: CollectorRegistry, readiness: Readiness
) -> web.AppRunner:
    """Serve the endpoints on ``host:port``; the caller cleans up the returned runner.

    Raises:
        OSError: the address cannot be bound (in use, not local).
    """
    runner = web.AppRunner(_app(registry, readiness), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    log.info("http listening on %s:%d (/metrics /healthz /readyz)", host, port)
    return runner
