"""The simulator's settings, validated on creation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from bridge.errors import ConfigError

__all__ = ["ACKS", "DEMO_REALM_KEY", "SHAPES", "Ack", "Shape", "SimulatorConfig", "control_host_port"]

Shape: TypeAlias = Literal["flat", "nested", "mixed"]
Ack: TypeAlias = Literal["info", "subscribe", "both"]

SHAPES: Final[tuple[str, ...]] = ("flat", "nested", "mixed")
ACKS: Final[tuple[str, ...]] = ("info", "subscribe", "both")
# Padded events stay well below the bridge's default 1 MiB frame limit unless asked.
MAX_DATA_BYTES: Final = 16 * 1024 * 1024
_HOST_PORT: Final = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]*):(\d{1,5})$")
# The key the simulator accepts by default: long enough for the bridge (16 characters at least).
DEMO_REALM_KEY: Final = "demo-realm-key-0123456789"
_COUNTERS: Final = ("count", "drop_every", "silent_after", "malformed_every", "data_bytes")


@dataclass(frozen=True, kw_only=True, slots=True)
class SimulatorConfig:
    """Settings of the simulated stream server; validated on creation.

    Attributes:
        host: address to listen on.
        port: TCP port; 0 picks a free one (read ``Simulator.port``).
        realm_keys: realm keys the server accepts.
        rate: events per second per realm; 0 means as fast as possible.
        count: stop emitting generated events after this many per realm (0 = never).
        shape: notification envelope; ``mixed`` alternates flat (odd seq) and nested (even seq).
        ack: what answers a successful subscribe/unsubscribe: ``info``, the echo, or both.
        pong: answer the text ``PING`` with a text ``PONG``.
        drop_every: close a connection cleanly after N events sent on it (0 = never).
        silent_after: after N events on a connection, stop sending and reading (0 = never).
        malformed_every: after every N events of a realm, also send one malformed frame.
        seed: RNG seed of the event sequences.
        data_bytes: pad the ``data`` value of generated events to about this many bytes
            (0 = the plain 24-hex entity id).
        tls_cert: PEM certificate chain to serve ``wss://`` with ('' = plain ``ws://``).
        tls_key: PEM private key of ``tls_cert``.
        control_addr: ``HOST:PORT`` of the HTTP control API ('' = none); an empty host
            means loopback.
        record: keep every sent event in ``Simulator.sent`` (a long-running process
            turns it off so that its memory stays flat).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    realm_keys: tuple[str, ...] = (DEMO_REALM_KEY,)
    rate: float = 20.0
    count: int = 0
    shape: Shape = "flat"
    ack: Ack = "both"
    pong: bool = False
    drop_every: int = 0
    silent_after: int = 0
    malformed_every: int = 0
    seed: int = 0
    data_bytes: int = 0
    tls_cert: str = ""
    tls_key: str = ""
    control_addr: str = ""
    record: bool = True

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("simulator setting 'host' must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"simulator setting 'port' must be 0..65535, got {self.port}")
        if not isinstance(self.realm_keys, tuple) or not self.realm_keys:
            raise ConfigError("simulator setting 'realm_keys' must be a non-empty tuple")
        if not all(isinstance(key, str) and key for key in self.realm_keys):
            raise ConfigError("simulator setting 'realm_keys' holds an empty or non-string key")
        if not math.isfinite(self.rate) or self.rate < 0:
            raise ConfigError(f"simulator setting 'rate' must be a finite number >= 0, got {self.rate}")
        for name in _COUNTERS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"simulator setting {name!r} must be an integer >= 0, got {value!r}")
        if self.data_bytes > MAX_DATA_BYTES:
            raise ConfigError(f"simulator setting 'data_bytes' must be at most {MAX_DATA_BYTES}")
        if self.shape not in SHAPES:
            raise ConfigError(f"simulator setting 'shape' must be one of {SHAPES}, got {self.shape!r}")
        if self.ack not in ACKS:
            raise ConfigError(f"simulator setting 'ack' must be one of {ACKS}, got {self.ack!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("simulator settings 'tls_cert' and 'tls_key' must be given together")
        if self.control_addr:
            control_host_port(self.control_addr)

    @property
    def tls(self) -> bool:
        """Whether the server speaks ``wss://``."""
        return bool(self.tls_cert)


def control_host_port(addr: str) -> tuple[str, int]:
    """Read ``HOST:PORT`` (or ``:PORT``, loopback) of the control API.

    Raises:
        ConfigError: not of that form, or the port is out of range.
    """
    match = _HOST_PORT.match(addr.strip())
    if match is None or int(match.group(2)) > 65535:
        raise ConfigError(f"simulator setting 'control_addr' must be HOST:PORT such as 127.0.0.1:8766, got {addr!r}")
    return match.group(1).strip("[]") or "127.0.0.1", int(match.group(2))
