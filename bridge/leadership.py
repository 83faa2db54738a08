"""Per-realm leadership held in RabbitMQ: an exclusive, auto-delete queue ``<exchange>.leader.<fp>`` per realm.

Holding the queue is leading the realm. The broker deletes an exclusive queue when its owner's connection
dies, which frees the lock with no extra service. A contender that gets RESOURCE_LOCKED (405) is a standby
and tries again every ``poll`` seconds.

Order of events on a lost lock connection (see docs/ha.md): the close callback of the connection demotes
every held realm synchronously (``on_change`` callbacks run before anything else in this loop), and a
liveness probe on the lock connection demotes after ``heartbeat`` seconds without an answer, which is
before the broker can have deleted the queue (it needs at least about 1.5 x heartbeat), so the old leader
stops publishing before a standby can take over.

Spreading, per lock connection:

* **Settle.** During the first ``settle`` seconds of its lock connection a replica leads at most one realm
  (its first attempt that succeeds), so that replicas started together (a deploy) each get one even when
  one of them connects a little earlier.
* **Contention.** The connection has *seen another replica* once an attempt at a lock was refused with
  RESOURCE_LOCKED, except a refusal at a realm this replica held on its previous lock connection (RabbitMQ
  may still hold that lock for the old connection, e.g. a link that went silent, until its own heartbeat
  detection: that is this replica, not another one).
* **Spread delay.** Once it has seen another replica, a replica that leads ``k`` realms, at or above its
  share of two replicas ``s = ceil(n / 2)`` of the ``n`` realms, waits ``min(poll, (k - s + 1) * spread_delay)``
  before an attempt at a realm it does not lead, unless that realm's last attempt on this connection was
  refused, so a replica with fewer realms wins a free lock. Below its share it waits nothing. No other wait:
  each pass (every ``poll`` seconds) tries every realm it does not lead, starting from a point of the realm
  list drawn at random per process, so replicas started together race for different free realms first.
* **Looking before taking more.** A replica that reaches its share without having seen another replica
  looks once per lock connection (passive declares of the locks it does not hold: nothing is created); one
  held elsewhere counts as seeing another replica.

So a lone replica leads its first realm at once and all its realms ``settle`` seconds after its lock
connection opened, at start and after each reconnect (their events wait in its spool meanwhile, nothing is
lost). Two replicas started together spread the realms: each takes one during settle, then its share at
once, and the rest only after a poll each, which leaves them to the other (40 realms: 20 + 20 in 2.1 s).
Replicas whose lock connections open more than ``settle`` apart do not spread: the first one leads every
realm. A standby polls every lock held elsewhere each ``poll`` seconds with no spread delay (it is not a
race for a free lock), so it takes over every realm of a leader that went within about ``poll``, not one
realm per ``poll``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import aiormq
from aio_pika.abc import AbstractConnection

from bridge.broker import access_refused
from bridge.nodes import NoNodeAvailable, connect_first, node_of, with_heartbeat

__all__ = ["Leadership", "LeadershipHealth", "RealmLock", "Role", "lock_queue_name"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Role(StrEnum):
    """A replica's role for one realm."""

    LEADER = "leader"
    STANDBY = "standby"


@dataclass(frozen=True, slots=True)
class RealmLock:
    """A realm to compete for: its label (metrics, logs) and its key fingerprint (lock name)."""

    label: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class LeadershipHealth:
    """What /readyz shows: the role per realm and the lock connection's node."""

    roles: dict[str, Role]
    node: str | None
    connected: bool


def lock_queue_name(exchange: str, fingerprint: str) -> str:
    """The lock queue of a realm: ``<exchange>.leader.<fp>`` (two deployments on one broker never collide)."""
    return f"{exchange}.leader.{fingerprint}"


RoleCallback = Callable[[str, Role], None]


