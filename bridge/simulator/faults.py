"""Fault injection: dead-but-open links, refused subscribes and bursts of malformed frames.

The clean drop is a plain WebSocket close (``DROP_CODE``); the server does it itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from dataclasses import dataclass
from typing import Final

from websockets.asyncio.server import ServerConnection

from bridge.simulator.frames import INVALID_KEY_TEXT, MALFORMED_KINDS, TRANSIENT_ERROR_TEXT

__all__ = ["DROP_CODE", "MalformedPicker", "RejectPlan", "Rejection", "release_when_gone", "stop_reading"]

log = logging.getLogger(__name__)

DROP_CODE: Final = 1001
# How often a silent connection checks whether the client has given up.
_SILENT_POLL: Final = 0.25
# A silent link whose client never gives up is cut after this long ("the TCP link dies").
_SILENT_MAX: Final = 300.0
_TCP_ESTABLISHED: Final = 1


def stop_reading(ws: ServerConnection) -> None:
    """Stop reading a link for good, so that even WebSocket pings go unanswered.

    websockets writes pongs from ``data_received()``; with the transport's reading paused
    the client's pings stay unread in the kernel buffer. The server runs with
    ``max_queue=None``, so websockets' own flow control never calls ``resume_reading()``,
    and the connection handler stops calling ``recv()``: nothing turns reading back on.
    """
    ws.transport.pause_reading()


async def release_when_gone(ws: ServerConnection, ident: int) -> None:
    """Abort a silent link once its client has gone away, or after ``_SILENT_MAX`` seconds."""
    # Reading is paused, so the FIN or RST of a client that gave up goes unnoticed by
    # asyncio; ask the kernel instead.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _SILENT_MAX
    transport = ws.transport
    while not transport.is_closing():
        established = _tcp_established(ws)
        if established is False or loop.time() >= deadline:
            why = "the client went away" if established is False else "silence cap reached"
            log.info("connection %d: %s, dropping the silent link", ident, why)
            transport.abort()
            return
        await asyncio.sleep(_SILENT_POLL)


def _tcp_established(ws: ServerConnection) -> bool | None:
    """Whether the kernel still sees the TCP link as established (None: cannot tell)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    sock = ws.transport.get_extra_info("socket")
    if tcp_info is None or sock is None:
        return None
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)
    except OSError:
        return False
    # First byte of struct tcp_info is tcpi_state; CLOSE_WAIT etc. mean the peer left.
    return bool(info) and info[0] == _TCP_ESTABLISHED


@dataclass(frozen=True, slots=True)
class Rejection:
    """How to refuse one subscribe.

    Attributes:
        text: the error frame's text.
        key_error: answer ``info`` realm NONE before the error, as for a bad key;
            otherwise only the error frame (a server-side, non-key failure).
    """

    text: str
    key_error: bool


class RejectPlan:
    """The next subscribes to refuse, whatever their key."""

    __slots__ = ("_left", "_rejection")

    def __init__(self) -> None:
        self._left = 0
        self._rejection = Rejection(INVALID_KEY_TEXT, key_error=True)

    def arm(self, n: int, text: str | None = None, *, key_error: bool = True) -> None:
        """Refuse the next ``n`` subscribes (replacing any plan); ``text`` defaults by kind."""
        if n < 0:
            raise ValueError("n must be >= 0")
        default = INVALID_KEY_TEXT if key_error else TRANSIENT_ERROR_TEXT
        self._rejection = Rejection(text or default, key_error)
        self._left = n

    def take(self) -> Rejection | None:
        """The refusal for this subscribe, or None to accept it."""
        if self._left <= 0:
            return None
        self._left -= 1
        return self._rejection

    @property
    def left(self) -> int:
        """Subscribes still to refuse."""
        return self._left


class MalformedPicker:
    """Malformed-frame kinds: in turn for ``malformed_every``, at random (seeded) for bursts."""

    __slots__ = ("_next", "_rng")

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"orangepill-sim-malformed:{seed}")
        self._next = 0

    def in_turn(self) -> str:
        """The next kind of the fixed cycle through ``MALFORMED_KINDS``."""
        kind = MALFORMED_KINDS[self._next % len(MALFORMED_KINDS)]
        self._next += 1
        return kind

    def at_random(self, n: int) -> list[str]:
        """``n`` kinds drawn at random."""
        return [self._rng.choice(MALFORMED_KINDS) for _ in range(n)]
