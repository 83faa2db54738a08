"""orangepill-bridge: the Orangepill notification stream, republished to a RabbitMQ topic exchange."""

from __future__ import annotations

__version__ = "0.1.0"