class Leadership:
    """Competes for each realm's lock on a dedicated connection and reports role changes.

    Args:
        exchange: the bridge's exchange (lock names derive from it).
        realms: the realms to compete for.
        urls: one AMQP URL per cluster node.
        heartbeat: AMQP heartbeat of the lock connection, seconds; also the liveness-probe deadline.
        poll: seconds between attempts at a lock held by someone else.
        spread_delay: extra wait per realm already led at or above its share of two replicas, before an
            attempt, once the lock connection has seen another replica (bounded by ``poll``; default ``poll``).
        settle: seconds after connecting during which a replica leads at most one realm (default
            ``max(2, 2 * poll)``).
    """

    def __init__(
        self,
        exchange: str,
        realms: Sequence[RealmLock],
        urls: Sequence[str],
        *,
        heartbeat: float = 5.0,
        poll: float = 1.0,
        spread_delay: float | None = None,
        settle: float | None = None,
        connect_timeout: float = 5.0,
        connect_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._exchange = exchange
        self._connect_kwargs = connect_kwargs or {}  # TLS options (bridge.tls.amqp_connect_kwargs)
        self._realms = tuple(realms)
        self._urls = [with_heartbeat(u, heartbeat) for u in urls]
        self._heartbeat = heartbeat
        self._poll = poll
        self._spread = poll if spread_delay is None else spread_delay
        # The share of one of two replicas, ceil(n / 2): no spread delay below it (see the module docstring).
        self._share = -(-len(self._realms) // 2)
        # Each process sweeps the realms from its own random starting point: replicas started together then
        # race for different free realms first, instead of all meeting at the same one.
        start = random.randrange(len(self._realms)) if self._realms else 0
        self._sweep = self._realms[start:] + self._realms[:start]
        self._settle = max(2.0, 2 * poll) if settle is None else settle
        self._connect_timeout = connect_timeout
        self._roles: dict[str, Role] = {r.label: Role.STANDBY for r in self._realms}
        self._callbacks: list[RoleCallback] = []
        self._node: str | None = None
        self._connected = False
        self._lost = asyncio.Event()
        self._raw: aiormq.abc.AbstractConnection | None = None  # the lock connection, for tests
        self._refused_said = ""  # the last ACCESS_REFUSED logged (once, not at every attempt)
        self._resigned: dict[str, str] = {}  # realm label -> why this replica gives it up for good
        self._resign_now = asyncio.Event()  # a resignation waits for the lock loop
        # Realms this replica held on its previous lock connection: RabbitMQ may still hold those locks for
        # that connection (a link that went silent) for a while, so refusing them says nothing of other replicas.
        self._held_before: frozenset[str] = frozenset()

    # -- public API --

    def on_change(self, callback: RoleCallback) -> None:
        """Call ``callback(realm_label, role)`` on every role change, synchronously, in this event loop."""
        self._callbacks.append(callback)

    def is_leader(self, realm_label: str) -> bool:
        """Whether this replica leads the realm now."""
        return self._roles.get(realm_label) is Role.LEADER

    def resign(self, label: str, why: str) -> None:
        """Give up the realm for the rest of this process: release its lock if held, never compete again.

        For a realm whose key the stream refused: this replica can no longer read it, so another replica
        whose subscription still works should lead it at once, not after its standby window.
        """
        if label in self._roles and label not in self._resigned:
            self._resigned[label] = why
            self._resign_now.set()

    def roles(self) -> dict[str, Role]:
        """The role per realm label."""
        return dict(self._roles)

    def health(self) -> LeadershipHealth:
        """Roles and lock connection state, for /readyz."""
        return LeadershipHealth(roles=dict(self._roles), node=self._node, connected=self._connected)

    async def run(self, stop: asyncio.Event) -> None:
        """Hold or wait for every realm's lock until ``stop`` is set; reconnects (next node) on loss."""
        start = 0
        failures = 0
        try:
            while not stop.is_set():
                try:
                    connection, index = await connect_first(
                        self._urls, start=start, attempt_timeout=self._connect_timeout, **self._connect_kwargs
                    )
                except NoNodeAvailable as exc:
                    failures += 1
                    level = logging.WARNING if failures == 1 or failures % 60 == 0 else logging.DEBUG
                    log.log(level, "leadership: %s; retrying every %.1fs", exc, self._poll)
                    await _wait(stop, self._poll)
                    continue
                failures = 0
                start = index
                try:
                    await self._hold(connection, node_of(self._urls[index]), stop)
                finally:
                    self._demote_all("lock connection closed")
                    self._connected = False
                    with contextlib.suppress(Exception):
                        # Bounded: closing a silent link waits for an answer that never comes.
                        await asyncio.wait_for(connection.close(), timeout=self._heartbeat)
                if not stop.is_set():
                    start = index + 1  # the node we lost may be going down: try the next one first
                    await _wait(stop, min(self._poll, 0.5))
        finally:
            self._demote_all("stopping")

    # -- internals --

    async def _hold(self, connection: AbstractConnection, node: str, stop: asyncio.Event) -> None:
        self._lost = asyncio.Event()
        lost = self._lost
        # Demote synchronously from the close callback: nothing else runs in this loop between the
        # connection noticing the loss and the publisher learning it is no longer leader.
        connection.close_callbacks.add(lambda *_: self._on_lost(lost))
        self._node = node
        self._connected = True
        log.info("leadership: lock connection on node %s", self._node)
        raw = self._raw = _raw(connection)
        settled_at = time.monotonic() + self._settle
        contended = False  # another replica seen on this lock connection: a lock attempt was refused
        own_old = self._held_before  # refused because our previous connection still holds them: no evidence
        held: set[str] = set()  # taken on this connection
        held_elsewhere: set[str] = set()  # refused at their last attempt on this connection
        surveyed = False  # looked for another replica's locks (once, at this replica's share)
        told_standby: set[str] = set()
        channel: aiormq.abc.AbstractChannel | None = None
        probe = asyncio.create_task(self._probe(raw, lost))
        try:
            while not stop.is_set() and not lost.is_set():
                self._resign_now.clear()
                for realm in self._sweep:
                    if stop.is_set() or lost.is_set():
                        break
                    if realm.label in self._resigned:
                        if self._roles[realm.label] is Role.LEADER:
                            channel = await self._release(raw, channel, realm, lost)
                        continue
                    if self._roles[realm.label] is Role.LEADER:
                        continue
                    led = self._leading()
                    settling = settled_at - time.monotonic()
                    if led and settling > 0 and await _wait_any(stop, lost, settling):
                        break
                    if not contended and not surveyed and led >= self._share:
                        # At its share without having met another replica yet (its sweep may simply not have
                        # reached one's realm): look before taking more. Passive declares create nothing.
                        surveyed = True
                        contended = await self._others_hold(raw, lost, own_old)
                    # The spread delay only helps when another replica may race for the same free lock: a
                    # lone replica (no refusal yet) takes every free realm at once, and a lock refused at the
                    # last attempt is a standby's poll (its holder may have gone: take it over within a poll).
                    spread = contended and realm.label not in held_elsewhere
                    # Below its share of two replicas a replica takes free realms at once; from there on each
                    # attempt waits (a poll by default), so the other replica, which may still be in its settle
                    # window, takes its share: many realms spread fast, and one replica does not take them all.
                    over = led - self._share + 1
                    delay = min(self._poll, self._spread * over) if spread and over > 0 else 0.0
                    if delay and await _wait_any(stop, lost, delay):
                        break
                    if channel is None or channel.is_closed:
                        channel = await self._rpc(raw.channel(), lost)
                    try:
                        await self._rpc(
                            channel.queue_declare(
                                lock_queue_name(self._exchange, realm.fingerprint), exclusive=True, auto_delete=True
                            ),
                            lost,
                        )
                    except aiormq.exceptions.ChannelLockedResource:
                        channel = None  # the broker closed it; a new one next time
                        held_elsewhere.add(realm.label)
                        if realm.label not in own_old:
                            contended = True
                        if realm.label not in told_standby:  # once per lock connection: a role is visible at start
                            told_standby.add(realm.label)
                            log.info("leadership: realm %s is standby (another replica holds the lock)", realm.label)
                        continue
                    held_elsewhere.discard(realm.label)
                    held.add(realm.label)  # even if the link just went: that connection may keep the lock a while
                    if not lost.is_set():
                        self._set(realm.label, Role.LEADER, f"holds the lock on node {self._node}")
                await _wait_any(stop, lost, self._poll, self._resign_now)
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            refused = access_refused(exc, self._exchange)
            if refused is not None:
                # Said once (it comes back at every attempt); no replica can lead until it is fixed.
                if refused != self._refused_said:
                    self._refused_said = refused
                    log.error("leadership: cannot take the realm locks: %s", refused)
            elif not lost.is_set():
                log.warning("leadership: lock connection failed (%s)", type(exc).__name__, exc_info=True)
        finally:
            self._held_before = frozenset(held - self._resigned.keys())
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await probe

    async def _others_hold(
        self, raw: aiormq.abc.AbstractConnection, lost: asyncio.Event, own_old: frozenset[str]
    ) -> bool:
        """Whether another connection holds the lock of a realm this replica does not lead (passive declares).

        A lock held by this replica's own previous connection (``own_old``) does not count.
        """
        for realm in self._realms:
            if self.is_leader(realm.label) or realm.label in self._resigned or realm.label in own_old:
                continue
            channel = await self._rpc(raw.channel(), lost)
            try:
                name = lock_queue_name(self._exchange, realm.fingerprint)
                await self._rpc(channel.queue_declare(name, passive=True), lost)
            except aiormq.exceptions.ChannelLockedResource:
                return True
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue  # free: the broker closed the channel
            if not channel.is_closed:
                await self._rpc(channel.close(), lost)
        return False

    async def _release(
        self,
        raw: aiormq.abc.AbstractConnection,
        channel: aiormq.abc.AbstractChannel | None,
        realm: RealmLock,
        lost: asyncio.Event,
    ) -> aiormq.abc.AbstractChannel:
        """Delete a resigned realm's lock queue (this connection owns it): another replica may take it now."""
        self._set(realm.label, Role.STANDBY, f"resigned: {self._resigned[realm.label]}")  # stop publishing first
        if channel is None or channel.is_closed:
            channel = await self._rpc(raw.channel(), lost)
        await self._rpc(channel.queue_delete(lock_queue_name(self._exchange, realm.fingerprint)), lost)
        log.info("leadership: realm %s lock released for another replica", realm.label)
        return channel

    async def _rpc(self, call: Awaitable[_T], lost: asyncio.Event) -> _T:
        """Await one RPC on the lock connection, but not past a lost link or ``heartbeat`` seconds.

        A link that goes silent (a network partition, a frozen proxy) answers nothing and closes
        nothing: aiormq's pending RPC would wait for ever, and with it this replica's attempts at
        the lock (a standby never reconnected, and never led again). The probe sets ``lost``
        within ``heartbeat`` seconds; this returns then, so the loop reconnects.

        Raises:
            ConnectionError: the link was lost, or the RPC took longer than ``heartbeat``.
        """
        task = asyncio.ensure_future(call)
        watch = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({task, watch}, timeout=self._heartbeat, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ConnectionError("lock connection lost" if lost.is_set() else "lock connection did not answer")

    async def _probe(self, raw: aiormq.abc.AbstractConnection, lost: asyncio.Event) -> None:
        # A cheap synchronous RPC every heartbeat/2 on a channel of its own. No answer within
        # heartbeat/2 = the link is gone as far as leadership goes: demote now rather than after
        # aiormq's own stuck-connection timeout (3 x (heartbeat + 1) s).
        channel = await raw.channel()
        interval = self._heartbeat / 2
        while not lost.is_set():
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(channel.basic_qos(prefetch_count=0), timeout=interval)
            except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError):
                log.warning("leadership: lock connection did not answer within %.1fs", interval)
                self._on_lost(lost)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(raw.close(), timeout=interval)  # a silent link never answers
                return

    def _on_lost(self, lost: asyncio.Event) -> None:
        lost.set()
        self._demote_all("lock connection lost")

    def _leading(self) -> int:
        return sum(1 for role in self._roles.values() if role is Role.LEADER)

    def _demote_all(self, why: str) -> None:
        for label, role in self._roles.items():
            if role is Role.LEADER:
                self._set(label, Role.STANDBY, why)

    def _set(self, label: str, role: Role, why: str) -> None:
        if self._roles[label] is role:
            return
        self._roles[label] = role
        log.info("leadership: realm %s is now %s (%s)", label, role.value, why)
        for callback in self._callbacks:
            try:
                callback(label, role)
            except Exception:
                log.exception("leadership: role callback failed")


def _raw(connection: AbstractConnection) -> aiormq.abc.AbstractConnection:
    transport = connection.transport
    if transport is None:
        raise ConnectionError("lock connection has no transport")
    raw: aiormq.abc.AbstractConnection = transport.connection
    return raw


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


async def _wait_any(a: asyncio.Event, b: asyncio.Event, seconds: float, also: asyncio.Event | None = None) -> bool:
    """Wait until either event (or ``also``) is set or ``seconds`` pass; True if ``a`` or ``b`` was set."""
    deadline = time.monotonic() + seconds
    events = (a, b) if also is None else (a, b, also)
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    return a.is_set() or b.is_set()
