"""Settings of the bridge: flags > environment > TOML file > defaults, validated once at start."""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from bridge.bindings import Binding, parse_bindings
from bridge.errors import ConfigError
from bridge.secrets import (
    MIN_KEY_LENGTH,
    Secret,
    host_port,
    key_fingerprint,
    redact_url,
    url_credentials_problem,
    url_passwords,
)
from bridge.tls import check_files as check_tls_files
from bridge.tls import url_disables_verification

__all__ = [
    "ENV_VARS",
    "SETTINGS",
    "ConfigFile",
    "Realm",
    "Secret",
    "Setting",
    "Settings",
    "add_arguments",
    "add_setting_arguments",
    "boolean",
    "choice",
    "file_realms",
    "load_settings",
    "number",
    "parse_realm",
    "redact_url",
    "resolve",
    "whole_number",
]


@dataclass(frozen=True, slots=True)
class Realm:
    """A realm to subscribe to: the key (a ``Secret``: never shown) and the label used in headers and metrics."""

    label: str
    key: Secret = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, Secret):
            object.__setattr__(self, "key", Secret(self.key))

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
    amqp_urls: tuple[str, ...] = field(default=(), repr=False)  # every node; amqp_url is the first
    standby_window: float = 30.0
    standby_window_bytes: int = 256 * 1024**2
    standby_poll: float = 1.0
    lock_heartbeat: float = 5.0
    exchange: str = "orangepill.events"
    spool: str = "./bridge-spool.db"
    spool_max_bytes: int = 2 * 1024**3
    spool_sync: str = "normal"
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
    ca_file: str = ""
    tls_insecure: bool = False
    amqp_client_cert: str = ""
    amqp_client_key: str = ""

    @property
    def realm_keys(self) -> tuple[str, ...]:
        """The realm keys, which must never be printed."""
        return tuple(realm.key.reveal() for realm in self.realms)

    @property
    def passwords(self) -> tuple[str, ...]:
        """Passwords inside the configured URLs (as written and decoded), which must never be printed."""
        found = [p for u in (*self.amqp_nodes, self.stream_url) for p in url_passwords(u)]
        return tuple(dict.fromkeys(found))

    @property
    def amqp_nodes(self) -> tuple[str, ...]:
        """One AMQP URL per RabbitMQ node, in order of preference."""
        return self.amqp_urls or (self.amqp_url,)

    @property
    def detection_worst_case(self) -> float:
        """Seconds until a standby can lead after the leader's host dies: 3 x heartbeat + poll (docs/ha.md)."""
        return 3 * self.lock_heartbeat + self.standby_poll

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
            elif f.name == "amqp_urls":
                value = [redact_url(u) for u in self.amqp_nodes]
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


def _window(text: str) -> int:
    value = _positive_int(text)
    if value > 65_535:  # beyond, memory for nothing: RabbitMQ confirms in batches far below this
        raise ValueError("must be a whole number from 1 to 65535")
    return value


def _frame_size(text: str) -> int:
    value = _size(text)
    if value > 512 * 1024 * 1024:  # RabbitMQ accepts no message above 512 MiB (max_message_size's ceiling)
        raise ValueError("must be at most 512MiB (RabbitMQ refuses any larger message)")
    return value


def _size(text: str) -> int:
    match = _SIZE.match(str(text))
    if match is None or (match.group(2) or "").lower() not in _SIZE_UNITS:
        raise ValueError("must be a size such as 2GiB, 500MB or 1048576")
    value = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
    if value < 64 * 1024:
        raise ValueError("must be at least 64KiB")
    return value


def _checked_url(text: str, schemes: tuple[str, ...]) -> str:
    """A URL of one of ``schemes`` with a host; the messages never hold the URL."""
    value = text.strip()
    problem = url_credentials_problem(value)
    if problem is not None:
        raise ValueError(f"is refused: {problem}")
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError:
        raise ValueError("must be a URL with a valid host and port") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError("must be " + " or ".join(f"a {s}://" for s in schemes) + " URL with a host")
    return value


