"""Topology as configuration: parsing and validation, and quorum queues declared on the real broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from bridge.bindings import Binding, declare_bindings, parse_bind, parse_bindings
from bridge.config import add_arguments, load_settings
from bridge.errors import ConfigError
from tests.helpers import AMQP_URL, KEY, PYTHON, ROOT, bridge_settings, collect, running_bridge, simulator, wait_until


def test_parse_bind_flag() -> None:
    """QUEUE=PATTERN,PATTERN becomes one binding with both patterns."""
    assert parse_bind("payments=transaction.#,*.failed") == Binding("payments", ("transaction.#", "*.failed"))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("payments=transaction*", "transaction*"),
        ("payments=", "payments"),
        ("bad queue=a.b", "bad queue"),
        ("amq.mine=#", "amq.mine"),
        ("no-equals-sign", "no-equals-sign"),
        ("q=a b", "a b"),
    ],
)
def test_bad_bind_is_a_config_error_naming_it(text: str, named: str) -> None:
    """A bad pattern or queue name is a ConfigError whose message names it."""
    with pytest.raises(ConfigError) as info:
        parse_bind(text)
    assert named in str(info.value)
    assert info.value.exit_code == 2


def test_flags_env_and_toml(tmp_path: Path) -> None:
    """--bind (repeatable), BRIDGE_BINDINGS and [[bindings]] all reach Settings.bindings; flags win."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--bind", "a=x.#", "--bind", "b=*.failed", "--bind", "a=y.*"])
    settings = load_settings(args, {}, require_realm=False)
    assert settings.bindings == (Binding("a", ("x.#", "y.*")), Binding("b", ("*.failed",)))
    env = load_settings(parser.parse_args([]), {"BRIDGE_BINDINGS": "a=x.#;b=#.failed"}, require_realm=False)
    assert env.bindings == (Binding("a", ("x.#",)), Binding("b", ("#.failed",)))
    toml = tmp_path / "bridge.toml"
    toml.write_text('[[bindings]]\nqueue = "payments"\npatterns = ["transaction.#", "apps.payment.*"]\n')
    from_file = load_settings(parser.parse_args(["--config", str(toml)]), {}, require_realm=False)
    assert from_file.bindings == (Binding("payments", ("transaction.#", "apps.payment.*")),)


def test_toml_bad_pattern_names_it(tmp_path: Path) -> None:
    """A bad pattern in the TOML file is a ConfigError naming the queue and the pattern."""
    toml = tmp_path / "bridge.toml"
    toml.write_text('[[bindings]]\nqueue = "payments"\npatterns = ["transaction.#", "deposit*"]\n')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError, match=r"payments.*deposit\*"):
        load_settings(parser.parse_args(["--config", str(toml)]), {}, require_realm=False)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_bindings([{"queue": "q", "pattern": ["#"]}], "bindings in the config file")


def test_run_with_a_bad_pattern_exits_2() -> None:
    """`run --bind q=transaction*` exits 2 and names the pattern."""
    proc = subprocess.run(
        [PYTHON, "-m", "bridge", "run", "--realm-key", KEY, "--bind", "q=transaction*"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "transaction*" in proc.stderr


@contextlib.asynccontextmanager
async def cleanup_queues(connection: AbstractRobustConnection, *names: str) -> AsyncIterator[None]:
    try:
        yield
    finally:
        channel = await connection.channel()
        for name in names:
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        with contextlib.suppress(Exception):
            await channel.close()


@pytest.mark.broker
async def test_quorum_queues_keep_events_before_any_consumer(
    exchange_name: str, amqp: AbstractRobustConnection
) -> None:
    """The bridge declares the bound quorum queues at start; events land there with no consumer running."""
    q_tx, q_failed = f"{exchange_name}.tx", f"{exchange_name}.failed"
    bindings = (Binding(q_tx, ("transaction.#",)), Binding(q_failed, ("*.failed", "#.failed")))
    async with cleanup_queues(amqp, q_tx, q_failed), simulator(rate=200, count=300) as sim:
        settings = bridge_settings(sim.url, exchange_name, bindings=bindings)
        async with running_bridge(settings) as bridge:
            await sim.wait_sent(300, timeout=60)
            assert await wait_until(
                lambda: (
                    bridge.metric("orangepill_bridge_spool_depth") == 0
                    and bridge.metric("orangepill_bridge_events_published_total", {"event": "transaction.done"}) > 0
                ),
                timeout=30,
            )
        sent = [e.event for e in sim.sent]
        channel = await amqp.channel()
        tx = await channel.declare_queue(q_tx, passive=True)
        failed = await channel.declare_queue(q_failed, passive=True)
        want_tx = sum(1 for e in sent if e.startswith("transaction."))
        want_failed = sum(1 for e in sent if e.endswith(".failed"))
        assert want_tx > 0
        got_tx = await collect(tx, want_tx, timeout=20, settle=0.3)
        got_failed = await collect(failed, want_failed, timeout=20, settle=0.3) if want_failed else []
        assert sorted(m.routing_key or "" for m in got_tx) == sorted(e for e in sent if e.startswith("transaction."))
        assert len(got_failed) == want_failed  # bound twice, still one copy per event
        # It is a quorum queue: redeclaring it as classic is refused by the broker.
        probe = await amqp.channel()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await probe.declare_queue(q_tx, durable=True, arguments={"x-queue-type": "classic"})


@pytest.mark.broker
async def test_existing_classic_queue_is_used_with_a_warning(
    exchange_name: str, amqp: AbstractRobustConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue that already exists as a classic queue is kept and bound, with a WARNING naming it; no crash."""
    name = f"{exchange_name}.classic.{uuid.uuid4().hex[:4]}"
    async with cleanup_queues(amqp, name):
        channel = await amqp.channel()
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        await channel.declare_queue(name, durable=True)  # classic
        other = await amqp.channel()
        caplog.set_level(logging.WARNING, logger="bridge.bindings")
        done = await declare_bindings(
            other, exchange_name, [Binding(name, ("deposit.#",)), Binding(name + ".q", ("x",))]
        )
        assert [kind for _, kind in done] == ["existing", "quorum"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(name in w and "PRECONDITION_FAILED" in w for w in warnings), warnings
        await exchange.publish(aio_pika.Message(b"{}"), routing_key="deposit.received")
        queue = await channel.declare_queue(name, passive=True)
        assert len(await collect(queue, 1, timeout=10)) == 1
        await channel.queue_delete(name + ".q")


@pytest.mark.broker
async def test_check_prints_each_binding(exchange_name: str, amqp: AbstractRobustConnection) -> None:
    """`check` lists every declared binding with its queue and patterns."""
    name = f"{exchange_name}.chk"
    async with cleanup_queues(amqp, name), simulator() as sim:
        proc = await asyncio.to_thread(
            subprocess.run,
            [PYTHON, "-m", "bridge", "check", "--stream-url", sim.url, "--realm-key", KEY, "--amqp-url", AMQP_URL,
             "--exchange", exchange_name, "--bind", f"{name}=transaction.#,*.failed"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"binding: quorum queue {name} <- transaction.#, *.failed" in proc.stdout
