"""The bridge process: wires stream clients, spool, broker, publisher and HTTP, and stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry

from bridge.backlog import watch_backlog
from bridge.broker import Broker, access_refused, describe_error
from bridge.config import Realm, Settings
from bridge.contract import KIND_EVENT, Outbound
from bridge.errors import BridgeError, ConfigError, RealmRejected, SpoolError
from bridge.explorer.hub import ExplorerHub
from bridge.ha import Announcer, Follower, LeaderEvidence, realm_spool_glob, spool_paths
from bridge.http import start_http
from bridge.leadership import Leadership, RealmLock, Role
from bridge.metrics import Metrics
from bridge.publisher import MessageSource, Publisher
from bridge.spool import MEMORY, CloseReport, Spool, Spooled, SpoolStats
from bridge.stream import EventSink, StreamClient, StreamState
from bridge.tls import amqp_connect_kwargs

__all__ = ["Bridge", "run_bridge"]

log = logging.getLogger(__name__)

_STREAM_STOP_GRACE = 5.0
_EXPIRE_INTERVAL: Final = 1.0  # seconds between two trims of a standby's window
_SIDE_TASK_RETELL: Final = 600.0  # an HA side task failing with the broker up: its ERROR again this often (s)
_TAIL_IDLE: Final = 0.5  # a standby's window tail is over once nothing more is handed out for this long (s)
_PUBLISHING_EVIDENCE: Final = 2.0  # a leader with a backlog and no confirm for this long sends no heartbeat


class RealmLane:
    """One realm on this replica: its spool, its publisher, and its role.

    A leader runs the publisher; a standby keeps spooling, trims its window by the leader's
    announcements and by age (only while the leader is heard), and never publishes.
    """

    def __init__(self, realm: Realm, spool: Spool, publisher: Publisher) -> None:
        self.realm = realm
        self.spool = spool
        self.publisher = publisher
        self.early = EarlyIds()
        self.role = Role.STANDBY
        self.last_confirm = 0.0  # monotonic time of the last confirm while leading
        self._stop: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        """Whether this replica publishes the realm now."""
        return self.role is Role.LEADER

    def start(self, after: asyncio.Event, on_done: Callable[[asyncio.Task[None]], None]) -> None:
        """Start publishing (promotion), once ``after`` is set (earlier runs' events published first)."""
        if self.task is not None and not self.task.done():
            return
        stop = self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run(stop, after), name=f"publisher-{self.realm.label}")
        self.task.add_done_callback(on_done)

    async def _run(self, stop: asyncio.Event, after: asyncio.Event) -> None:
        await after.wait()
        await self.publisher.run(stop)

    def halt(self) -> None:
        """Stop publishing now (demotion, stop): synchronous, so nothing more leaves after this returns."""
        self.publisher.halt()
        if self._stop is not None:
            self._stop.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()


