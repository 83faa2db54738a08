"""Secrets without sockets: the Secret type, redaction (raw, escaped, before truncation), URL credentials, settings."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.config import Secret, Settings, add_arguments, load_settings, parse_realm
from bridge.contract import KIND_EVENT, quarantine_message
from bridge.errors import ConfigError, ProtocolError
from bridge.secrets import LogScrubber, clip, host_port, key_fingerprint, redact, redact_url
from bridge.wire import ErrorFrame, parse_frame, parse_frames

KEY = 'S3cr3t/Realm"Key-é-0123456789abcdef'  # 35 characters with '/', 'é' and '"'
PASSWORD = "p#ss/w@rd-2024-x"
ENCODED = "p%23ss%2Fw%40rd-2024-x"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _pieces(secret: str, n: int = 12) -> list[str]:
    return [secret[i : i + n] for i in range(len(secret) - n + 1)] or [secret]


def _leaks(text: str, *secrets: str) -> list[str]:
    return [p for s in secrets for p in _pieces(s) if p in text]


# -- Secret ---------------------------------------------------------------------------


def test_secret_repr_and_str_are_masked() -> None:
    """repr, str and format of a Secret never show the value; reveal() does."""
    s = Secret(KEY)
    assert KEY not in repr(s) and KEY not in str(s) and KEY not in f"{s} {s!r} {s:>40}"
    assert s.reveal() == KEY
    assert Secret(KEY) == s and hash(Secret(KEY)) == hash(s) and Secret("x" * 16) != s


def test_settings_repr_and_describe_hide_every_secret() -> None:
    """A stray log of the settings (repr, str, describe) shows neither the key nor the password."""
    s = load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_AMQP_URL": f"amqp://bridge:{ENCODED}@h:5672/"})
    for text in (repr(s), str(s), str(s.describe()), repr(s.realms), str(s.realms[0])):
        assert not _leaks(text, KEY, PASSWORD, ENCODED), text
    assert s.realms[0].key.reveal() == KEY


# -- redaction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        KEY,
        json.dumps(KEY),
        json.dumps(KEY, ensure_ascii=False),
        json.dumps(KEY).replace("/", "\\/"),
        json.dumps(KEY).replace("\\u00e9", "\\u00E9"),
        json.dumps(json.dumps(KEY)),
        repr(KEY),
        ascii(KEY),
    ],
)
def test_redact_catches_the_raw_and_every_escaped_form(form: str) -> None:
    """The key is replaced raw, JSON-escaped (\\/, \\uXXXX either case, \\"), doubly escaped and as a repr."""
    out = redact(f'{{"realm": {form}, "x": 1}}', (KEY,))
    assert key_fingerprint(KEY) in out
    assert not _leaks(out, KEY) and "0123456789abcdef" not in out


def test_redact_replaces_the_whole_token_not_a_piece() -> None:
    """A key inside a longer token takes the token with it: no "bro<…>er", no piece of the key left."""
    key = "k" * 16
    out = redact(f"broker x{key}y done", (key,))
    assert out == f"broker <realm-key {key_fingerprint(key)}> done"


@pytest.mark.parametrize("start", [0, 7, len(KEY) - 16])
def test_a_piece_of_the_key_is_redacted_too(start: int) -> None:
    """A 16-character piece of a key (an upstream error echoing it truncated) goes, raw or JSON-escaped."""
    piece = KEY[start : start + 16]
    for form in (piece, json.dumps(piece)[1:-1], json.dumps(piece, ensure_ascii=True)[1:-1]):
        out = redact(f"bad key {form}; retry later", (KEY,))
        assert out.startswith("bad key <realm-key ") and out.endswith("; retry later"), out
        assert key_fingerprint(KEY) in out and not _leaks(out, KEY), out


def test_pieces_shorter_than_twelve_and_other_text_stay() -> None:
    """Eleven characters of a key, and text with none of it, are left as they were."""
    for text in (f"id {KEY[:11]} ok", f"code {KEY[5:16]}!", "nothing secret here \\/ at all"):
        assert redact(text, (KEY,)) == text


def test_the_log_scrubber_masks_a_piece_of_a_key_in_any_line() -> None:
    """The last line of defence catches a piece of a key in a formatted log line."""
    line = LogScrubber((KEY,), ())(f"stream error frame message=unknown realm {KEY[3:19]}")
    assert not _leaks(line, KEY) and key_fingerprint(KEY) in line


def test_redaction_happens_before_truncation() -> None:
    """An error frame and an event name that hold the key near the cut keep no piece of it."""
    frame = parse_frame(json.dumps({"type": "error", "message": "x" * 180 + KEY}))
    assert isinstance(frame, ErrorFrame)
    shown = clip(redact(frame.message, (KEY,)), 200)
    assert not _leaks(shown, KEY) and len(shown) <= 200
    with pytest.raises(ProtocolError) as info:
        parse_frame(json.dumps({"type": "notification", "event": "a" * 60 + "." + KEY + " x", "data": 1}))
    msg = quarantine_message('{"raw": 1}', info.value, realm="r", secrets=(KEY,), received_at=0.0)
    assert not _leaks(str(msg.headers["detail"]), KEY)


def test_quarantine_body_holds_no_escaped_key() -> None:
    """A frame that echoes the key raw and JSON-escaped is stored with the key's fingerprint only."""
    raw = '{"type": "notification", "event": "bad name", "echo": ' + json.dumps(KEY) + ', "raw": "' + KEY + '"}'
    with pytest.raises(ProtocolError) as info:
        parse_frames(raw)
    msg = quarantine_message(raw, info.value, realm="r", secrets=(KEY,), received_at=0.0)
    body = msg.body.decode()
    assert not _leaks(body, KEY) and body.count(key_fingerprint(KEY)) == 2


@given(st.text(max_size=200), st.text(max_size=200))
def test_redact_never_leaves_the_key_around_any_text(before: str, after: str) -> None:
    """Whatever surrounds the key, raw or JSON-escaped, no 12-character piece of it survives."""
    for form in (KEY, json.dumps(KEY)[1:-1]):
        out = redact(before + form + after, (KEY,))
        assert KEY not in out
        assert not [p for p in _pieces(KEY) if p in out and p not in before + after]


def test_log_scrubber_masks_password_forms_and_keys() -> None:
    """The scrubber masks a long password written and decoded, a short one only in a URL, and keys."""
    clean = LogScrubber((KEY,), (ENCODED,))
    text = clean(f"url amqp://bridge:{ENCODED}@h/ said {PASSWORD} and {json.dumps(KEY)}")
    assert not _leaks(text, KEY, PASSWORD, ENCODED)
    assert LogScrubber((), ("guest",))("amqp://guest:guest@h/") == "amqp://guest:***@h/"


# -- URLs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["amqp://bridge:#S3cret@rabbit.internal/", "amqp://bridge:2024/S3cret@host/", "amqp://bridge:a?S3cret@host/",
     "amqp://bridge:a@S3cret@host/"],
)  # fmt: skip
def test_amqp_url_with_unencoded_password_is_refused(url: str) -> None:
    """A password with an unencoded #, /, ? or @ is refused, the message says to percent-encode and hides it."""
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_AMQP_URL": url})
    assert "percent-encoded" in str(info.value) and "BRIDGE_AMQP_URL" in str(info.value)
    assert "S3cret" not in str(info.value)
    assert "S3cret" not in redact_url(url) and "S3cret" not in host_port(url)


