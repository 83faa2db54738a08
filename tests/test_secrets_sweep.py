"""The secrets sweep: a whole session at DEBUG shows neither the realm key nor the AMQP password anywhere.

A 36-character key with '/', 'é' and '"', and a password with '#', '/' and '@' (percent-encoded
in the URL), given through the *_FILE forms. The session covers events, frames that echo the key
(raw and JSON-escaped) and are quarantined, an error frame echoing it, a rejected key, a broker
auth failure, a broker on a closed port, configuration errors from a flag, the environment and
the TOML file, and ``check``. Every log line, /metrics, /readyz, every message on the exchange
and on the quarantine queue, the output of every command and the process command line are
searched for the secrets and for any 12-character piece of them (raw and JSON-escaped): 0 hits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import aio_pika
import pytest

from bridge.contract import Topology
from bridge.secrets import key_fingerprint
from tests.helpers import PYTHON, ROOT, BridgeProcess, bind_queue, bridge_settings, collect, free_port, rabbitmqctl
from tests.helpers import simulator as run_simulator

pytestmark = pytest.mark.broker

KEY = 'Sw3ep/Realm"Key-é-0123456789abcdef01'
PASSWORD = "Sw#ep/P@ss-2024-zq"
WRONG = "Wr#ng/P@ss-2024-zq"
OTHER_KEY = "0ther/Realm-Key-é-9876543210fedcba9"  # one the simulator does not accept
SECRETS = (KEY, PASSWORD, quote(PASSWORD, safe=""), WRONG, quote(WRONG, safe=""), OTHER_KEY)


def _forms(piece: str) -> set[str]:
    """A piece as it may appear in text: raw, JSON-escaped (ASCII or not), a Python repr."""
    return {piece, json.dumps(piece)[1:-1], json.dumps(piece, ensure_ascii=False)[1:-1], repr(piece)[1:-1]}


def _needles() -> set[str]:
    out: set[str] = set()
    for secret in SECRETS:
        for i in range(len(secret) - 11):
            out |= _forms(secret[i : i + 12])
    return out


NEEDLES = _needles()


def _hits(where: str, text: str) -> list[str]:
    return [f"{where}: {needle!r}" for needle in NEEDLES if needle in text]


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode("utf-8", "replace"))
    except OSError as exc:
        return f"<{exc}>"


async def _answer(url: str, want: str, *, timeout: float) -> str:
    """GET ``url`` until the answer contains ``want`` (or ``timeout`` runs out); the last answer."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        text = await asyncio.to_thread(_get, url)
        if want in text or asyncio.get_running_loop().time() >= deadline:
            return text
        await asyncio.sleep(0.25)


def _cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "bridge", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def sweep_user() -> Iterator[str]:
    """A broker user whose password holds '#', '/' and '@' (deleted afterwards)."""
    user = f"sweep-{uuid.uuid4().hex[:8]}"
    try:
        rabbitmqctl("add_user", user, PASSWORD, timeout=60)
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*", timeout=60)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot add a broker user here: {exc}")
    try:
        yield user
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            rabbitmqctl("delete_user", user, timeout=60)


