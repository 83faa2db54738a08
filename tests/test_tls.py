"""TLS of the bridge: --ca-file for wss:// and amqps://, a client certificate for AMQP, --tls-insecure.

The CA, server and client certificates are made by the test (openssl CLI). The stream side uses
the simulator over wss://; the broker side a private RabbitMQ node with a TLS listener on a spare
loopback port (tests/cluster.py), skipped with the reason when such a node cannot start here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aio_pika
import pytest

from bridge.check import KeyCheck, check_realm
from bridge.errors import ConfigError
from bridge.tls import amqp_connect_kwargs
from tests import cluster as cluster_mod
from tests.helpers import KEY, bind_queue, bridge_settings, collect, free_port, running_bridge, simulator

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")

_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(d: Path, name: str, cn: str, ext: str) -> None:
    _openssl("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.cnf").write_text(ext + "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.cnf", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate, signed by it."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Bridge Test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)  # fmt: skip
    _issue(d, "server", "127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
           "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")  # fmt: skip
    _issue(d, "client", "orangepill-bridge", "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
           "extendedKeyUsage=clientAuth\n")  # fmt: skip
    return d


def _wss(pki: Path) -> dict[str, object]:
    return {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}


async def test_stream_with_ca_file_is_accepted_and_without_it_fails_clearly(pki: Path) -> None:
    """Over wss://, --ca-file makes the test CA trusted; without it the failure names certificate verification."""
    async with simulator(paused=True, **_wss(pki)) as sim:
        assert sim.url.startswith("wss://")
        base = bridge_settings(sim.url, "unused")
        trusted = await check_realm(replace(base, ca_file=str(pki / "ca.pem")), base.realms[0])
        untrusted = await check_realm(base, base.realms[0])
        insecure = await check_realm(replace(base, tls_insecure=True), base.realms[0])
    assert trusted.result is KeyCheck.ACCEPTED, trusted.detail
    assert untrusted.result is KeyCheck.UNREACHABLE
    assert "certificate verify failed" in untrusted.detail
    assert insecure.result is KeyCheck.ACCEPTED, insecure.detail


@pytest.mark.broker
async def test_bridge_reads_wss_with_ca_file_and_publishes(pki: Path, exchange_name: str) -> None:
    """A whole bridge reads a wss:// stream trusted through --ca-file and publishes its events."""
    async with simulator(rate=0, count=5, **_wss(pki)) as sim:
        settings = bridge_settings(sim.url, exchange_name, ca_file=str(pki / "ca.pem"))
        connection = await aio_pika.connect_robust(settings.amqp_url)
        async with connection:
            queue = await bind_queue(connection, settings, "#")
            async with running_bridge(settings):
                got = await collect(queue, 5, timeout=30)
            await queue.delete(if_unused=False, if_empty=False)
    assert len(got) == 5


def test_unreadable_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    """A CA file that cannot be read fails at once with a ConfigError naming the file."""
    settings = bridge_settings("wss://127.0.0.1:1", "x", amqp_url="amqps://guest:guest@127.0.0.1:1/",
                               ca_file=str(tmp_path / "missing.pem"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        amqp_connect_kwargs(settings)
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--realm-key", KEY, "--ca-file", str(tmp_path / "missing.pem")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "missing.pem" in result.stderr, result.stderr


# -- RabbitMQ with a TLS listener -----------------------------------------------------


@pytest.fixture(scope="module")
def tls_node(pki: Path) -> Iterator[tuple[str, str]]:
    """A private RabbitMQ node with a TLS listener that requires a client certificate: (amqps URL, plain URL)."""
    tls_port = free_port()
    original = cluster_mod._prepare

    def prepare(node: cluster_mod.ClusterNode, uid: int, gid: int) -> None:
        original(node, uid, gid)
        for name in ("ca.pem", "server.pem", "server.key"):
            shutil.copy(pki / name, node.base / name)
            os.chown(node.base / name, uid, gid)
        with (node.base / "rabbitmq.conf").open("a") as conf:
            conf.write(
                f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
                f"ssl_options.cacertfile = {node.base / 'ca.pem'}\n"
                f"ssl_options.certfile = {node.base / 'server.pem'}\n"
                f"ssl_options.keyfile = {node.base / 'server.key'}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = true\n"
                "auth_mechanisms.1 = PLAIN\n"
            )

    cluster_mod._prepare = prepare
    try:
        with cluster_mod.rabbit_cluster(size=1) as running:
            node = running.nodes[0]
            # guest is loopback-only, and the TLS listener is on loopback too.
            yield f"amqps://guest:guest@localhost:{tls_port}/", node.url
    except cluster_mod.ClusterUnavailable as exc:
        pytest.skip(f"no private RabbitMQ node with a TLS listener here: {exc}")
    finally:
        cluster_mod._prepare = original


async def test_amqps_with_ca_file_and_client_certificate(pki: Path, tls_node: tuple[str, str]) -> None:
    """amqps:// connects with --ca-file and a client certificate; without the CA, or the certificate, it fails."""
    url, _ = tls_node
    base = bridge_settings("ws://127.0.0.1:1", "x", amqp_url=url)
    good = replace(base, ca_file=str(pki / "ca.pem"), amqp_client_cert=str(pki / "client.pem"),
                   amqp_client_key=str(pki / "client.key"))  # fmt: skip
    connection = await aio_pika.connect(url, timeout=20, **amqp_connect_kwargs(good))
    await connection.close()
    with pytest.raises(Exception, match=r"(?i)certificate verify failed"):
        await aio_pika.connect(url, timeout=20, **amqp_connect_kwargs(replace(good, ca_file="")))
    with pytest.raises(Exception):  # noqa: B017, PT011 - the node closes the TLS handshake (no certificate)
        await aio_pika.connect(
            url, timeout=20, **amqp_connect_kwargs(replace(good, amqp_client_cert="", amqp_client_key=""))
        )


async def test_bridge_publishes_over_amqps(pki: Path, tls_node: tuple[str, str], exchange_name: str) -> None:
    """The whole bridge, on wss:// and amqps:// with one --ca-file and a client certificate, delivers events."""
    url, plain = tls_node
    async with simulator(rate=0, count=3, **_wss(pki)) as sim:
        settings = bridge_settings(sim.url, exchange_name, amqp_url=url, ca_file=str(pki / "ca.pem"),
                                   amqp_client_cert=str(pki / "client.pem"),
                                   amqp_client_key=str(pki / "client.key"))  # fmt: skip
        connection = await aio_pika.connect_robust(plain)
        async with connection:
            queue = await bind_queue(connection, settings, "#")
            async with running_bridge(settings):
                got = await collect(queue, 3, timeout=40)
    assert len(got) == 3