def _ws_url(text: str) -> str:
    return _checked_url(text, ("ws", "wss"))


def _amqp_url(text: str) -> str:
    value = _checked_url(text, ("amqp", "amqps"))
    for beat in parse_qs(urlsplit(value).query, keep_blank_values=True).get("heartbeat", []):
        # aio-pika reads a value it cannot parse as 0: the heartbeat off, and a silent link never noticed.
        if not beat.isascii() or not beat.isdigit() or int(beat) > 65535:
            raise ValueError("has a ?heartbeat= that is not a whole number of seconds from 0 to 65535")
    return value


def _file_path(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must be a file path")
    return value


def _exchange(text: str) -> str:
    name = text.strip()
    if not _EXCHANGE.match(name):
        raise ValueError("must be 1-200 characters of letters, digits, '.', '-', '_' or ':'")
    if name.startswith("amq."):
        raise ValueError("must not start with 'amq.' (RabbitMQ reserves those names)")
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
        raise ValueError(
            "must be HOST:PORT with a port from 1 to 65535 (such as 0.0.0.0:9180 or 127.0.0.1:9180) or 'off'"
        )
    return value


def choice(*options: str) -> Callable[[str], str]:
    """A parser that accepts one of ``options`` (case-insensitive)."""

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError("must be one of " + ", ".join(options))
        return value

    return parse


def boolean(text: str) -> bool:
    """Read yes/no text: 1, true, yes, on or 0, false, no, off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be one of true, false, yes, no, on, off, 1, 0")


def whole_number(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    """A parser of whole numbers from ``minimum`` to ``maximum`` (no upper bound by default)."""
    bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"must be a whole number {bounds}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"must be a whole number {bounds}")
        return value

    return parse


def number(minimum: float = 0.0) -> Callable[[str], float]:
    """A parser of finite numbers of at least ``minimum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be a number of at least {minimum:g}") from None
        if not math.isfinite(value) or value < minimum:
            raise ValueError(f"must be a finite number of at least {minimum:g}")
        return value

    return parse


def _log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
    return value


_REALM_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def parse_realm(text: str, *, label: str = "") -> Realm:
    """Read ``KEY`` or ``LABEL=KEY``; without a label the key's fingerprint is the label.

    The text before the first ``=`` is a label only when it looks like one
    (``[A-Za-z0-9_.-]{1,32}``) and the rest could be a key (16 characters or more,
    not only ``=``); otherwise the whole value is the key (base64 padding stays).
    A key that itself holds ``=`` after such a prefix must be given with a label
    (``prod=pk_live_4f9a2c=9b7e…``) or with an explicit ``label`` (``--realm-label``),
    in which case the value is never split.

    Raises:
        ValueError: the key is empty, shorter than 16 characters, too long or holds
            whitespace (the message never shows the key).
    """
    value = text.strip()
    if not label:
        head, sep, tail = value.partition("=")
        if sep and tail.strip("=") and len(tail) >= MIN_KEY_LENGTH and _REALM_LABEL.match(head):
            label, value = head, tail
    elif not _REALM_LABEL.match(label):
        raise ValueError("a realm label must be 1-32 letters, digits, '_', '.' or '-'")
    if not value:
        raise ValueError("a realm key is empty")
    if any(ch.isspace() for ch in value) or len(value) > 4096:
        raise ValueError("a realm key holds whitespace or is too long")
    if len(value) < MIN_KEY_LENGTH:
        raise ValueError(
            f"a realm key is shorter than {MIN_KEY_LENGTH} characters: that is not a real key "
            "(Orangepill realm keys are UUIDs), and a key that short could not be kept out of logs"
        )
    return Realm(label=label or key_fingerprint(value), key=Secret(value))


def _raw_items(raw: Any, where: str) -> list[tuple[str, str]]:
    """A list setting's raw items (flag list, comma-separated text or TOML array), each with where it was."""
    items = raw if isinstance(raw, list) else str(raw).split(",")
    out: list[tuple[str, str]] = []
    for index, item in enumerate(items, 1):
        if not isinstance(item, str):
            raise ConfigError(f"{where}: item #{index} must be a string")
        if item.strip():
            out.append((item, f"{where} #{index}"))
    return out


def _secret_lines(raw: Any, where: str) -> list[tuple[str, str]]:
    """The lines of a secret file (blank lines and ``#`` comment lines skipped), each with where it was."""
    path = str(raw).strip()
    try:
        # utf-8-sig: a byte-order mark (Notepad's "UTF-8") is not part of the first key.
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read(1024 * 1024)
    except OSError as exc:
        raise ConfigError(f"{where} {path}: cannot read the file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where} {path}: not UTF-8 text") from None
    out: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append((stripped, f"{where} {path} line {number}"))
    if not out:
        raise ConfigError(f"{where} {path}: the file holds no value")
    return out


def file_realms(raw: Any, where: str) -> list[Realm]:
    """The realms of a realm-key file (one ``KEY`` or ``LABEL=KEY`` per line, ``#`` comment lines).

    Raises:
        ConfigError: the file cannot be read, or a line is not a valid realm (never shown).
    """
    realms: list[Realm] = []
    for line, at in _secret_lines(raw, where):
        try:
            realms.append(parse_realm(line))
        except ValueError as exc:
            raise ConfigError(f"{at}: {exc}") from None
    return realms


def _amqp_url_lines(raw: Any, where: str) -> list[str]:
    urls: list[str] = []
    for line, at in _secret_lines(raw, where):
        for item in (u for u in line.split(",") if u.strip()):
            try:
                urls.append(_amqp_url(item))
            except ValueError as exc:
                raise ConfigError(f"{at}: AMQP URL {exc}") from None
    return urls


# -- the generic machinery: a list of Setting specs and one resolver -------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: where it is read from, how its text becomes a value, and how it is shown.

    Attributes:
        name: the dataclass field, the ``argparse`` dest and the TOML key.
        flag: the command-line flag.
        env: the environment variable.
        parse: turns the text into the value, or raises ``ValueError``; its message never
            holds the value, and is shown only when it says what the value "must" be.
        help: one line for ``--help``.
        item: for a list setting (repeatable flag, comma-separated variable, TOML array),
            the name of one element in errors, such as "realm key"; empty for a single value.
        secret: the value is never shown in an error.
        switch: a ``--flag/--no-flag`` boolean rather than a flag with a value.
        file_keys: other names accepted for it in the TOML file.
        shown_default: the default as ``--help`` shows it (else the dataclass default).
        convert: for a structured setting, turns the raw value (flag list, variable text or
            TOML value) and where it came from into the value itself, instead of ``parse``.
    """

    name: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    item: str = ""
    secret: bool = False
    switch: bool = False
    file_keys: tuple[str, ...] = ()
    shown_default: str | None = None
    convert: Callable[[Any, str], Any] | None = None


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """The flag and the environment variable that name a TOML file of settings."""

    flag: str
    env: str


def add_setting_arguments(
    parser: argparse.ArgumentParser,
    specs: Sequence[Setting],
    defaults: object,
    config: ConfigFile | None,
    *,
    only: Sequence[str] | None = None,
) -> None:
    """Add each setting's flag to a parser (all, or the named ones); an unset flag stays None.

    Args:
        parser: the parser to extend.
        specs: the settings.
        defaults: an object whose attributes are the defaults shown in ``--help``.
        config: the flag naming a TOML file, if the settings may come from one.
        only: the names of the settings to add (default: all).
    """
    for s in specs:
        if only is not None and s.name not in only:
            continue
        shown = s.shown_default if s.shown_default is not None else redact_url(str(getattr(defaults, s.name)))
        kwargs: dict[str, Any] = {"dest": s.name, "default": None}
        if s.switch:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = s.env
            if s.item:
                kwargs["action"] = "append"
        parser.add_argument(s.flag, help=f"{s.help} [env {s.env}; default {shown}]", **kwargs)
    if config is not None:
        parser.add_argument(config.flag, dest="config", default=None, metavar=config.env, help="TOML file of settings")


def resolve(
    specs: Sequence[Setting],
    args: argparse.Namespace | None,
    environ: Mapping[str, str],
    config: ConfigFile | None,
    *,
    sources: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Read each setting from its flag, else its variable, else the TOML file; unset ones are left out.

    Args:
        specs: the settings.
        args: parsed flags (attributes named like the settings; None = not given).
        environ: the environment.
        config: the flag and variable naming a TOML file, or None for no file.
        sources: if given, filled with where each value came from (0 flag, 1 environment, 2 file).

    Returns:
        The parsed values of the settings that were given, by name.

    Raises:
        ConfigError: a value or the file is invalid; the message names the flag, the
            variable or the file key, and never shows a secret.
    """
    ns = args if args is not None else argparse.Namespace()
    path = (getattr(ns, "config", None) or environ.get(config.env) or None) if config is not None else None
    in_file = _read_toml(path, specs, config) if path and config is not None else {}
    values: dict[str, Any] = {}
    for s in specs:
        flag_value = getattr(ns, s.name, None)
        if flag_value is not None:
            values[s.name] = _convert(s, flag_value, s.flag)
            rank = 0
        elif environ.get(s.env, "").strip():
            values[s.name] = _convert(s, environ[s.env], s.env, skip_empty=True)
            rank = 1
        elif s.name in in_file:
            raw, where = in_file[s.name]
            values[s.name] = _convert(s, raw, where)
            rank = 2
        else:
            continue
        if sources is not None:
            sources[s.name] = rank
    return values


def _convert(s: Setting, raw: Any, where: str, *, skip_empty: bool = False) -> Any:
    if s.convert is not None:
        return s.convert(raw, where)
    if s.item:
        items = raw if isinstance(raw, list) else str(raw).split(",")
        out: list[Any] = []
        for index, item in enumerate(items, 1):
            if skip_empty and not str(item).strip():
                continue
            try:
                out.append(s.parse(str(item)))
            except ValueError as exc:
                raise ConfigError(f"{where}: {s.item} #{index}: {exc}") from None
        return out
    try:
        return s.parse(str(raw))
    except ValueError as exc:
        shown = "" if s.secret else _shown(raw)
        message = str(exc) if "must" in str(exc) else "is not valid"
        raise ConfigError(f"{where}: {message}{shown}") from None


# A value is echoed in an error only when it cannot be a secret: short and plain (a
# number, a size, a word). Anything else may be a key or password put under the wrong
# setting; a URL is shown as host:port only.
_PLAIN = re.compile(r"^[A-Za-z0-9.:+-]{0,11}$")
_KNOWN_SCHEMES = frozenset({"ws", "wss", "amqp", "amqps"})
_PLAIN_NAME = re.compile(r"[A-Za-z][A-Za-z_-]{0,15}")  # a TOML name shown although unknown (fullmatch)


def _shown(raw: Any) -> str:
    text = str(raw).strip()
    if "://" in text:
        scheme = text.partition("://")[0]
        if scheme.lower() not in _KNOWN_SCHEMES:  # host_port would guess a port for it
            return f" (got a URL of scheme {scheme!r})" if _PLAIN.match(scheme) else " (got a URL of another scheme)"
        return f" (got a URL to {host_port(text)})"
    if _PLAIN.match(text):
        return f" (got {text!r})"
    return ""


def _read_toml(path: str, specs: Sequence[Setting], config: ConfigFile) -> dict[str, tuple[Any, str]]:
    """The file's values by setting name, each with where it was found (for errors)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        data = tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))  # a byte-order mark is allowed
    except OSError as exc:
        raise ConfigError(f"{config.flag} {path}: cannot read the file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config.flag} {path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{config.flag} {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "TOML files must be UTF-8"
        ) from None
    names = {key: s.name for s in specs for key in (s.name, *s.file_keys)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        # An unknown name may be a secret written as a key: only a near miss of a real name, or a
        # short plain word (at most 16 letters, '_' and '-': no digit, so never a realm key, which
        # is a UUID), is shown.
        hints: list[str] = []
        for key in unknown:
            if close := difflib.get_close_matches(key, list(names), n=1, cutoff=0.75):
                hints.append(f"{key!r} (did you mean {close[0]!r}?)")
            elif _PLAIN_NAME.fullmatch(key):
                hints.append(repr(key))
        hidden = len(unknown) - len(hints)
        shown = ", ".join([*hints, *([f"{hidden} other name(s), not shown"] if hidden else [])])
        raise ConfigError(f"{config.flag} {path}: unknown setting(s): {shown}")
    return {names[key]: (value, f"{key} in {config.flag} {path}") for key, value in data.items()}


# -- the bridge's settings ------------------------------------------------------------

# One entry per setting; add new ones anywhere in the list.
SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("stream_url", "--stream-url", "ORANGEPILL_STREAM_URL", _ws_url, "Orangepill stream URL"),
    Setting("realms", "--realm-key", "ORANGEPILL_REALM_KEY", str,
            "realm key, KEY or LABEL=KEY (repeatable; env: comma-separated); prefer --realm-key-file",
            item="realm key", secret=True, file_keys=("realm_keys",), shown_default="required for run and check",
            convert=_raw_items),
    Setting("realm_key_file", "--realm-key-file", "ORANGEPILL_REALM_KEY_FILE", _file_path,
            "file of realm keys, one KEY or LABEL=KEY per line, '#' comment lines (a Docker or Kubernetes secret)",
            shown_default="none", convert=_secret_lines),
    Setting("realm_labels", "--realm-label", "ORANGEPILL_REALM_LABEL", str,
            "label of each realm key, in order (repeatable; env: comma-separated); keys are then never split at '='",
            item="realm label", file_keys=("realm_label",), shown_default="LABEL= prefix, else the key's fingerprint",
            convert=_raw_items),
    Setting("amqp_url", "--amqp-url", "BRIDGE_AMQP_URL", _amqp_url,
            "RabbitMQ URL, one per cluster node (repeatable; env: comma-separated); prefer --amqp-url-file",
            item="AMQP URL", secret=True),
    Setting("amqp_url_file", "--amqp-url-file", "BRIDGE_AMQP_URL_FILE", _file_path,
            "file of RabbitMQ URLs, one per line (several for a cluster), '#' comment lines",
            shown_default="none", convert=_amqp_url_lines),
    Setting("ca_file", "--ca-file", "BRIDGE_CA_FILE", _file_path,
            "PEM CA bundle to verify the stream (wss://) and the broker (amqps://) with", shown_default="system CAs"),
    Setting("tls_insecure", "--tls-insecure", "BRIDGE_TLS_INSECURE", boolean,
            "do not verify TLS certificates (stream and broker; logged as a WARNING at every start)",
            switch=True, shown_default="off"),
    Setting("amqp_client_cert", "--amqp-client-cert", "BRIDGE_AMQP_CLIENT_CERT", _file_path,
            "PEM client certificate for amqps://", shown_default="none"),
    Setting("amqp_client_key", "--amqp-client-key", "BRIDGE_AMQP_CLIENT_KEY", _file_path,
            "PEM private key of --amqp-client-cert", shown_default="none"),
    Setting("exchange", "--exchange", "BRIDGE_EXCHANGE", _exchange, "topic exchange to publish to"),
    Setting("spool", "--spool", "BRIDGE_SPOOL", _spool, "spool file, or 'memory' for no disk"),
    Setting("spool_max_bytes", "--spool-max-bytes", "BRIDGE_SPOOL_MAX_BYTES", _size,
            "spool bound; when full the stream is not read (back-pressure)"),
    Setting("spool_sync", "--spool-sync", "BRIDGE_SPOOL_SYNC", choice("normal", "full"),
            "normal: a commit survives a crash of the process; full: an fsync per group commit, so it survives "
            "a crash of the host (power loss, kernel panic) too"),
    Setting("metrics_addr", "--metrics-addr", "BRIDGE_METRICS_ADDR", _addr,
            "HOST:PORT for /metrics, /healthz, /readyz, or 'off'"),
    Setting("ping_interval", "--ping-interval", "BRIDGE_PING_INTERVAL", _positive_float,
            "seconds between text PING keepalives"),
    Setting("idle_timeout", "--idle-timeout", "BRIDGE_IDLE_TIMEOUT", _positive_float,
            "seconds without any frame or pong before the link is dropped and redialled"),
    Setting("subscribe_timeout", "--subscribe-timeout", "BRIDGE_SUBSCRIBE_TIMEOUT", _positive_float,
            "seconds to wait for the answer to subscribe"),
    Setting("confirm_window", "--confirm-window", "BRIDGE_CONFIRM_WINDOW", _window,
            "publishes awaiting a broker confirm at once"),
    Setting("publish_timeout", "--publish-timeout", "BRIDGE_PUBLISH_TIMEOUT", _positive_float,
            "seconds to wait for a confirm before retrying"),
    Setting("reconnect_min", "--reconnect-min", "BRIDGE_RECONNECT_MIN", _positive_float,
            "first reconnect delay, seconds"),
    Setting("reconnect_max", "--reconnect-max", "BRIDGE_RECONNECT_MAX", _positive_float,
            "largest reconnect delay, seconds"),
    Setting("reconnect_reset_after", "--reconnect-reset-after", "BRIDGE_RECONNECT_RESET_AFTER",
            _positive_float, "seconds a link must stay subscribed before the backoff resets"),
    Setting("unroutable", "--unroutable", "BRIDGE_UNROUTABLE", choice("keep", "drop"),
            "keep unroutable events in <exchange>.unrouted, or drop (and count) them"),
    Setting("max_frame_bytes", "--max-frame-bytes", "BRIDGE_MAX_FRAME_BYTES", _frame_size,
            "largest frame read; a larger one closes the link (1009), counts as oversize, and is redialled"),
    Setting("drain_timeout", "--drain-timeout", "BRIDGE_DRAIN_TIMEOUT", _positive_float,
            "seconds to wait for outstanding confirms on shutdown"),
    Setting("log_format", "--log-format", "BRIDGE_LOG_FORMAT", choice("auto", "json", "text"),
            "log format (auto: text on a terminal, JSON otherwise)"),
    Setting("log_level", "--log-level", "BRIDGE_LOG_LEVEL", _log_level, "log level"),
    Setting("explorer", "--explorer", "BRIDGE_EXPLORER", choice("on", "off"),
            "the Explorer page at / on the metrics port"),
    Setting("bindings", "--bind", "BRIDGE_BINDINGS", str,
            "declare a durable quorum queue bound to patterns, QUEUE=PATTERN[,PATTERN...] (repeatable; "
            "env: ';'-separated; TOML: [[bindings]] queue, patterns)",
            item="binding", convert=parse_bindings, shown_default="none"),
    Setting("standby_window", "--standby-window", "BRIDGE_STANDBY_WINDOW", _positive_float,
            "seconds of events a standby keeps to publish on promotion"),
    Setting("standby_window_bytes", "--standby-window-bytes", "BRIDGE_STANDBY_WINDOW_BYTES", _size,
            "byte bound of a standby's window"),
    Setting("standby_poll", "--standby-poll", "BRIDGE_STANDBY_POLL", _positive_float,
            "seconds between a standby's attempts at a realm's leadership lock"),
    Setting("lock_heartbeat", "--lock-heartbeat", "BRIDGE_LOCK_HEARTBEAT", _positive_float,
            "AMQP heartbeat of the leadership lock connection, seconds"),
)  # fmt: skip

CONFIG_FLAG: Final = "--config"
CONFIG_ENV: Final = "BRIDGE_CONFIG"
CONFIG_FILE: Final = ConfigFile(CONFIG_FLAG, CONFIG_ENV)
ENV_VARS: Final[tuple[str, ...]] = (*(s.env for s in SETTINGS), CONFIG_ENV)


def add_arguments(parser: argparse.ArgumentParser, *, only: Sequence[str] | None = None) -> None:
    """Add the bridge's flags to a parser (all, or the named fields); unset flags stay None."""
    add_setting_arguments(parser, SETTINGS, Settings(), CONFIG_FILE, only=only)


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
    sources: dict[str, int] = {}
    values = resolve(SETTINGS, args, os.environ if environ is None else environ, CONFIG_FILE, sources=sources)
    raw_keys = _one_of(values, sources, "realms", "realm_key_file", "--realm-key", "--realm-key-file")
    realms = _checked_realms(_realms(raw_keys, values.pop("realm_labels", None)), require_realm=require_realm)
    if urls := _one_of(values, sources, "amqp_url", "amqp_url_file", "--amqp-url", "--amqp-url-file"):
        values["amqp_url"], values["amqp_urls"] = urls[0], tuple(urls)
    settings = Settings(realms=realms, **values)
    _check_together(settings)
    check_tls_files(settings)
    return settings


def _one_of(values: dict[str, Any], sources: dict[str, int], direct: str, file: str, flag: str, file_flag: str) -> Any:
    """The value given directly or in a file: the one from the higher source; both from one source is an error."""
    given, in_file = values.pop(direct, None), values.pop(file, None)
    if given is None or in_file is None:
        return given if in_file is None else in_file
    if sources[direct] == sources[file]:
        raise ConfigError(f"{flag} and {file_flag} are both given: use one of them")
    return given if sources[direct] < sources[file] else in_file


def _realms(raw: list[tuple[str, str]] | None, labels: list[tuple[str, str]] | None) -> list[Realm]:
    items = raw or []
    if labels is not None and len(labels) != len(items):
        raise ConfigError(
            f"--realm-label is given {len(labels)} time(s) for {len(items)} realm key(s): give one per key"
        )
    realms: list[Realm] = []
    for index, (text, where) in enumerate(items):
        try:
            realms.append(parse_realm(text, label=labels[index][0].strip() if labels else ""))
        except ValueError as exc:
            # A bad label given by --realm-label is that setting's fault, not the key's.
            named = labels[index][1] if labels and "realm label" in str(exc) else where
            raise ConfigError(f"{named}: {exc}") from None
    return realms


def _checked_realms(realms: list[Realm], *, require_realm: bool) -> tuple[Realm, ...]:
    keys = [realm.key for realm in realms]
    if len(set(keys)) != len(keys):
        raise ConfigError("--realm-key: the same realm key is given twice")
    labels = [realm.label for realm in realms]
    if len(set(labels)) != len(labels):
        shared = next(label for label in labels if labels.count(label) > 1)
        raise ConfigError(
            f"--realm-key / --realm-label (or the realm key file): two realms share the label {shared!r}; "
            "each realm needs its own"
        )
    if require_realm and not realms:
        raise ConfigError("--realm-key (ORANGEPILL_REALM_KEY) is required: give the realm key of your Orangepill realm")
    return tuple(realms)


def _check_together(settings: Settings) -> None:
    """Refuse settings that are each valid but do not fit together."""
    if not settings.tls_insecure and any(url_disables_verification(u) for u in settings.amqp_nodes):
        raise ConfigError(
            "--amqp-url: no_verify_ssl in the URL turns TLS verification off; remove it, or give --tls-insecure "
            "to turn verification off on purpose"
        )
    if bool(settings.amqp_client_cert) != bool(settings.amqp_client_key) and not settings.amqp_client_cert:
        raise ConfigError("--amqp-client-key needs --amqp-client-cert")
    if settings.reconnect_max < settings.reconnect_min:
        raise ConfigError("--reconnect-max must not be smaller than --reconnect-min")
    if settings.idle_timeout <= settings.ping_interval:
        raise ConfigError(
            f"--idle-timeout ({settings.idle_timeout:g}s) must be longer than --ping-interval "
            f"({settings.ping_interval:g}s), or a quiet but healthy link would be dropped"
        )
    if settings.standby_window < settings.detection_worst_case + 1:
        raise ConfigError(
            f"--standby-window ({settings.standby_window:g}s) must exceed the worst-case failure detection "
            f"(3 x --lock-heartbeat + --standby-poll = {settings.detection_worst_case:g}s) by at least 1s, "
            "or events of a dead leader's last seconds could be lost"
        )