class Bridge:
    """One running bridge replica: everything that lives between start and stop."""

    def __init__(self, settings: Settings, metrics: Metrics, spools: Spool | Mapping[str, Spool]) -> None:
        self.settings = settings
        self.metrics = metrics
        if isinstance(spools, Spool):
            if len(settings.realms) > 1:
                raise ValueError("several realms need one spool each (a mapping by realm label)")
            spools = {realm.label: spools for realm in settings.realms}
        self.state = StreamState(settings.realms, metrics)
        self.broker = Broker(settings, metrics)
        metrics.watch_blocked(lambda: self.broker.blocked)
        self.broker.counts_realm = self._leads
        self.lanes: dict[str, RealmLane] = {}
        for realm in settings.realms:
            spool = spools[realm.label]
            publisher = Publisher(settings, spool, metrics, self.broker, on_confirmed=self._confirmed_hook(realm))
            self.lanes[realm.label] = RealmLane(realm, spool, publisher)
            metrics.realm_role(realm.label, False)
        self._by_fp = {lane.realm.fingerprint: lane for lane in self.lanes.values()}
        self.leadership = Leadership(
            settings.exchange,
            [RealmLock(realm.label, realm.fingerprint) for realm in settings.realms],
            settings.amqp_nodes,
            heartbeat=settings.lock_heartbeat,
            poll=settings.standby_poll,
            connect_kwargs=amqp_connect_kwargs(settings),
        )
        self.leadership.on_change(self._on_role)
        self.evidence = LeaderEvidence()
        self.announcer: Announcer | None = None
        self.explorer: ExplorerHub | None = None
        if settings.explorer == "on" and settings.metrics_host_port is not None:
            self.explorer = ExplorerHub(self.readiness)
        self.clients = [
            StreamClient(settings, lane.realm, self._sink(lane.spool), metrics, self.state)
            for lane in self.lanes.values()
        ]
        self.accepted = AcceptedKeys(settings.spool)
        self.replica_id = uuid.uuid4().hex[:12]  # marks this process's announcements, which its follower skips
        for client in self.clients:
            fp = client.realm.fingerprint
            client.on_first_accept = lambda fp=fp: self.accepted.add(fp)
        # How long announced ids are worth keeping: while the events stay in a standby's window, and a margin.
        self._announced_for = 2 * settings.standby_window + 30
        self.carry: list[str] = []  # spool files of earlier runs, published before anything else
        self.carry_depth: dict[str, int] = {}  # events each carry file holds (live while it drains)
        self._draining: dict[str, Spool] = {}
        metrics.add_spool_source(self._carry_totals)
        self._recovered = asyncio.Event()
        self._stream_stop = asyncio.Event()
        self._publish_stop = asyncio.Event()
        self._coord_stop = asyncio.Event()
        self._lock_stop = asyncio.Event()
        self._streams: dict[asyncio.Future[Any], StreamClient] = {}  # each realm's stream task, and its client
        self.rejected: dict[str, str] = {}  # realm label -> why the stream refused its key (not retried)
        self._coordinator: asyncio.Task[None] | None = None
        self._leader_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._fatal: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._http: web.AppRunner | None = None
        self._lost = 0  # accepted events the spool could not keep (set at shutdown)

    @property
    def spool(self) -> Spool:
        """The first realm's spool (the only one with a single realm)."""
        return next(iter(self.lanes.values())).spool

    @property
    def publisher(self) -> Publisher:
        """The first realm's publisher (the only one with a single realm)."""
        return next(iter(self.lanes.values())).publisher

    def _sink(self, spool: Spool) -> EventSink:
        return spool if self.explorer is None else _ShownSink(spool, self.explorer)

    def _confirmed_hook(self, realm: Realm) -> Callable[[str], None]:
        fp, label = realm.fingerprint, realm.label

        def confirmed(message_id: str) -> None:
            self.lanes[label].last_confirm = time.monotonic()
            if self.announcer is not None:
                self.announcer.confirmed(fp, (message_id,))

        return confirmed

    # -- roles ------------------------------------------------------------------------

    def _on_role(self, label: str, role: Role) -> None:
        """Leadership's callback, synchronous: a demotion halts the publisher before anything else runs."""
        lane = self.lanes[label]
        if lane.role is role:
            return
        lane.role = role
        self.metrics.leader_changed(label, role is Role.LEADER)
        if role is Role.LEADER:
            lane.last_confirm = time.monotonic()
            if not self._publish_stop.is_set():
                if lane.spool.depth:
                    # Not (only) an earlier run's events: a standby keeps what it reads until the leader
                    # announces it published them, and a replica is standby until its lock settles.
                    log.info(
                        "realm %s: leading now; the %d events its spool holds go out first (read while this "
                        "replica was standby, as it is at start until it takes the lock, and not announced by "
                        "another replica; or kept by an earlier run)",
                        label, lane.spool.depth,
                    )  # fmt: skip
                lane.start(self._recovered, self._lane_done)
        else:
            lane.halt()

    def _lane_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._fatal.done():
            return
        exc = task.exception()
        if exc is not None:
            self._fatal.set_result(exc)

    def _healthy_leading(self) -> list[str]:
        """Realms this replica leads and publishes now: the announcer's heartbeats say so to the standbys."""
        if not self.broker.connected:
            return []
        now = time.monotonic()
        return [
            lane.realm.fingerprint
            for lane in self.lanes.values()
            if lane.leading and (lane.spool.depth == 0 or now - lane.last_confirm < _PUBLISHING_EVIDENCE)
        ]

    async def _on_announcement(self, fingerprint: str, ids: list[str]) -> None:
        """The Follower's callback: note that the realm's leader is alive; a standby drops what it published.

        An id that matches nothing yet is remembered (``RealmLane.early``): this replica's stream may
        deliver that event later than the leader's did (a replica that was frozen reads its socket's
        backlog and the announcements of it at the same time), and its window must not publish it again.
        """
        lane = self._by_fp.get(fingerprint)
        if lane is None or lane.leading:
            return
        now = time.monotonic()
        self.evidence.heard(fingerprint, now)
        if ids:
            found: set[str] = set()
            with contextlib.suppress(SpoolError):
                await lane.spool.discard(ids, found=found)
            if len(found) < len(ids):
                lane.early.add((i for i in ids if i not in found), now, self._announced_for)

    async def _expire_windows(self, stop: asyncio.Event) -> None:
        """A standby keeps ``--standby-window`` seconds (and bytes), but only while its realm's leader is heard.

        What falls out of the window is published, not dropped: the leader announces every id it had
        confirmed, so an event still here after the window is one the leader never had (its own link
        was down or reconnecting at that moment, or it restarted and won the lock back) or whose
        announcement was lost. Publishing it costs a duplicate at worst (same ``message_id``);
        dropping it would lose it. With no leader heard, a standby keeps everything.
        """
        settings = self.settings
        while not await _wait(stop, _EXPIRE_INTERVAL):
            for lane in self.lanes.values():
                if lane.leading or not lane.spool.depth or not self.evidence.alive(
                    lane.realm.fingerprint, time.monotonic()
                ):
                    continue
                tail = _WindowTail(
                    lane.spool, time.time() - settings.standby_window, settings.standby_window_bytes, lane.early
                )
                try:
                    published = await self._publish_source(tail, tail.finished)
                except SpoolError:
                    log.debug("standby window not trimmed", exc_info=True)
                    continue
                if published:
                    log.warning(
                        "realm %s: published %d events the leader never confirmed (older than the standby "
                        "window: the leader missed them, or its announcements were lost)",
                        lane.realm.label, published,
                    )  # fmt: skip

    # -- health ---------------------------------------------------------------------

    def _spool_health(self) -> dict[str, Any]:
        spools = [lane.spool for lane in self.lanes.values()]
        healths = [spool.health() for spool in spools]
        bad = [h.reason for h in healths if not h.ok]
        carry_depth, carry_bytes = self._carry_totals()
        return {
            "ok": not bad,
            "reason": "; ".join(bad) if bad else "; ".join(dict.fromkeys(h.reason for h in healths)),
            "depth": sum(spool.depth for spool in spools) + carry_depth,
            "bytes": sum(spool.bytes for spool in spools) + carry_bytes,
            "full": any(spool.full for spool in spools),
            # SQLite's level in use, read back from the file's connection: "normal", "full", or "memory".
            "sync": spools[0].synchronous.lower() if spools else MEMORY,
        }

    def readiness(self) -> dict[str, Any]:
        """What /readyz reports: ready while every realm is subscribed, the broker and the lock are up.

        A healthy standby is ready: ``roles`` says which realms this replica leads.
        """
        stream, broker, spool = self.state.health(), self.broker.health(), self._spool_health()
        lock = self.leadership.health()
        reasons: list[str] = []
        for realm, subscribed in stream.subscribed.items():
            if realm in self.rejected:
                reasons.append(f"realm {realm} stopped: the stream rejected its key (not retried; fix it and restart)")
            elif not subscribed:
                why = "awaiting answer" if stream.connected.get(realm) else "stream disconnected"
                reasons.append(f"realm {realm} not subscribed ({why})")
        if not broker.connected:
            reasons.append(f"broker not connected: {broker.error or 'connecting'}")
        elif self.broker.blocked:
            reasons.append("broker blocks publishing (a memory or disk alarm on RabbitMQ): events wait in the spool")
        if not lock.connected:
            reasons.append("leadership lock connection down: this replica cannot lead")
        if spool["full"]:
            reasons.append("spool full: the stream is not being read")
        fatal = [] if spool["ok"] else [f"spool not working: {spool['reason']}"]
        reasons += fatal
        return {
            "ready": not reasons,
            "reasons": reasons,
            "alive": not fatal,
            "fatal": fatal,
            "roles": {label: role.value for label, role in lock.roles.items()},
            "stream": {"connected": stream.connected, "subscribed": stream.subscribed},
            "broker": {"connected": broker.connected, "error": broker.error, "node": broker.node,
                       "blocked": self.broker.blocked},
            "leadership": {"connected": lock.connected, "node": lock.node},
            "spool": spool,
            "publish": {"in_flight": sum(lane.publisher.in_flight for lane in self.lanes.values())},
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
            if isinstance(fatal, RealmRejected):
                await self._other_answers()
        finally:
            await self._shutdown()
        return self._exit_code(fatal)

    async def _other_answers(self, wait: float = 2.0) -> None:
        """Before exiting on a refused key, let the realms still awaiting their first answer have it (at most
        ``wait`` s): every refused key is then named in the log, not only the first, so that one restart
        after fixing them is enough."""
        pending = [task for task, client in self._streams.items() if not task.done() and not client.accepted_once]
        if pending:  # a realm that subscribes meanwhile runs on until the timeout: at most ``wait`` s
            await asyncio.wait(pending, timeout=wait)

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
        self._streams = {
            asyncio.create_task(c.run(self._stream_stop), name=f"stream-{c.realm.label}"): c for c in self.clients
        }
        self._coordinator = asyncio.create_task(self._coordinate(), name="broker")
        self._leader_task = asyncio.create_task(self.leadership.run(self._lock_stop), name="leadership")
        self._background = [
            asyncio.create_task(self._expire_windows(self._coord_stop), name="standby-window"),
            asyncio.create_task(self._publish_carry(), name="carry"),
            asyncio.create_task(
                # Only what this replica publishes is a backlog: a standby's spool is its window, kept, not drained.
                watch_backlog(self._led_depth, self._publishing_any, self._coord_stop),
                name="backlog-progress",
            ),
        ]

    def _leads(self, label: str) -> bool:
        """Whether this replica counts an unroutable event of the realm: it leads it, or, for a realm no longer
        configured (events of an earlier run's spool file, which no replica leads), it publishes such files now."""
        lane = self.lanes.get(label)
        return lane.leading if lane is not None else bool(self._draining)

    def _led_depth(self) -> int:
        """Events in the spools of the realms this replica leads (what it has to publish)."""
        return sum(lane.spool.depth for lane in self.lanes.values() if lane.leading)

    def _publishing_any(self) -> bool:
        return self.broker.connected and any(lane.leading for lane in self.lanes.values())

    async def _coordinate(self) -> None:
        """Connect to RabbitMQ, then announce (leader), follow (standby) and poll the bridge's queues."""
        if not await self.broker.connect(self._publish_stop):
            return
        connection = self.broker.connection
        assert connection is not None
        exchange = self.settings.exchange
        self.announcer = Announcer(connection, exchange, leading=self._healthy_leading, replica=self.replica_id)
        # The follower's queue keeps what was announced while this replica was cut off: read after the
        # reconnect, not republished.
        follower = Follower(
            connection, exchange, self._on_announcement, keep_for=self._announced_for, replica=self.replica_id
        )

        def up() -> bool:
            return self.broker.connected
        await asyncio.gather(
            _keep_running("announcer", self.announcer.run, self._coord_stop, exchange, up),
            _keep_running("follower", follower.run, self._coord_stop, exchange, up),
            self.broker.poll_queues(self._coord_stop),
        )

    async def _publish_carry(self) -> None:
        """Publish what spools of earlier runs kept, whatever this replica's role, then let the realms publish.

        Those events may exist nowhere else (the other replicas may never have received them), so they
        are published even by a standby: at worst duplicates with the same message_id, never a loss.
        """
        try:
            for path in self.carry:
                if self._publish_stop.is_set():
                    return
                await self._drain_file(path)
        finally:
            self._recovered.set()

    def _carry_totals(self) -> tuple[int, int]:
        """Events (and body bytes) waiting in the carry files: they count in ``spool_depth`` and /readyz."""
        depth = sum(s.depth for s in self._draining.values())
        depth += sum(n for path, n in self.carry_depth.items() if path not in self._draining)
        return depth, sum(s.bytes for s in self._draining.values())

    async def _drain_file(self, path: str) -> None:
        spool = await Spool.open(
            path, max_bytes=self.settings.spool_max_bytes, synchronous=self.settings.spool_sync
        )
        log.info("publishing %d events kept by an earlier run in %s", spool.depth, path)
        self._draining[path] = spool
        try:
            await self._publish_source(spool, lambda: spool.depth == 0)
        finally:
            self._draining.pop(path, None)
            self.carry_depth[path] = spool.depth
            report = await spool.close(give_up_after=self.settings.drain_timeout)
        if report.kept == 0 and report.lost == 0 and report.error is None:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + suffix)
            log.info("published every event of %s; file removed", path)
        else:
            log.warning("%s still holds %d events; they are published at the next start", path, report.kept)

    async def _publish_source(self, source: MessageSource, finished: Callable[[], bool]) -> int:
        """Publish from ``source`` with a publisher of its own until ``finished()``; how many were confirmed."""
        confirmed = 0

        def count(_message_id: str) -> None:
            nonlocal confirmed
            confirmed += 1

        publisher = Publisher(self.settings, source, self.metrics, self.broker, on_confirmed=count)
        stop = asyncio.Event()
        task = asyncio.create_task(publisher.run(stop))
        try:
            while not finished() and not self._publish_stop.is_set() and not task.done():
                await _wait(self._publish_stop, 0.05)
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=self.settings.drain_timeout + 2)
            await publisher.drain(self.settings.drain_timeout)
        return confirmed

    async def _watch(self, stop: asyncio.Event) -> BaseException | None:
        """Wait for ``stop``, or for a stream, the broker link or a publisher to fail; return what was fatal."""
        assert self._coordinator is not None and self._leader_task is not None
        stop_wait = asyncio.create_task(stop.wait(), name="stop")
        watched: set[asyncio.Future[Any]] = {stop_wait, self._fatal, self._coordinator, self._leader_task}
        watched |= set(self._streams)
        try:
            while not stop.is_set():
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                watched -= done
                if self._fatal in done:
                    return self._fatal.result()
                for task in done - {stop_wait}:
                    exc = None if task.cancelled() else task.exception()
                    if isinstance(exc, RealmRejected) and self._revoked_while_others_run(task, watched):
                        self._realm_rejected(task, exc)  # the other realms go on
                    elif exc is not None:
                        return exc
                if not set(self._streams) & watched:
                    break
            return None
        finally:
            stop_wait.cancel()

    def _revoked_while_others_run(self, task: asyncio.Future[Any], watched: set[asyncio.Future[Any]]) -> bool:
        """A realm's stream ended with its key refused after it had been accepted (revoked while the bridge
        ran), and another realm's stream still runs.

        A key refused from the first answer is bad configuration: exit 2 at once, as the contract says, so
        that a deploy with a mistyped key fails where it is seen.
        """
        client = self._streams.get(task)
        if client is None or not set(self._streams) & watched:
            return False
        return client.accepted_once or client.realm.fingerprint in self.accepted

    def _realm_rejected(self, task: asyncio.Future[Any], exc: RealmRejected) -> None:
        """One realm's key was revoked while other realms still run: that realm stops, the others go on.

        Exiting (code 2, as for a key refused at the first answer) would stop the events of every realm over
        one revoked key, and the stream has no replay. The realm is not retried; its spool is still
        published; /readyz answers 503, ``realm_rejected`` is 1 and the alert ``OrangepillRealmKeyRejected``
        fires. Exit code 2 comes when no realm is left.
        """
        label = self._streams[task].realm.label
        self.rejected[label] = str(exc)
        self.state.retire(label)
        left = sum(1 for t in self._streams if not t.done())
        log.error("%s; the bridge goes on with its other %d realm(s)", str(exc).rstrip("."), left)
        self._background.append(asyncio.create_task(self._resign_when_drained(label), name=f"resign-{label}"))

    async def _resign_when_drained(self, label: str) -> None:
        """Give a rejected realm's lock up once this replica has published what it had read of it.

        Another replica whose subscription still works then leads it at once (its spool's events go out
        first), instead of publishing them only as its standby window's tail. Published first, so that
        nothing this replica read is left to a standby that never had it; a lone replica keeps nothing.
        """
        lane = self.lanes[label]
        fp = lane.realm.fingerprint
        # Not while it holds events to publish and no other replica leads the realm: a lock lost meanwhile
        # (a broker outage demotes every realm) must come back to this replica, or they would wait until
        # the next start. A standby whose realm another replica leads keeps only its window: it goes at once.
        while (lane.spool.depth or lane.publisher.in_flight) and (
            lane.leading or not self.evidence.alive(fp, time.monotonic())
        ):
            if await _wait(self._coord_stop, 0.5):
                return
        self.leadership.resign(label, "the stream rejected its key on this replica")

    # -- shutdown, in order -------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Unsubscribe, commit, stop publishing and drain confirms, announce them, then release the locks."""
        log.info("stopping: unsubscribing and closing the stream")
        now = time.monotonic()
        # A standby's window in memory goes with the process; while its realm's leader is heard, that leader
        # has (or had) those events: they are not this replica's to lose.
        covered = {
            label for label, lane in self.lanes.items()
            if self.settings.spool == MEMORY and not lane.leading and self.evidence.alive(lane.realm.fingerprint, now)
        }  # fmt: skip
        for label, lane in self.lanes.items():
            if lane.spool.full:
                # Held back, the stream's frames wait in the socket: closing now would drop them.
                log.warning(
                    "realm %s: the spool is full at the stop; what the stream still holds is read into it beyond "
                    "--spool-max-bytes, so that it is not lost (published at the next start)",
                    label,
                )
                lane.spool.lift_bound()
        await self._stop_streams()
        await self._flush_spools()
        unconfirmed = await self._stop_publishing()
        self._coord_stop.set()  # the announcer sends what was confirmed last before the locks go
        await _bounded(self._coordinator, self.settings.drain_timeout + 2)
        for task in self._background:
            await _bounded(task, self.settings.drain_timeout + 2)
        self._lock_stop.set()
        await _bounded(self._leader_task, self.settings.drain_timeout + 2)
        await self.broker.close()
        reports = [await lane.spool.close(give_up_after=self.settings.drain_timeout) for lane in self.lanes.values()]
        lost = 0
        for label, r in zip(self.lanes, reports, strict=True):
            if label not in covered:
                lost += r.lost
            elif r.lost:
                log.warning(
                    "realm %s: %d events of this standby's window were in memory only (--spool memory) and go with "
                    "it; the realm's leader, heard a moment ago, publishes them",
                    label, r.lost,
                )  # fmt: skip
        report = CloseReport(
            kept=sum(r.kept for r in reports), lost=lost, error="; ".join(r.error for r in reports if r.error) or None
        )
        self._lost = report.lost
        if self._http is not None:
            await self._http.cleanup()
        # The files that keep the events: one per realm when there are several (``<stem>.fp-<hex>.db``).
        holders = [lane.spool.path for lane, r in zip(self.lanes.values(), reports, strict=True) if r.kept]
        self._report_leftovers(unconfirmed, report, ", ".join(holders) or self.settings.spool)

    async def _stop_streams(self) -> None:
        """Unsubscribe every realm; cancel the ones that do not finish in time."""
        self._stream_stop.set()
        if not self._streams:
            return
        _, late = await asyncio.wait(self._streams, timeout=_STREAM_STOP_GRACE)
        for task in late:
            task.cancel()

    async def _flush_spools(self) -> None:
        """Commit what the stream read last. Bounded: a disk that refuses commits must not hang the shutdown."""
        for lane in self.lanes.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(lane.spool.flush(), timeout=self.settings.drain_timeout)

    async def _stop_publishing(self) -> int:
        """Stop every publisher at once, then wait (bounded) for the confirms of what is in flight."""
        self._publish_stop.set()
        for lane in self.lanes.values():
            if lane.task is not None:
                lane.halt()
                await _bounded(lane.task, self.settings.drain_timeout + 2)
        drains = [lane.publisher.drain(self.settings.drain_timeout) for lane in self.lanes.values()]
        return sum(await asyncio.gather(*drains))

    def _report_leftovers(self, unconfirmed: int, report: CloseReport, spool: str) -> None:
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
        handled = {task for task, client in self._streams.items() if client.realm.label in self.rejected}
        for task in [*self._streams, *(t for t in (self._coordinator,) if t is not None)]:
            if not task.done() or task.cancelled():
                continue
            exc = task.exception()  # read for each, so that asyncio does not warn of one never retrieved
            # A realm whose key was rejected while others ran was said then: not fatal now.
            if fatal is None and exc is not None and task not in handled:
                fatal = exc
            elif isinstance(exc, RealmRejected) and exc is not fatal and task not in handled:
                log.error("%s", exc)  # every refused key named, not only the one that ended the run
        if fatal is None and self._lost:
            return 1
        if fatal is None:
            if self.rejected:
                log.info("stopped cleanly; realm(s) %s had stopped earlier: the stream rejected the key",
                         ", ".join(self.rejected))  # fmt: skip
            else:
                log.info("stopped cleanly")
            return 0
        if isinstance(fatal, BridgeError):
            log.error("%s", fatal)
            return fatal.exit_code
        log.error("fatal error: %s", fatal, exc_info=fatal)
        return 1


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


