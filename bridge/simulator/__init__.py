"""A fake Orangepill stream server for demos, tests and benchmarks, with fault injection.

It speaks the protocol of the Orangepill WebSocket documentation: ``subscribe``/``unsubscribe``
frames answered with ``info`` and/or ``subscribe`` frames, the ``info NONE`` + ``error``
failure, the text ``PING`` keepalive, and ``notification`` frames in the flat ("Event data")
or nested (JavaScript example) envelope. Every notification also carries ``seq`` (contiguous
per realm, from 1) and ``sent_at`` (unix seconds) so that a test can account for every event.

Faults: clean drops after N events (``drop_every``), a dead-but-open link that neither sends
nor reads (``silent_after``, ``go_silent``), malformed frames (``malformed_every``,
``send_malformed``) and refused subscribes (``reject_next``); ``control_addr`` drives them
over HTTP from another process.

Modules:

- ``settings``: ``SimulatorConfig``, validated on creation;
- ``flows``: the event sequences and the rate schedule (pure);
- ``frames``: the frames written, malformed ones included (pure);
- ``faults``: silent links, refusal plans, malformed-kind choice;
- ``server``: ``Simulator``, the connections and the emitters;
- ``control``: the HTTP control API;
- ``cli``: the ``simulate`` flags (resolved by ``bridge.config``) and ``serve``.
"""

from __future__ import annotations

from bridge.simulator.cli import add_simulate_arguments, config_from_args, serve
from bridge.simulator.frames import MALFORMED_KINDS
from bridge.simulator.server import SentEvent, Simulator
from bridge.simulator.settings import DEMO_REALM_KEY, SimulatorConfig

__all__ = [
    "DEMO_REALM_KEY",
    "MALFORMED_KINDS",
    "SentEvent",
    "Simulator",
    "SimulatorConfig",
    "add_simulate_arguments",
    "config_from_args",
    "serve",
]
