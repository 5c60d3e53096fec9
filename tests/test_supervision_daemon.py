"""Supervision against a real daemon process (``python -m gatewayd run``): a bug in one
datagram's handling costs that datagram; a bug that fails the plugin gets it restarted, and a
crash loop leaves it failed. The plugin is tests/crashy_plugin.py, a UDP listener."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gatewayd.testing import free_port, wait_for_port
from gatewayd.testing.processes import poll_until as wait_until
from gatewayd.testing.processes import signal_and_wait

ROOT = Path(__file__).resolve().parent.parent


def get(api_port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}{path}", timeout=10) as answer:
            body = answer.read()
            status = answer.status
    except urllib.error.HTTPError as error:
        body, status = error.read(), error.code
    return status, (json.loads(body) if path != "/metrics" else body.decode())


def events(db: Path) -> list[tuple[str, str | None, dict]]:
    """The events the sqlite sink stored so far ([] before it made its table)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            rows = conn.execute("SELECT type, device, data FROM events ORDER BY rowid").fetchall()
        except sqlite3.OperationalError:
            return []
    return [(t, d, json.loads(data)) for t, d, data in rows]


def plugin(api_port: int) -> dict:
    return get(api_port, "/health")[1]["plugins"]["crashy"]


def test_a_bad_datagram_costs_itself_and_a_failed_plugin_is_restarted(tmp_path):
    api_port, udp_port = free_port(), free_port()
    config = tmp_path / "gatewayd.yaml"
    config.write_text(
        f"""\
gateway: {{id: t1, state_dir: {tmp_path / "state"}, shutdown_timeout: 5s}}
api: {{listen: "127.0.0.1:{api_port}"}}
plugins:
  crashy:
    type: tests.crashy_plugin:Crashy
    listen: "127.0.0.1:{udp_port}"
    restart_limit: 2
sinks:
  store: {{type: sqlite, path: events.db}}
routes:
  - {{sinks: [store]}}
"""
    )
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    send = lambda text: udp.sendto(text.encode(), ("127.0.0.1", udp_port))  # noqa: E731
    db = tmp_path / "state" / "events.db"
    try:
        wait_for_port(api_port, timeout=30)
        send("d1 1.5")
        send("garbage")  # ValueError inside context.handling
        send("d2 2.5")
        wait_until(lambda: len(events(db)) >= 3, what="three events")
        first = events(db)
        assert [(t, d) for t, d, _ in first] == [
            ("reading", "d1"),
            ("frame.invalid", None),
            ("reading", "d2"),
        ]
        assert first[1][2]["reason"] == "internal_error"
        assert first[1][2]["message"].startswith("ValueError: not enough values to unpack")
        assert plugin(api_port)["state"] == "running"

        send("crash")  # KeyError in a guarded timer: the plugin fails and is restarted
        wait_until(lambda: plugin(api_port)["restarts"] == 1, what="a restart")
        state = wait_until(
            lambda: (p := plugin(api_port))["state"] == "running" and p, what="running again"
        )
        assert state["error"] is None
        _, metrics = get(api_port, "/metrics")
        assert 'gatewayd_plugin_restarts_total{plugin="crashy"} 1.0' in metrics
        assert 'gatewayd_plugin_internal_errors_total{plugin="crashy"} 1.0' in metrics
        send("d3 3.5")  # a fresh instance listens on the same port
        wait_until(lambda: any(d == "d3" for _, d, _ in events(db)), what="d3 after restart")

        send("crash")  # restart 2 of restart_limit 2
        wait_until(lambda: plugin(api_port)["restarts"] == 2, what="the second restart")
        wait_until(lambda: plugin(api_port)["state"] == "running", what="running again")
        send("crash")  # a third failure within the window: a crash loop
        failed = wait_until(
            lambda: (p := plugin(api_port))["state"] == "failed" and p, what="crash loop"
        )
        assert failed["error"].startswith("crash loop: 2 restarts within 600 s")
        assert "KeyError" in failed["error"]
        status, health = get(api_port, "/health")
        assert status == 503 and health["status"] == "degraded"
        time.sleep(1.5)  # no more restarts
        assert plugin(api_port)["restarts"] == 2
    finally:
        udp.close()
        signal_and_wait(daemon, signal.SIGTERM, timeout=20)
        log.close()
    code = daemon.returncode
    output = (tmp_path / "daemon.log").read_text()
    assert code == 0, output
    assert output.count("unexpected error in plugin crashy") == 3, output
    assert output.count("plugin crashy failed (runtime error: KeyError") == 2, output
    assert "plugin crashy left failed: crash loop" in output
    # The traceback of the bad datagram is in the log once, the plugin's failures too.
    assert output.count("handling a message failed") == 1
