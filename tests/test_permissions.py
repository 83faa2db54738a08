"""RabbitMQ permissions: what the README tells operators to grant is enough, and what is missing is said."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from aio_pika.abc import AbstractRobustConnection

from bridge.broker import permissions_needed
from bridge.tail import tail
from tests.helpers import bind_queue, bridge_settings, collect, running_bridge, simulator, wait_until

pytestmark = pytest.mark.broker


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def _user(configure: str, write: str, read: str) -> Iterator[str]:
    """A RabbitMQ user with these permissions on the default vhost, for the test only: its AMQP URL."""
    name, password = f"test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    _ctl("add_user", name, password)
    try:
        _ctl("set_permissions", "-p", "/", name, configure, write, read)
        yield f"amqp://{name}:{password}@127.0.0.1:5672/"
    finally:
        _ctl("delete_user", name)


def _documented(exchange: str) -> str:
    """The pattern the README and the error messages give (``permissions_needed``)."""
    line = permissions_needed(exchange)
    return line.rsplit(" ", 1)[-1].strip("'")


def test_the_documented_pattern_covers_the_names_and_nothing_else() -> None:
    pattern = _documented("orangepill.events")
    assert pattern == r"^orangepill\.events(\..*)?$"
    assert f"'{pattern}' '{pattern}' '{pattern}'" in permissions_needed("orangepill.events")
    assert _documented("a-b.c") == r"^a-b\.c(\..*)?$"


async def test_the_documented_permissions_are_enough_for_run_its_follower_and_tail(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A user allowed only the documented pattern runs the bridge (topology, lock, announcer, follower, tap)
    and tail, with no access refused anywhere."""
    pattern = _documented(exchange_name)
    with _user(pattern, pattern, pattern) as url:
        async with simulator(rate=50.0) as sim:
            settings = bridge_settings(sim.url, exchange_name, amqp_url=url)
            queue = await bind_queue(amqp, settings, "#")
            with caplog.at_level(logging.DEBUG):
                async with running_bridge(settings) as bridge:
                    got = await collect(queue, 20, timeout=20)
                    stop = asyncio.Event()
                    assert await tail(settings, ["#"], False, stop, count=5) == 0
                    await asyncio.sleep(2.5)  # the HA side tasks have started (and would have failed) by now
                    assert await bridge.finish() == 0
    assert len(got) == 20
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "ACCESS_REFUSED" in m or m.startswith("ha ")] == []  # "ha follower stopped (…)"


async def test_a_refused_follower_queue_is_an_error_said_once_with_the_permission_to_grant(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without permission on its private queue a standby could never hear its leader (it would keep every
    event and publish its spool again at a failover): the bridge says so at ERROR, once, not every second,
    with the set_permissions line, and keeps publishing."""
    escaped = exchange_name.replace(".", r"\.")
    narrow = rf"^{escaped}(\.(unrouted|quarantine|ha|leader\..*|unrouted\.tap\..*))?$"
    with _user(narrow, narrow, narrow) as url:
        async with simulator(rate=20.0) as sim:
            settings = bridge_settings(sim.url, exchange_name, amqp_url=url)
            queue = await bind_queue(amqp, settings, "#")
            with caplog.at_level(logging.INFO):
                async with running_bridge(settings) as bridge:
                    assert len(await collect(queue, 10, timeout=20)) == 10  # still publishing
                    assert await wait_until(lambda: any("ha follower failed" in r.getMessage()
                                                        for r in caplog.records), 10)  # fmt: skip
                    await asyncio.sleep(3)  # three more failed attempts
                    assert await bridge.finish() == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "ha follower" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "ACCESS_REFUSED" in errors[0].getMessage()
    assert f"set_permissions -p VHOST USER '{_documented(exchange_name)}'" in errors[0].getMessage()


async def test_a_user_without_permissions_ends_run_with_exit_2_and_says_what_to_grant(
    exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with _user("", "", "") as url:
        async with simulator(rate=0.0) as sim:
            settings = bridge_settings(sim.url, exchange_name, amqp_url=url)
            with caplog.at_level(logging.INFO):
                async with running_bridge(settings) as bridge:
                    assert await asyncio.wait_for(bridge.task, 30) == 2
    said = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "ACCESS_REFUSED" in said and _documented(exchange_name) in said, said
    assert "Traceback" not in caplog.text
