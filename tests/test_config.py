"""Settings: flags > environment > TOML > defaults, validated once, secrets never shown."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from bridge.config import Settings, add_arguments, load_settings, parse_realm, redact_url
from bridge.errors import ConfigError

KEY = "c9d4744c-0eae-4457-a665-2c18b9ac132b"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_match_the_design_table() -> None:
    """The defaults are those of the design card."""
    s = load_settings(_args("--realm-key", KEY), {})
    assert s.stream_url == "wss://stream.orangepill.cloud"
    assert s.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert s.exchange == "orangepill.events"
    assert s.spool == "./bridge-spool.db"
    assert s.metrics_addr == "0.0.0.0:9180"
    assert s.ping_interval == 10.0


def test_flag_beats_env_beats_file(tmp_path: Path) -> None:
    """A flag overrides the environment, which overrides the TOML file."""
    cfg = tmp_path / "bridge.toml"
    cfg.write_text('exchange = "from.file"\nping_interval = 3\nrealm_keys = ["filekey-0123456789abcdef"]\nspool = "memory"\n')
    env = {"BRIDGE_EXCHANGE": "from.env", "BRIDGE_PING_INTERVAL": "4", "BRIDGE_CONFIG": str(cfg)}
    s = load_settings(_args("--exchange", "from.flag"), env)
    assert s.exchange == "from.flag"
    assert s.ping_interval == 4.0
    assert s.spool == "memory"
    assert [r.key.reveal() for r in s.realms] == ["filekey-0123456789abcdef"]


def test_a_toml_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """A TOML file saved with a UTF-8 byte-order mark reads like one without."""
    cfg = tmp_path / "bridge.toml"
    cfg.write_bytes(b'\xef\xbb\xbfexchange = "from.file"\r\nrealm_keys = ["filekey-0123456789abcdef"]\r\n')
    assert load_settings(_args("--config", str(cfg)), {}).exchange == "from.file"


def test_env_realm_keys_are_comma_separated() -> None:
    """ORANGEPILL_REALM_KEY holds several keys separated by commas, with optional labels."""
    s = load_settings(None, {"ORANGEPILL_REALM_KEY": f"{KEY}, eu=other-key-0123456789ab"})
    assert [r.key.reveal() for r in s.realms] == [KEY, "other-key-0123456789ab"]
    assert s.realms[1].label == "eu"
    assert s.realms[0].label.startswith("fp-")


def test_repeatable_realm_flag() -> None:
    """--realm-key can be given several times."""
    a, b = "a" * 16, "b" * 16
    s = load_settings(_args("--realm-key", a, "--realm-key", b), {})
    assert [r.key.reveal() for r in s.realms] == [a, b]


def test_missing_realm_key_names_the_setting() -> None:
    """run without a realm key fails naming --realm-key and ORANGEPILL_REALM_KEY."""
    with pytest.raises(ConfigError, match="ORANGEPILL_REALM_KEY"):
        load_settings(None, {})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BRIDGE_PING_INTERVAL": "soon"}, "BRIDGE_PING_INTERVAL"),
        ({"BRIDGE_PING_INTERVAL": "-1"}, "BRIDGE_PING_INTERVAL"),
        ({"ORANGEPILL_STREAM_URL": "http://x"}, "ORANGEPILL_STREAM_URL"),
        ({"BRIDGE_AMQP_URL": "redis://x"}, "BRIDGE_AMQP_URL"),
        ({"BRIDGE_EXCHANGE": "amq.topic"}, "BRIDGE_EXCHANGE"),
        ({"BRIDGE_METRICS_ADDR": "9180"}, "BRIDGE_METRICS_ADDR"),
        ({"BRIDGE_SPOOL_MAX_BYTES": "lots"}, "BRIDGE_SPOOL_MAX_BYTES"),
        ({"BRIDGE_CONFIRM_WINDOW": "0"}, "BRIDGE_CONFIRM_WINDOW"),
        ({"BRIDGE_UNROUTABLE": "maybe"}, "BRIDGE_UNROUTABLE"),
        ({"BRIDGE_SPOOL_SYNC": "sometimes"}, "BRIDGE_SPOOL_SYNC"),
        ({"BRIDGE_CONFIG": "/nonexistent/bridge.toml"}, "--config"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], named: str) -> None:
    """Each invalid value is refused with a message naming where it came from."""
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, **env})


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    """A typo in the config file is an error, not silently ignored."""
    cfg = tmp_path / "bridge.toml"
    cfg.write_text("exchnage = 'x'\n")
    with pytest.raises(ConfigError, match="exchnage"):
        load_settings(_args("--config", str(cfg), "--realm-key", KEY), {})


def test_idle_timeout_must_exceed_ping_interval() -> None:
    """An idle timeout not longer than the ping interval is refused."""
    with pytest.raises(ConfigError, match="idle-timeout"):
        load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_IDLE_TIMEOUT": "5", "BRIDGE_PING_INTERVAL": "10"})


def test_errors_and_repr_never_show_secrets() -> None:
    """Neither the settings' repr, describe(), nor an error message shows a key or password."""
    s = load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_AMQP_URL": "amqp://u:hunter2@h:5672/"})
    assert KEY not in repr(s) and "hunter2" not in repr(s)
    assert KEY not in str(s.describe()) and "hunter2" not in str(s.describe())
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"ORANGEPILL_REALM_KEY": f"{KEY},{KEY}"})
    assert KEY not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"ORANGEPILL_REALM_KEY": "bad key with spaces"})
    assert "bad key" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_AMQP_URL": "amqp://u:hunter2@h:notaport/"})
    assert "hunter2" not in str(info.value)