async def _bounded(task: asyncio.Task[Any] | None, seconds: float) -> None:
    if task is None:
        return
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.wait_for(task, timeout=seconds)


async def _keep_running(
    name: str,
    run: Callable[[asyncio.Event], Awaitable[None]],
    stop: asyncio.Event,
    exchange: str,
    link_up: Callable[[], bool],
) -> None:
    """Run an HA side task until ``stop``; restart it (after a pause) when it fails.

    A failure while the broker link is down is expected (DEBUG). One with the link up (RabbitMQ
    refusing the task's queue: a user without permission on it) is a replica that cannot follow or
    announce, silently otherwise: a standby that never hears its leader keeps every event and
    publishes its whole spool again at a failover. It is said at ERROR, once per distinct cause,
    again every ``_SIDE_TASK_RETELL`` seconds while it lasts.
    """
    said, said_at = "", 0.0
    while not stop.is_set():
        try:
            await run(stop)
        except Exception as exc:
            now, kind = time.monotonic(), type(exc).__name__  # the text names a fresh queue each time
            if link_up() and (kind != said or now - said_at >= _SIDE_TASK_RETELL):
                said, said_at = kind, now
                why = access_refused(exc, exchange) or f"{kind}: {describe_error(exc)}"
                log.error("ha %s failed with the broker up, retrying every second: %s", name, why)
            else:
                log.debug("ha %s stopped (%s); restarting", name, kind, exc_info=True)
            await _wait(stop, 1.0)


