"""The event catalogue of the Orangepill WebSocket documentation."""

from __future__ import annotations

import pytest

from bridge.catalog import CATALOG, lookup, metric_label, metric_labels


def test_catalogue_has_every_seed_event() -> None:
    """All 55 events of the documentation's table are listed, each once."""
    names = [spec.name for spec in CATALOG]
    assert len(names) == 55 == len(set(names))
    assert {"deposit.received", "transaction.done", "apps.deposit.failed", "persons.sync.started"} <= set(names)


def test_infobip_marks() -> None:
    """Events marked * in the documentation need the Infobip extension, others do not."""
    assert lookup("person.created") is not None and lookup("person.created").infobip  # type: ignore[union-attr]
    assert lookup("deposit.received") is not None and not lookup("deposit.received").infobip  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["sms.message.sent", "whatsapp.message.failed", "viber.message.sent"])
def test_channel_pattern(name: str) -> None:
    """CHANNEL.message.sent/failed match any channel name."""
    spec = lookup(name)
    assert spec is not None and spec.name.startswith("CHANNEL.message.")


def test_unknown_name_is_not_in_catalogue() -> None:
    """Names outside the catalogue look up to None (they are still routed)."""
    assert lookup("transaction.processed") is None


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("deposit.received", "deposit.received"),
        ("sms.message.sent", "sms.message.sent"),
        ("viber.message.sent", "CHANNEL.message.sent"),
        ("transaction.processed", "other"),
        ("x" * 200, "other"),
    ],
)
def test_metric_label_is_bounded(name: str, label: str) -> None:
    """Metric labels are catalogue names, known channels, the CHANNEL pattern or other."""
    assert metric_label(name) == label
    assert label in metric_labels()