def test_sizes_accept_units() -> None:
    """Spool sizes accept units such as GiB and MB."""
    s = load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_SPOOL_MAX_BYTES": "2GiB"})
    assert s.spool_max_bytes == 2 * 1024**3


def test_realm_label_parsing() -> None:
    """LABEL=KEY gives a label; a bare key gets its fingerprint as label."""
    assert parse_realm(f"eu={KEY}").label == "eu"
    assert parse_realm(KEY).label.startswith("fp-")
    assert parse_realm("c29tZS1rZXktdmFsdWU==").key.reveal() == "c29tZS1rZXktdmFsdWU=="  # base64 padding


def test_redact_url_hides_password() -> None:
    """redact_url hides the password and keeps the rest."""
    assert redact_url("amqp://guest:guest@localhost:5672/") == "amqp://guest:***@localhost:5672/"


def test_settings_is_frozen() -> None:
    """Settings cannot be changed after start."""
    s = Settings()
    with pytest.raises(AttributeError):
        s.exchange = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("--stream-url", "htp://x"), "got a URL of scheme 'htp'"),
        (("--stream-url", "https://stream.orangepill.cloud"), "got a URL of scheme 'https'"),
        (("--stream-url", "ws:///path"), "got a URL to ?:80"),
        (("--metrics-addr", "127.0.0.1:99999"), "a port from 1 to 65535"),
        (("--exchange", "amq.topic"), "must not start with 'amq.'"),
        (("--amqp-url", "amqp://u:p@h:5672/?heartbeat=abc"), "?heartbeat= that is not a whole number"),
        (("--amqp-url", "amqp://u:p@h:5672/?heartbeat=-5"), "?heartbeat= that is not a whole number"),
        (("--amqp-url", "amqp://u:p@h:5672/?heartbeat=99999"), "from 0 to 65535"),
        (("--confirm-window", "1000000000"), "from 1 to 65535"),
        (("--max-frame-bytes", "10GiB"), "at most 512MiB"),
    ],
)
def test_refusals_say_what_is_wrong(argv: tuple[str, ...], says: str) -> None:
    """The refusal names the actual problem: the scheme (not a guessed port), the port range, the reserved prefix."""
    with pytest.raises(ConfigError) as info:
        load_settings(_args("--realm-key", KEY, *argv), {})
    assert says in str(info.value), str(info.value)
    assert argv[0] in str(info.value)


def test_a_heartbeat_of_zero_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """aio-pika took ?heartbeat=abc (or -5) for 0, silently: only a real number is accepted, and 0, which
    turns off the detection of a silent link, is said at start."""
    from bridge.tls import log_transport_warnings

    settings = load_settings(_args("--realm-key", KEY, "--amqp-url", "amqp://u:p@127.0.0.1:5672/?heartbeat=0"), {})
    with caplog.at_level(logging.WARNING):
        log_transport_warnings(settings)
    assert "sets ?heartbeat=0: the AMQP heartbeat is off" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        log_transport_warnings(load_settings(_args("--realm-key", KEY, "--amqp-url", "amqp://u:p@127.0.0.1/?heartbeat=30"), {}))
    assert "heartbeat" not in caplog.text


def test_a_realm_label_problem_names_the_label_setting() -> None:
    """A bad --realm-label (or ORANGEPILL_REALM_LABEL) was reported as a --realm-key problem; a shared label says which."""
    with pytest.raises(ConfigError, match=r"^--realm-label #1: a realm label must be"):
        load_settings(_args("--realm-key", KEY, "--realm-label", "bad label!"), {})
    with pytest.raises(ConfigError, match=r"two realms share the label 'eu'"):
        load_settings(_args("--realm-key", f"eu={KEY}", "--realm-key", "eu=" + KEY.replace("c", "d")), {})


def test_spool_sync_is_normal_unless_full_is_asked() -> None:
    """--spool-sync / BRIDGE_SPOOL_SYNC: normal by default, full on request (any case)."""
    assert load_settings(None, {"ORANGEPILL_REALM_KEY": KEY}).spool_sync == "normal"
    assert load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_SPOOL_SYNC": "full"}).spool_sync == "full"
    assert load_settings(_args("--realm-key", KEY, "--spool-sync", "full"), {}).spool_sync == "full"
