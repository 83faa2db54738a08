"""The command line: exit codes and messages a user sees."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from tests.helpers import AMQP_URL, KEY, PYTHON, ROOT, simulator


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
    for command in ("run", "simulate", "demo", "tail", "events", "check"):
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
    result = _run("demo", "--seconds", "4", "--rate", "20", "--exchange", exchange_name, "--metrics-addr", "off", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "realm=demo" in result.stdout
    assert result.stdout.count("\n") >= 10
    # The tail is bound before the simulator starts: the first event (user.created) is shown too.
    assert result.stdout.splitlines()[0].split()[1] == "user.created"
