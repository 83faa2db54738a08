"""Topic matching: the pure matcher, the page's JavaScript copy, and the real RabbitMQ agree."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.topic import documented_matches, matches, pattern_problem, words

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TOPIC_JS = Path(__file__).resolve().parent.parent / "bridge" / "explorer" / "static" / "topic.js"

EDGE_CASES = [
    ("#.a", "a", True),
    ("a.#", "a", True),
    ("a.#", "a.b.c", True),
    ("#", "", True),
    ("*", "", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a.", True),
    ("*.*", ".", True),
    ("#.#", "", True),
    ("a.#.b", "a.b", True),
    ("a.*.b", "a.b", False),
    ("", "", True),
    ("", "a", False),
    ("transaction.#", "transaction.done", True),
    ("*.failed", "apps.payment.failed", False),
    ("#.failed", "apps.payment.failed", True),
    ("a*", "ab", False),
    ("a*", "a*", True),
]


def _exhaustive() -> list[tuple[str, str]]:
    pat_words = ["a", "b", "", "*", "#"]
    key_words = ["a", "b", ""]
    pats = [""] + [".".join(p) for n in (1, 2, 3) for p in itertools.product(pat_words, repeat=n)]
    keys = [""] + [".".join(k) for n in (1, 2, 3) for k in itertools.product(key_words, repeat=n)]
    return [(p, k) for p in dict.fromkeys(pats) for k in dict.fromkeys(keys)]


@pytest.mark.parametrize(("pattern", "key", "expected"), EDGE_CASES)
def test_edge_cases(pattern: str, key: str, expected: bool) -> None:
    """The documented corner cases of RabbitMQ's topic rules hold in the pure matcher."""
    assert matches(pattern, key) is expected


def test_words_of_empty_and_trailing_dot() -> None:
    """The empty key has no words; a trailing dot adds an empty word."""
    assert words("") == ()
    assert words("a.") == ("a", "")


def test_javascript_matcher_agrees() -> None:
    """The page's topic.js gives the same answer as bridge.topic on every short pattern/key pair."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed; the browser test covers the JavaScript matcher")
    cases = _exhaustive() + [(p, k) for p, k, _ in EDGE_CASES]
    script = (
        f"const t = require({json.dumps(str(TOPIC_JS))});"
        "const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "process.stdout.write(JSON.stringify(cases.map(([p, k]) => t.topicMatches(p, k))));"
    )
    out = subprocess.run(
        [node, "-e", script], input=json.dumps(cases), capture_output=True, text=True, check=True, timeout=60
    )
    got = json.loads(out.stdout)
    want = [matches(p, k) for p, k in cases]
    wrong = [(c, g) for c, g, w in zip(cases, got, want, strict=True) if g != w]
    assert not wrong, wrong[:10]
    assert len(got) > 6000


def test_documented_matches() -> None:
    """The catalogue panel lists the documented failed events for *.failed, and channel events for #.failed."""
    failed = documented_matches("*.failed")
    assert set(failed) == {
        "account.failed",
        "transaction.failed",
        "deposit.failed",
        "withdrawal.failed",
        "currency.failed",
    }
    assert "CHANNEL.message.failed" in documented_matches("#.failed")
    assert "CHANNEL.message.sent" in documented_matches("sms.#")
    assert documented_matches("nothing.here") == ()


@pytest.mark.parametrize("bad", ["", "transaction*", "a.#b", "a b", "a\tb", "x" * 256, "a..b", ".a", "transaction."])
def test_pattern_problem_refuses(bad: str) -> None:
    """Patterns that are surely mistakes get a reason."""
    assert pattern_problem(bad) is not None


@pytest.mark.parametrize("good", ["#", "*", "transaction.#", "*.failed", "#.failed", "apps.payment.*"])
def test_pattern_problem_accepts(good: str) -> None:
    """Ordinary patterns are accepted."""
    assert pattern_problem(good) is None


# -- against the real broker --

_pat_word = st.sampled_from(["a", "b", "", "*", "#"])
_key_word = st.sampled_from(["a", "b", ""])
_patterns = st.lists(_pat_word, max_size=4).map(".".join)
_keys = st.lists(_key_word, max_size=4).map(".".join)


class _Broker:
    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.connection = self.runner.run(aio_pika.connect(AMQP_URL, timeout=10))

    def routed(self, patterns: list[str], keys: list[str]) -> dict[str, set[str]]:
        return self.runner.run(self._routed(patterns, keys))

    async def _routed(self, patterns: list[str], keys: list[str]) -> dict[str, set[str]]:
        channel = await self.connection.channel(publisher_confirms=True)
        name = f"test.topic.{uuid.uuid4().hex[:10]}"
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=False)
        queues = []
        try:
            for pattern in patterns:
                queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
                await queue.bind(exchange, routing_key=pattern)
                queues.append((pattern, queue))
            for index, key in enumerate(keys):
                await exchange.publish(aio_pika.Message(body=str(index).encode()), routing_key=key)
            out: dict[str, set[str]] = {}
            for pattern, queue in queues:
                got = out.setdefault(pattern, set())
                while (message := await queue.get(no_ack=True, fail=False)) is not None:
                    got.add(keys[int(message.body)])
            return out
        finally:
            for _, queue in queues:
                await queue.delete(if_unused=False, if_empty=False)
            await exchange.delete()
            await channel.close()

    def close(self) -> None:
        self.runner.run(self.connection.close())
        self.runner.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[_Broker]:
    """One connection to the real RabbitMQ for the whole module."""
    try:
        b = _Broker()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"RabbitMQ is not reachable on 127.0.0.1:5672: {exc}")
    yield b
    b.close()


@pytest.mark.broker
def test_edge_cases_on_the_broker(broker: _Broker) -> None:
    """RabbitMQ routes the corner cases exactly as the pure matcher says."""
    patterns = sorted({p for p, _, _ in EDGE_CASES})
    keys = sorted({k for _, k, _ in EDGE_CASES})
    routed = broker.routed(patterns, keys)
    for pattern in patterns:
        assert routed[pattern] == {k for k in keys if matches(pattern, k)}, pattern
    for pattern, key, expected in EDGE_CASES:
        assert (key in routed[pattern]) is expected, (pattern, key)


@pytest.mark.broker
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patterns=st.lists(_patterns, min_size=1, max_size=6, unique=True),
       keys=st.lists(_keys, min_size=1, max_size=8, unique=True))  # fmt: skip
def test_matcher_agrees_with_broker(broker: _Broker, patterns: list[str], keys: list[str]) -> None:
    """For generated patterns and keys, the queues RabbitMQ fills are the ones the matcher predicts."""
    routed = broker.routed(patterns, keys)
    for pattern in patterns:
        assert routed[pattern] == {k for k in keys if matches(pattern, k)}, pattern
