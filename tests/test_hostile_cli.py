"""Hostile operator input at the command line: clear messages and exit codes, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import PYTHON, ROOT, free_port


def _bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "bridge", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_non_utf8_toml_file_is_a_clear_config_error(tmp_path: Path) -> None:
    """A TOML file that is not UTF-8 exits 2 with a message naming the file and the byte, no traceback."""
    path = tmp_path / "bad.toml"
    path.write_bytes(b'exchange = "\xff\xfe"\n')
    out = _bridge("run", "--config", str(path))
    assert out.returncode == 2, out.stderr
    assert f"--config {path}: not UTF-8 text (byte 0xff at offset 12)" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_with_an_invalid_host_name_says_so(tmp_path: Path) -> None:
    """check with hosts such as a..b (refused by the IDNA codec) reports them as invalid, exit 1, no traceback."""
    port = free_port()
    out = _bridge(
        "check", "--stream-url", f"ws://a..b:{port}/", "--realm-key", "hostile-realm-key-0123",
        "--amqp-url", f"amqp://guest:guest@a..b:{port}/",
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"stream ws://a..b:{port}/ realm" in out.stdout
    assert "invalid host name" in out.stdout
    assert f"broker amqp://guest:***@a..b:{port}/: invalid host name" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
