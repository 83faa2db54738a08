"""Hot standby support: the leader announces confirmed message ids; standbys trim their window by them.

The leader collects the ids RabbitMQ confirmed and, every ``interval`` (100 ms), publishes one small,
non-persistent message per realm fingerprint on the bridge's own fanout exchange ``<exchange>.ha``.
Each standby consumes it with a server-named, exclusive, auto-delete queue and hands the ids to a
callback (the spool's ``discard``). Nothing is ever bound to the events exchange for this: a queue bound
to ``#`` there would make every event routable and defeat the alternate exchange.

An announcement lost (standby reconnecting, broker restart) only costs duplicates after a failover,
never an event: the standby keeps what it was not told about, up to its window.

The announcer also sends a heartbeat (an announcement with no ids) for every realm it leads and
publishes healthily, at least every ``heartbeat`` seconds. A standby trims its window by age only
while it has heard such a heartbeat recently (``LeaderEvidence``): with the broker down or no leader
it keeps everything, because expiring then would lose events.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from bridge.contract import Topology, header_text
from bridge.errors import ProtocolError

__all__ = [
    "Announcer",
    "Follower",
    "LeaderEvidence",
    "ha_exchange_name",
    "pack_ids",
    "realm_spool_glob",
    "spool_paths",
    "unpack_ids",
]

log = logging.getLogger(__name__)

MAX_IDS_PER_MESSAGE: Final = 2000
FORMAT_VERSION: Final = 1

IdsCallback = Callable[[str, list[str]], Awaitable[Any] | Any]
_FOLLOWER_PREFETCH: Final = 64
"""Announcements delivered to a follower and not yet handled, at most (the rest wait in its queue)."""
_FOLLOWER_MAX_BYTES: Final = 64 * 1024 * 1024
"""Announcements a follower's queue holds while its replica is cut off, at most (the oldest go first)."""
HEARTBEAT: Final = 1.0
"""Seconds between two heartbeats of a realm's leader (at most)."""
EVIDENCE_MAX_AGE: Final = 3.0
"""A standby trims its window by age only if it heard the realm's leader within this many seconds."""


class LeaderEvidence:
    """When each realm's leader was last heard on ``<exchange>.ha`` (monotonic seconds); pure bookkeeping."""

    def __init__(self, max_age: float = EVIDENCE_MAX_AGE) -> None:
        self._max_age = max_age
        self._heard: dict[str, float] = {}

    def heard(self, fingerprint: str, now: float) -> None:
        """An announcement (ids or heartbeat) of the realm arrived at ``now``."""
        self._heard[fingerprint] = now

    def alive(self, fingerprint: str, now: float) -> bool:
        """Whether the realm's leader was heard within ``max_age`` seconds of ``now``."""
        at = self._heard.get(fingerprint)
        return at is not None and now - at <= self._max_age


def spool_paths(path: str, fingerprints: Iterable[str]) -> dict[str, str]:
    """One spool per realm: ``PATH`` itself for one realm, else ``<stem>.<fp><suffix>`` next to ``PATH``.

    ``memory`` stays ``memory`` (one in-memory spool per realm). With one realm the file is exactly the
    ``--spool`` file, so spools of earlier versions replay unchanged.

    Examples:
        ``/var/lib/bridge/spool.db`` and realms fp-a, fp-b give ``/var/lib/bridge/spool.fp-a.db`` and
        ``/var/lib/bridge/spool.fp-b.db``.
    """
    fps = list(fingerprints)
    if path == "memory" or len(fps) == 1:
        return dict.fromkeys(fps, path)
    return {fp: _realm_file(path, fp) for fp in fps}


def realm_spool_glob(path: str) -> str:
    """A glob of every realm's file next to ``path`` (``<stem>.fp-<12 hex><suffix>``), whatever the realms."""
    return glob.escape(_realm_file(path, "@FP@")).replace("@FP@", "fp-" + "[0-9a-f]" * 12)


def _realm_file(path: str, fp: str) -> str:
    head, sep, name = path.rpartition("/")
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        stem, suffix = name, ""
    return f"{head}{sep}{stem}.{fp}{'.' + suffix if suffix else ''}"


