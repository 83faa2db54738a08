"""The command line: exit codes and messages a user sees."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
from pathlib import Path

import aio_pika
import orjson
import pytest
import websockets

from bridge.progress import Progress
from bridge.tail import tail
from tests.helpers import AMQP_URL, KEY, PYTHON, ROOT, bridge_settings, free_port, simulator


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [PYTHON, "-m", "bridge", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "BRIDGE_LOG_FORMAT": "text", **(env or {})},
    )


def test_run_without_key_exits_2_naming_the_setting() -> None:
    """run with no realm key exits 2 and names --realm-key."""
    result = _run("run", env={"ORANGEPILL_REALM_KEY": ""})
    assert result.returncode == 2
    assert "--realm-key" in result.stderr


def test_bad_setting_exits_2_naming_it() -> None:
    """An invalid value exits 2 before anything starts, naming the flag."""
    result = _run("run", "--realm-key", KEY, "--ping-interval", "often")
    assert result.returncode == 2
    assert "--ping-interval" in result.stderr
    assert KEY not in result.stderr


def test_events_lists_the_catalogue() -> None:
    """events prints every documented event and binding examples."""
    result = _run("events")
    assert result.returncode == 0
    assert "deposit.received" in result.stdout
    assert "transaction.#" in result.stdout
    assert result.stdout.count("\n") > 55


def test_module_and_help() -> None:
    """python -m bridge --help lists the commands of the design card."""
    result = _run("--help")
    assert result.returncode == 0
    for command in ("run", "simulate", "demo", "tail", "events", "check", "reroute"):
        assert command in result.stdout


@pytest.mark.broker
async def test_check_passes_and_detects_a_rejected_key(exchange_name: str) -> None:
    """check exits 0 when stream, key and broker are fine, and 2 without showing the key when the key is refused."""
    async with simulator(paused=True) as sim:
        good = await asyncio.to_thread(
            _run, "check", "--stream-url", sim.url, "--realm-key", KEY, "--amqp-url", AMQP_URL, "--exchange", exchange_name
        )
        bad = await asyncio.to_thread(
            _run, "check", "--stream-url", sim.url, "--realm-key", "wrong-key-1234567890", "--amqp-url", AMQP_URL,
            "--exchange", exchange_name,
        )
    assert good.returncode == 0, good.stdout + good.stderr
    assert "key accepted" in good.stdout
    assert bad.returncode == 2
    assert "REJECTED" in bad.stdout
    assert "wrong-key-1234567890" not in bad.stdout + bad.stderr


@pytest.mark.broker
def test_demo_runs_end_to_end(exchange_name: str) -> None:
    """demo runs simulator, bridge and tail together and prints events, then stops cleanly."""
    import re

    from tests.helpers import free_port

    port = free_port()
    result = _run("demo", "--seconds", "4", "--rate", "20", "--exchange", exchange_name,
                  env={"BRIDGE_METRICS_ADDR": f"127.0.0.1:{port}"}, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "realm=demo" in result.stdout
    assert result.stdout.count("\n") >= 10
    # The tail is bound before the simulator starts: the first event (user.created) is shown too.
    assert result.stdout.splitlines()[0].split()[1] == "user.created"
    # The environment counts as the flag would (it was ignored); the demo's own spool is gone after a clean stop.
    assert f"metrics on http://127.0.0.1:{port}/metrics" in result.stderr, result.stderr[-2000:]
    spool = re.search(r"spool (\S+orangepill-bridge-demo-\d+\.db)", result.stderr)
    assert spool is not None, result.stderr[-2000:]
    assert not Path(spool.group(1)).exists() and not Path(spool.group(1) + "-wal").exists()


def test_tail_count_must_be_a_whole_number() -> None:
    """tail --count refuses a negative or non-numeric N with exit 2, naming the flag."""
    result = _run("tail", "--count", "-1")
    assert result.returncode == 2
    assert "--count" in result.stderr and "whole number" in result.stderr


@pytest.mark.parametrize("pattern", ["transaction*", "a..b", ""])
def test_tail_refuses_a_pattern_that_would_catch_nothing(pattern: str) -> None:
    """tail checks its patterns as --bind does: exit 2 with the reason, before any broker is touched."""
    result = _run("tail", pattern)
    assert result.returncode == 2
    assert f"pattern {pattern!r}" in result.stderr


async def _publish(exchange_name: str, keys: list[str]) -> None:
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name, ensure=True)
        for i, key in enumerate(keys):
            body = orjson.dumps({"type": "notification", "event": key, "data": f"{i:024x}"})
            await exchange.publish(aio_pika.Message(body, message_id=f"m{i}"), routing_key=key)


@pytest.mark.broker
async def test_tail_count_stops_after_n_events_with_a_bar(exchange_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """tail with count=3 prints exactly 3 events, returns 0 without being stopped, and counts them on its bar."""
    tty = _Tty()
    bound, stop = asyncio.Event(), asyncio.Event()
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name)
    progress = Progress("tail", 3, stream=tty)
    task = asyncio.create_task(tail(settings, ["#"], False, stop, bound, count=3, progress=progress))
    await asyncio.wait_for(bound.wait(), 30)
    await _publish(exchange_name, ["user.created", "deposit.done", "transaction.done", "user.updated", "x.y"])
    assert await asyncio.wait_for(task, 30) == 0
    assert not stop.is_set()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["user.created", "deposit.done", "transaction.done"]
    assert progress.done == 3
    assert "tail:" in tty.getvalue() and "/3 [" in tty.getvalue()  # the bar was drawn on the "terminal"


@pytest.mark.broker
async def test_tail_count_command_exits_by_itself(exchange_name: str) -> None:
    """orangepill-bridge tail --count 2 exits 0 after two events, printing two lines."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bridge", "tail", "--count", "2", "--amqp-url", AMQP_URL, "--exchange", exchange_name,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        while b"tail: bound" not in line and line:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
        await _publish(exchange_name, ["user.created", "deposit.done", "transaction.done"])
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert len(out.decode().splitlines()) == 2


