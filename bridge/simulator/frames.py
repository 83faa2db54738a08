"""The text frames the simulator writes: answers, notifications and malformed frames.

They follow the Orangepill WebSocket documentation: ``info``/``subscribe`` answers, the
``info`` realm NONE + ``error`` failure (whose text sits in the ``realm`` field), and
notifications in the flat ("Event data") or nested (JavaScript example) envelope.
"""

from __future__ import annotations

import time
from typing import Final

import orjson

__all__ = [
    "INVALID_KEY_TEXT",
    "MALFORMED_KINDS",
    "TRANSIENT_ERROR_TEXT",
    "answer",
    "dumps",
    "error",
    "malformed",
    "notification",
    "padded",
]

MALFORMED_KINDS: Final[tuple[str, ...]] = (
    "bad_json",
    "seed_stray_brace",
    "missing_event",
    "invalid_routing_key",
    "not_object",
)
INVALID_KEY_TEXT: Final = "Invalid Realm Key."
TRANSIENT_ERROR_TEXT: Final = "Service temporarily unavailable"
# Filler of padded data values: printable, JSON-safe, and easy to spot in a dump.
_FILLER: Final = "0123456789abcdef"


def dumps(obj: dict[str, object] | list[object]) -> str:
    """Compact JSON text."""
    return orjson.dumps(obj).decode()


def answer(kind: str, realm: str, now: int) -> str:
    """An ``info``, ``subscribe`` or ``unsubscribe`` answer for a realm (``NONE`` for a refusal)."""
    return dumps({"type": kind, "realm": realm, "timestamp": now})


def error(text: str, now: int) -> str:
    """An ``error`` frame; the documentation puts its text in the ``realm`` field."""
    return dumps({"type": "error", "realm": text, "timestamp": now})


def padded(data: str, size: int) -> str:
    """``data`` followed by ``:`` and filler up to ``size`` characters (unchanged if already that long)."""
    if size <= len(data):
        return data
    missing = size - len(data) - 1
    repeats, rest = divmod(missing, len(_FILLER))
    return f"{data}:{_FILLER * repeats}{_FILLER[:rest]}"


def notification(body: dict[str, object], shape: str) -> str:
    """A notification frame in the ``flat`` or ``nested`` envelope."""
    if shape == "nested":
        return dumps({"type": "notification", "data": body})
    return dumps({"type": "notification", **body})


def malformed(kind: str, event: str, data: str) -> str:
    """A frame that is not a valid notification, of the given kind (no ``seq``).

    Raises:
        ValueError: ``kind`` is not one of ``MALFORMED_KINDS``.
    """
    base: dict[str, object] = {
        "type": "notification",
        "event": event,
        "data": data,
        "timestamp": str(int(time.time() * 1000)),
    }
    if kind == "bad_json":
        text = dumps(base)
        return text[: len(text) // 2]
    if kind == "seed_stray_brace":
        # The documentation's own examples end in a stray brace: '{ ... } }'.
        return dumps(base) + " }"
    if kind == "missing_event":
        del base["event"]
        return dumps(base)
    if kind == "invalid_routing_key":
        head, _, tail = event.partition(".")
        base["event"] = f"{head}..{tail}" if tail else f"{event}..x"
        return dumps(base)
    if kind == "not_object":
        return dumps(["notification", event, data])
    raise ValueError(f"unknown malformed kind {kind!r}")
