"""The chaos soak of issue 14 in about a minute and a half: every fault kind once, no event lost outside SIGKILL
windows.

Runs against a private RabbitMQ node on a spare loopback port (tests/cluster.py), never the broker on 5672;
skipped with the reason when such a node cannot be started here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import chaos
from tests.cluster import ClusterUnavailable

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(1200)]

SEED = 14
PEAK_RSS_MB = 150


@pytest.fixture(scope="module")
def target() -> Iterator[chaos.Target]:
    stack = contextlib.ExitStack()
    try:
        node = stack.enter_context(chaos.private_target())
    except ClusterUnavailable as exc:
        pytest.skip(f"no private RabbitMQ node: {exc}")
    with stack:
        yield node


@pytest.fixture(scope="module")
def report(target: chaos.Target, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = chaos.ChaosConfig(
        minutes=1, seed=SEED, rate=300, replicas=1, broker="private",  # runs on until every kind was injected
        gap=(5.0, 8.0), down=(5.0, 8.0), results_dir=tmp_path_factory.mktemp("chaos"),
    )  # fmt: skip
    return chaos.soak(cfg, target)


def test_every_fault_kind_is_injected(report: dict) -> None:
    """A short run goes through the whole rotation: each of the eight fault kinds at least once."""
    assert report["error"] is None
    assert set(report["faults_by_kind"]) == set(chaos.KINDS)


def test_no_event_lost_outside_sigkill_windows(report: dict) -> None:
    """Every seq the simulator sent reached the consumer, except the documented ones read just before a SIGKILL."""
    events = report["events"]
    assert events["sent"] >= 10_000
    assert events["lost_elsewhere"] == 0, events["lost_elsewhere_detail"]
    assert events["distinct"] + events["lost"] == events["sent"]


def test_memory_descriptors_and_tasks_stay_bounded(report: dict) -> None:
    """The bridge's RSS stays under the bound, and its descriptors and tasks do not grow from start to end."""
    mem = report["memory"]
    assert mem["rss_mb"]["peak"] < PEAK_RSS_MB
    assert mem["fds"]["end"] <= mem["fds"]["start"] + 4
    assert mem["tasks"]["end"] <= mem["tasks"]["start"] + 5


def test_report_files_are_written(report: dict) -> None:
    """The JSON report and the RSS/spool plot are written next to each other."""
    path = Path(report["json"])
    assert json.loads(path.read_text())["seed"] == SEED
    assert report["plot"] and Path(report["plot"]).stat().st_size > 10_000
