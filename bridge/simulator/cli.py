"""The ``simulate`` command: its flags, resolved by the bridge's own settings code, and ``serve``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import IO, Final, Self

from bridge.config import ConfigFile, Setting, add_setting_arguments, boolean, choice, number, resolve, whole_number
from bridge.config import file_realms as _file_realms
from bridge.errors import ConfigError
from bridge.progress import Progress
from bridge.secrets import key_fingerprint
from bridge.simulator.server import SentEvent, Simulator, load_tls
from bridge.simulator.settings import ACKS, DEMO_REALM_KEY, MAX_DATA_BYTES, SHAPES, SimulatorConfig, control_host_port

__all__ = ["SIM_SETTINGS", "SentProgress", "add_simulate_arguments", "config_from_args", "serve"]

log = logging.getLogger(__name__)


def _text(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _key_file(raw: object, where: str) -> list[str]:
    """The keys of a realm-key file, read as the bridge reads it (a ``LABEL=`` prefix is dropped)."""
    return [realm.key.reveal() for realm in _file_realms(raw, where)]


def _control_addr(text: str) -> str:
    value = text.strip()
    if value.lower() in ("", "off", "none"):
        return ""
    try:
        control_host_port(value)
    except ConfigError:
        raise ValueError("must be HOST:PORT (such as 127.0.0.1:8766), :PORT for loopback, or 'off'") from None
    return value


# One entry per setting, as in bridge.config.SETTINGS.
SIM_SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("host", "--host", "SIM_HOST", _text, "address to listen on"),
    Setting("port", "--port", "SIM_PORT", whole_number(0, 65535), "port; 0 = any free port"),
    Setting("realm_keys", "--realm-key", "ORANGEPILL_REALM_KEY", _text,
            "accepted realm key (repeatable; env: comma-separated)",
            item="realm key", secret=True, shown_default=DEMO_REALM_KEY),
    Setting("realm_key_file", "--realm-key-file", "ORANGEPILL_REALM_KEY_FILE", _text,
            "file of accepted realm keys, one KEY or LABEL=KEY per line, '#' comment lines",
            shown_default="none", convert=_key_file),
    Setting("rate", "--rate", "SIM_RATE", number(0), "events per second per realm, 0 = as fast as possible"),
    Setting("count", "--count", "SIM_COUNT", whole_number(0),
            "stop sending after N events per realm (the server stays up until Ctrl-C), 0 = never"),
    Setting("shape", "--shape", "SIM_SHAPE", choice(*SHAPES), "notification envelope: " + ", ".join(SHAPES)),
    Setting("ack", "--ack", "SIM_ACK", choice(*ACKS), "answer to a subscribe: " + ", ".join(ACKS)),
    Setting("pong", "--pong", "SIM_PONG", boolean, "answer the text PING with PONG", switch=True),
    Setting("drop_every", "--drop-every", "SIM_DROP_EVERY", whole_number(0),
            "close a connection after N events on it, 0 = never"),
    Setting("silent_after", "--silent-after", "SIM_SILENT_AFTER", whole_number(0),
            "go silent on a connection after N events on it, 0 = never"),
    Setting("malformed_every", "--malformed-every", "SIM_MALFORMED_EVERY", whole_number(0),
            "send a malformed frame after every N events, 0 = never"),
    Setting("seed", "--seed", "SIM_SEED", whole_number(0), "RNG seed of the event sequences"),
    Setting("data_bytes", "--data-bytes", "SIM_DATA_BYTES", whole_number(0, MAX_DATA_BYTES),
            "pad each generated event's data value to about N bytes, 0 = plain ids"),
    Setting("tls_cert", "--tls-cert", "SIM_TLS_CERT", _text, "PEM certificate chain: serve wss://", shown_default="none (ws://)"),
    Setting("tls_key", "--tls-key", "SIM_TLS_KEY", _text, "PEM private key of --tls-cert", shown_default="none"),
    Setting("control_addr", "--control-addr", "SIM_CONTROL_ADDR", _control_addr,
            "HOST:PORT of the HTTP fault-control API (no authentication: keep it on loopback), or 'off'",
            shown_default="off"),
)  # fmt: skip

SIM_CONFIG_FILE: Final = ConfigFile("--config", "SIM_CONFIG")


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` flags; each falls back to its ``SIM_*`` variable, then a TOML file.

    Realm keys fall back to ``ORANGEPILL_REALM_KEY`` (comma-separated), then to
    ``ORANGEPILL_REALM_KEY_FILE`` (the same file the bridge reads), then to ``DEMO_REALM_KEY``.
    """
    add_setting_arguments(parser, SIM_SETTINGS, SimulatorConfig(), SIM_CONFIG_FILE)


def config_from_args(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> SimulatorConfig:
    """Build the simulator settings from flags, then the environment, then the TOML file, then defaults.

    The result does not record sent events (``record=False``): a process run from the
    command line is watched through its logs and control API, and must stay flat in memory.

    Raises:
        ConfigError: a value is invalid; the message names the flag, variable or file key.
    """
    sources: dict[str, int] = {}
    values = resolve(SIM_SETTINGS, ns, os.environ if environ is None else environ, SIM_CONFIG_FILE, sources=sources)
    in_file = values.pop("realm_key_file", None)
    if in_file is not None and sources["realm_key_file"] < sources.get("realm_keys", 3):
        values["realm_keys"] = in_file
    if "realm_keys" in values:
        values["realm_keys"] = tuple(dict.fromkeys(values["realm_keys"]))
    config = SimulatorConfig(record=False, **values)
    load_tls(config)  # fail now, with exit code 2, rather than at bind time
    return config


class SentProgress:
    """An ``on_sent`` hook showing ``--count`` progress (every realm's events): a bar on a terminal, log lines.

    Args:
        config: the settings; the total is ``count`` times the number of realm keys.
        stream: where the bar goes (standard error; a bar only when it is a terminal).
    """

    def __init__(self, config: SimulatorConfig, *, stream: IO[str] | None = None) -> None:
        self.progress = Progress("simulate", config.count * len(config.realm_keys), stream=stream)
        self._closed = False

    def __call__(self, _event: SentEvent) -> None:
        progress = self.progress
        progress.update()
        if progress.done == progress.total:
            self.close()

    def close(self) -> None:
        """End the bar (once; the first call logs the final line)."""
        if not self._closed:
            self._closed = True
            self.progress.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def serve(
    config: SimulatorConfig,
    stop: asyncio.Event,
    *,
    on_sent: Callable[[SentEvent], None] | None = None,
) -> None:
    """Run the simulator until ``stop`` is set, logging its state.

    Args:
        config: the settings.
        stop: set it to stop.
        on_sent: called with each delivered event (a progress display, for one).

    Raises:
        OSError: the address cannot be bound.
    """
    async with Simulator(config, on_sent=on_sent) as sim:
        log.info(
            "simulated Orangepill stream at %s accepting %d realm key(s): %s",
            sim.url,
            len(config.realm_keys),
            ", ".join(key_fingerprint(key) for key in config.realm_keys),
        )
        last = (-1, -1, -1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):
                    await stop.wait()
            state = (sim.open_connections, sim.subscribes, sim.sent_total)
            if state != last:
                log.info(
                    "simulator: %d open connection(s), %d subscribe(s), %d rejected, %d event(s) sent",
                    state[0],
                    state[1],
                    sim.rejected,
                    state[2],
                )
                last = state
