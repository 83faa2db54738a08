"""The publisher's confirm router: what one ack or nack frame settles, by aiormq's rules.

The channel here is a stand-in holding only what the router touches (the confirmations
map and the return handler); the router itself is the component under test. The
publisher's tests against the real RabbitMQ run every confirm through it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import aiormq
import pytest
from aiormq.channel import Returning
from pamqp.commands import Basic

from bridge.publisher import ConfirmRouter


class _Slot:
    """A duck-typed confirmation, like the publisher's own slots."""

    def __init__(self) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.settled = 0

    def done(self) -> bool:
        return self.settled > 0

    def cancelled(self) -> bool:
        return False

    def set_result(self, result: object) -> None:
        self.settled += 1
        self.result = result

    def set_exception(self, exc: BaseException) -> None:
        self.settled += 1
        self.error = exc


def _channel(tags: range) -> tuple[Any, dict[int, _Slot]]:
    slots = {tag: _Slot() for tag in tags}

    async def on_return(frame: Basic.Return) -> None:  # aiormq: pop, re-insert a marker at the end, settle
        tag = frame.reply_code  # the stand-in's way to say which publish came back
        confirmation = channel.confirmations.pop(tag)
        channel.confirmations[tag] = Returning()
        confirmation.set_result("returned")

    channel = SimpleNamespace(confirmations=OrderedDict(slots), _on_return_frame=on_return)
    ConfirmRouter(channel)  # type: ignore[arg-type]
    return channel, slots


def test_a_multiple_ack_settles_every_tag_up_to_it_once_and_leaves_the_rest() -> None:
    channel, slots = _channel(range(1, 11))
    asyncio.run(channel._on_confirm_frame(Basic.Ack(delivery_tag=4, multiple=True)))
    assert [t for t, s in slots.items() if s.settled] == [1, 2, 3, 4]
    assert all(isinstance(slots[t].result, Basic.Ack) for t in (1, 2, 3, 4))
    assert list(channel.confirmations) == list(range(5, 11))
    asyncio.run(channel._on_confirm_frame(Basic.Ack(delivery_tag=7, multiple=False)))
    asyncio.run(channel._on_confirm_frame(Basic.Ack(delivery_tag=10, multiple=True)))
    assert all(s.settled == 1 for s in slots.values())
    assert not channel.confirmations


def test_a_multiple_nack_fails_every_tag_it_covers_with_a_delivery_error() -> None:
    channel, slots = _channel(range(1, 6))
    asyncio.run(channel._on_confirm_frame(Basic.Nack(delivery_tag=3, multiple=True)))
    assert all(isinstance(slots[t].error, aiormq.exceptions.DeliveryError) for t in (1, 2, 3))
    assert not slots[4].settled and not slots[5].settled


def test_a_returned_publish_out_of_order_in_the_map_is_still_cleared_by_the_ack() -> None:
    """aiormq moves a returned publish's tag to the end of the map; a later multiple ack must find it."""
    channel, slots = _channel(range(1, 9))
    asyncio.run(channel._on_return_frame(Basic.Return(reply_code=2)))
    assert list(channel.confirmations)[-1] == 2 and slots[2].result == "returned"
    asyncio.run(channel._on_confirm_frame(Basic.Ack(delivery_tag=5, multiple=True)))
    assert list(channel.confirmations) == [6, 7, 8]  # the marker went too
    assert slots[2].settled == 1  # the return settled it; the ack did not settle it again
    assert all(slots[t].settled == 1 for t in (1, 3, 4, 5))


def test_an_ack_for_an_unknown_tag_settles_nothing(caplog: pytest.LogCaptureFixture) -> None:
    channel, slots = _channel(range(5, 8))
    with caplog.at_level(logging.ERROR, logger="bridge.publisher"):
        asyncio.run(channel._on_confirm_frame(Basic.Ack(delivery_tag=3, multiple=True)))
    assert not any(s.settled for s in slots.values())
    assert "Unexpected confirmation frame" in caplog.text


def test_a_slot_settled_before_its_confirm_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """A publish timeout settled it already: the late ack pops it without settling it twice."""
    channel, slots = _channel(range(1, 4))
    slots[2].set_exception(TimeoutError())
    with caplog.at_level(logging.WARNING, logger="bridge.publisher"):
        asyncio.run(channel._on_confirm_frame(Basic.Ack(delivery_tag=3, multiple=True)))
    assert slots[2].settled == 1 and isinstance(slots[2].error, TimeoutError)
    assert slots[1].settled == 1 and slots[3].settled == 1
    assert not channel.confirmations
    assert "was ignored" in caplog.text
