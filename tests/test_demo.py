"""``gatewayd demo`` end to end: every plugin reports through its simulator, and the demo's
backend stand-in sends a command over the northbound MQTT link and gets its answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.testing import free_port

pytestmark = pytest.mark.integration


def test_demo_shows_every_plugin_and_the_command_topic(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gatewayd",
            "demo",
            "--duration",
            "16",
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {e["plugin"] for e in events} >= {"thermometers", "cabinets", "esam", "heating"}
    assert "Traceback" not in done.stderr
    answers = [line for line in done.stderr.splitlines() if "demo backend: answer" in line]
    assert answers and '"status": 200' in answers[0] and '"id": "demo-1"' in answers[0]
    results = [e for e in events if e["type"] == "command.result"]
    assert any(e["data"].get("source") == "mqtt" for e in results)


def quiet_config(directory: Path) -> Path:
    """A demo config with no plugin and the API on a free port: a demo that starts and stops in
    a second without taking etc/demo.yaml's fixed ports (another demo may hold them)."""
    path = directory / "quiet.yaml"
    path.write_text(f'api: {{listen: "127.0.0.1:{free_port()}"}}\n')
    return path


@pytest.mark.parametrize("keep", [False, True])
def test_demo_says_where_its_state_is_and_removes_it_unless_kept(
    tmp_path: Path, keep: bool
) -> None:
    command = [sys.executable, "-m", "gatewayd", "demo", "--duration", "0.5"]
    command += ["-c", str(quiet_config(tmp_path))] + ["--keep-state"] * keep
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("gatewayd demo: state in ")]
    state = Path(line.removeprefix("gatewayd demo: state in ").split(" (")[0])
    assert state.parent == tmp_path.resolve() and state.name.startswith("gatewayd-demo-")
    assert state.exists() is keep
    assert ("--keep-state keeps it" in line) is not keep


def test_demo_never_removes_a_state_dir_it_was_given(tmp_path: Path) -> None:
    state = tmp_path / "state"
    command = [sys.executable, "-m", "gatewayd", "demo", "--duration", "0.5"]
    command += ["-c", str(quiet_config(tmp_path)), "--state-dir", str(state)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"gatewayd demo: state in {state.resolve()}\n" in done.stderr
    assert state.is_dir()
