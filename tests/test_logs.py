"""The log scrubber: the last line of defence for secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from bridge import logs

KEY = "c9d4744c-0eae-4457-a665-2c18b9ac132b"


LIBRARY_LOGGERS = ("aio_pika", "aiormq", "websockets", "aiohttp.access", "aiormq.connection",
                   "aio_pika.robust_connection", "aio_pika.tools")  # fmt: skip


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    libraries = {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters)) for name in LIBRARY_LOGGERS}
    stream = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", stream)
    logs.setup_logging("INFO", "json", realm_keys=(KEY,), passwords=("guest",))
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    for name, (level, filters) in libraries.items():  # setup_logging set levels and filters on these too
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.filters[:] = filters


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
    """Per-attempt outage lines of aiormq and aio-pika: duplicates never reach an INFO log, a new cause once a minute."""
    attempt = 'Connection attempt to "%s" failed: %s. Reconnecting after %r seconds.'
    robust = logging.getLogger("aio_pika.robust_connection")
    logging.getLogger("aiormq.connection").error("error when creating transport: %r", ConnectionRefusedError(111))
    for _ in range(3):
        robust.warning(attempt, "amqp://h/", "[Errno 111] Connection refused", 1)
    robust.warning(attempt, "amqp://h/", "ACCESS_REFUSED - Login was refused", 1)  # a new cause: shown
    robust.warning(attempt, "amqp://h/", "ACCESS_REFUSED - Login was refused", 1)
    logging.getLogger("aio_pika.tools").error(
        "Callback %r error: %s: %s", "<bound method RobustChannel._on_close of x>", "RuntimeError", "closed"
    )
    # A failing callback of the bridge's own, and any other library error, stay errors.
    logging.getLogger("aio_pika.tools").error("Callback %r error: %s: %s", "<Broker._on_reconnected>", "KeyError", "x")
    logging.getLogger("aiormq.connection").error("Unexpected frame %r", "frame")
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [(r["logger"], r["level"]) for r in lines] == [
        ("aio_pika.robust_connection", "warning"),
        ("aio_pika.robust_connection", "warning"),
        ("aio_pika.tools", "error"),
        ("aiormq.connection", "error"),
    ]
    assert "Connection refused" in lines[0]["msg"] and "ACCESS_REFUSED" in lines[1]["msg"]
    assert "Broker._on_reconnected" in lines[2]["msg"]


def test_a_repeated_library_line_passes_again_after_a_minute(captured: io.StringIO) -> None:
    """The same text passes once per minute (by the record's own time), and is DEBUG in between."""
    noise = logs.LibraryNoise()  # the fixture set the root logger to INFO: a demoted line is dropped

    def record(at: float) -> logging.LogRecord:
        rec = logging.makeLogRecord({"name": "aio_pika.robust_connection", "levelno": logging.WARNING,
                                     "levelname": "WARNING", "msg": 'Connection attempt to "%s" failed',
                                     "args": ("amqp://h/",), "created": at})  # fmt: skip
        return rec

    verdicts = [(noise.filter(rec := record(t)), rec.levelname) for t in (1000.0, 1030.0, 1059.0, 1061.0)]
    assert verdicts == [(True, "WARNING"), (False, "DEBUG"), (False, "DEBUG"), (True, "WARNING")]


def test_demoted_library_lines_show_at_debug(captured: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --log-level DEBUG the demoted lines are there, at DEBUG."""
    debug = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", debug)
    logs.setup_logging("DEBUG", "json", realm_keys=(KEY,), passwords=("guest",))
    logging.getLogger("aiormq.connection").error("error when creating transport: %r", ConnectionRefusedError(111))
    lines = [json.loads(line) for line in debug.getvalue().splitlines()]
    assert [(r["logger"], r["level"]) for r in lines] == [("aiormq.connection", "debug")]


def test_the_same_cause_with_another_object_address_is_a_repeat(captured: io.StringIO) -> None:
    """aio-pika names the frame object it got, with its address: 15 lines in 16 s once permissions were cleared."""
    attempt = 'Connection attempt to "%s" failed: %s. Reconnecting after %r seconds.'
    robust = logging.getLogger("aio_pika.robust_connection")
    for address in ("0x7f9b12345678", "0x7f9b87654321", "0x7f9babcdef01"):
        robust.warning(attempt, "amqp://h/", f"Expected one of ['Connection.OpenOk'], got <Connection.Close object at "
                                             f"{address}>", 1)  # fmt: skip
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert len(lines) == 1 and "Connection.Close object" in lines[0]["msg"]
