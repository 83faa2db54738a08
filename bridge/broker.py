"""The RabbitMQ connection: connect, declare the topology, report health, poll the bridge's queues.

Reconnection is aio-pika's robust connection. This module adds only what it
lacks: the first-connect retry and one state value (``LinkState``) whose setter
logs every change and drives the ``amqp_connected`` gauge. ``bridge.publisher``
publishes on the channel this module opens.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ExchangeType,
)
from aiormq.abc import AbstractChannel as RawChannel

from bridge.backoff import Backoff, Verdict, classify
from bridge.bindings import declare_bindings
from bridge.config import Settings
from bridge.contract import APP_ID, ORIGINAL_ROUTING_KEY, Topology, header_text
from bridge.errors import TopologyError
from bridge.metrics import Metrics
from bridge.nodes import NoNodeAvailable, connect_robust_nodes, node_in_use, node_of, with_default_heartbeat
from bridge.secrets import LogScrubber
from bridge.tls import amqp_connect_kwargs

__all__ = [
    "Broker",
    "BrokerHealth",
    "LinkState",
    "access_refused",
    "connect_for_command",
    "connection_blocked",
    "declare_topology",
    "describe_error",
    "message_copy",
    "permissions_needed",
]

log = logging.getLogger(__name__)

QUEUE_POLL_INTERVAL = 10.0
_RECONNECT_INTERVAL = 1.0
_PUBLISH_HEARTBEAT = 10.0  # AMQP heartbeat of the publishing connection unless its URL sets one (s)
_STILL_DOWN_EVERY = 60.0  # a broker that stays down at start: a reminder this often (seconds)
_DOWN_TEXTS_MAX = 32  # distinct error texts logged at WARNING per outage; then only the reminder


class LinkState(enum.Enum):
    """Where the RabbitMQ link stands (the only connection state the bridge keeps)."""

    CONNECTING = "connecting"  # first connect not made yet
    UP = "up"
    DOWN = "down"  # lost; aio-pika is reconnecting
    CLOSED = "closed"  # closed by us


@dataclass(frozen=True, slots=True)
class BrokerHealth:
    """What /readyz shows of the broker link."""

    connected: bool
    error: str
    node: str | None = None  # host:port of the node in use


async def connect_for_command(settings: Settings, verb: str, *, robust: bool = False) -> AbstractConnection | None:
    """A connection for a command (``tail``, ``reroute``); None, having said why, if unreachable.

    ``robust``: aio-pika reconnects it after a loss and restores its channels, queues, bindings and
    consumers (``tail``); a plain one ends with the loss (``reroute`` must stop, not carry on).
    """
    connect = aio_pika.connect_robust if robust else aio_pika.connect
    try:
        connection: AbstractConnection = await connect(settings.amqp_url, timeout=10, **amqp_connect_kwargs(settings))
    except Exception as exc:
        scrub = LogScrubber(settings.realm_keys, settings.passwords)
        print(f"{verb}: cannot reach the broker: {scrub(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return None
    return connection


async def _own_queue(connection: AbstractConnection, channel: AbstractChannel, name: str) -> AbstractQueue:
    """Declare one of the bridge's own durable queues; one that exists with other arguments is used as it is.

    Someone may have declared it first as a quorum queue, or with a length limit: that is theirs to
    choose, and refusing it would stop the bridge. The attempt runs on a channel of its own, because
    RabbitMQ closes the channel of a declaration it refuses.
    """
    side = await connection.channel()
    try:
        await side.declare_queue(name, durable=True)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        log.warning("queue %s already exists with other arguments (%s); using it as it is", name, _reply_text(exc))
        return await channel.declare_queue(name, passive=True)
    finally:
        if not side.is_closed:
            await side.close()
    # Declared on the (robust) channel as well, as before: a reconnect re-declares it, and recreates it if gone.
    return await channel.declare_queue(name, durable=True)


def _reply_text(exc: BaseException) -> str:
    """The broker's words in a channel or connection error (``PRECONDITION_FAILED - …``), shortened."""
    text = str(exc.args[1] if len(exc.args) > 1 else exc)
    return text[:300]


def message_copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """A received message with its body and every property, and ``headers``, to publish again."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=message.delivery_mode or aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
        # user_id is left out: RabbitMQ refuses a user_id other than the connection's own user.
    )


def _in_background(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` as a task of its own, kept referenced until it ends."""
    task = asyncio.ensure_future(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Future[None]] = set()


