"""``orangepill-bridge demo``: simulator + bridge + live tail in one process, the whole product on one screen."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from dataclasses import replace

from bridge.app import run_bridge
from bridge.config import Realm, Secret, Settings
from bridge.simulator import DEMO_REALM_KEY, Simulator, SimulatorConfig
from bridge.spool import Spool
from bridge.tail import tail

__all__ = ["demo"]

_DEMO_KEY = DEMO_REALM_KEY
_DEMO_METRICS = "127.0.0.1:9180"
_DEFAULTS = Settings()


async def demo(settings: Settings, args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Run the demo until ``stop`` (or ``--seconds``); return the bridge's exit code."""
    # The tail binds its queue first, so that the demo's very first event is shown too.
    tail_stop = asyncio.Event()
    tail_task = await _start_tail(settings, tail_stop)
    if tail_task.done():
        return tail_task.result() or 1
    sim = Simulator(SimulatorConfig(port=0, realm_keys=(_DEMO_KEY,), rate=args.rate))
    await sim.start()
    demo_settings = _demo_settings(settings, sim.url)
    print(
        f"demo: simulator on {sim.url}, bridge -> {settings.exchange} on the broker, spool {demo_settings.spool}, "
        + ("no metrics" if demo_settings.metrics_addr == "off" else f"metrics on http://{demo_settings.metrics_addr}/metrics")
        + ". Ctrl-C stops.",
        file=sys.stderr,
    )
    bridge_stop = asyncio.Event()
    bridge = asyncio.create_task(run_bridge(demo_settings, bridge_stop))
    try:
        await _wait_for_end(stop, bridge, args.seconds)
    finally:
        bridge_stop.set()
        code = await bridge
        tail_stop.set()
        with contextlib.suppress(Exception):
            await tail_task
        await sim.stop()
    if code == 0:
        await _remove_demo_spool(demo_settings.spool)
    print(f"demo: simulator sent {len(sim.sent)} events", file=sys.stderr)
    return code


async def _start_tail(settings: Settings, stop: asyncio.Event) -> asyncio.Task[int]:
    """Start the tail and wait (up to 15 s) until its queue is bound or it failed."""
    bound = asyncio.Event()
    task = asyncio.create_task(tail(settings, ["#"], False, stop, bound, new_exchange_notice=False))
    bound_wait = asyncio.ensure_future(bound.wait())
    await asyncio.wait({bound_wait, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    bound_wait.cancel()
    return task


def _demo_settings(settings: Settings, stream_url: str) -> Settings:
    """The bridge's settings for the demo: its own realm and stream; a spool file of its own and the metrics on
    loopback unless they were set (by a flag, the environment or the TOML file: anything but the default)."""
    spool = settings.spool
    if spool == _DEFAULTS.spool:
        spool = _demo_spool()
    metrics = settings.metrics_addr if settings.metrics_addr != _DEFAULTS.metrics_addr else _DEMO_METRICS
    return replace(
        settings,
        stream_url=stream_url,
        realms=(Realm(label="demo", key=Secret(_DEMO_KEY)),),
        spool=spool,
        metrics_addr=metrics,
    )


def _demo_spool() -> str:
    return os.path.join(tempfile.gettempdir(), f"orangepill-bridge-demo-{os.getpid()}.db")


async def _remove_demo_spool(path: str) -> None:
    """The demo's own spool file, once it is empty (every event confirmed); one that holds events stays."""
    if path != _demo_spool():
        return
    try:
        spool = await Spool.open(path)
        left = spool.depth
        await spool.close()
    except Exception:
        return
    if left:
        print(f"demo: {left} events stay in {path}", file=sys.stderr)
        return
    for name in (path, f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


async def _wait_for_end(stop: asyncio.Event, bridge: asyncio.Task[int], seconds: float) -> None:
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        return
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait({stop_wait, bridge}, return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