def test_percent_encoded_password_is_accepted_and_masked() -> None:
    """The same password percent-encoded is accepted, and masked in both its forms."""
    s = load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_AMQP_URL": f"amqp://bridge:{ENCODED}@h/"})
    assert set(s.passwords) == {ENCODED, PASSWORD}
    assert redact_url(s.amqp_url) == "amqp://bridge:***@h/"


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ({"ORANGEPILL_STREAM_URL": "https://user:StreamPw0rd@x/"}, "ORANGEPILL_STREAM_URL"),
        ({"BRIDGE_EXCHANGE": KEY}, "BRIDGE_EXCHANGE"),
        ({"BRIDGE_METRICS_ADDR": "StreamPw0rdStreamPw0rd"}, "BRIDGE_METRICS_ADDR"),
        ({"BRIDGE_SPOOL_MAX_BYTES": "hunter2-hunter2-hunter2"}, "BRIDGE_SPOOL_MAX_BYTES"),
    ],
)
def test_config_errors_never_echo_a_secret(source: dict[str, str], where: str) -> None:
    """A URL with credentials, or a secret put under the wrong setting, is not echoed in the error."""
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, **source})
    text = str(info.value)
    assert where in text
    assert not _leaks(text, KEY, "StreamPw0rdStreamPw0rd", "hunter2-hunter2-hunter2"), text
    assert "StreamPw0rd" not in text