class EarlyIds:
    """Message ids a standby heard announced before its own stream delivered the event, for a while.

    Bounded in time (``keep_for`` seconds after the announcement) and in count (the oldest go first).
    """

    def __init__(self, max_ids: int = 200_000) -> None:
        self._until: dict[str, float] = {}  # insertion order = announcement order
        self._max = max_ids

    def __len__(self) -> int:
        return len(self._until)

    def add(self, ids: Iterable[str], now: float, keep_for: float) -> None:
        until = self._until
        for message_id in ids:
            until.pop(message_id, None)
            until[message_id] = now + keep_for
        self._trim(now)

    def seen(self, message_id: str) -> bool:
        """Whether ``message_id`` was announced (and not long ago); forgets it."""
        self._trim(time.monotonic())
        return self._until.pop(message_id, None) is not None

    def _trim(self, now: float) -> None:
        until = self._until
        while until:
            oldest = next(iter(until))
            if until[oldest] > now and len(until) <= self._max:
                break
            del until[oldest]


class _WindowTail:
    """A standby's spool as a publisher source that hands out only what fell out of the window.

    Messages come oldest first; the first one still inside the window (received after ``cutoff``,
    and within the byte budget) ends the tail: it and anything after it go straight back.
    """

    def __init__(self, spool: Spool, cutoff: float, max_bytes: int, early: EarlyIds | None = None) -> None:
        self._spool = spool
        self._cutoff = cutoff
        self._over = max(0, spool.bytes - max_bytes)  # body bytes beyond the budget, oldest first
        self._early = early or EarlyIds()
        self.done = False

    def finished(self) -> bool:
        """Whether the tail has been published (the first message inside the window was reached)."""
        return self.done

    async def get_batch(self, max_n: int) -> list[Spooled]:
        if self.done or not self._spool.depth:
            self.done = True
            await asyncio.Event().wait()  # the caller stops the publisher, which cancels this wait
        try:
            # Committed only (the window is what is on disk); not for ever: once what is left is in
            # flight, nothing more comes until the stream sends again, and the tail is over.
            batch = await asyncio.wait_for(self._spool.get_batch(max_n, early=False), _TAIL_IDLE)
        except TimeoutError:
            self.done = True
            return []
        out: list[Spooled] = []
        announced: list[int] = []
        for n, item in enumerate(batch):
            size = len(item.msg.body)
            if item.msg.received_at >= self._cutoff and self._over <= 0:
                self._spool.release(batch[n:])
                self.done = True
                break
            self._over -= size
            if self._early.seen(item.msg.message_id):
                announced.append(item.id)  # the leader published it: heard before this replica read it
            else:
                out.append(item)
        if announced:
            self._spool.ack(announced)
        return out

    def ack(self, ids: Iterable[int]) -> None:
        self._spool.ack(ids)

    def release(self, items: Iterable[Spooled]) -> None:
        self._spool.release(items)


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
        carry = await _set_aside_earlier_runs(settings)
        spools = await _open_spools(settings, metrics)
    except BridgeError as exc:
        log.error("%s", exc)
        return exc.exit_code
    bridge = Bridge(settings, metrics, spools)
    bridge.carry = list(carry)
    bridge.carry_depth = dict(carry)
    try:
        return await bridge.run(stop)
    except BridgeError as exc:
        log.error("%s", exc)
        for spool in spools.values():
            with contextlib.suppress(Exception):
                await spool.close()
        return exc.exit_code


