"""Shared pieces of the HA tests: bridge replicas as real processes, their /readyz and /metrics, a test queue."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import AMQP_URL, BridgeProcess, free_port, process_args, wait_until

KEY2 = "test-realm-key-second-7a41e2"
# Fast failover for tests: a standby polls the lock every 0.2 s; window > 3 x 2 + 0.2 + 1.
HA_FLAGS = ("--standby-poll", "0.2", "--lock-heartbeat", "2", "--standby-window", "30")


class Replica:
    """One bridge replica: a process with its own spool and metrics port; restartable with the same spool."""

    def __init__(
        self,
        name: str,
        stream_url: str,
        exchange: str,
        spool_dir: Path,
        *,
        amqp_urls: Sequence[str] = (AMQP_URL,),
        extra: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.port = free_port()
        self.spool = str(spool_dir / f"{name}.db")
        args = process_args(stream_url, exchange, self.spool, self.port)
        i = args.index("--amqp-url")
        del args[i : i + 2]
        for url in amqp_urls:
            args += ["--amqp-url", url]
        self.args = [*args, *HA_FLAGS, *extra]
        self.proc: BridgeProcess | None = None
        self.logs: list[str] = []

    def start(self) -> None:
        """Start (or restart) the process."""
        self.proc = BridgeProcess(self.args, log_path=f"/tmp/ha-{self.name}-{uuid.uuid4().hex[:6]}.log")

    def kill(self) -> None:
        """SIGKILL."""
        assert self.proc is not None
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        self.proc.signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.logs.append(self.proc.output())
        return code

    def close(self) -> None:
        """Kill if running; keep the log text."""
        if self.proc is not None:
            self.logs.append(self.proc.output())
            self.proc.close()

    def output(self) -> str:
        """Every log line of every run."""
        return "".join(self.logs) + (self.proc.output() if self.proc else "")

    async def readyz(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """The /readyz JSON, or None when the process does not answer."""
        try:
            async with session.get(f"http://127.0.0.1:{self.port}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                data: dict[str, Any] = await r.json()
                return data
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def metrics(self, session: aiohttp.ClientSession) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, by (name, labels)."""
        async with session.get(f"http://127.0.0.1:{self.port}/metrics", timeout=aiohttp.ClientTimeout(total=3)) as r:
            text = await r.text()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    async def roles(self, session: aiohttp.ClientSession) -> dict[str, str]:
        """Role per realm label, {} when down."""
        state = await self.readyz(session)
        return dict(state.get("roles", {})) if state else {}


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of the samples of one metric whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


async def wait_roles(
    session: aiohttp.ClientSession, replicas: Sequence[Replica], realm: str, timeout: float = 30
) -> Replica:
    """Wait until exactly one of the replicas leads ``realm`` and every other running one is a ready standby."""
    found: list[Replica] = []

    async def check() -> bool:
        found.clear()
        states = [await r.readyz(session) for r in replicas]
        if any(s is None or not s.get("ready") for s in states):
            return False
        leaders = [r for r, s in zip(replicas, states, strict=True) if s and s["roles"].get(realm) == "leader"]
        found.extend(leaders)
        return len(leaders) == 1

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return found[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no single ready leader of {realm} within {timeout}s: {found}")


class Collector:
    """Consumes a test queue in the background and keeps every message."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue
        self.messages: list[AbstractIncomingMessage] = []
        self._tag: str | None = None

    async def start(self) -> None:
        async def on_message(message: AbstractIncomingMessage) -> None:
            await message.ack()
            self.messages.append(message)

        self._tag = await self.queue.consume(on_message)

    async def stop(self) -> None:
        if self._tag is not None:
            with contextlib.suppress(Exception):
                await self.queue.cancel(self._tag)

    def seqs(self, realm: str | None = None) -> list[int]:
        """Sequence numbers received (of one realm label, from the ``realm`` header, when given)."""
        return [
            int(orjson.loads(m.body)["seq"])
            for m in self.messages
            if realm is None or (m.headers or {}).get("realm") == realm
        ]

    async def wait_all(self, last_seq: int, realm: str | None = None, timeout: float = 60) -> bool:
        """Wait until every seq 1..last_seq arrived."""
        want = set(range(1, last_seq + 1))
        return await wait_until(lambda: want <= set(self.seqs(realm)), timeout=timeout, interval=0.2)

    async def expect_all_sent(self, sim: Any, timeout: float = 60) -> int:
        """The simulator's last seq (its one realm), once every seq up to it arrived; fails with the missing ones."""
        realms = sim.stats()["realms"]
        last = int(realms[next(iter(realms))]["last_seq"])
        if not await self.wait_all(last, timeout=timeout):
            missing = sorted(set(range(1, last + 1)) - set(self.seqs()))[:20]
            raise AssertionError(f"not every event up to seq {last} arrived; missing (first 20): {missing}")
        return last
