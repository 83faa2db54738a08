"""The Event Stream Explorer: a live page on the metrics port that reads only the bridge's memory."""

from __future__ import annotations

from bridge.explorer.hub import ExplorerHub, Row

__all__ = ["ExplorerHub", "Row"]