async def _set_aside_earlier_runs(settings: Settings) -> dict[str, int]:
    """Move spool files that still hold events of an earlier run aside (``<file>.carry-<ms>``); every carry
    file, oldest first, with how many events it holds.

    Each realm then starts with a fresh spool (a standby's window must hold only what it received),
    and the bridge publishes the carry files first. This also covers a ``--spool PATH`` file written
    by a single-spool version with several realms: its events are published, never dropped.
    """
    if settings.spool == MEMORY:
        return {}
    found, existing, orphans = _earlier_files(settings)
    depths: dict[str, int] = {}
    for path in existing:
        try:
            earlier = await Spool.open(path, max_bytes=settings.spool_max_bytes, synchronous=settings.spool_sync)
        except SpoolError as exc:
            if path not in orphans:
                raise
            # A realm file of another layout that another process holds (two bridges sharing one
            # directory): theirs, not ours.
            log.warning("spool %s belongs to no configured realm and cannot be opened (%s); left alone", path, exc)
            continue
        depth = earlier.depth
        report = await earlier.close(give_up_after=settings.drain_timeout)
        if not depth:
            continue
        if report.error:
            raise SpoolError(f"spool {path}: cannot set aside the events of an earlier run: {report.error}")
        carry = f"{path}.carry-{int(time.time() * 1000)}"
        _move_spool_file(path, carry)
        log.info(
            "spool %s holds %d events from an earlier run; publishing them first (moved to %s)", path, depth, carry
        )
        found.append(carry)
        depths[carry] = depth
    return {path: depths[path] if path in depths else await _depth_of(path, settings) for path in sorted(set(found))}


