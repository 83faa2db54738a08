"""Settings of the bridge: flags > environment > TOML file > defaults, validated once at start."""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from bridge.bindings import Binding, parse_bindings
from bridge.errors import ConfigError
from bridge.protocol import key_fingerprint

__all__ = [
    "ENV_VARS",
    "SETTINGS",
    "Realm",
    "Settings",
    "add_arguments",
    "load_settings",
    "parse_realm",
    "redact_url",
]


@dataclass(frozen=True, slots=True)
class Realm:
    """A realm to subscribe to: the key (never shown) and the label used in headers and metrics."""

    label: str
    key: str = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """Short non-reversible name of the key."""
        return key_fingerprint(self.key)


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Every setting of the bridge, read once at start."""

    stream_url: str = "wss://stream.orangepill.cloud"
    realms: tuple[Realm, ...] = ()
    amqp_url: str = field(default="amqp://guest:guest@localhost:5672/", repr=False)
    exchange: str = "orangepill.events"
    spool: str = "./bridge-spool.db"
    spool_max_bytes: int = 2 * 1024**3
    metrics_addr: str = "0.0.0.0:9180"
    ping_interval: float = 10.0
    idle_timeout: float = 30.0
    subscribe_timeout: float = 10.0
    confirm_window: int = 256
    publish_timeout: float = 30.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    reconnect_reset_after: float = 10.0
    unroutable: str = "keep"
    max_frame_bytes: int = 1024 * 1024
    drain_timeout: float = 10.0
    log_format: str = "auto"
    log_level: str = "INFO"
    explorer: str = "on"
    bindings: tuple[Binding, ...] = ()

    @property
    def realm_keys(self) -> tuple[str, ...]:
        """The realm keys, which must never be printed."""
        return tuple(realm.key for realm in self.realms)

    @property
    def passwords(self) -> tuple[str, ...]:
        """Passwords inside the configured URLs, which must never be printed."""
        found = (urlsplit(self.amqp_url).password, urlsplit(self.stream_url).password)
        return tuple(p for p in found if p)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings to scrub from text taken from the outside (server frames): the realm keys."""
        return self.realm_keys

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        """Where to serve /metrics, or None when switched off."""
        if self.metrics_addr in ("", "off", "none"):
            return None
        host, _, port = self.metrics_addr.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - documented default

    def describe(self) -> dict[str, Any]:
        """The settings with secrets removed, for the start-up log line."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "realms":
                value = [realm.label for realm in self.realms]
            elif f.name == "amqp_url" or f.name == "stream_url":
                value = redact_url(value)
            out[f.name] = value
        return out


# -- value parsers: each takes the raw text and returns the value or raises ValueError --

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip
_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_EXCHANGE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]*):(\d{1,5})$")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a positive number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError("must be a positive whole number") from None
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _size(text: str) -> int:
    match = _SIZE.match(str(text))
    if match is None or (match.group(2) or "").lower() not in _SIZE_UNITS:
        raise ValueError("must be a size such as 2GiB, 500MB or 1048576")
    value = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
    if value < 64 * 1024:
        raise ValueError("must be at least 64KiB")
    return value


def _ws_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("must be a ws:// or wss:// URL with a host")
    return text.strip()


def _amqp_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError("must be an amqp:// or amqps:// URL with a host")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return text.strip()


def _exchange(text: str) -> str:
    name = text.strip()
    if not _EXCHANGE.match(name):
        raise ValueError("must be 1-200 characters of letters, digits, '.', '-', '_' or ':'")
    if name.startswith("amq."):
        raise ValueError("names starting with 'amq.' are reserved by RabbitMQ")
    return name


def _spool(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must be a file path or 'memory'")
    return value


def _addr(text: str) -> str:
    value = text.strip()
    if value.lower() in ("", "off", "none"):
        return "off"
    match = _HOST_PORT.match(value)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError("must be HOST:PORT (such as 0.0.0.0:9180 or 127.0.0.1:9180) or 'off'")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError("must be one of " + ", ".join(options))
        return value

    return parse


def _log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
    return value


def parse_realm(text: str) -> Realm:
    """Read ``KEY`` or ``LABEL=KEY``; without a label the key's fingerprint is the label.

    Raises:
        ValueError: the key is empty or holds whitespace (the message never shows the key).
    """
    value = text.strip()
    label = ""
    head, sep, tail = value.partition("=")
    if sep and tail.strip("=") and _LABEL.match(head):
        label, value = head, tail
    if not value:
        raise ValueError("a realm key is empty")
    if any(ch.isspace() for ch in value) or len(value) > 4096:
        raise ValueError("a realm key holds whitespace or is too long")
    return Realm(label=label or key_fingerprint(value), key=value)


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its field, flag, environment variable, parser and help."""

    name: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("stream_url", "--stream-url", "ORANGEPILL_STREAM_URL", _ws_url, "Orangepill stream URL"),
    Setting("realms", "--realm-key", "ORANGEPILL_REALM_KEY", parse_realm,
            "realm key, KEY or LABEL=KEY (repeatable; env: comma-separated)"),
    Setting("amqp_url", "--amqp-url", "BRIDGE_AMQP_URL", _amqp_url, "RabbitMQ URL"),
    Setting("exchange", "--exchange", "BRIDGE_EXCHANGE", _exchange, "topic exchange to publish to"),
    Setting("spool", "--spool", "BRIDGE_SPOOL", _spool, "spool file, or 'memory' for no disk"),
    Setting("spool_max_bytes", "--spool-max-bytes", "BRIDGE_SPOOL_MAX_BYTES", _size,
            "spool bound; when full the stream is not read (back-pressure)"),
    Setting("metrics_addr", "--metrics-addr", "BRIDGE_METRICS_ADDR", _addr,
            "HOST:PORT for /metrics, /healthz, /readyz, or 'off'"),
    Setting("ping_interval", "--ping-interval", "BRIDGE_PING_INTERVAL", _positive_float,
            "seconds between text PING keepalives"),
    Setting("idle_timeout", "--idle-timeout", "BRIDGE_IDLE_TIMEOUT", _positive_float,
            "seconds without any frame or pong before the link is dropped and redialled"),
    Setting("subscribe_timeout", "--subscribe-timeout", "BRIDGE_SUBSCRIBE_TIMEOUT", _positive_float,
            "seconds to wait for the answer to subscribe"),
    Setting("confirm_window", "--confirm-window", "BRIDGE_CONFIRM_WINDOW", _positive_int,
            "publishes awaiting a broker confirm at once"),
    Setting("publish_timeout", "--publish-timeout", "BRIDGE_PUBLISH_TIMEOUT", _positive_float,
            "seconds to wait for a confirm before retrying"),
    Setting("reconnect_min", "--reconnect-min", "BRIDGE_RECONNECT_MIN", _positive_float,
            "first reconnect delay, seconds"),
    Setting("reconnect_max", "--reconnect-max", "BRIDGE_RECONNECT_MAX", _positive_float,
            "largest reconnect delay, seconds"),
    Setting("reconnect_reset_after", "--reconnect-reset-after", "BRIDGE_RECONNECT_RESET_AFTER",
            _positive_float, "seconds a link must stay subscribed before the backoff resets"),
    Setting("unroutable", "--unroutable", "BRIDGE_UNROUTABLE", _choice("keep", "drop"),
            "keep unroutable events in <exchange>.unrouted, or drop (and count) them"),
    Setting("max_frame_bytes", "--max-frame-bytes", "BRIDGE_MAX_FRAME_BYTES", _size,
            "larger frames are quarantined"),
    Setting("drain_timeout", "--drain-timeout", "BRIDGE_DRAIN_TIMEOUT", _positive_float,
            "seconds to wait for outstanding confirms on shutdown"),
    Setting("log_format", "--log-format", "BRIDGE_LOG_FORMAT", _choice("auto", "json", "text"),
            "log format (auto: text on a terminal, JSON otherwise)"),
    Setting("log_level", "--log-level", "BRIDGE_LOG_LEVEL", _log_level, "log level"),
    Setting("explorer", "--explorer", "BRIDGE_EXPLORER", _choice("on", "off"),
            "the Explorer page at / on the metrics port"),
    Setting("bindings", "--bind", "BRIDGE_BINDINGS", str,
            "declare a durable quorum queue bound to patterns, QUEUE=PATTERN[,PATTERN...] (repeatable; "
            "env: ';'-separated; TOML: [[bindings]] queue, patterns)"),
)  # fmt: skip

