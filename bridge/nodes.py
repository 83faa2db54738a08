"""Several AMQP URLs, one per RabbitMQ cluster node: connect to the first that answers, fail over to the next.

aio-pika's ``connect_robust`` takes one URL and reconnects to that URL only, so failover between nodes is
ours. Two shapes, for two needs:

* ``connect_first(urls, start=i)``: a plain (non-robust) connection to the first node that answers, trying
  them in turn from ``start``. The leadership lock uses it in a loop: a lock must never be restored behind
  the owner's back (a ``RobustChannel`` would silently re-declare the exclusive queue after a reconnect),
  so losing the connection has to surface as an event, and the caller reconnects and re-competes.
* ``connect_robust_nodes(urls)``: a ``RobustConnection`` whose reconnect loop moves to the next URL after
  a lost connection or a failed attempt, so the publisher keeps aio-pika's channel and topology restore.
  aio-pika calls ``_on_connection_close`` both when a live connection is lost and when an attempt fails
  (``UnderlayConnection.connect``), so that one override is the rotation point; the URL is switched before
  the reconnect loop's next attempt. ``tests/test_ha_cluster.py`` pins this against a real 3-node cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from bridge.errors import BridgeError

__all__ = [
    "NoNodeAvailable",
    "connect_first",
    "connect_robust_nodes",
    "node_in_use",
    "node_of",
    "with_default_heartbeat",
    "with_heartbeat",
]

log = logging.getLogger(__name__)


class NoNodeAvailable(BridgeError, ConnectionError):
    """No configured RabbitMQ node accepted a connection; the message lists host:port only."""


def node_of(url: str | URL) -> str:
    """``host:port`` of an AMQP URL, never the credentials."""
    parts = urlsplit(str(url))
    default = 5671 if parts.scheme == "amqps" else 5672
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or default
    except ValueError:
        port = default
    return f"{host}:{port}"


def with_heartbeat(url: str, heartbeat: float) -> str:
    """The URL with its AMQP heartbeat timeout set (whole seconds, at least 1)."""
    return str(URL(url).update_query(heartbeat=max(1, round(heartbeat))))


def with_default_heartbeat(url: str, heartbeat: float) -> str:
    """The URL with an AMQP heartbeat, unless it sets one itself (``?heartbeat=N`` wins)."""
    parsed = URL(url)
    return url if "heartbeat" in parsed.query else with_heartbeat(url, heartbeat)


async def connect_first(
    urls: Sequence[str], *, start: int = 0, attempt_timeout: float = 5.0, **kwargs: Any
) -> tuple[AbstractConnection, int]:
    """Connect (without auto-reconnect) to the first node that answers, trying them in turn from ``start``.

    Args:
        urls: one AMQP URL per node.
        start: index of the node to try first (callers pass "the one after the node just lost").
        attempt_timeout: seconds per attempt.
        **kwargs: passed to ``aio_pika.connect``.

    Returns:
        The connection and the index of its URL.

    Raises:
        NoNodeAvailable: every node refused or timed out.
    """
    if not urls:
        raise NoNodeAvailable("no AMQP URL configured")
    failures: list[str] = []
    for step in range(len(urls)):
        index = (start + step) % len(urls)
        try:
            connection = await aio_pika.connect(urls[index], timeout=attempt_timeout, **kwargs)
        except Exception as exc:  # whatever a connect attempt raises, that node did not answer
            # Not only AMQP and socket errors: a server that accepts and closes at once makes aiormq
            # raise StopAsyncIteration out of its handshake (that killed the bridge with exit 1).
            failures.append(f"{node_of(urls[index])} ({type(exc).__name__})")
            log.debug("AMQP node %s did not answer", node_of(urls[index]), exc_info=True)
            continue
        return connection, index
    raise NoNodeAvailable("no RabbitMQ node answered: " + ", ".join(failures))


class _RotatingRobustConnection(RobustConnection):
    """A robust connection that moves to the next URL after a lost connection or a failed attempt."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        urls = kwargs.pop("node_urls", None) or [str(url)]
        self._node_urls: list[URL] = [URL(u) for u in urls]
        start: int = kwargs.pop("node_start", 0)
        self._node_index = start % len(self._node_urls)
        self.closed_node = ""  # host:port of the node whose connection (or attempt) closed last
        super().__init__(url=self._node_urls[self._node_index], loop=loop, **kwargs)

    @property
    def node(self) -> str:
        """``host:port`` of the node in use (or being tried)."""
        return node_of(self._node_urls[self._node_index])

    @property
    def node_index(self) -> int:
        """Index (in the URLs given) of the node in use or being tried."""
        return self._node_index

    def _rotate(self, why: str) -> None:
        if len(self._node_urls) < 2:
            return
        old = self.node
        self._node_index = (self._node_index + 1) % len(self._node_urls)
        self.url = self._node_urls[self._node_index]
        log.warning("AMQP %s on %s; next node %s", why, old, self.node)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        log.info("AMQP connected to node %s", self.node)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        self.closed_node = self.node  # the close callbacks' error is this node's, not the next one's
        if not (self._close_called or self.is_closed):
            self._rotate("connection closed or refused")
        await super()._on_connection_close(closing)


async def connect_robust_nodes(
    urls: Sequence[str],
    *,
    attempt_timeout: float = 5.0,
    reconnect_interval: float = 0.5,
    start: int = 0,
    single_attempt: bool = False,
    **kwargs: Any,
) -> AbstractRobustConnection:
    """A robust connection over several nodes: the first that answers, then the next one on each loss.

    Args:
        urls: one AMQP URL per node.
        attempt_timeout: seconds per node for the first connection.
        reconnect_interval: seconds between attempts (each attempt after a failure tries the next node).
        start: index of the node to try first.
        single_attempt: try only ``urls[start]`` for the first connection and raise at once when it
            fails (the caller rotates ``start`` and keeps its own backoff); reconnects after a loss
            still move through every node.
        **kwargs: passed to ``aio_pika.connect_robust``.

    Returns:
        The connection; ``node_in_use(connection)`` names its node.

    Raises:
        NoNodeAvailable: no node answered in time.
    """
    if not urls:
        raise NoNodeAvailable("no AMQP URL configured")
    # fail_fast off: the first connect keeps cycling through the nodes instead of failing on the first one;
    # our own timeout bounds it.
    first = start % len(urls)
    connection = _RotatingRobustConnection(
        URL(urls[first]), node_urls=list(urls), node_start=first, reconnect_interval=reconnect_interval,
        fail_fast="1" if single_attempt else "0", **kwargs,
    )  # fmt: skip
    budget = attempt_timeout + 1 if single_attempt else attempt_timeout * len(urls) + 1
    try:
        await asyncio.wait_for(connection.connect(timeout=attempt_timeout), timeout=budget)
    except Exception as exc:  # as in connect_first (StopAsyncIteration from aiormq included)
        await connection.close()
        tried = node_of(urls[first]) if single_attempt else ", ".join(node_of(u) for u in urls)
        raise NoNodeAvailable(f"no RabbitMQ node answered: {tried} ({type(exc).__name__})") from exc
    return connection


def node_in_use(connection: AbstractConnection) -> str:
    """``host:port`` of the node a connection uses, without credentials."""
    if isinstance(connection, _RotatingRobustConnection):
        return connection.node
    return node_of(str(getattr(connection, "url", "")))
