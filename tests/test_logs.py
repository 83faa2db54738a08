"""The log scrubber: the last line of defence for secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from bridge import logs

KEY = "c9d4744c-0eae-4457-a665-2c18b9ac132b"


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", stream)
    logs.setup_logging("INFO", "json", realm_keys=(KEY,), passwords=("guest",))
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def test_realm_key_is_scrubbed_from_messages_and_tracebacks(captured: io.StringIO) -> None:
    """A realm key in a message or an exception is replaced by its fingerprint."""
    log = logging.getLogger("bridge.test")
    log.warning("server said %s", KEY)
    try:
        raise ValueError(f"bad {KEY}")
    except ValueError:
        log.error("failed", exc_info=True)
    out = captured.getvalue()
    assert KEY not in out
    assert out.count("fp-") >= 2


def test_password_is_scrubbed_only_inside_urls(captured: io.StringIO) -> None:
    """The AMQP password is hidden in URLs without rewriting the user name that happens to equal it."""
    logging.getLogger("bridge.test").warning("url amqp://guest:guest@h/ user guest")
    record = json.loads(captured.getvalue().splitlines()[-1])
    assert record["msg"] == "url amqp://guest:***@h/ user guest"


def test_json_lines_have_level_logger_and_message(captured: io.StringIO) -> None:
    """Each JSON line carries ts, level, logger and msg."""
    logging.getLogger("bridge.test").info("stream subscribed realm=%s", "eu")
    record = json.loads(captured.getvalue().splitlines()[-1])
    assert record["level"] == "info"
    assert record["logger"] == "bridge.test"
    assert record["msg"] == "stream subscribed realm=eu"
    assert record["ts"].endswith("Z")


def test_scrubbing_leaves_the_record_alone(captured: io.StringIO) -> None:
    """Scrubbing works on the output, so other handlers still see the record's own exc_info."""
    seen: list[logging.LogRecord] = []
    other = logging.Handler()
    other.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(other)
    try:
        raise ValueError(KEY)
    except ValueError:
        logging.getLogger("bridge.test").error("failed", exc_info=True)
    assert seen[-1].exc_info is not None
    assert KEY not in captured.getvalue()