CONFIG_FLAG: Final = "--config"
CONFIG_ENV: Final = "BRIDGE_CONFIG"
ENV_VARS: Final[tuple[str, ...]] = (*(s.env for s in SETTINGS), CONFIG_ENV)


def add_arguments(parser: argparse.ArgumentParser, *, only: Sequence[str] | None = None) -> None:
    """Add the settings' flags to a parser (all, or the named fields); unset flags stay None."""
    for s in SETTINGS:
        if only is not None and s.name not in only:
            continue
        default = getattr(Settings(), s.name)
        shown = "required for run" if s.name == "realms" else redact_url(str(default))
        kwargs: dict[str, Any] = {"dest": s.name, "default": None, "metavar": s.env}
        if s.name in ("realms", "bindings"):
            kwargs["action"] = "append"
        parser.add_argument(s.flag, help=f"{s.help} [env {s.env}; default {shown}]", **kwargs)
    parser.add_argument(
        CONFIG_FLAG, dest="config", default=None, metavar=CONFIG_ENV, help="TOML file of settings"
    )


def _where(s: Setting, source: str) -> str:
    return {"flag": s.flag, "env": s.env}.get(source, f"{s.name} in the config file")


def _convert(s: Setting, raw: Any, source: str) -> Any:
    if s.name == "bindings":
        return parse_bindings(raw, _where(s, source))
    if s.name == "realms":
        items = raw if isinstance(raw, list) else str(raw).split(",")
        realms: list[Realm] = []
        for index, item in enumerate(items, 1):
            if not str(item).strip() and source == "env":
                continue
            try:
                realms.append(parse_realm(str(item)))
            except ValueError as exc:
                raise ConfigError(f"{_where(s, source)}: realm key #{index}: {exc}") from None
        return realms
    try:
        return s.parse(str(raw))
    except ValueError as exc:
        shown = "" if s.name == "amqp_url" else f" (got {_shown(raw)})"
        message = str(exc) if "must" in str(exc) else "is not valid"
        raise ConfigError(f"{_where(s, source)}: {message}{shown}") from None