def connection_blocked(connection: object) -> bool:
    """Whether RabbitMQ has blocked this aiormq connection (``connection.blocked``: a memory or disk alarm).

    While blocked, RabbitMQ reads nothing from it: publishes wait in the socket, unconfirmed, and
    each one resent meanwhile is one more copy delivered once the alarm clears. aiormq keeps the
    state in a private event (and logs the change); read it here, in one place.
    """
    unblocked = getattr(connection, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()


def permissions_needed(exchange: str) -> str:
    """What the bridge's RabbitMQ user must be allowed, as a ``rabbitmqctl set_permissions`` line.

    Every name the bridge declares, binds or consumes starts with the exchange's name (the exchange, its
    ``.unrouted``, ``.quarantine``, ``.ha`` and ``.leader.*``, and the private queues under them), so one
    pattern covers them all; ``--bind`` queues are named by the user and need the same three permissions.
    """
    pattern = "^" + re.escape(exchange).replace("\\-", "-") + r"(\..*)?$"
    return (
        f"configure, write and read permission on every name matching {pattern} (and on the queues of --bind): "
        f"rabbitmqctl set_permissions -p VHOST USER '{pattern}' '{pattern}' '{pattern}'"
    )


def access_refused(exc: BaseException, exchange: str) -> str | None:
    """The operator's message for an ACCESS_REFUSED from RabbitMQ, or None for any other error."""
    if not isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return None
    return f"RabbitMQ refused access ({describe_error(exc)}); the bridge's user needs {permissions_needed(exchange)}"


async def declare_topology(
    connection: AbstractConnection, settings: Settings, *, confirms: bool
) -> tuple[AbstractChannel, AbstractExchange, bool]:
    """Declare the exchange, the quarantine queue and (with ``keep``) the alternate exchange and queue.

    Returns:
        The channel to publish on, the topic exchange, and whether the
        alternate exchange is attached (False when the exchange already existed
        without it: returned events are then moved to the unrouted queue by us).

    Raises:
        TopologyError: the exchange cannot be used at all.
    """
    names = Topology(settings.exchange)
    keep = settings.unroutable == "keep"
    channel = await connection.channel(publisher_confirms=confirms, on_return_raises=False)
    await _own_queue(connection, channel, names.quarantine)
    arguments: dict[str, Any] = {}
    if keep:
        unrouted_x = await channel.declare_exchange(names.unrouted, ExchangeType.FANOUT, durable=True)
        unrouted_q = await _own_queue(connection, channel, names.unrouted)
        await unrouted_q.bind(unrouted_x)
        arguments["alternate-exchange"] = names.unrouted
    try:
        exchange = await channel.declare_exchange(
            names.exchange, ExchangeType.TOPIC, durable=True, arguments=arguments or None
        )
        return channel, exchange, keep
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        # The exchange exists with other arguments. Without the alternate exchange it still routes
        # by pattern; another type (fanout, direct) or a transient exchange breaks the contract.
        wrong = _WRONG_KIND.search(str(exc))
        if wrong is not None:
            raise TopologyError(
                f"exchange {names.exchange} already exists as {_describe_kind(wrong.group(1), wrong.group(2))}; the "
                "bridge needs a durable topic exchange (routing key = event name, bound by patterns such as "
                f"transaction.#). Delete it (rabbitmqadmin delete exchange name={names.exchange}, or in the "
                "management UI) or choose another --exchange"
            ) from None
        log.warning(
            "exchange %s already exists with different arguments; using it as it is. Unroutable "
            "events are still kept: the bridge publishes with mandatory and moves returned events "
            "to queue %s itself. To attach the alternate exchange on the broker instead, use a "
            "policy: rabbitmqctl set_policy AE '^%s$' '{\"alternate-exchange\":\"%s\"}' "
            "--apply-to exchanges",
            names.exchange, names.unrouted, names.exchange.replace(".", "\\."), names.unrouted,
        )  # fmt: skip
    # The failed declare closed that channel: a second one, once per connect (no leak).
    channel = await connection.channel(publisher_confirms=confirms, on_return_raises=False)
    try:
        exchange = await channel.get_exchange(names.exchange, ensure=True)
    except aiormq.exceptions.AMQPError as exc:
        raise TopologyError(f"exchange {names.exchange} cannot be used: {describe_error(exc)}") from None
    return channel, exchange, False


# RabbitMQ's 406 text for a declare that disagrees with the existing exchange, on a property the
# contract depends on: "inequivalent arg 'type' for exchange 'x' in vhost '/': received 'topic' but
# current is 'fanout'" (or 'durable', 'auto_delete', 'internal').
_WRONG_KIND: Final = re.compile(r"inequivalent arg '(type|durable|auto_delete|internal)'.*?current is '([^']*)'")


def _describe_kind(arg: str, current: str) -> str:
    if arg == "type":
        return f"a {current} exchange"
    if arg == "durable":
        return "a transient (not durable) exchange" if current == "false" else "a durable exchange"
    return f"an exchange with {arg}={current}"


class _DownLog:
    """The connect loop's log: ``broker down`` once, then only when the error changes or a minute passed.

    Each retry in between is logged at DEBUG (the backoff reaches ``--reconnect-max``, 30 s by
    default, but starts at ``--reconnect-min``: a line per attempt would flood the log).
    """

    def __init__(self) -> None:
        self.attempts = 0
        self.since = time.monotonic()
        self._said: set[str] = set()  # every error text already logged (one per node of a cluster)
        self._said_at = 0.0

    def failed(self, error: str, delay: float) -> None:
        self.attempts += 1
        now = time.monotonic()
        if error not in self._said and len(self._said) < _DOWN_TEXTS_MAX:
            log.warning("broker down: %s; retrying in %.1fs", error, delay)
        elif now - self._said_at >= _STILL_DOWN_EVERY:
            log.warning(
                "broker still down after %d attempts in %.0fs: %s; retrying in %.1fs",
                self.attempts, now - self.since, error, delay,
            )  # fmt: skip
        else:
            log.debug("broker down: %s; retrying in %.1fs (attempt %d)", error, delay, self.attempts)
            return
        self._said.add(error)
        self._said_at = now


class Broker:
    """One robust RabbitMQ connection with the bridge's topology, for the bridge's lifetime."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.topology = Topology(settings.exchange)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None  # publishing, with confirms
        self._poll_channel: AbstractChannel | None = None  # queue depths only (see poll_once)
        self._state = LinkState.CONNECTING
        self._up = asyncio.Event()  # mirrors state is UP, for waiting; written only by _set_state
        self.alternate_exchange = False
        self.last_error = "not connected yet"
        self.reconnected_callbacks: list[Callable[[], None]] = []
        # Whether this process counts an unroutable event of a realm (by label): the app says "if it leads it".
        self.counts_realm: Callable[[str], bool] = lambda _label: True
        self._restoring = asyncio.Lock()  # one restore of the bridge's own queues at a time
        self._guard = _UnroutedGuard(self)

    # -- state --------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        """Where the link stands."""
        return self._state

    @property
    def connection(self) -> AbstractRobustConnection | None:
        """The robust connection, once made (aio-pika keeps it alive across reconnects)."""
        return self._connection

    @property
    def connected(self) -> bool:
        """True while the connection and its channel are open."""
        return self._state is LinkState.UP

    def _set_state(self, state: LinkState, error: str = "") -> None:
        if state is LinkState.UP:
            self.last_error = ""
        elif error:
            self.last_error = error
        if state is not self._state:
            log.debug("broker link %s -> %s", self._state.value, state.value)
            self._state = state
        if state is LinkState.UP:
            self._up.set()
        else:
            self._up.clear()
        self._metrics.amqp_up(state is LinkState.UP)

    async def wait_up(self) -> None:
        """Wait until the link is up."""
        await self._up.wait()

    @property
    def node(self) -> str | None:
        """``host:port`` of the RabbitMQ node in use (or being reconnected to), None before the first connect."""
        connection = self._connection
        return None if connection is None else node_in_use(connection)

    @property
    def blocked(self) -> bool:
        """RabbitMQ has blocked the publishing connection (a resource alarm): nothing is published meanwhile."""
        transport = getattr(self._connection, "transport", None)
        return self.connected and connection_blocked(getattr(transport, "connection", None))

    def health(self) -> BrokerHealth:
        """The link's health for /readyz."""
        return BrokerHealth(connected=self.connected, error=self.last_error, node=self.node)

    # -- connection ---------------------------------------------------------------

    async def connect(self, stop: asyncio.Event) -> bool:
        """Connect (retrying with backoff while the broker is down) and declare the topology.

        aio-pika's ``connect_robust`` raises when the broker is down at the first
        attempt. Its ``fail_fast=false`` retries instead, but at a fixed interval,
        with a warning per attempt from the library, no error text for /readyz and
        no way to give up on ``stop`` short of closing: hence this small loop.

        Returns:
            False when ``stop`` was set before a connection was made.

        Raises:
            TopologyError: RabbitMQ refused the layout in a way a retry cannot fix.
        """
        backoff = Backoff(self._settings.reconnect_min, self._settings.reconnect_max, float("inf"))
        tls = amqp_connect_kwargs(self._settings)  # built once: the CA and client files are read here
        # A silent link (a partition: no FIN, no RST) is found by the heartbeat after 3 x (heartbeat + 1) s;
        # with RabbitMQ's 60 s that is 3 minutes of "connected" while nothing gets through.
        nodes = [with_default_heartbeat(url, _PUBLISH_HEARTBEAT) for url in self._settings.amqp_nodes]
        start = 0
        told = _DownLog()
        while not stop.is_set():
            try:
                # One node per attempt, the next one after each failure; once connected, aio-pika's
                # reconnect loop moves through the nodes by itself (bridge.nodes).
                connection = await connect_robust_nodes(
                    nodes,
                    start=start,
                    single_attempt=True,
                    attempt_timeout=10,
                    reconnect_interval=_RECONNECT_INTERVAL,
                    client_properties={"connection_name": APP_ID},
                    **tls,
                )
            except Exception as exc:
                cause = exc.__cause__ if isinstance(exc, NoNodeAvailable) and exc.__cause__ else exc
                if classify(cause) is Verdict.GIVE_UP:
                    raise cause from None
                delay = backoff.next_delay(None)
                self.last_error = f"broker unreachable at {node_of(nodes[start % len(nodes)])}: {describe_error(cause)}"
                told.failed(self.last_error, delay)
                start = (start + 1) % len(nodes)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                continue
            await self._adopt(connection)
            return True
        return False

    async def _adopt(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        try:
            channel, _, alternate = await declare_topology(connection, self._settings, confirms=True)
            self._channel, self.alternate_exchange = channel, alternate
            if self._settings.bindings:
                await self._declare_bindings(connection)
            if alternate:
                await self._tap_unrouted(connection)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            await connection.close()
            raise TopologyError(access_refused(exc, self.topology.exchange) or str(exc)) from None
        except BaseException:
            await connection.close()
            raise
        self._metrics.amqp_connect()
        self._set_state(LinkState.UP)
        log.info(
            "broker up node=%s exchange=%s alternate_exchange=%s",
            self.node, self.topology.exchange, alternate,
        )  # fmt: skip

    async def _declare_bindings(self, connection: AbstractRobustConnection) -> None:
        """Declare the configured consumer queues (quorum) and their bindings, once per connect."""
        side = await connection.channel()
        try:
            await declare_bindings(side, self.topology.exchange, self._settings.bindings)
        finally:
            await side.close()

    async def _tap_unrouted(self, connection: AbstractRobustConnection) -> None:
        """Count events the alternate exchange takes.

        RabbitMQ confirms an event routed to the alternate exchange like any
        other, so the publisher never hears of it. A private queue bound to the
        (fanout) alternate exchange sees a copy of each; the bridge counts and
        drops the copies, the originals stay in ``<exchange>.unrouted``.
        """
        channel = await connection.channel()
        tap = await channel.declare_queue(
            f"{self.topology.unrouted}.tap.{uuid.uuid4().hex[:8]}",
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": 10_000},
        )
        await tap.bind(self.topology.unrouted)
        metrics = self._metrics

        async def count(message: AbstractIncomingMessage) -> None:
            # Every replica's tap sees every copy (and those of `reroute`): only the replica that leads
            # the event's realm counts it, so a standby does not raise the alert and the sum is right.
            if self.counts_realm(header_text((message.headers or {}).get("realm"))):
                metrics.unroutable()
                self._guard.saw(message)

        await tap.consume(count, no_ack=True)

    def _on_connection_lost(self, _sender: object, exc: BaseException | None = None) -> None:
        if self._state is LinkState.UP:
            error = f"broker connection lost: {describe_error(exc) if exc else 'closed'}"
            log.warning("broker down: %s; aio-pika reconnects every %gs", error, _RECONNECT_INTERVAL)
            self._set_state(LinkState.DOWN, error)
        elif self._state is not LinkState.CLOSED:
            # aio-pika calls this for each reconnect attempt that fails too: /readyz says why the latest
            # failed (the node refuses connections now), not why the link went minutes ago.
            node = getattr(self._connection, "closed_node", "") or self.node or "?"
            self._set_state(LinkState.DOWN, f"broker unreachable at {node}: {describe_error(exc)}" if exc else "")

    def _on_reconnected(self, _sender: object) -> None:
        self._metrics.amqp_connect()
        self._set_state(LinkState.UP)
        log.info("broker up again node=%s", self.node)
        for callback in self.reconnected_callbacks:
            callback()
        connection = self._connection
        if self._settings.bindings and connection is not None:
            # "Each time the bridge connects": a --bind queue deleted meanwhile (or lost with a node) comes back.
            _in_background(self._bind_again(connection))

    def exchange_gone(self, exc: BaseException) -> None:
        """A publish found no exchange: someone deleted it while the bridge ran (RabbitMQ says NOT_FOUND).

        aio-pika's channel restore declares it again, with its alternate exchange; the bindings went
        with it. Said at WARNING; the ``--bind`` queues are bound again; other consumers must bind again.
        """
        log.warning(
            "the exchange %s was gone (%s): deleted while the bridge ran? It is declared again, but RabbitMQ "
            "deleted every binding with it: until the consumers bind their queues again, events go to %s%s",
            self.topology.exchange, _reply_text(exc), self.topology.unrouted,
            " (the --bind queues are bound again now)" if self._settings.bindings else "",
        )  # fmt: skip
        connection = self._connection
        if self._settings.bindings and connection is not None:
            _in_background(self._bind_again(connection, delay=0.5))

    async def _bind_again(self, connection: AbstractRobustConnection, delay: float = 0.0) -> None:
        for attempt in range(3):  # after an exchange was deleted, aio-pika's channel restore declares it first
            await asyncio.sleep(delay + attempt)
            try:
                await self._declare_bindings(connection)
                return
            except Exception as exc:
                why = describe_error(exc)
        log.warning("the --bind queues could not be declared and bound again: %s", why)

    async def raw_channel(self) -> RawChannel | None:
        """The current aiormq channel under the publishing channel (aio-pika reopens it after a reconnect)."""
        channel = self._channel
        if channel is None or not self.connected:
            return None
        try:
            return await asyncio.wait_for(channel.get_underlay_channel(), timeout=5)
        except (TimeoutError, aiormq.exceptions.AMQPError, RuntimeError):
            return None

    async def put_back_unrouted(self, copies: list[AbstractIncomingMessage]) -> None:
        """Publish these tap copies into ``<exchange>.unrouted`` (original routing key in a header), confirmed."""
        connection = self._connection
        if connection is None or not copies:
            return
        channel = await connection.channel(publisher_confirms=True)
        try:
            for copy in copies:
                headers = dict(copy.headers or {})
                headers.setdefault(ORIGINAL_ROUTING_KEY, copy.routing_key or "")
                await channel.default_exchange.publish(
                    message_copy(copy, headers), routing_key=self.topology.unrouted,
                    timeout=self._settings.publish_timeout,
                )
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        log.warning("put %d unroutable events back into %s", len(copies), self.topology.unrouted)

    async def close(self) -> None:
        """Close the RabbitMQ connection."""
        connection, self._connection = self._connection, None
        self._set_state(LinkState.CLOSED)
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()
        self._set_state(LinkState.CLOSED)

    # -- the bridge's own queues -----------------------------------------------------

    async def poll_queues(self, stop: asyncio.Event) -> None:
        """Export the depth of the unrouted and quarantine queues every 10 s until ``stop``."""
        while not stop.is_set():
            if self.connected:
                try:
                    await self.poll_once()
                except Exception:  # a depth gauge must never take the bridge down
                    log.debug("queue depth poll failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=QUEUE_POLL_INTERVAL)

    async def poll_once(self) -> None:
        """Read the depth of the bridge's own queues once, on the one polling channel.

        The channel is kept and reused: opening and closing one per poll leaks two
        close callbacks per cycle on the connection in aiormq 7.2 (see
        docs/aiormq-closing-observer-leak.md). It is not the publishing channel,
        because a 404 on a passive declare closes the channel it ran on. The
        declare goes to the aiormq channel underneath, so that the robust channel
        does not remember the queue and re-declare it after each reopen.
        """
        if self._connection is None:
            return
        for name in self._kept_queues:
            depth = await self.queue_depth(name)
            if depth is None:  # deleted while the bridge runs: what goes there would be lost
                await self.restore_own_queues()
                depth = 0
            self._metrics.queue_depth(name.rsplit(".", 1)[1], depth)

    @property
    def _kept_queues(self) -> tuple[str, ...]:
        """The bridge's own queues in use: the quarantine, and the unrouted queue unless ``--unroutable drop``."""
        keep = self._settings.unroutable == "keep"
        return tuple(name for name in self.topology.own_queues if keep or name != self.topology.unrouted)

    async def queue_depth(self, name: str) -> int | None:
        """Messages in one of the bridge's queues (a passive declare on the polling channel); None if it is gone.

        Raises:
            ConnectionError: not connected.
        """
        connection = self._connection
        if connection is None:
            raise ConnectionError("not connected")
        if self._poll_channel is None or self._poll_channel.is_closed:
            self._poll_channel = await connection.channel()
        raw = await self._poll_channel.get_underlay_channel()
        try:
            declared = await raw.queue_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None  # the 404 closed the polling channel: a new one next time
        except asyncio.CancelledError as exc:
            # aiormq may hand the channel's 404 to a waiting call as a CancelledError carrying the reply.
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or "NOT_FOUND" not in str(exc):
                raise
            return None
        return int(declared.message_count or 0)

    async def restore_own_queues(self) -> list[str]:
        """Declare again the bridge's own queues that are gone (someone deleted them while it ran); their names.

        Without ``<exchange>.unrouted`` the alternate exchange routes unroutable events nowhere and
        RabbitMQ confirms them: they would be dropped. Without ``<exchange>.quarantine`` a quarantine
        publish is returned. Each one declared again is said at WARNING.
        """
        connection = self._connection
        if connection is None:
            return []
        async with self._restoring:
            restored: list[str] = []
            for name in self._kept_queues:
                if await self.queue_depth(name) is not None:
                    continue
                side = await connection.channel()
                try:
                    queue = await side.declare_queue(name, durable=True)
                    if name == self.topology.unrouted:
                        exchange = await side.declare_exchange(name, ExchangeType.FANOUT, durable=True)
                        await queue.bind(exchange)
                finally:
                    with contextlib.suppress(Exception):
                        await side.close()
                restored.append(name)
                log.warning(
                    "queue %s was gone (deleted while the bridge ran?); declared it again. What RabbitMQ had "
                    "routed to it is lost to it; unroutable events the bridge saw meanwhile are put back",
                    name,
                )
            return restored


class _UnroutedGuard:
    """Notices that ``<exchange>.unrouted`` was deleted under the alternate exchange, and puts back what fell.

    With the queue gone the alternate exchange still routes each unroutable event to the bridge's tap
    (so RabbitMQ confirms it and returns nothing), and nowhere else: the event is dropped. The tap
    keeps the copies it saw since the queue was last seen (at most ``_GUARD_MAX``), and at most once a
    second looks: still there, the copies are let go; gone, it is declared again and the copies are
    published into it (with ``original_routing_key``, as the bridge keeps a returned event), confirmed.
    At worst an event is in the queue twice (same ``message_id``), never nowhere.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._copies: collections.deque[AbstractIncomingMessage] = collections.deque(maxlen=_GUARD_MAX)
        self._scheduled = False
        self._last = 0.0

    def saw(self, message: AbstractIncomingMessage) -> None:
        self._copies.append(message)
        if not self._scheduled:
            self._scheduled = True
            delay = max(0.0, self._last + _GUARD_EVERY - time.monotonic())
            asyncio.get_running_loop().call_later(delay, self._spawn)

    def _spawn(self) -> None:
        _in_background(self._check())

    async def _check(self) -> None:
        self._last = time.monotonic()
        seen = list(self._copies)  # copies that arrive during the check wait for the next one
        self._scheduled = False
        try:
            gone = await self._broker.queue_depth(self._broker.topology.unrouted) is None
            if gone:
                await self._broker.restore_own_queues()
                await self._broker.put_back_unrouted(seen)
        except Exception:  # the link went: the next copy, or the reconnect's declare, takes it from here
            log.debug("unrouted queue check failed", exc_info=True)
            return
        for _ in range(min(len(seen), len(self._copies))):
            self._copies.popleft()
        if self._copies and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(_GUARD_EVERY, self._spawn)


_GUARD_EVERY: Final = 1.0
_GUARD_MAX: Final = 10_000  # the tap's own x-max-length


def describe_error(exc: BaseException | None) -> str:
    """A short ``Type: text`` description of an exception, for logs and /readyz."""
    if exc is None:
        return "unknown error"
    if isinstance(exc, asyncio.CancelledError):
        # aiormq ends a connection whose heartbeats stopped by cancelling its reader.
        return "the connection stopped answering (no heartbeat or data from the broker)"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
