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


def test_library_lines_about_a_down_broker_are_demoted(captured: io.StringIO) -> None:
    """aiormq's and aio-pika's per-attempt lines about an outage do not reach an INFO log; other lines do."""
    logging.getLogger("aiormq.connection").error("error when creating transport: %r", ConnectionRefusedError(111))
    logging.getLogger("aio_pika.robust_connection").warning(
        'Connection attempt to "%s" failed: %s. Reconnecting after %r seconds.', "amqp://h/", "refused", 1
    )
    logging.getLogger("aio_pika.tools").error(
        "Callback %r error: %s: %s", "<bound method RobustChannel._on_close of x>", "RuntimeError", "closed"
    )
    # A failing callback of the bridge's own, and any other library error, stay errors.
    logging.getLogger("aio_pika.tools").error("Callback %r error: %s: %s", "<Broker._on_reconnected>", "KeyError", "x")
    logging.getLogger("aiormq.connection").error("Unexpected frame %r", "frame")
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [(r["logger"], r["level"]) for r in lines] == [("aio_pika.tools", "error"), ("aiormq.connection", "error")]
    assert "Broker._on_reconnected" in lines[0]["msg"]


def test_demoted_library_lines_show_at_debug(captured: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --log-level DEBUG the demoted lines are there, at DEBUG."""
    debug = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", debug)
    logs.setup_logging("DEBUG", "json", realm_keys=(KEY,), passwords=("guest",))
    logging.getLogger("aiormq.connection").error("error when creating transport: %r", ConnectionRefusedError(111))
    lines = [json.loads(line) for line in debug.getvalue().splitlines()]
    assert [(r["logger"], r["level"]) for r in lines] == [("aiormq.connection", "debug")]