async def test_no_secret_anywhere_in_a_whole_session(
    tmp_path: Path, sweep_user: str, exchange_name: str
) -> None:
    """Across a whole session at DEBUG and its failure paths, no piece of a key or password shows anywhere."""
    import os

    assert len(KEY) == 36 and {"/", "é", '"'} <= set(KEY)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("ORANGEPILL_", "BRIDGE_"))}
    base_env.update({"BRIDGE_LOG_FORMAT": "json", "BRIDGE_LOG_LEVEL": "DEBUG", "BRIDGE_UVLOOP": "0"})
    key_file = tmp_path / "realm_key"
    key_file.write_text(f"# the realm key\nsweep={KEY}\n", encoding="utf-8")
    url_file = tmp_path / "amqp_url"
    url_file.write_text(f"amqp://{sweep_user}:{quote(PASSWORD, safe='')}@127.0.0.1:5672/\n")
    env = {**base_env, "ORANGEPILL_REALM_KEY_FILE": str(key_file), "BRIDGE_AMQP_URL_FILE": str(url_file)}
    seen: list[tuple[str, str]] = []  # (where, text) to scan at the end
    topology = Topology(exchange_name)

    def common(stream_url: str, metrics_port: int) -> list[str]:
        return [
            "--stream-url", stream_url, "--exchange", exchange_name, "--spool", "memory",
            "--metrics-addr", f"127.0.0.1:{metrics_port}", "--ping-interval", "0.5", "--idle-timeout", "3",
            "--reconnect-min", "0.05", "--reconnect-max", "0.5", "--drain-timeout", "5",
        ]  # fmt: skip

    async with run_simulator(realm_keys=(KEY,), rate=20, count=5) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        consumer = await aio_pika.connect_robust("amqp://guest:guest@127.0.0.1:5672/")
        async with consumer:
            events = await bind_queue(consumer, settings, "#")

            # 1. The session: events, quarantined echoes of the key, an error frame echoing it.
            port = free_port()
            bridge = BridgeProcess(common(sim.url, port), env, clean_env=True)
            try:
                await sim.wait_subscribed(1, timeout=30)
                got = await collect(events, 5, timeout=30)
                assert len(got) == 5
                echoes = [
                    '{"type": "notification", "event": "bad name", "key": "' + KEY + '"}',  # raw: not even JSON
                    json.dumps({"type": "notification", "event": "bad name " + KEY, "data": KEY}),
                    json.dumps({"type": "notification", "event": "x" * 60 + "." + KEY + " y", "data": 1}),
                    json.dumps({"type": "notification", "event": "bad name", "k": KEY}).replace("/", "\\/"),
                ]
                for frame in echoes:
                    assert await sim.send_raw(frame) == 1
                await sim.send_raw(json.dumps({"type": "error", "message": "z" * 180 + KEY}))
                quarantine = await consumer.channel()
                q = await quarantine.declare_queue(topology.quarantine, passive=True)
                kept = await collect(q, len(echoes), timeout=30)
                assert len(kept) == len(echoes)
                for message in [*got, *kept]:
                    seen.append(("message body", message.body.decode("utf-8", "replace")))
                    seen.append(("message properties", repr(message.properties) + repr(message.headers)))
                seen.append(("/metrics", await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")))
                seen.append(("/readyz", await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/readyz")))
                seen.append(("/", await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/")))
                cmdline = Path(f"/proc/{bridge.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                seen.append(("cmdline", cmdline))
                environ = Path(f"/proc/{bridge.pid}/environ").read_bytes().replace(b"\0", b" ").decode()
                seen.append(("environ", environ))
            finally:
                assert bridge.stop() == 0
                seen.append(("session log", bridge.output()))
                bridge.close()

            # 2. check, with the same files.
            result = await asyncio.to_thread(_cli, "check", "--stream-url", sim.url, "--exchange", exchange_name,
                                             env=env)  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
            seen.append(("check", result.stdout + result.stderr))

            # 3. A key the server refuses, with an error text that echoes it: exit 2.
            sim.reject_next(1, text=f"Invalid Realm Key {KEY}.")
            bridge = BridgeProcess(common(sim.url, free_port()), env, clean_env=True)
            try:
                assert await asyncio.to_thread(bridge.wait, 60) == 2
            finally:
                seen.append(("rejected key log", bridge.output()))
                bridge.close()
            other = tmp_path / "other_key"
            other.write_text(OTHER_KEY + "\n", encoding="utf-8")
            result = await asyncio.to_thread(_cli, "check", "--stream-url", sim.url, "--exchange", exchange_name,
                                             env={**env, "ORANGEPILL_REALM_KEY_FILE": str(other)})  # fmt: skip
            assert result.returncode == 2, result.stdout + result.stderr
            seen.append(("check of an unknown key", result.stdout + result.stderr))

        # 4. Broker auth failure (wrong password) and a broker on a closed port.
        closed = free_port()
        for what, url in (
            ("auth failure", f"amqp://{sweep_user}:{quote(WRONG, safe='')}@127.0.0.1:5672/"),
            ("closed port", f"amqp://{sweep_user}:{quote(PASSWORD, safe='')}@127.0.0.1:{closed}/"),
        ):
            bad_url = tmp_path / f"amqp_url_{what.replace(' ', '_')}"
            bad_url.write_text(url + "\n")
            port = free_port()
            while port == closed:  # nothing listens on the closed port, so it may come back
                port = free_port()
            bridge = BridgeProcess(common(sim.url, port), {**env, "BRIDGE_AMQP_URL_FILE": str(bad_url)}, clean_env=True)
            try:
                # /readyz answers once the process is up; it names the broker once the first connect failed.
                readyz = await _answer(f"http://127.0.0.1:{port}/readyz", "127.0.0.1", timeout=30)
                seen.append((f"/readyz ({what})", readyz))
                seen.append((f"/metrics ({what})", await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")))
            finally:
                bridge.stop()
                seen.append((f"{what} log", bridge.output()))
                bridge.close()
            result = await asyncio.to_thread(_cli, "check", "--stream-url", sim.url, "--exchange", exchange_name,
                                             env={**env, "BRIDGE_AMQP_URL_FILE": str(bad_url)})  # fmt: skip
            assert result.returncode == 1, result.stdout + result.stderr
            seen.append((f"check ({what})", result.stdout + result.stderr))

    # 5. Configuration errors from each source: exit 2, no secret in the message.
    toml = tmp_path / "bridge.toml"
    toml.write_text(f"exchange = {json.dumps(KEY)}\n")
    toml_name = tmp_path / "bridge-name.toml"
    toml_name.write_text(f"{json.dumps(KEY)} = {json.dumps(PASSWORD)}\n")
    for what, args, extra in (
        ("flag", ["--amqp-url", f"amqp://{sweep_user}:{PASSWORD}@127.0.0.1/"], {}),
        ("flag (stream URL)", ["--stream-url", f"https://u:{PASSWORD}@x/"], {}),
        ("env", [], {"BRIDGE_EXCHANGE": KEY}),
        ("env (AMQP URL)", [], {"BRIDGE_AMQP_URL_FILE": "", "BRIDGE_AMQP_URL": f"amqp://u:{PASSWORD}@h/"}),
        ("TOML value", ["--config", str(toml)], {}),
        ("TOML name", ["--config", str(toml_name)], {}),
    ):
        result = await asyncio.to_thread(_cli, "run", *args, env={**env, **extra})
        assert result.returncode == 2, (what, result.stderr)
        assert "configuration error" in result.stderr, (what, result.stderr)
        seen.append((f"config error ({what})", result.stdout + result.stderr))

    hits = [hit for where, text in seen for hit in _hits(where, text)]
    assert not hits, hits[:20]
    # The sweep looked at a real session, and the echoes were there, redacted rather than absent.
    text = dict(seen)
    assert _hits("control", "log: " + json.dumps(KEY)) and _hits("control", PASSWORD[3:15])
    assert sum(len(t) for _, t in seen) > 10_000
    bodies = "".join(t for where, t in seen if where == "message body")
    assert bodies.count(key_fingerprint(KEY)) >= 4
    assert "frame quarantined" in text["session log"] and key_fingerprint(KEY) in text["session log"]
    assert "stream error frame" in text["session log"]
    assert "rejected the realm key" in text["rejected key log"]
    assert "ACCESS_REFUSED" in text["auth failure log"] or "refused" in text["auth failure log"].lower()
    assert "127.0.0.1" in text["/readyz (closed port)"]
