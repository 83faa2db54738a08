"""HA settings: several AMQP URLs, standby window and poll, validated at start."""

from __future__ import annotations

import argparse

import pytest

from bridge.config import add_arguments, load_settings
from bridge.errors import ConfigError

ENV = {"ORANGEPILL_REALM_KEY": "ha-config-realm-key-01"}


def parse(*argv: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_settings(parser.parse_args(list(argv)), {**ENV, **(env or {})})


def test_defaults() -> None:
    """Defaults: window 30 s, poll 1 s, lock heartbeat 5 s, one node."""
    s = parse()
    assert (s.standby_window, s.standby_poll, s.lock_heartbeat) == (30.0, 1.0, 5.0)
    assert s.amqp_nodes == (s.amqp_url,)
    assert s.detection_worst_case == 16.0


def test_repeatable_flag_and_comma_env() -> None:
    """--amqp-url repeats, BRIDGE_AMQP_URL splits on commas; amqp_url is the first node."""
    s = parse("--amqp-url", "amqp://u:pw1@a:5673/", "--amqp-url", "amqp://u:pw2@b:5674/")
    assert s.amqp_nodes == ("amqp://u:pw1@a:5673/", "amqp://u:pw2@b:5674/") and s.amqp_url.endswith("a:5673/")
    assert set(s.passwords) >= {"pw1", "pw2"}
    assert "pw2" not in str(s.describe())
    e = parse(env={"BRIDGE_AMQP_URL": "amqp://a:5673/, amqp://b:5674/"})
    assert e.amqp_nodes == ("amqp://a:5673/", "amqp://b:5674/")


def test_bad_url_in_list_named_without_secret() -> None:
    """One bad URL among several is a ConfigError naming the variable, never showing the password."""
    with pytest.raises(ConfigError, match="BRIDGE_AMQP_URL") as info:
        parse(env={"BRIDGE_AMQP_URL": "amqp://u:secretpw@a/,http://u:secretpw@b/"})
    assert "secretpw" not in str(info.value)


def test_window_shorter_than_detection_is_rejected() -> None:
    """A standby window not longer than 3 x heartbeat + poll + 1 s is a configuration error."""
    with pytest.raises(ConfigError, match="--standby-window"):
        parse("--standby-window", "10")
    with pytest.raises(ConfigError, match="--standby-window"):
        parse("--lock-heartbeat", "10")  # 3 x 10 + 1 > 30
    assert parse("--standby-window", "8", "--lock-heartbeat", "2", "--standby-poll", "0.5").standby_window == 8
