"""The daemon as a real process with the heating plugin: the broker dies and comes back while
simulated gateways report, and the daemon keeps running, reconnects and stores what follows."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gatewayd.testing import free_port
from tests.test_service import daemon_config, wait_until

pytestmark = pytest.mark.integration


def write_config(tmp_path: Path, broker_port: int, api_port: int, db: Path) -> Path:
    return daemon_config(
        tmp_path,
        api_port,
        f"""\
plugins:
  heating:
    type: heating
    broker: {{host: 127.0.0.1, port: {broker_port}, reconnect_initial: 0.1s, reconnect_max: 0.5s}}
sinks:
  store: {{type: sqlite, path: {db}}}
routes:
  - {{match: {{type: meter.reading}}, sinks: [store]}}
""",
    )


def readings(db: Path) -> list[tuple[str, str]]:
    """(ts, gateway) of the meter readings in the sqlite sink, oldest first."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            rows = conn.execute(
                "SELECT ts, json_extract(data, '$.gateway') FROM events"
                " WHERE type = 'meter.reading' ORDER BY ts"
            ).fetchall()
        except sqlite3.OperationalError as exc:  # the sink has not made its table yet
            if "no such table" not in str(exc):
                raise
            return []
    return rows


def metric(api_port: int, name: str) -> float:
    url = f"http://127.0.0.1:{api_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def child(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gatewayd", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )


def test_broker_restart_under_a_running_daemon(tmp_path, mosquitto):
    api_port, db = free_port(), tmp_path / "events.db"
    daemon = child("run", "-c", str(write_config(tmp_path, mosquitto.port, api_port, db)))
    broker = f"127.0.0.1:{mosquitto.port}"
    simulator = child(
        "simulate", "heating", "--broker", broker, "--gateways", "2", "--interval", "0.3"
    )
    try:
        assert wait_until(lambda: len(readings(db)) >= 12)
        mosquitto.kill()
        assert wait_until(lambda: metric(api_port, "gatewayd_plugin_mqtt_connected") == 0)
        time.sleep(1.0)  # a few failed reconnects
        assert daemon.poll() is None, "the daemon stopped with its broker"
        assert metric(api_port, "gatewayd_plugin_mqtt_state") in (1.0, 3.0)
        stored_before = len(readings(db))

        mosquitto.start()
        assert wait_until(lambda: metric(api_port, "gatewayd_plugin_mqtt_state") == 2.0)
        assert wait_until(lambda: len(readings(db)) >= stored_before + 12)
        after = readings(db)[stored_before:]
        assert {gateway for _, gateway in after} == {"02345678903", "02345678904"}
        assert metric(api_port, "gatewayd_plugin_mqtt_disconnects") == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/health", timeout=5) as answer:
            health = json.load(answer)
        assert health["plugins"]["heating"]["state"] == "running", health
    finally:
        simulator.terminate()
        simulator.wait(10)
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            raise
    assert code == 0, daemon.stderr.read().decode()[-3000:]
