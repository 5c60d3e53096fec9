"""``gatewayd simulate FAMILY`` with bad options: one line naming the problem, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gatewayd.testing import free_port


def simulate(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gatewayd", "simulate", *args, "--duration", "1"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("heating", "--broker", "nonsense"),
            "argument --broker: expected \"host:port\", got 'nonsense'",
        ),
        (("powerbank", "--cabinets", "-1"), "argument --cabinets: expected 1 or more, got -1"),
        (("heating", "--gateways", "x"), "argument --gateways: expected a whole number, got 'x'"),
        (
            ("example", "--interval", "0"),
            "argument --interval: expected seconds more than 0, got 0",
        ),
        (
            ("example", "--connect", "nowhere"),
            "argument --connect: expected \"host:port\", got 'nowhere'",
        ),
        (
            ("powerbank", "--connect", "127.0.0.1:99999"),
            "argument --connect: expected \"host:port\", got '127.0.0.1:99999'",
        ),
        (
            ("heating", "--password-file", "/nonexistent/password"),
            "gatewayd simulate: [Errno 2] No such file or directory: '/nonexistent/password'",
        ),
        (
            ("esam", "--keys", "/nonexistent/keys.yaml"),
            "gatewayd simulate: key file /nonexistent/keys.yaml: cannot open",
        ),
    ],
)
def test_bad_option_is_one_line_and_exit_2(args, message):
    result = simulate(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_simulator_that_cannot_connect_says_so():
    result = simulate("powerbank", "--connect", f"127.0.0.1:{free_port()}", "--cabinets", "3")
    assert result.returncode == 0
    assert result.stderr.count("cannot connect to 127.0.0.1:") == 1  # once, not per cabinet


def test_a_negative_duration_is_a_usage_error():
    command = [sys.executable, "-m", "gatewayd", "simulate", "esam", "--duration", "-1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "argument --duration: expected seconds more than 0, got -1" in result.stderr


def test_a_simulator_that_cannot_start_says_why_and_exits_1(tmp_path):
    regular = tmp_path / "not-a-link"
    regular.write_text("keep me")
    for link in (tmp_path / "missing-dir" / "reader", regular):
        result = simulate("esam", "--pty", "--link", str(link))
        assert result.returncode == 1, result.stderr
        assert "gatewayd simulate: cannot start:" in result.stderr
        assert "Traceback" not in result.stderr
    assert regular.read_text() == "keep me"