async def test_simulate_count_logs_progress_to_the_total() -> None:
    """simulate --count 5 reports its progress; the final line says 5/5 once a subscriber took them."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bridge", "simulate", "--port", str(port), "--count", "5", "--realm-key", KEY,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "BRIDGE_LOG_FORMAT": "text"},
    )  # fmt: skip
    try:
        events = 0
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                ws = await websockets.connect(f"ws://127.0.0.1:{port}")
                break
            except OSError:
                assert asyncio.get_running_loop().time() < deadline, "simulator did not listen"
                await asyncio.sleep(0.1)
        async with ws:
            await ws.send(orjson.dumps({"type": "subscribe", "realm": KEY}).decode())
            while events < 5:
                frame = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(frame, str) and '"notification"' in frame:
                    events += 1
        await asyncio.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert "simulate: 5/5 (100%)" in out.decode(), out.decode()[-2000:]


@pytest.mark.broker
async def test_tail_says_when_it_had_to_create_the_exchange(exchange_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """tail on an exchange that does not exist yet says so (a mistyped --exchange); on an existing one it does not."""
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name)
    for _ in range(2):  # the first run creates the exchange, the second finds it
        bound, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(tail(settings, ["#"], False, stop, bound))
        await asyncio.wait_for(bound.wait(), 30)
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0
    first, _, second = capsys.readouterr().err.partition(f"tail: bound to {exchange_name}")
    assert f"the exchange {exchange_name!r} did not exist" in first
    assert "did not exist" not in second


@pytest.mark.broker
async def test_tail_on_an_exchange_of_another_kind_says_so_and_exits_2(
    exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """tail on a fanout exchange of that name prints why (as run and check do) and returns 2, no traceback."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.FANOUT, durable=True)
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name)
    code = await asyncio.wait_for(tail(settings, ["#"], False, asyncio.Event()), 30)
    assert code == 2
    assert f"exchange {exchange_name} already exists as a fanout exchange" in capsys.readouterr().err


@pytest.mark.broker
@pytest.mark.fault
async def test_tail_carries_on_after_the_broker_drops_its_connection(
    exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broker that closes every connection does not end (or silently stall) a tail: it says so, reconnects,
    re-binds its queue and prints the events published after that."""
    from tests.test_faults import _ctl, broker_lock

    bound, stop = asyncio.Event(), asyncio.Event()
    settings = bridge_settings("ws://127.0.0.1:1", exchange_name, amqp_url=AMQP_URL + "?reconnect_interval=0.5")
    task = asyncio.create_task(tail(settings, ["deposit.#"], False, stop, bound, count=1))
    await asyncio.wait_for(bound.wait(), 30)
    async with broker_lock():
        await asyncio.to_thread(_ctl, "close_all_connections", "tail test")
    err = ""
    for _ in range(100):
        err += capsys.readouterr().err
        if "reconnected" in err:
            break
        await asyncio.sleep(0.1)
    assert "tail: lost the connection to RabbitMQ" in err and "tail: reconnected" in err, err
    await asyncio.sleep(0.5)  # the consumer is restored right after the reconnect callbacks
    await _publish(exchange_name, ["deposit.received"])
    assert await asyncio.wait_for(task, 30) == 0
    assert "deposit.received" in capsys.readouterr().out


def test_output_into_a_pipe_closed_early_ends_quietly() -> None:
    """`orangepill-bridge events | head -1`: no BrokenPipeError traceback, the shell's SIGPIPE status."""
    proc = subprocess.Popen([PYTHON, "-m", "bridge", "events"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader is gone before the writer is done
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=30)
    assert first.startswith(b"user.created")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code in (0, 141)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--ca-file", "/nonexistent/ca.pem"), "--ca-file /nonexistent/ca.pem: cannot load the CA bundle"),
        (("--amqp-client-cert", "/etc/hostname"), "cannot load the client certificate and key"),
    ],
)
def test_a_tls_file_is_checked_at_start_even_without_a_tls_url(flags: tuple[str, ...], says: str) -> None:
    """README: every value is validated at start. A CA or client file that cannot be loaded was accepted as long
    as no wss:// or amqps:// URL used it (and failed only when one did)."""
    result = _run("check", "--realm-key", "abcdefghijklmnopqrstuv", "--stream-url", "ws://127.0.0.1:9", *flags)
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr


@pytest.mark.broker
def test_a_sigterm_during_the_start_up_stops_cleanly(exchange_name: str) -> None:
    """A stop that came while the bridge was still importing ended it with 143 and no log line (2 of 20 early
    SIGTERMs in a probe); now the signal is noted and the bridge stops as for any SIGTERM."""
    import time

    proc = subprocess.Popen(
        [PYTHON, "-m", "bridge", "run", "--realm-key", "abcdefghijklmnopqrstuv", "--stream-url", "ws://127.0.0.1:9",
         "--exchange", exchange_name, "--spool", "memory", "--metrics-addr", "off"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "BRIDGE_LOG_FORMAT": "text"},
    )  # fmt: skip
    time.sleep(0.3)  # past the command line's own imports, before the event loop runs
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert "signal SIGTERM: stopping" in out
