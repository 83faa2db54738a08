"""The simulator serves wss:// with a certificate made by the test, signed by a CA made by the test."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect

from bridge.errors import ConfigError
from bridge.simulator import Simulator, SimulatorConfig
from bridge.wire import subscribe_frame

KEY = "tls-realm-key-0001"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Simulator Test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)  # fmt: skip
    return d


def _config(pki: Path, **settings: object) -> SimulatorConfig:
    return SimulatorConfig(
        port=0, realm_keys=(KEY,), tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), **settings
    )


async def test_wss_with_the_test_ca_receives_answers_and_events(pki: Path) -> None:
    """A client trusting the test CA subscribes over wss:// and gets the answers and notifications."""
    trust = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    async with Simulator(_config(pki, rate=0, count=5)) as sim:
        assert sim.url.startswith("wss://127.0.0.1:")
        async with connect(sim.url, ssl=trust, ping_interval=None) as ws:
            await ws.send(subscribe_frame(KEY))
            frames = [orjson.loads(await ws.recv()) for _ in range(7)]
    assert [f["type"] for f in frames] == ["info", "subscribe"] + ["notification"] * 5
    assert [f["seq"] for f in frames[2:]] == [1, 2, 3, 4, 5]


async def test_a_client_without_the_ca_is_refused(pki: Path) -> None:
    """Certificate verification really happens: the system trust store does not know the test CA."""
    async with Simulator(_config(pki)) as sim:
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(sim.url, ssl=ssl.create_default_context(), ping_interval=None):
                pass


async def test_silent_links_stay_silent_over_tls(pki: Path) -> None:
    """go_silent works on a TLS transport too: no pong comes back."""
    trust = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    async with Simulator(_config(pki, rate=50)) as sim, connect(sim.url, ssl=trust, ping_interval=None) as ws:
        await ws.send(subscribe_frame(KEY))
        await sim.wait_sent(2)
        await (await ws.ping())
        sim.go_silent()
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pong, 0.5)


async def test_unloadable_certificate_is_a_config_error(pki: Path) -> None:
    """A key that does not match the certificate fails at start with a ConfigError naming the flags."""
    config = SimulatorConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "ca.key"))
    with pytest.raises(ConfigError, match="--tls-cert"):
        await Simulator(config).start()