REPLICA_HEADER: Final = "replica"
"""Header of an announcement: the random id of the process that sent it (not a secret; for its own follower)."""


def ha_exchange_name(exchange: str) -> str:
    """The bridge's coordination exchange: ``<exchange>.ha`` (fanout), ``Topology.ha``."""
    return Topology(exchange).ha


def pack_ids(fingerprint: str, ids: Iterable[str]) -> bytes:
    """One announcement body: ``{"v":1,"fp":…,"ids":[…]}``."""
    return orjson.dumps({"v": FORMAT_VERSION, "fp": fingerprint, "ids": list(ids)})


def unpack_ids(body: bytes) -> tuple[str, list[str]]:
    """Read an announcement body.

    Raises:
        ProtocolError: the body is not an announcement of a known version.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_announcement", "not JSON") from exc
    if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
        raise ProtocolError("bad_announcement", "unknown version")
    fp, ids = data.get("fp"), data.get("ids")
    if not isinstance(fp, str) or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ProtocolError("bad_announcement", "fields missing or of the wrong type")
    return fp, ids


async def _declare(channel: aio_pika.abc.AbstractChannel, exchange: str) -> aio_pika.abc.AbstractExchange:
    # Durable so that a broker restart keeps the name; messages are transient.
    return await channel.declare_exchange(ha_exchange_name(exchange), aio_pika.ExchangeType.FANOUT, durable=True)


class Announcer:
    """The leader's side: buffer confirmed ids per realm and publish them every ``interval`` seconds.

    Args:
        connection: an open (ideally robust) connection; the announcer opens its own channel.
        exchange: the bridge's events exchange (the announcements go to ``<exchange>.ha``).
        interval: seconds between announcements.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        exchange: str,
        *,
        interval: float = 0.1,
        leading: Callable[[], Iterable[str]] = tuple,
        heartbeat: float = HEARTBEAT,
        replica: str = "",
    ) -> None:
        self._connection = connection
        self._headers: dict[str, Any] = {REPLICA_HEADER: replica} if replica else {}
        self._exchange = exchange
        self._interval = interval
        self._pending: dict[str, list[str]] = {}
        self._leading = leading
        self._heartbeat = heartbeat
        self._last_sent: dict[str, float] = {}
        self._wake = asyncio.Event()  # ids came in (or stop)
        self.announced = 0  # ids sent, for tests and metrics
        self.heartbeats = 0

    def confirmed(self, fingerprint: str, ids: Iterable[str]) -> None:
        """Note ids RabbitMQ has confirmed for a realm (cheap, synchronous; sent at the next tick)."""
        self._pending.setdefault(fingerprint, []).extend(ids)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish the buffered ids at most every interval until ``stop``; a last flush on the way out.

        An idle announcer sleeps until ids come in or a heartbeat is due (once a ``heartbeat``), so a
        quiet bridge does not wake ten times a second for nothing.
        """
        channel = await self._connection.channel(publisher_confirms=False)
        target = await _declare(channel, self._exchange)
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(stop.wait())
        watcher.add_done_callback(lambda _: self._wake.set())
        try:
            while not stop.is_set():
                if not self._pending:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._until_heartbeat(loop.time())):
                            await self._wake.wait()
                if self._pending and not stop.is_set():
                    await asyncio.sleep(self._interval)  # gather the confirms of one interval
                await self._flush(target)
        finally:
            watcher.cancel()
            with contextlib.suppress(Exception):
                await channel.close()

    def _until_heartbeat(self, now: float) -> float:
        """Seconds until a realm led now is due its heartbeat (at most ``heartbeat``)."""
        due = [self._last_sent.get(fp, -self._heartbeat) + self._heartbeat - now for fp in self._leading()]
        return max(0.0, min(due, default=self._heartbeat))

    async def _flush(self, target: aio_pika.abc.AbstractExchange) -> None:
        pending, self._pending = self._pending, {}
        now = asyncio.get_running_loop().time()
        for fp in self._leading():
            if fp not in pending and now - self._last_sent.get(fp, -self._heartbeat) >= self._heartbeat - 0.01:
                pending[fp] = []  # a heartbeat: "this realm's leader is alive and publishing"
        # Not mandatory: an announcement no queue takes (no standby, or one re-binding after a
        # reconnect) is simply dropped; RabbitMQ would return it, and aiormq logs ERROR for a
        # returned message of a channel without confirms.
        for fp, ids in pending.items():
            self._last_sent[fp] = now
            if not ids:
                with contextlib.suppress(Exception):
                    await target.publish(self._message(fp, []), routing_key="", mandatory=False)
                    self.heartbeats += 1
                continue
            for start in range(0, len(ids), MAX_IDS_PER_MESSAGE):
                chunk = ids[start : start + MAX_IDS_PER_MESSAGE]
                try:
                    await target.publish(self._message(fp, chunk), routing_key="", mandatory=False)
                except Exception:
                    # Lost announcements mean duplicates after a failover, never loss: do not retry.
                    log.debug("ha: announcement not sent", exc_info=True)
                    continue
                self.announced += len(chunk)

    def _message(self, fingerprint: str, ids: list[str]) -> aio_pika.Message:
        return aio_pika.Message(
            pack_ids(fingerprint, ids),
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            content_type="application/json",
            app_id="orangepill-bridge",
            headers=self._headers or None,
        )


class Follower:
    """The standby's side: receive announcements and hand ``(fingerprint, ids)`` to a callback.

    The queue is this process's for its whole life, and outlives a lost connection by ``keep_for``
    seconds: the announcements sent while this replica was cut off (a broker that dropped a frozen
    process, a network partition, a restart of its node) wait there and are read after the reconnect.
    With an exclusive queue they went with the connection, and the standby then published every
    event of that time again once its window ran out (2,497 duplicates after a 25 s SIGSTOP).

    Args:
        connection: an open (ideally robust: the queue is re-declared on reconnect) connection.
        exchange: the bridge's events exchange.
        on_ids: called with each announcement (may be sync or async), e.g. the spool's discard.
        keep_for: seconds RabbitMQ keeps the queue, and what waits in it, once nothing consumes it.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        exchange: str,
        on_ids: IdsCallback,
        keep_for: float = 60.0,
        replica: str = "",
    ) -> None:
        self._connection = connection
        # This process's own announcements are not evidence of another leader: read after a demotion (still in
        # the queue when the lock went), they made a replica believe its realm was led elsewhere.
        self._replica = replica
        self._exchange = exchange
        self._on_ids = on_ids
        # Named under the exchange, as everything of the bridge's: one permission pattern covers it.
        self.queue_name = f"{ha_exchange_name(exchange)}.follower.{uuid.uuid4().hex[:12]}"
        self._arguments: dict[str, Any] = {
            "x-expires": max(1000, int(keep_for * 1000)),
            "x-max-length-bytes": _FOLLOWER_MAX_BYTES,  # the oldest go first
        }
        self.received = 0
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume announcements until ``stop``; then delete the queue (a failure leaves it to expire)."""
        channel = await self._connection.channel(publisher_confirms=False)
        stopped = False
        try:
            source = await _declare(channel, self._exchange)
            await channel.set_qos(prefetch_count=_FOLLOWER_PREFETCH)
            queue = await channel.declare_queue(self.queue_name, arguments=self._arguments)
            await queue.bind(source)
            tag = await queue.consume(self._handle)
            self.ready.set()
            await stop.wait()
            stopped = True
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(queue.delete(if_unused=False, if_empty=False), 5)
        finally:
            if not stopped:
                self.ready.clear()
            with contextlib.suppress(Exception):
                await channel.close()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        # Acknowledged once handled: an announcement on its way when the link dropped is delivered again
        # after the reconnect (with automatic acks RabbitMQ counted it delivered, and it was gone).
        try:
            if self._replica and header_text((message.headers or {}).get(REPLICA_HEADER)) == self._replica:
                return
            try:
                fp, ids = unpack_ids(message.body)
            except ProtocolError as exc:
                log.warning("ha: ignored an announcement: %s", exc)
                return
            self.received += len(ids)
            result = self._on_ids(fp, ids)
            if inspect.isawaitable(result):
                await result
        finally:
            with contextlib.suppress(Exception):
                await message.ack()
