"""The simulator's pure parts and its settings, tested without sockets."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
import pytest

from bridge.errors import ConfigError, ProtocolError
from bridge.simulator import MALFORMED_KINDS, SimulatorConfig, add_simulate_arguments, config_from_args
from bridge.simulator.faults import MalformedPicker, RejectPlan
from bridge.simulator.flows import BURST, EventSource, RateSchedule
from bridge.simulator.frames import malformed, padded
from bridge.wire import parse_frame


def _parse(*argv: str, environ: dict[str, str] | None = None) -> SimulatorConfig:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)), environ or {})


def test_rate_schedule_paces_events_and_bursts_when_behind() -> None:
    """At 100/s one event is due at the start, the next after 10 ms, and a 1 s lag is caught up in bursts."""
    schedule = RateSchedule(100.0)
    schedule.restart(now=50.0, generated=0)
    assert schedule.due(50.0, 0) == 1
    assert schedule.due(50.0, 1) == 0
    assert schedule.delay(50.0, 1) == pytest.approx(0.01)
    assert schedule.due(51.0, 1) == 100
    assert schedule.due(60.0, 1) == BURST


def test_rate_schedule_restart_forgets_idle_time() -> None:
    """After a restart, time spent idle is not caught up."""
    schedule = RateSchedule(10.0)
    schedule.restart(now=0.0, generated=0)
    schedule.restart(now=100.0, generated=5)
    assert schedule.due(100.0, 5) == 1


def test_rate_zero_is_always_a_full_burst() -> None:
    """Rate 0 means as fast as possible: a full burst is always due."""
    assert RateSchedule(0.0).due(0.0, 10**6) == BURST


def test_event_source_is_deterministic_per_seed_and_realm() -> None:
    """The same seed and realm index give the same steps; another index gives others."""
    assert EventSource(3, 0).take(200) == EventSource(3, 0).take(200)
    assert EventSource(3, 0).take(200) != EventSource(3, 1).take(200)


@pytest.mark.parametrize("size", [0, 10, 25, 26, 1000, 100_000])
def test_padded_reaches_the_size_and_keeps_the_id(size: int) -> None:
    """A padded value starts with the entity id and is exactly the size asked (never shorter than the id)."""
    oid = "63967141191e9023f356df9f"
    value = padded(oid, size)
    assert value.startswith(oid)
    assert len(value) == max(size, len(oid))
    assert orjson.loads(orjson.dumps(value)) == value


def test_reject_plan_refuses_n_then_accepts() -> None:
    """An armed plan refuses exactly n subscribes with its text, then accepts again."""
    plan = RejectPlan()
    assert plan.take() is None
    plan.arm(2, "Nope")
    first, second, third = plan.take(), plan.take(), plan.take()
    assert first is not None and second is not None
    assert (first.text, first.key_error) == ("Nope", True)
    assert third is None


def test_reject_plan_default_texts() -> None:
    """A key refusal defaults to the documented text, a non-key one to a server error."""
    plan = RejectPlan()
    plan.arm(1)
    key = plan.take()
    plan.arm(1, key_error=False)
    other = plan.take()
    assert key is not None and key.text == "Invalid Realm Key."
    assert other is not None and (other.text, other.key_error) == ("Service temporarily unavailable", False)


def test_malformed_picker_cycles_in_turn_and_draws_seeded_random_kinds() -> None:
    """In turn cycles through every kind; random draws repeat for the same seed."""
    picker = MalformedPicker(1)
    assert [picker.in_turn() for _ in MALFORMED_KINDS] == list(MALFORMED_KINDS)
    assert MalformedPicker(5).at_random(30) == MalformedPicker(5).at_random(30)
    assert set(MalformedPicker(5).at_random(200)) == set(MALFORMED_KINDS)


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_every_malformed_kind_is_refused_by_the_bridge_parser(kind: str) -> None:
    """Each malformed kind is a frame the bridge's parser refuses."""
    with pytest.raises(ProtocolError):
        parse_frame(malformed(kind, "user.created", "63967141191e9023f356df9f"))


def test_unknown_malformed_kind_raises() -> None:
    """An unknown kind is a programming error, not a silent default."""
    with pytest.raises(ValueError, match="unknown"):
        malformed("nope", "user.created", "x")


def test_new_flags_are_read_from_flags_and_environment() -> None:
    """--data-bytes, --tls-*, --control-addr and SIM_* variables fill the new settings; the CLI does not record."""
    config = _parse("--data-bytes", "100000", "--control-addr", ":0", environ={"SIM_SEED": "9"})
    assert (config.data_bytes, config.control_addr, config.seed, config.record) == (100_000, ":0", 9, False)


def test_toml_file_fills_what_flags_and_environment_leave(tmp_path: Path) -> None:
    """A --config TOML file is read after flags and environment, before defaults."""
    cfg = tmp_path / "sim.toml"
    cfg.write_text('rate = 7\ncount = 3\nrealm_keys = ["file-key"]\nshape = "nested"\npong = true\n')
    config = _parse("--config", str(cfg), "--count", "5", environ={"SIM_RATE": "9"})
    assert (config.rate, config.count, config.realm_keys, config.shape, config.pong) == (
        9.0,
        5,
        ("file-key",),
        "nested",
        True,
    )


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--data-bytes", "lots"], {}, "--data-bytes"),
        (["--port", "70000"], {}, "--port"),
        ([], {"SIM_RATE": "-1"}, "SIM_RATE"),
        ([], {"SIM_SHAPE": "round"}, "SIM_SHAPE"),
        ([], {"SIM_PONG": "perhaps"}, "SIM_PONG"),
        (["--control-addr", "everywhere"], {}, "--control-addr"),
        (["--tls-cert", "/nonexistent.pem"], {}, "tls_key"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], {}, "--tls-cert"),
    ],
)
def test_bad_values_name_where_they_came_from(argv: list[str], environ: dict[str, str], named: str) -> None:
    """Every invalid simulator value fails naming its flag, variable or setting."""
    with pytest.raises(ConfigError, match=named):
        _parse(*argv, environ=environ)


def test_bad_toml_value_names_the_file_key(tmp_path: Path) -> None:
    """An invalid value in the file names the key and the file."""
    cfg = tmp_path / "sim.toml"
    cfg.write_text('drop_every = "often"\n')
    with pytest.raises(ConfigError, match=r"drop_every in --config .*sim\.toml"):
        _parse("--config", str(cfg))


def test_realm_key_errors_never_show_a_key() -> None:
    """An empty realm key among others is refused without showing the other keys."""
    with pytest.raises(ConfigError) as info:
        _parse("--realm-key", "secret-key-1234", "--realm-key", " ", environ={"ORANGEPILL_REALM_KEY": "other-key-5678"})
    assert "secret-key-1234" not in str(info.value)
    assert "other-key-5678" not in str(info.value)
    assert "--realm-key" in str(info.value)


def test_control_addr_and_tls_are_validated_by_the_dataclass() -> None:
    """SimulatorConfig refuses a half TLS setting and a malformed control address."""
    with pytest.raises(ConfigError, match="tls_key"):
        SimulatorConfig(tls_cert="c.pem")
    with pytest.raises(ConfigError, match="control_addr"):
        SimulatorConfig(control_addr="nowhere")
    with pytest.raises(ConfigError, match="data_bytes"):
        SimulatorConfig(data_bytes=-1)