async def _depth_of(path: str, settings: Settings) -> int:
    """Events a carry file of an earlier start holds (read at start, for the gauges); 0 if it cannot be read now."""
    try:
        spool = await Spool.open(path, max_bytes=settings.spool_max_bytes, synchronous=settings.spool_sync)
    except SpoolError:
        return 0
    depth = spool.depth
    await spool.close(give_up_after=settings.drain_timeout)
    return depth


def _move_spool_file(path: str, to: str) -> None:
    """Rename a closed spool file together with its WAL; the shared-memory index is rebuilt on open.

    A clean close checkpoints the WAL into the file, but a checkpoint that cannot write (a full
    disk) leaves the committed rows in the WAL only: it must travel with the file, never be dropped.
    """
    os.replace(path, to)
    with contextlib.suppress(FileNotFoundError):
        os.replace(path + "-wal", to + "-wal")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + "-shm")


_FINGERPRINT: Final = re.compile(r"fp-[0-9a-f]{12}")


class AcceptedKeys:
    """The fingerprints of the realm keys the stream has accepted, kept next to the spool (``<spool>.accepted``).

    A key refused at its first answer of a run is bad configuration (exit 2), unless it was accepted in an
    earlier run: then it was revoked, and a restart (a crash, a reboot, a deploy) must not stop the other
    realms over it. Fingerprints only, never a key; nothing is kept with ``--spool memory``.
    """

    def __init__(self, spool: str) -> None:
        self.path = None if spool == MEMORY else spool + ".accepted"
        self._known: set[str] = set()
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as f:
                lines = f.read(1024**2).decode("ascii", "replace").splitlines()
        except FileNotFoundError:
            return  # a first start: no key accepted yet
        except OSError as exc:
            log.warning("%s cannot be read (%s): every refused key is taken for a new one", self.path, exc)
            return
        # Only whole fingerprint lines count: a torn or foreign line is skipped (and left out at the next write).
        self._known = {line.strip() for line in lines if _FINGERPRINT.fullmatch(line.strip())}

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self._known

    def add(self, fingerprint: str) -> None:
        """Remember a key the stream accepted: the file is written again, whole, when the key is new to it or
        the file is gone (deleted while the bridge ran); a temporary file renamed over it, never a torn line."""
        if self.path is None or (fingerprint in self._known and os.path.exists(self.path)):
            return
        self._known.add(fingerprint)
        temporary = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "w", encoding="ascii") as f:
                f.write("".join(f"{fp}\n" for fp in sorted(self._known)))
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            log.warning("%s cannot be written (%s): a restart after this key is revoked exits 2", self.path, exc)