def _shown(raw: Any) -> str:
    text = str(raw)
    return repr(text if len(text) <= 60 else text[:59] + "…")


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FLAG} {path}: cannot read the file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_FLAG} {path}: not valid TOML ({exc})") from None
    known = {s.name for s in SETTINGS} | {"realm_keys"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{CONFIG_FLAG} {path}: unknown setting(s) {', '.join(unknown)}")
    if "realm_keys" in data:
        data["realms"] = data.pop("realm_keys")
    return data


def load_settings(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_realm: bool = True,
) -> Settings:
    """Resolve every setting from flags, then environment, then the TOML file, then defaults.

    Args:
        args: parsed flags (attributes named like the settings; None = not given).
        environ: the environment (defaults to ``os.environ``).
        require_realm: whether at least one realm key is required.

    Returns:
        The validated settings.

    Raises:
        ConfigError: a value is invalid; the message names the flag, variable or
            file key, and never shows a secret.
    """
    env = os.environ if environ is None else environ
    ns = args if args is not None else argparse.Namespace()
    config_path = getattr(ns, "config", None) or env.get(CONFIG_ENV) or None
    file_values = _read_toml(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for s in SETTINGS:
        flag_value = getattr(ns, s.name, None)
        if flag_value is not None:
            values[s.name] = (
                [r for raw in flag_value for r in _convert(s, [raw], "flag")]
                if s.name == "realms"
                else _convert(s, flag_value, "flag")
            )
        elif env.get(s.env, "").strip():
            values[s.name] = _convert(s, env[s.env], "env")
        elif s.name in file_values:
            values[s.name] = _convert(s, file_values[s.name], "file")
    realms = values.pop("realms", [])
    keys = [realm.key for realm in realms]
    if len(set(keys)) != len(keys):
        raise ConfigError("--realm-key: the same realm key is given twice")
    labels = [realm.label for realm in realms]
    if len(set(labels)) != len(labels):
        raise ConfigError("--realm-key: two realms share a label")
    if require_realm and not realms:
        raise ConfigError(
            "--realm-key (ORANGEPILL_REALM_KEY) is required: give the realm key of your Orangepill realm"
        )
    settings = Settings(realms=tuple(realms), **values)
    if settings.reconnect_max < settings.reconnect_min:
        raise ConfigError("--reconnect-max must not be smaller than --reconnect-min")
    if settings.idle_timeout <= settings.ping_interval:
        raise ConfigError(
            f"--idle-timeout ({settings.idle_timeout:g}s) must be longer than --ping-interval "
            f"({settings.ping_interval:g}s), or a quiet but healthy link would be dropped"
        )
    return settings


def redact_url(url: str) -> str:
    """Hide the password of a URL (``amqp://guest:***@host/``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
