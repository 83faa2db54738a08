"""The floor of the "CPU at 100 events/s" figure on this machine: a compiled relay.

At 100 events/s every event arrives alone and the subject sleeps between them, so
its cost is mostly what one wake-up costs. ``socat`` relays TCP messages from a
sender to a sink (one wake-up, one read and one write per message, no AMQP and no
interpreter); its CPU at the same rate is the least any relay pays here. The
bench reports it next to the bridge, the Node peer and raw aio-pika. Without
``socat`` on PATH (Debian's package ``socat``) it says so and reports None.
"""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import threading
import time
from typing import Any

from bench import common

MESSAGE = (
    b'{"type":"notification","event":"deposit.received","data":"63967141191e9023f356df9f",'
    b'"timestamp":"162553625262"}'
)


def relay_floor(rate: float = 100.0, count: int = 2000) -> dict[str, Any]:
    """socat relaying ``count`` messages offered at ``rate``/s: its CPU as a share of one core."""
    exe = shutil.which("socat")
    if exe is None:
        return {"skipped": "no socat on PATH (apt-get install socat)", "cpu_percent_of_core": None}
    sink = socket.create_server(("127.0.0.1", 0))
    received = 0

    def drain() -> None:
        nonlocal received
        conn, _ = sink.accept()
        with conn:
            while data := conn.recv(65536):
                received += len(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    port = common.free_port()
    relay = subprocess.Popen(
        [exe, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", f"TCP:127.0.0.1:{sink.getsockname()[1]}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                sender = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with sender:
            time.sleep(0.5)  # socat connects to the sink after the accept
            cpu0, t0 = common.cpu_seconds(relay.pid), time.monotonic()
            for i in range(count):
                sender.sendall(MESSAGE)
                delay = t0 + (i + 1) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            wall = time.monotonic() - t0
            cpu = common.cpu_seconds(relay.pid) - cpu0
            early = relay.poll()  # socat ended before the sender was done: no figure
        reader.join(timeout=5)
    finally:
        relay.terminate()
        relay.wait(timeout=5)
        sink.close()
    if early is not None or math.isnan(cpu):
        return {"skipped": f"socat exited early (code {early})", "cpu_percent_of_core": None}
    return {
        "subject": "socat relay",
        "rate": rate,
        "count": count,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "cpu_percent_of_core": round(100.0 * cpu / wall, 2),
        "complete": received == count * len(MESSAGE),
    }
