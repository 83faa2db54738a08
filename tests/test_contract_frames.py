"""The hand-built publish frames are byte for byte what pamqp marshals for the contract's properties."""

from __future__ import annotations

import pamqp.frame
import pytest
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from bridge.contract import (
    KIND_EVENT,
    KIND_QUARANTINE,
    Outbound,
    amqp_properties,
    header_frame_bytes,
    properties_bytes,
    publish_frames,
)

_EVENT = Outbound(
    kind=KIND_EVENT,
    routing_key="deposit.received",
    message_id="0123456789abcdef0123456789abcdef",
    body=b'{"type":"notification","event":"deposit.received","data":"x"}',
    headers={"realm": "prod", "received_at": 1764150000123, "entity_id": "ent-\u00e9\u4e2d"},
    received_at=1764150000.987,
)
_QUARANTINE = Outbound(
    kind=KIND_QUARANTINE,
    routing_key="invalid_json",
    message_id="f" * 32,
    body=b"\xff\xfe not json",
    headers={"realm": "r", "reason": "invalid_json", "detail": "bad", "received_at": 5},
    received_at=5.0,
)
_ODD = Outbound(
    kind=KIND_EVENT,
    routing_key="a",
    message_id="m",
    body=b"",
    headers={
        "realm": "",
        "small": 7,
        "neg": -40000,
        "mid": 70000,
        "big": 2**40,
        "u32": 2**31,
        "u32top": 2**32 - 1,
        "i64": 2**32,
        "low": -(2**31) - 1,
    },
    received_at=0.0,
)


_FALLBACK = Outbound(
    kind=KIND_EVENT, routing_key="a", message_id="m", body=b"x", headers={"realm": "r", "flag": True}, received_at=1.0
)  # a bool header: the whole table goes through pamqp


def _reference(msg: Outbound, extra: dict[str, str] | None, mandatory: bool, frame_max: int) -> bytes:
    props = amqp_properties(msg, extra)
    frames: list[object] = [
        Basic.Publish(exchange="ex.ch", routing_key=msg.routing_key, mandatory=mandatory),
        ContentHeader(0, len(msg.body), props),
    ]
    step = frame_max - 8
    body = msg.body
    if body:
        frames += (
            [ContentBody(body)]
            if len(body) < step
            else [ContentBody(body[i : i + step]) for i in range(0, len(body), step)]
        )
    return b"".join(pamqp.frame.marshal(f, 7) for f in frames)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "msg", [_EVENT, _QUARANTINE, _ODD, _FALLBACK], ids=["event", "quarantine", "odd_headers", "fallback"]
)
@pytest.mark.parametrize("mandatory", [True, False])
def test_frames_match_pamqp(msg: Outbound, mandatory: bool) -> None:
    """Method, content header and body frames equal pamqp's marshalling of the same publish."""
    mine = publish_frames(
        7, "ex.ch", msg.routing_key, properties_bytes(msg), msg.body, mandatory=mandatory, max_content=131064
    )
    assert mine == _reference(msg, None, mandatory, 131072)
    assert header_frame_bytes(amqp_properties(msg)) == 20 + len(properties_bytes(msg))


def test_extra_headers_and_a_body_split_over_frames() -> None:
    """Extra headers are merged like amqp_properties does; a body above frame_max is split like aiormq splits it."""
    big = Outbound(kind=KIND_EVENT, routing_key="k", message_id="i", body=b"y" * 10_000,
                   headers={"realm": "x"}, received_at=1.0)  # fmt: skip
    extra = {"original_routing_key": "k"}
    mine = publish_frames(7, "ex.ch", "k", properties_bytes(big, extra), big.body, mandatory=True, max_content=4096 - 8)
    assert mine == _reference(big, extra, True, 4096)
