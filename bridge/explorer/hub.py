"""The Explorer's memory: recent events, the events/s history, and a bounded buffer per browser.

The bridge calls :meth:`ExplorerHub.record` once per event it accepted (after
the spool took it). That call never waits and never allocates more than one
small tuple per client: each client has a fixed-size buffer, and when a browser
reads too slowly its oldest rows are dropped (and counted). The page reads only
this memory; it never consumes from RabbitMQ.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Client", "ExplorerHub", "Row", "Status"]

log = logging.getLogger(__name__)

_MAX_ENTITY = 96

Row = tuple[float, str, str, str, str]
"""One event as the page shows it: (unix time, event name, entity id, realm label, message_id)."""

Status = Callable[[], dict[str, Any]]
"""Returns the bridge's readiness dict (``Bridge.readiness``)."""


class Client:
    """One connected browser: a bounded buffer of rows and a wake-up event."""

    __slots__ = ("buffer", "dropped", "wake")

    def __init__(self, size: int) -> None:
        self.buffer: collections.deque[Row] = collections.deque(maxlen=size)
        self.dropped = 0
        self.wake = asyncio.Event()

    def take(self) -> list[Row]:
        """Every buffered row, oldest first, emptying the buffer."""
        rows = list(self.buffer)
        self.buffer.clear()
        self.wake.clear()
        return rows


class ExplorerHub:
    """Keeps what the Explorer page shows, in memory, bounded."""

    def __init__(
        self,
        status: Status | None = None,
        *,
        recent: int = 200,
        client_buffer: int = 500,
        max_clients: int = 16,
        history_seconds: int = 600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.status_source = status
        self.client_buffer = client_buffer
        self.max_clients = max_clients
        self._clock = clock
        self._recent: collections.deque[Row] = collections.deque(maxlen=recent)
        self._clients: list[Client] = []
        self._second = int(clock())
        self._count = 0
        # (second, events) for every finished second, oldest first.
        self._history: collections.deque[tuple[int, int]] = collections.deque(maxlen=history_seconds)
        self.recorded = 0
        self.dropped = 0

    def record(self, at: float, event: str, entity_id: str, realm: str, message_id: str) -> None:
        """Note one accepted event; never blocks, never raises on a slow browser."""
        if len(entity_id) > _MAX_ENTITY:  # upstream data: bound what 200 rows can hold
            entity_id = entity_id[: _MAX_ENTITY - 1] + "…"
        row: Row = (at, event, entity_id, realm, message_id)
        self._recent.append(row)
        self.recorded += 1
        second = int(at)
        if second != self._second:
            self._roll(second)
        self._count += 1
        for client in self._clients:
            buf = client.buffer
            if len(buf) == buf.maxlen:
                client.dropped += 1
                self.dropped += 1
            buf.append(row)
            client.wake.set()

    def _roll(self, second: int) -> None:
        if second < self._second:
            return  # a clock step back: count it in the current second
        if self._count or self._history:
            self._history.append((self._second, self._count))
        gap = min(second - self._second - 1, self._history.maxlen or 0)
        for missing in range(second - gap, second):
            self._history.append((missing, 0))
        self._second, self._count = second, 0

    def rates(self, seconds: int = 300) -> list[tuple[int, int]]:
        """Events per second for the last ``seconds`` finished seconds, oldest first (gaps are 0)."""
        now = int(self._clock())
        if now > self._second:
            self._roll(now)
        return list(self._history)[-seconds:]

    def rate(self, window: int = 5) -> float:
        """Mean events per second over the last ``window`` finished seconds."""
        last = self.rates(window)
        return sum(n for _, n in last) / window if last else 0.0

    def recent(self) -> list[Row]:
        """The latest rows, oldest first."""
        return list(self._recent)

    def subscribe(self) -> Client | None:
        """A new client buffer, or None when ``max_clients`` are already connected."""
        if len(self._clients) >= self.max_clients:
            return None
        client = Client(self.client_buffer)
        self._clients.append(client)
        return client

    def unsubscribe(self, client: Client) -> None:
        """Forget a client (its browser went away)."""
        if client in self._clients:
            self._clients.remove(client)

    @property
    def clients(self) -> int:
        """How many browsers are connected."""
        return len(self._clients)

    def status(self) -> dict[str, Any]:
        """What the page's header shows: realms, rate, spool depth and broker state; never a secret."""
        state: dict[str, Any] = {}
        if self.status_source is not None:
            try:
                state = self.status_source()
            except Exception:
                log.warning("explorer: the status source failed", exc_info=True)
        stream = state.get("stream") or {}
        connected: dict[str, bool] = stream.get("connected") or {}
        subscribed: dict[str, bool] = stream.get("subscribed") or {}
        roles: dict[str, str] = stream.get("roles") or state.get("roles") or {}
        realms = [
            {
                "label": label,
                "connected": bool(connected.get(label)),
                "subscribed": bool(subscribed.get(label)),
                "role": str(roles.get(label, "leader")),
            }
            for label in sorted(set(connected) | set(subscribed))
        ]
        broker = state.get("broker") or {}
        spool = state.get("spool") or {}
        return {
            "time": self._clock(),
            "ready": bool(state.get("ready", False)),
            "reasons": [str(r) for r in state.get("reasons", [])],
            "realms": realms,
            "broker": {"connected": bool(broker.get("connected")), "error": broker.get("error")},
            "spool": {"depth": int(spool.get("depth") or 0), "full": bool(spool.get("full"))},
            "rate": round(self.rate(), 2),
            "recorded": self.recorded,
            "clients": self.clients,
        }
