"""Fixtures only (helpers live in tests/helpers.py): a unique exchange, a robust connection to the local RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import aio_pika
import hypothesis  # noqa: F401  (imported here, at collection: see below)
import pytest
from aio_pika.abc import AbstractRobustConnection

from bridge.contract import Topology
from tests.helpers import AMQP_URL

# Hypothesis's pytest plugin imports hypothesis at the terminal summary when no test did; pytest's assertion
# rewriting then parses it deep in the plugin stack, where CPython 3.11.7 fails with "SystemError: AST
# constructor recursion depth mismatch" (a run of a few tests, -k, ended with that traceback after passing).


@pytest.fixture
def exchange_name() -> Iterator[str]:
    """A unique exchange name; the exchange and the bridge's queues are deleted afterwards."""
    name = f"test.{uuid.uuid4().hex[:10]}"
    yield name
    asyncio.run(_delete_topology(Topology(name)))


@pytest.fixture
def exchange_names() -> Iterator[Callable[[str], str]]:
    """Unique exchange names with a readable part (``test.<part>.<hex>``); each one's topology is deleted afterwards.

    The broker outlives the suite (CI and later sessions reuse it): nothing a test declares may pile up there.
    """
    names: list[str] = []

    def make(part: str) -> str:
        names.append(f"test.{part}.{uuid.uuid4().hex[:6]}")
        return names[-1]

    yield make
    for name in names:
        asyncio.run(_delete_topology(Topology(name)))


async def _delete_topology(names: Topology) -> None:
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(AMQP_URL, timeout=5)
        async with connection:
            channel = await connection.channel()
            for queue in names.own_queues:
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
            for exchange in names.own_exchanges:
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(exchange)


@pytest.fixture
async def amqp() -> AsyncIterator[AbstractRobustConnection]:
    """A robust connection to the local RabbitMQ, for the test's own consumers."""
    connection = await aio_pika.connect_robust(AMQP_URL, timeout=10, reconnect_interval=0.5)
    try:
        yield connection
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
