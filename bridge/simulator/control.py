"""The simulator's HTTP control API: drive its faults from another process.

Routes (all answer JSON):

- ``POST /drop``: close every connection (clean close; silent ones are aborted).
- ``POST /silent``: make every open connection silent (no frames out, nothing read).
- ``POST /malformed?n=N[&kind=K]``: send N malformed frames, of random kinds unless K is given.
- ``POST /pause``, ``POST /resume``: hold back or restart the generated events.
- ``POST /reject?n=N[&text=T][&kind=key|error]``: refuse the next N subscribes; ``key``
  (default) answers ``info`` NONE then an error frame (text "Invalid Realm Key."),
  ``error`` answers only an error frame (text "Service temporarily unavailable").
- ``GET /stats``: the counters of ``Simulator.stats()``.

It listens on loopback unless told otherwise, and has no authentication: never expose it.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Final

from aiohttp import web

from bridge.simulator.frames import MALFORMED_KINDS

if TYPE_CHECKING:
    from bridge.simulator.server import Simulator

__all__ = ["ControlServer"]

log = logging.getLogger(__name__)

_MAX_N: Final = 100_000
_MAX_TEXT: Final = 500


def _count(request: web.Request, default: int) -> int:
    raw = request.query.get("n", str(default))
    try:
        n = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="n must be a whole number") from None
    if not 0 <= n <= _MAX_N:
        raise web.HTTPBadRequest(text=f"n must be from 0 to {_MAX_N}")
    return n


class ControlServer:
    """An aiohttp server whose routes call the simulator's fault controls."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (0 picks a free port; read ``url``).

        Raises:
            OSError: the address cannot be bound.
        """
        app = web.Application()
        app.add_routes(
            [
                web.post("/drop", self._drop),
                web.post("/silent", self._silent),
                web.post("/malformed", self._malformed),
                web.post("/pause", self._pause),
                web.post("/resume", self._resume),
                web.post("/reject", self._reject),
                web.get("/stats", self._stats),
            ]
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}"
        if not ipaddress.ip_address(bound[0]).is_loopback:
            log.warning(
                "simulator control API on %s is reachable beyond this machine, without authentication", self.url
            )
        log.info("simulator control API on %s", self.url)

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _drop(self, request: web.Request) -> web.Response:
        return web.json_response({"dropped": await self._sim.drop_all()})

    async def _silent(self, request: web.Request) -> web.Response:
        return web.json_response({"silenced": self._sim.go_silent()})

    async def _malformed(self, request: web.Request) -> web.Response:
        kind = request.query.get("kind")
        if kind is not None and kind not in MALFORMED_KINDS:
            raise web.HTTPBadRequest(text="kind must be one of " + ", ".join(MALFORMED_KINDS))
        return web.json_response({"sent": await self._sim.send_malformed(_count(request, 1), kind)})

    async def _pause(self, request: web.Request) -> web.Response:
        self._sim.pause()
        return web.json_response({"paused": True})

    async def _resume(self, request: web.Request) -> web.Response:
        self._sim.resume()
        return web.json_response({"paused": False})

    async def _reject(self, request: web.Request) -> web.Response:
        n = _count(request, 1)
        text = request.query.get("text") or None
        if text is not None and len(text) > _MAX_TEXT:
            raise web.HTTPBadRequest(text=f"text must be at most {_MAX_TEXT} characters")
        kind = request.query.get("kind", "key")
        if kind not in ("key", "error"):
            raise web.HTTPBadRequest(text="kind must be key or error")
        self._sim.reject_next(n, text, key_error=kind == "key")
        return web.json_response({"rejecting": n})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self._sim.stats())