def test_short_plain_values_are_still_echoed() -> None:
    """A short plain value that cannot be a secret is still shown, to help the user."""
    with pytest.raises(ConfigError, match="'soon'"):
        load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_PING_INTERVAL": "soon"})


def test_toml_errors_never_echo_a_secret(tmp_path: Path) -> None:
    """A key used as a TOML name, or a secret under the wrong TOML setting, is not echoed; a near miss is."""
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(f'"{KEY.replace(chr(34), "")}" = 1\nexchnage = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(_args("--config", str(cfg), "--realm-key", KEY), {})
    assert "exchnage" in str(info.value) and "did you mean 'exchange'" in str(info.value)
    assert not _leaks(str(info.value), KEY.replace('"', "")), str(info.value)
    cfg.write_text(f"exchange = {json.dumps(KEY)}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(_args("--config", str(cfg), "--realm-key", KEY), {})
    assert not _leaks(str(info.value), KEY)


def test_toml_unknown_plain_name_is_named(tmp_path: Path) -> None:
    """An unknown name that is a short plain word is named; one with digits or a long one is only counted."""
    cfg = tmp_path / "bridge.toml"
    cfg.write_text('bogus_key = 1\nabc123def456 = 2\ncorrect_horse_battery_staple = 3\n')
    with pytest.raises(ConfigError) as info:
        load_settings(_args("--config", str(cfg), "--realm-key", KEY), {})
    text = str(info.value)
    assert "'bogus_key'" in text, text
    assert "abc123def456" not in text and "correct_horse" not in text, text
    assert "2 other name(s), not shown" in text, text


# -- realm keys -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["k", "demo-realm-key", "x" * 15])
def test_short_keys_are_a_configuration_error(key: str) -> None:
    """A key below 16 characters is refused, and the message does not show it."""
    with pytest.raises(ConfigError, match="shorter than 16") as info:
        load_settings(_args("--realm-key", key), {})
    assert len(key) == 1 or key not in str(info.value)


def test_label_prefix_rule() -> None:
    """LABEL= is a label only when it looks like one and the rest could be a key; otherwise the value is whole."""
    assert parse_realm(f"eu={KEY}").label == "eu"
    assert parse_realm(f"eu={KEY}").key.reveal() == KEY
    whole = "pk_live_4f9a2c=9b7e"  # the rest is too short to be a key: nothing is split
    assert parse_realm(whole).key.reveal() == whole
    padded = "c29tZS1rZXktdmFsdWU=="
    assert parse_realm(padded).key.reveal() == padded
    spaced = "not a label!=" + "z" * 20
    assert parse_realm(spaced.replace(" ", "_")).key.reveal() == spaced.replace(" ", "_")


def test_realm_label_flag_keeps_the_key_whole() -> None:
    """With --realm-label the value is never split, even when it starts like LABEL=KEY."""
    key = "pk_live_4f9a2c=9b7e0123456789abcdef"
    s = load_settings(_args("--realm-key", key, "--realm-label", "payments"), {})
    assert s.realms[0].label == "payments" and s.realms[0].key.reveal() == key
    split = load_settings(_args("--realm-key", key), {})
    assert split.realms[0].label == "pk_live_4f9a2c"  # the documented rule: use --realm-label for such keys
    with pytest.raises(ConfigError, match="one per key"):
        load_settings(_args("--realm-key", key, "--realm-label", "a", "--realm-label", "b"), {})


# -- secrets from files ---------------------------------------------------------------


def test_realm_key_file(tmp_path: Path) -> None:
    """ORANGEPILL_REALM_KEY_FILE holds one key per line, LABEL=KEY allowed, # comments and blanks skipped."""
    path = tmp_path / "realm_key"
    path.write_text(f"# the keys\n{KEY}\n\n  eu=other-key-0123456789ab  \n")
    s = load_settings(None, {"ORANGEPILL_REALM_KEY_FILE": str(path)})
    assert [r.key.reveal() for r in s.realms] == [KEY, "other-key-0123456789ab"]
    assert s.realms[1].label == "eu"
    flag = load_settings(_args("--realm-key-file", str(path)), {"ORANGEPILL_REALM_KEY": "z" * 16})
    assert len(flag.realms) == 2  # the flag wins over the environment


def test_a_byte_order_mark_is_not_part_of_the_key(tmp_path: Path) -> None:
    """A key file saved with a UTF-8 byte-order mark (Notepad) gives the key itself, and its own fingerprint."""
    path = tmp_path / "realm_key"
    path.write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\r\n")
    (realm,) = load_settings(None, {"ORANGEPILL_REALM_KEY_FILE": str(path)}).realms
    assert realm.key.reveal() == KEY
    assert realm.fingerprint == key_fingerprint(KEY)


def test_realm_key_file_errors_show_the_path_not_the_content(tmp_path: Path) -> None:
    """A bad line names the file and line, never the content; a missing file says so."""
    path = tmp_path / "realm_key"
    path.write_text(f"{KEY}\nshort-secret\n")
    with pytest.raises(ConfigError, match=r"line 2: a realm key is shorter") as info:
        load_settings(None, {"ORANGEPILL_REALM_KEY_FILE": str(path)})
    assert "short-secret" not in str(info.value) and not _leaks(str(info.value), KEY)
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_settings(None, {"ORANGEPILL_REALM_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="both given"):
        load_settings(None, {"ORANGEPILL_REALM_KEY_FILE": str(path), "ORANGEPILL_REALM_KEY": KEY})


def test_amqp_url_file(tmp_path: Path) -> None:
    """BRIDGE_AMQP_URL_FILE holds one URL per line (several nodes); a bad one is refused unseen."""
    path = tmp_path / "amqp_url"
    path.write_text(f"# nodes\namqp://bridge:{ENCODED}@n1:5672/\namqp://bridge:{ENCODED}@n2:5672/\n")
    s = load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_AMQP_URL_FILE": str(path)})
    assert [host_port(u) for u in s.amqp_nodes] == ["n1:5672", "n2:5672"]
    path.write_text(f"amqp://bridge:{PASSWORD}@n1:5672/\n")
    with pytest.raises(ConfigError, match="percent-encoded") as info:
        load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_AMQP_URL_FILE": str(path)})
    assert not _leaks(str(info.value), PASSWORD)


def test_simulator_reads_the_same_key_file(tmp_path: Path) -> None:
    """simulate --realm-key-file / ORANGEPILL_REALM_KEY_FILE accepts the keys of the bridge's file."""
    from bridge.simulator import add_simulate_arguments, config_from_args

    path = tmp_path / "realm_key"
    path.write_text(f"# demo\neu={KEY}\n")
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    assert config_from_args(parser.parse_args([]), {"ORANGEPILL_REALM_KEY_FILE": str(path)}).realm_keys == (KEY,)
    flagged = config_from_args(parser.parse_args(["--realm-key-file", str(path)]), {})
    assert flagged.realm_keys == (KEY,)


# -- TLS settings ---------------------------------------------------------------------


def test_no_verify_ssl_needs_tls_insecure() -> None:
    """?no_verify_ssl=1 in the AMQP URL is refused unless --tls-insecure turns verification off on purpose."""
    url = "amqps://bridge:pw@broker.example:5671/?no_verify_ssl=1"
    with pytest.raises(ConfigError, match="tls-insecure"):
        load_settings(None, {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_AMQP_URL": url})
    s = load_settings(_args("--tls-insecure"), {"ORANGEPILL_REALM_KEY": KEY, "BRIDGE_AMQP_URL": url})
    assert s.tls_insecure


def test_transport_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """--tls-insecure and a ws:// or amqp:// URL to another host each log a WARNING; loopback does not."""
    from bridge.tls import log_transport_warnings

    caplog.set_level(logging.WARNING)
    log_transport_warnings(Settings(stream_url="ws://127.0.0.1:8765", amqp_url="amqp://g:g@localhost/"))
    assert not caplog.records
    log_transport_warnings(
        Settings(stream_url="ws://stream.example:80", amqp_url="amqp://u:pw0rd-long-1@rabbit.example/", tls_insecure=True)
    )
    text = caplog.text
    assert "verification is OFF" in text
    assert "stream connection to stream.example:80 is not encrypted" in text
    assert "broker connection to rabbit.example:5672 is not encrypted" in text
    assert "pw0rd-long-1" not in text


@pytest.mark.parametrize(
    "data",
    [KEY, {"id": KEY, "n": 1}, "acct-" + KEY[-12:], KEY[3:19]],
    ids=["the key", "data.id the key", "ends with a piece", "a 16-char piece"],
)
def test_an_entity_id_that_holds_the_realm_key_is_left_out_of_the_headers(data: object) -> None:
    """An upstream that echoes the key in data: the entity_id header (and so the Explorer) never carries it."""
    from bridge.stream import frame_messages

    frame = json.dumps({"type": "notification", "event": "transaction.done", "data": data, "timestamp": "5"})
    result = frame_messages(frame, realm="eu", realm_fp=key_fingerprint(KEY), secrets=(KEY,), max_bytes=1 << 20,
                            received_at=1.0)  # fmt: skip
    (msg,) = result.messages
    assert "entity_id" not in msg.headers
    assert _leaks(repr(msg.headers), KEY) == []


def test_an_ordinary_entity_id_is_kept_and_the_check_is_exact() -> None:
    from bridge.secrets import holds_secret
    from bridge.stream import frame_messages

    frame = json.dumps({"type": "notification", "event": "transaction.done", "data": "63967141191e9023f356df9f"})
    result = frame_messages(frame, realm="eu", realm_fp=key_fingerprint(KEY), secrets=(KEY,), max_bytes=1 << 20,
                            received_at=1.0)  # fmt: skip
    assert result.messages[0].headers["entity_id"] == "63967141191e9023f356df9f"
    assert holds_secret("x" + KEY[5:17] + "y", (KEY,))
    assert not holds_secret(KEY[5:16], (KEY,))  # 11 characters: shorter than a piece
    assert not holds_secret(KEY, ())


@pytest.mark.parametrize(
    "fields",
    [{"data": KEY}, {"data": {"id": KEY, "n": 1}}, {"data": "63967141191e9023f356df9f", "echo": ["x", KEY]}],
    ids=["data is the key", "data.id is the key", "an extra field holds it"],
)
@pytest.mark.parametrize("ascii_escapes", [False, True], ids=["raw", "json-escaped"])
def test_a_realm_key_in_an_event_body_is_replaced_by_its_fingerprint(fields: dict[str, object], ascii_escapes: bool) -> None:
    """An upstream that echoes the key: the published body holds its fingerprint instead, stays JSON, keeps its id."""
    from bridge.stream import frame_messages

    event = {"type": "notification", "event": "transaction.done", **fields, "timestamp": "5"}
    frame = json.dumps(event, ensure_ascii=ascii_escapes)

    def message(secrets: tuple[str, ...]) -> object:
        result = frame_messages(frame, realm="eu", realm_fp=key_fingerprint(KEY), secrets=secrets, max_bytes=1 << 20,
                                received_at=1.0)  # fmt: skip
        (msg,) = result.messages
        return msg

    msg, unguarded = message((KEY, "another-realm-key-0000")), message(())
    assert msg.kind == unguarded.kind == KIND_EVENT and msg.key_removed and not unguarded.key_removed
    assert KEY in _strings(json.loads(unguarded.body))  # the key would have gone out
    body = json.loads(msg.body)  # still JSON
    assert not any(_leaks(text, KEY) for text in _strings(body)) and not _leaks(msg.body.decode(), KEY)
    assert f"<realm-key {key_fingerprint(KEY)}>" in msg.body.decode()
    assert body["event"] == "transaction.done" and body["timestamp"] == "5"
    assert msg.message_id == unguarded.message_id  # the id is of the values as received


def _strings(value: object) -> list[str]:
    """Every string in a decoded JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def test_a_body_without_a_key_is_published_byte_for_byte() -> None:
    """No key in the event: the body is the one built without the check (and no flag is set)."""
    from bridge.stream import frame_messages

    frame = json.dumps({"type": "notification", "event": "a.b", "data": KEY[:11], "x": "S3cr3t/Realm"})
    guarded, plain = (
        frame_messages(frame, realm="eu", realm_fp="fp", secrets=s, max_bytes=1 << 20, received_at=1.0).messages[0]
        for s in ((KEY,), ())
    )
    assert guarded.body == plain.body and not guarded.key_removed
