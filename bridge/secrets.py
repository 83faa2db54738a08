"""Everything the bridge does so that a secret never leaves the process: pure, no I/O.

A realm key is shown only as its fingerprint; a password only as ``***``. The
same helpers serve log lines, quarantine bodies, error messages and the
settings summary, so there is one rule for all of them:

- secrets are held in ``Secret``, whose ``repr`` and ``str`` are masked;
- text from the outside is redacted first (the raw key and every escaped form
  of it: JSON ``\\uXXXX``, ``\\/``, ``\\"``, Python ``\\xXX``, doubled
  backslashes), and only then truncated (``clip``);
- a URL's credentials are found by parsing the URL, never by pattern matching.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = [
    "MIN_KEY_LENGTH",
    "LogScrubber",
    "Secret",
    "clip",
    "holds_secret",
    "host_port",
    "key_fingerprint",
    "key_mark",
    "redact",
    "redact_url",
    "url_credentials_problem",
    "url_passwords",
]

MIN_KEY_LENGTH = 16
"""Shorter realm keys are refused: they cannot be told apart from ordinary text."""

# Characters that extend a token around a secret found in text: the whole token is
# replaced, so that neither "bro<realm-key …>er" nor a piece of the key next to it is left.
_TOKEN_CHAR = r"[\w.~+/%-]"  # noqa: S105 - a character class, not a password


class Secret:
    """A secret string whose ``repr`` and ``str`` are masked; ``reveal()`` gives the value.

    Equality and hashing use the value (so duplicates can be found), compared in
    constant time.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise TypeError("a Secret holds a str")
        self._value = value

    def reveal(self) -> str:
        """The secret itself: only for the wire, never for text a person reads."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return format("***", spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        mine, theirs = (v.encode("utf-8", "surrogatepass") for v in (self._value, other._value))
        return hmac.compare_digest(mine, theirs)

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not pickled")


def _text_of(secret: str | Secret) -> str:
    return secret.reveal() if isinstance(secret, Secret) else secret


def key_fingerprint(realm_key: str | Secret) -> str:
    """A short, stable, non-reversible name for a realm key (``fp-`` + 12 hex)."""
    digest = hashlib.sha256(_text_of(realm_key).encode("utf-8", "surrogatepass")).hexdigest()
    return "fp-" + digest[:12]


def key_mark(realm_key: str | Secret) -> str:
    """What stands where a realm key was redacted: ``<realm-key fp-…>``."""
    return f"<realm-key {key_fingerprint(realm_key)}>"


def _hex_variants(code: int, width: int) -> str:
    """A pattern for ``code`` as ``width`` hex digits in either case."""
    return "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d for d in f"{code:0{width}x}")


def _char_pattern(ch: str) -> str:
    """Every way one character of a secret can be written in JSON, a Python repr, or nested escapes."""
    code = ord(ch)
    options = [r"\\*" + re.escape(ch)]  # raw, or escaped as \" \/ \\ (any nesting)
    if code > 0xFFFF:
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        options.append(rf"\\+u{_hex_variants(high, 4)}\\+u{_hex_variants(low, 4)}")
        options.append(rf"\\+U{_hex_variants(code, 8)}")
    else:
        options.append(rf"\\+u{_hex_variants(code, 4)}")
    if code < 0x100:
        options.append(rf"\\+x{_hex_variants(code, 2)}")
    return "(?:" + "|".join(options) + ")"


@functools.lru_cache(maxsize=64)
def _secret_pattern(secret: str) -> re.Pattern[str]:
    return re.compile("".join(_char_pattern(ch) for ch in secret))


_TOKEN = re.compile(_TOKEN_CHAR)
_MAX_WIDEN = 64  # a bound, so that a long run of word characters costs little


def _widen(text: str, start: int, end: int) -> tuple[int, int]:
    """Grow ``text[start:end]`` to the token around it."""
    low = max(start - _MAX_WIDEN, 0)
    while start > low and _TOKEN.match(text, start - 1):
        start -= 1
    high = min(end + _MAX_WIDEN, len(text))
    while end < high and _TOKEN.match(text, end):
        end += 1
    return start, end


def redact(text: str, secrets: Iterable[str | Secret]) -> str:
    """Replace every occurrence of a realm key, or of a 12-character piece of one, raw or escaped, by its fingerprint.

    The token around the key goes with it (``xKEYy`` becomes ``<realm-key fp-…>``),
    so that no piece of a key and no mangled word are left. A piece counts too: an
    upstream error that echoes a truncated key must not show its start. Redact
    before any truncation: ``clip(redact(text, keys), limit)``.
    """
    for secret in secrets:
        value = _text_of(secret)
        if not value:
            continue
        pieces, escaped_pieces = _pieces(value)
        # Cheap test first: every escaped form holds a backslash, every raw one a raw piece.
        if "\\" not in text and value not in text and not any(p in text for p in pieces):
            continue
        mark = key_mark(value)
        text = _replace(text, [_widen(text, m.start(), m.end()) for m in _secret_pattern(value).finditer(text)], mark)
        text = _replace(text, _piece_spans(text, pieces, escaped_pieces), mark)
    return text


PIECE: Final = 12
"""No run of this many characters of a secret is shown (SECURITY.md)."""
# Escaped pieces are looked for in texts up to this size: log lines, error details, small frames.
# A regex of every escaped piece costs about 1.4 s per MB; above this only raw pieces are (str.find).
_ESCAPED_PIECES_MAX: Final = 16 * 1024


@functools.lru_cache(maxsize=64)
def _pieces(secret: str) -> tuple[tuple[str, ...], re.Pattern[str] | None]:
    """Every distinct ``PIECE``-character piece of ``secret``, and one pattern for their escaped forms."""
    pieces = tuple(dict.fromkeys(secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1)))
    if not pieces:
        return (), None
    return pieces, re.compile("|".join("".join(_char_pattern(ch) for ch in piece) for piece in pieces))


def _piece_spans(text: str, pieces: tuple[str, ...], escaped: re.Pattern[str] | None) -> list[tuple[int, int]]:
    """Where pieces of a secret stand in ``text`` (raw always; escaped in texts up to 16 KiB), widened to tokens."""
    spans: list[tuple[int, int]] = []
    if escaped is not None and "\\" in text and len(text) <= _ESCAPED_PIECES_MAX:
        spans = [m.span() for m in escaped.finditer(text)]
        # Non-overlapping matches can leave the tail of a longer raw run: the raw scan below finds it.
    for piece in pieces:
        at = text.find(piece)
        while at != -1:
            spans.append((at, at + len(piece)))
            at = text.find(piece, at + 1)
    return [_widen(text, start, end) for start, end in spans]


def _replace(text: str, spans: list[tuple[int, int]], mark: str) -> str:
    """Replace each run of overlapping or touching spans by one ``mark``."""
    if not spans:
        return text
    out: list[str] = []
    last = 0
    run_start, run_end = -1, -1
    for start, end in sorted(spans):
        if start <= run_end:
            run_end = max(run_end, end)
            continue
        if run_end >= 0:
            out.extend((text[last:run_start], mark))
            last = run_end
        run_start, run_end = start, end
    out.extend((text[last:run_start], mark, text[run_end:]))
    return "".join(out)


def holds_secret(text: str, secrets: tuple[str, ...]) -> bool:
    """Whether ``text``, a decoded value (no escapes), holds a realm key or a ``PIECE``-character piece of one.

    For values the bridge copies into headers (``entity_id``): about 0.8 µs for a 24-character id.
    """
    if len(text) < PIECE or not secrets:
        return False
    pattern = _raw_pieces(secrets)
    return pattern is not None and pattern.search(text) is not None


@functools.lru_cache(maxsize=16)
def _raw_pieces(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    pieces = {piece for secret in secrets for piece in _pieces(secret)[0]}
    return re.compile("|".join(re.escape(p) for p in sorted(pieces))) if pieces else None


def clip(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters (``…`` marks a cut); call it after ``redact``."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def url_credentials_problem(url: str) -> str | None:
    """Why a URL's user name or password cannot be read reliably, or None when it can.

    A ``#``, ``/``, ``?`` or ``@`` left unencoded in the password ends the host part
    early (or makes it ambiguous): the password would then be taken for a path,
    a query or a fragment, sent wrongly, and not recognised as a password to mask.
    The answer never holds the URL.
    """
    _, sep, rest = url.strip().partition("://")
    if not sep:
        return None
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    after = rest[len(authority) :]
    if "@" in after or authority.count("@") > 1:
        return (
            "the user name or password holds a character that must be percent-encoded "
            "('#' as %23, '/' as %2F, '?' as %3F, '@' as %40; "
            "Python: urllib.parse.quote(password, safe=''))"
        )
    return None


def url_passwords(url: str) -> tuple[str, ...]:
    """The password of a URL as written and percent-decoded (empty when there is none)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return ()
    if not password:
        return ()
    return tuple(dict.fromkeys((password, unquote(password))))


