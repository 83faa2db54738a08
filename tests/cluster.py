"""A throw-away 3-node RabbitMQ cluster on loopback, started from the installed rabbitmq-server.

The node on 127.0.0.1:5672 (``rabbit@localhost``) is never touched: every extra node has its own
node name, AMQP and distribution ports, config file, env file, data, log and plugin directories, and is
stopped and its directories removed at the end. It shares the Erlang cookie of the default node
(``/var/lib/rabbitmq/.erlang.cookie``): the nodes and ``rabbitmqctl`` run as the ``rabbitmq`` user with
``HOME=/var/lib/rabbitmq``, which is where Erlang looks for the cookie.

Use ``rabbit_cluster()`` as a context manager; it raises ``ClusterUnavailable`` (with the reason) when
the cluster cannot come up, and the pytest fixture turns that into a skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_HOME = Path("/var/lib/rabbitmq")
START_TIMEOUT = 90.0


class ClusterUnavailable(RuntimeError):
    """The cluster could not be started on this machine; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class ClusterNode:
    """One extra RabbitMQ node: its name, ports and directory."""

    name: str
    amqp_port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The AMQP URL of this node (guest is allowed on loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.amqp_port}"


class Cluster:
    """Handle on the running cluster: URLs, and stopping/starting one node."""

    def __init__(self, nodes: list[ClusterNode], env: dict[str, str]) -> None:
        self.nodes = nodes
        self._env = env

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def ctl(self, node: ClusterNode, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` as the rabbitmq user; raise ClusterUnavailable on failure."""
        result = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node.name, *args],
            env=self._env, user="rabbitmq", group="rabbitmq", cwd=RABBITMQ_HOME,
            capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip
        out = (result.stdout + result.stderr).decode(errors="replace")
        if result.returncode != 0:
            raise ClusterUnavailable(f"rabbitmqctl -n {node.name} {' '.join(args)} failed: {out.strip()[-400:]}")
        return out

    def start_node(self, node: ClusterNode) -> None:
        """Start a node (foreground process) and wait until its AMQP port answers."""
        self.launch_node(node)
        self.wait_node(node)

    def launch_node(self, node: ClusterNode) -> None:
        """Start a node's process; ``wait_node`` waits for it (several nodes boot at once this way)."""
        env = {
            **self._env,
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_CONF_ENV_FILE": str(node.base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq.conf"),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(node.base / "node.pid"),
        }
        log = (node.base / "console.log").open("ab")
        node.proc = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=env, user="rabbitmq", group="rabbitmq", cwd=RABBITMQ_HOME,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()

    def wait_node(self, node: ClusterNode) -> None:
        """Wait until a launched node's AMQP port answers; raise ClusterUnavailable if it exits or times out."""
        assert node.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                tail = (node.base / "console.log").read_text(errors="replace")[-600:]
                raise ClusterUnavailable(f"node {node.name} exited with {node.proc.returncode}: {tail}")
            if _port_open(node.amqp_port):
                return
            time.sleep(0.3)
        raise ClusterUnavailable(f"node {node.name} did not open 127.0.0.1:{node.amqp_port} in {START_TIMEOUT:g}s")

    def stop_node(self, node: ClusterNode, timeout: float = 60.0) -> None:
        """Stop a node cleanly (``rabbitmqctl stop``), then make sure its process is gone."""
        if node.proc is None:
            return
        if node.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.ctl(node, "stop", timeout=timeout)
            try:
                node.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, 9)
                node.proc.wait(timeout=10)
        node.proc = None

    def kill_node(self, node: ClusterNode) -> None:
        """SIGKILL a node's process group (a crash: its TCP connections are reset at once)."""
        if node.proc is not None and node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, 9)
            node.proc.wait(timeout=10)
        node.proc = None


def _prepare(node: ClusterNode, uid: int, gid: int) -> None:
    for sub in ("mnesia", "log"):
        (node.base / sub).mkdir(parents=True, exist_ok=True)
    (node.base / "rabbitmq.conf").write_text(
        f"listeners.tcp.local = 127.0.0.1:{node.amqp_port}\n"
        "loopback_users.guest = true\n"
    )
    # Our own env file, so the NODENAME of /etc/rabbitmq/rabbitmq-env.conf does not apply; keep its
    # loopback-only settings for epmd and distribution.
    (node.base / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
    (node.base / "enabled_plugins").write_text("[].\n")
    for path in [node.base, *node.base.rglob("*")]:
        os.chown(path, uid, gid)


@contextlib.contextmanager
def rabbit_cluster(size: int = 3) -> Iterator[Cluster]:
    """Start ``size`` fresh RabbitMQ nodes on loopback, join them, yield, then stop and remove them.

    Raises:
        ClusterUnavailable: not root/rabbitmq, no rabbitmq-server, no cookie, or a node failed to start.
    """
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        raise ClusterUnavailable("rabbitmq-server is not installed in /usr/lib/rabbitmq/bin")
    try:
        account = pwd.getpwnam("rabbitmq")
    except KeyError:
        raise ClusterUnavailable("there is no rabbitmq user") from None
    if os.geteuid() not in (0, account.pw_uid):
        raise ClusterUnavailable("starting extra RabbitMQ nodes needs root or the rabbitmq user")
    if not (RABBITMQ_HOME / ".erlang.cookie").exists():
        raise ClusterUnavailable(f"no Erlang cookie in {RABBITMQ_HOME}")
    tag = uuid.uuid4().hex[:6]
    root = Path(tempfile.mkdtemp(prefix=f"opb-cluster-{tag}-"))
    os.chown(root, account.pw_uid, account.pw_gid)
    nodes = [
        ClusterNode(name=f"opb{tag}n{i}@localhost", amqp_port=_free_port(), dist_port=_free_port(), base=root / f"n{i}")
        for i in range(1, size + 1)
    ]
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(RABBITMQ_HOME),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "RABBITMQ_CONF_ENV_FILE": str(root / "none.conf"),
    }
    cluster = Cluster(nodes, env)
    try:
        for node in nodes:
            _prepare(node, account.pw_uid, account.pw_gid)
        for node in nodes:  # boot together: a node's boot is mostly waiting, and three in a row took a minute
            cluster.launch_node(node)
        for node in nodes:
            cluster.wait_node(node)
        first = nodes[0]
        for node in nodes[1:]:
            cluster.ctl(node, "stop_app")
            cluster.ctl(node, "join_cluster", first.name)
            cluster.ctl(node, "start_app")
        status = cluster.ctl(first, "cluster_status", "--formatter", "json")
        missing = [n.name for n in nodes if status.count(n.name) < 2]
        if missing:
            raise ClusterUnavailable(f"nodes not running in the cluster: {missing}")
        yield cluster
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                cluster.stop_node(node)
        shutil.rmtree(root, ignore_errors=True)
