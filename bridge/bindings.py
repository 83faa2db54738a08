"""Topology as configuration: durable quorum queues bound to patterns, declared at start.

``--bind QUEUE=PATTERN[,PATTERN…]`` (repeatable), ``BRIDGE_BINDINGS``
(``;``-separated ``QUEUE=PATTERN,…`` items) or a ``[[bindings]]`` table in the
TOML file (``queue = "…"``, ``patterns = ["…"]``). The queues exist from the
bridge's first second, so events are kept even before any consumer runs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiormq
from aio_pika.abc import AbstractChannel, AbstractQueue

from bridge.errors import ConfigError
from bridge.topic import pattern_problem

__all__ = ["Binding", "declare_bindings", "parse_bind", "parse_bindings"]

log = logging.getLogger(__name__)

_QUEUE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,255}$")
QUORUM: Final = {"x-queue-type": "quorum"}


@dataclass(frozen=True, slots=True)
class Binding:
    """One queue and the patterns it is bound to on the events exchange."""

    queue: str
    patterns: tuple[str, ...]


def _check_queue(name: str, where: str) -> str:
    if not _QUEUE.match(name):
        raise ConfigError(
            f"{where}: queue name {name[:80]!r} is not valid: use 1-255 letters, digits, '.', '-', '_' or ':'"
        )
    if name.startswith("amq."):
        raise ConfigError(f"{where}: queue name {name!r}: names starting with 'amq.' are reserved by RabbitMQ")
    return name


def _check_patterns(queue: str, patterns: Sequence[Any], where: str) -> tuple[str, ...]:
    if not patterns:
        raise ConfigError(f"{where}: queue {queue!r} has no pattern")
    out: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"{where}: queue {queue!r}: a pattern must be a string")
        problem = pattern_problem(pattern)
        if problem is not None:
            raise ConfigError(f"{where}: queue {queue!r}: pattern {pattern[:80]!r} {problem}")
        if pattern not in out:
            out.append(pattern)
    return tuple(out)


def parse_bind(text: str, where: str = "--bind") -> Binding:
    """Read one ``QUEUE=PATTERN[,PATTERN…]``.

    Raises:
        ConfigError: no ``=``, a bad queue name or a bad pattern (named in the message).
    """
    queue, sep, rest = text.strip().partition("=")
    if not sep:
        raise ConfigError(f"{where}: {text[:80]!r} is not QUEUE=PATTERN[,PATTERN...]")
    queue = _check_queue(queue.strip(), where)
    return Binding(queue, _check_patterns(queue, [p.strip() for p in rest.split(",")], where))


def parse_bindings(raw: Any, where: str) -> tuple[Binding, ...]:
    """Read bindings from flags (a list of strings), the environment (one string) or TOML (tables).

    The same queue given twice gets the union of its patterns.

    Raises:
        ConfigError: anything malformed, naming ``where``, the queue and the pattern.
    """
    items: list[Binding] = []
    if isinstance(raw, str):
        items = [parse_bind(part, where) for part in raw.split(";") if part.strip()]
    elif isinstance(raw, list | tuple):
        for entry in raw:
            if isinstance(entry, Binding):
                items.append(entry)
            elif isinstance(entry, str):
                items.append(parse_bind(entry, where))
            elif isinstance(entry, dict):
                unknown = sorted(set(entry) - {"queue", "patterns"})
                if unknown:
                    raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (use queue and patterns)")
                queue = entry.get("queue")
                patterns = entry.get("patterns")
                if not isinstance(queue, str):
                    raise ConfigError(f'{where}: every binding needs queue = "NAME"')
                if isinstance(patterns, str):
                    patterns = [patterns]
                if not isinstance(patterns, list):
                    raise ConfigError(f'{where}: queue {queue[:80]!r} needs patterns = ["..."]')
                queue = _check_queue(queue, where)
                items.append(Binding(queue, _check_patterns(queue, patterns, where)))
            else:
                raise ConfigError(f"{where}: expected QUEUE=PATTERN strings or tables of queue and patterns")
    else:
        raise ConfigError(f"{where}: expected QUEUE=PATTERN strings or tables of queue and patterns")
    merged: dict[str, list[str]] = {}
    for item in items:
        patterns = merged.setdefault(item.queue, [])
        patterns.extend(p for p in item.patterns if p not in patterns)
    return tuple(Binding(queue, tuple(patterns)) for queue, patterns in merged.items())


async def declare_bindings(
    channel: AbstractChannel, exchange: str, bindings: Sequence[Binding]
) -> list[tuple[Binding, str]]:
    """Declare each binding's queue as a durable quorum queue and bind it to its patterns.

    A queue that already exists with other arguments (a classic queue, say) is
    used as it is, with a WARNING: RabbitMQ answers PRECONDITION_FAILED, which
    closes the channel, so the channel is reopened and the queue bound passively.

    Args:
        channel: an open channel (it may be reopened).
        exchange: the events exchange's name (it must exist).
        bindings: what to declare.

    Returns:
        For each binding, ``"quorum"`` or ``"existing"`` (the queue was kept as it was).

    Raises:
        aiormq.exceptions.AMQPError: the broker refused in another way (no such exchange,
            access refused).
    """
    done: list[tuple[Binding, str]] = []
    for binding in bindings:
        kind = "quorum"
        queue: AbstractQueue
        try:
            queue = await channel.declare_queue(binding.queue, durable=True, arguments=dict(QUORUM))
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            log.warning(
                "queue %s already exists with other arguments; using it as it is (%s). "
                "To make it a quorum queue, move its consumers, delete it and restart the bridge.",
                binding.queue, _reason(exc),
            )  # fmt: skip
            if channel.is_closed:
                await channel.reopen()
            queue = await channel.declare_queue(binding.queue, passive=True)
            kind = "existing"
        for pattern in binding.patterns:
            await queue.bind(exchange, routing_key=pattern)
        log.info("binding: queue %s (%s) <- %s %s", binding.queue, kind, exchange, ", ".join(binding.patterns))
        done.append((binding, kind))
    return done


def _reason(exc: BaseException) -> str:
    args = getattr(exc, "args", ())
    text = str(args[0]) if args else str(exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__