def redact_url(url: str) -> str:
    """Hide the password of a URL (``amqp://guest:***@host/``), found by parsing the URL.

    A URL whose credentials cannot be parsed reliably is not shown at all.
    """
    if url_credentials_problem(url) is not None:
        return "<url with unencoded credentials>"
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

    Realm keys are replaced wherever they appear, raw or escaped, with the token
    around them (by their fingerprint). A password of 8 characters or more is
    replaced wherever it appears (as written in the URL and decoded); a shorter
    one only where it stands in a URL (``:password@``), so that a password such
    as ``guest`` does not also rewrite the user name. It works on the formatted
    text, never on the record, which other handlers may share.
    """

    def __init__(self, realm_keys: Iterable[str | Secret], passwords: Iterable[str | Secret]) -> None:
        self._keys = tuple(_text_of(k) for k in realm_keys if _text_of(k))
        found = [_text_of(p) for p in passwords if _text_of(p)]
        self._passwords = tuple(dict.fromkeys([*found, *(unquote(p) for p in found)]))

    def __call__(self, text: str) -> str:
        text = redact(text, self._keys)
        for password in self._passwords:
            if password not in text:
                continue
            # A short password only where it stands in a URL, so that "guest" keeps the user name.
            old = password if len(password) >= 8 else f":{password}@"
            text = text.replace(old, "***" if len(password) >= 8 else ":***@")
        return text


def host_port(url: str) -> str:
    """``host:port`` of a broker or stream URL: never the user name or the password."""
    if url_credentials_problem(url) is not None:
        return "<url with unencoded credentials>"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<invalid url>"
    default = {"amqps": 5671, "wss": 443, "https": 443, "ws": 80, "http": 80}.get(parts.scheme, 5672)
    host = parts.hostname or "?"
    return f"[{host}]:{port or default}" if ":" in host else f"{host}:{port or default}"
