"""The ``orangepill-bridge`` command line: arguments become settings, then the app runs.

Each verb lives in its own module (``app``, ``demo``, ``tail``, ``check``, the
simulator); this one only parses arguments, sets up logging and signals, and
imports the verb it runs (lazily, so ``--help`` and ``events`` stay fast).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from bridge import __version__
from bridge.catalog import CATALOG, EXAMPLE_BINDINGS
from bridge.config import add_arguments, load_settings, whole_number
from bridge.errors import ConfigError
from bridge.logs import setup_logging
from bridge.tls import check_files, log_transport_warnings

__all__ = ["main"]

log = logging.getLogger("bridge.cli")

_BROKER_ONLY = (
    "amqp_url", "amqp_url_file", "ca_file", "tls_insecure", "amqp_client_cert", "amqp_client_key",
    "exchange", "unroutable", "log_format", "log_level",
)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orangepill-bridge",
        description="Republish the Orangepill notification stream to a RabbitMQ topic exchange.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the bridge (the main job)")
    add_arguments(run)

    from bridge.simulator import add_simulate_arguments

    simulate = sub.add_parser("simulate", help="serve a fake Orangepill stream on ws://127.0.0.1:8765")
    add_simulate_arguments(simulate)

    demo = sub.add_parser("demo", help="simulator + bridge + live tail in one process, against the AMQP URL given")
    add_arguments(demo, only=(*_BROKER_ONLY, "metrics_addr", "spool"))
    demo.add_argument("--rate", type=float, default=5.0, help="simulated events per second [5]")
    demo.add_argument("--seconds", type=float, default=0.0, help="stop after this many seconds (0 = Ctrl-C)")

    tail = sub.add_parser("tail", help="bind a temporary queue to the exchange and print events live")
    tail.add_argument("patterns", nargs="*", default=["#"], metavar="PATTERN", help="binding keys [#]")
    tail.add_argument("--json", action="store_true", help="print each message body as received")
    tail.add_argument(
        "--count", type=_count, default=0, metavar="N", help="stop after N events, with a bar on a terminal [0 = never]"
    )
    add_arguments(tail, only=_BROKER_ONLY)

    reroute = sub.add_parser(
        "reroute", help="publish the events kept in <exchange>.unrouted to the exchange again, once bound"
    )
    reroute.add_argument("--dry-run", action="store_true", help="count them by routing key, move nothing")
    reroute.add_argument(
        "--refused",
        action="store_true",
        help="instead, the events RabbitMQ refused for good (reason=unpublishable in <exchange>.quarantine), "
        "once the cause is fixed; quarantined frames stay",
    )
    reroute.add_argument(
        "--limit", type=_count, default=0, metavar="N", help="handle at most N events [0 = all there at the start]"
    )
    # Declares nothing; the realm keys only keep a key out of the entity_id of a --refused event rebuilt.
    add_arguments(
        reroute, only=(*(name for name in _BROKER_ONLY if name != "unroutable"), "realms", "realm_key_file")
    )

    events = sub.add_parser("events", help="list the documented events and example binding patterns")
    events.add_argument("--infobip", action="store_true", help="only events that need the Infobip extension")

    check = sub.add_parser(
        "check", help="pre-flight: stream reachable, realm key accepted, broker reachable, topology declared"
    )
    add_arguments(check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code.

    Output piped into a reader that stops early (``orangepill-bridge events | head``) ends the command
    quietly, as other command-line tools do, instead of with a BrokenPipeError traceback.
    """
    _catch_early_signals()
    try:
        return _main(argv)
    except BrokenPipeError:
        # Python would flush stdout again at exit and fail again: point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it


_early_signals: list[int] = []


def _catch_early_signals() -> None:
    """Until the event loop handles them, a SIGTERM or SIGINT is noted, not fatal: a stop that came during the
    start-up (the imports take about 0.4 s) ended the process with 143 and no log line; now it stops cleanly."""

    def note(signum: int, _frame: object) -> None:
        _early_signals.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread (tests): leave it
            signal.signal(sig, note)


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command: str = args.command
    if command == "events":
        return _events(args)
    try:
        if command == "simulate":
            return _simulate(args)
        settings = load_settings(args, require_realm=command in ("run", "check"))
        check_files(settings)
    except ConfigError as exc:
        print(f"orangepill-bridge {command}: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format, settings.realm_keys, settings.passwords)
    log_transport_warnings(settings)
    if command == "run":
        from bridge.app import run_bridge

        return _run_until_signal(lambda stop: run_bridge(settings, stop))
    if command == "demo":
        from bridge.demo import demo

        return _run_until_signal(lambda stop: demo(settings, args, stop))
    if command == "tail":
        from bridge.tail import tail
        from bridge.topic import pattern_problem

        for pattern in args.patterns:
            problem = pattern_problem(pattern)
            if problem is not None:  # the same rule as --bind: a pattern that would catch nothing
                print(f"orangepill-bridge tail: pattern {pattern[:80]!r} {problem}", file=sys.stderr)
                return 2

        return _run_until_signal(lambda stop: tail(settings, args.patterns, args.json, stop, count=args.count))
    if command == "reroute":
        from bridge.reroute import reroute

        return _run_until_signal(
            lambda stop: reroute(settings, stop, dry_run=args.dry_run, limit=args.limit, refused=args.refused)
        )
    if command == "check":
        from bridge.check import preflight

        return _run_until_signal(lambda stop: preflight(settings))
    parser.error(f"unknown command {command}")  # pragma: no cover - argparse rejects it first
    return 2  # pragma: no cover


def _count(text: str) -> int:
    """A whole number >= 0 (argparse type; the message is the settings parser's own)."""
    try:
        return whole_number(0)(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_until_signal(factory: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run a coroutine with SIGTERM/SIGINT setting its stop event (a second signal forces exit)."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.error("second signal: exiting at once")
                os._exit(1)
            log.info("signal %s: stopping", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        if _early_signals:  # a signal during the start-up
            on_signal(_early_signals[0])
        return await factory(stop)

    return _asyncio_run(runner())


def _asyncio_run(coro: Awaitable[int]) -> int:
    async def wrap() -> int:
        return await coro

    if os.environ.get("BRIDGE_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(wrap())
    return asyncio.run(wrap())


def _events(args: argparse.Namespace) -> int:
    width = max(len(spec.name) for spec in CATALOG)
    for spec in CATALOG:
        if args.infobip and not spec.infobip:
            continue
        mark = "*" if spec.infobip else " "
        print(f"{spec.name:<{width}} {mark} {spec.description}")
    print("\n* needs the Infobip extension. CHANNEL is sms, whatsapp, html or any other enabled channel.")
    print("\nExample binding patterns (routing key = event name):")
    for pattern, meaning in EXAMPLE_BINDINGS:
        print(f"  {pattern:<16} {meaning}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from bridge.simulator import config_from_args, serve
    from bridge.simulator.cli import SentProgress

    config = config_from_args(args)
    setup_logging(os.environ.get("BRIDGE_LOG_LEVEL", "INFO"), os.environ.get("BRIDGE_LOG_FORMAT", "auto"))

    async def go(stop: asyncio.Event) -> int:
        if not config.count:
            await serve(config, stop)
            return 0
        with SentProgress(config) as progress:  # --count N: a bar on a terminal
            await serve(config, stop, on_sent=progress)
        return 0

    return _run_until_signal(go)
