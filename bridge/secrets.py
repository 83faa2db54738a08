"""Everything the bridge does so that a secret never leaves the process: pure, no I/O.

A realm key is shown only as its fingerprint; a password only as ``***``. The
same helpers serve log lines, quarantine bodies, error messages and the
settings summary, so there is one rule for all of them.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit, urlunsplit

__all__ = ["LogScrubber", "host_port", "key_fingerprint", "redact", "redact_url"]


def key_fingerprint(realm_key: str) -> str:
    """A short, stable, non-reversible name for a realm key (``fp-`` + 12 hex)."""
    digest = hashlib.sha256(realm_key.encode("utf-8", "surrogatepass")).hexdigest()
    return "fp-" + digest[:12]


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every occurrence of a secret by its fingerprint."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, f"<realm-key {key_fingerprint(secret)}>")
    return text


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


class LogScrubber:
    """Last line of defence: no realm key or password leaves through a log line.

    Realm keys are replaced wherever they appear (by their fingerprint); a
    password only where it stands in a URL (``:password@``), so that a
    password such as ``guest`` does not also rewrite the user name. It works on
    the formatted text, never on the record, which other handlers may share.
    """

    def __init__(self, realm_keys: tuple[str, ...], passwords: tuple[str, ...]) -> None:
        self._keys = tuple(k for k in realm_keys if k)
        self._passwords = tuple(p for p in passwords if p)

    def __call__(self, text: str) -> str:
        text = redact(text, self._keys)
        for password in self._passwords:
            text = text.replace(f":{password}@", ":***@")
        return text


def host_port(url: str) -> str:
    """``host:port`` of a broker or stream URL: never the user name or the password."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<invalid url>"
    default = {"amqps": 5671, "wss": 443, "ws": 80}.get(parts.scheme, 5672)
    host = parts.hostname or "?"
    return f"[{host}]:{port or default}" if ":" in host else f"{host}:{port or default}"
