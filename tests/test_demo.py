"""``gatewayd demo`` end to end: every plugin reports through its simulator, and the demo's
backend stand-in sends a command over the northbound MQTT link and gets its answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