def _earlier_files(settings: Settings) -> tuple[list[str], list[str], set[str]]:
    """Carry files left by earlier starts, the spool files that exist, and which of those are orphans.

    Spool files are ``--spool`` itself, each configured realm's file, and the realm files of any
    other set of realms next to it (``<stem>.fp-<12 hex>.db``): a bridge that ran with two realms
    and now runs with one (or other ones) publishes what those files kept instead of stranding it.
    """
    fps = [realm.fingerprint for realm in settings.realms]
    ours = list(dict.fromkeys([settings.spool, *spool_paths(settings.spool, fps).values()]))
    realm_files = realm_spool_glob(settings.spool)
    orphans = {found for found in glob.glob(realm_files) if found not in ours}
    paths = [*ours, *sorted(orphans)]
    carry = [
        found
        for pattern in [*(glob.escape(path) for path in ours), realm_files]
        for found in glob.glob(pattern + ".carry-*")
        if not found.endswith(("-wal", "-shm", "-journal"))
    ]
    return carry, [path for path in paths if os.path.exists(path)], orphans


async def _open_spools(settings: Settings, metrics: Metrics) -> dict[str, Spool]:
    """One spool per realm (``ha.spool_paths``); the byte bound is shared evenly; gauges show the sum."""
    paths = spool_paths(settings.spool, [r.fingerprint for r in settings.realms])
    spools: dict[str, Spool] = {}

    def report(_stats: SpoolStats) -> None:
        metrics.spool_full_now(any(s.full for s in spools.values()))

    share = max(1, settings.spool_max_bytes // max(1, len(settings.realms)))
    try:
        for realm in settings.realms:
            spools[realm.label] = await Spool.open(
                paths[realm.fingerprint], max_bytes=share, on_stats=report, synchronous=settings.spool_sync
            )
    except BaseException:
        for spool in spools.values():
            with contextlib.suppress(Exception):
                await spool.close()
        raise
    metrics.watch_spools(spools.values())
    return spools
