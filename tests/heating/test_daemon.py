"""The daemon as a real process with the heating plugin: the broker dies and comes back while
simulated gateways report, and the daemon keeps running, reconnects and stores what follows;
a report the broker redelivers after ``kill -9`` is stored once."""

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

import paho.mqtt.client as paho
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


def readings_by_meter(db: Path) -> dict[str, int]:
    """meter_id -> meter.reading rows in the sqlite sink."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT device, count(*) FROM events WHERE type = 'meter.reading' GROUP BY device"
        ).fetchall()
    return dict(rows)


def test_a_report_redelivered_after_kill_9_is_stored_once(tmp_path, mosquitto):
    """Issue 12 item 6: the broker's redelivery of a QoS 1 report after ``kill -9`` is not a
    second event, nor is the gateway's own retry of it.

    A real redelivery, not a re-publish: the daemon reaches mosquitto through a proxy that
    swallows its PUBACKs. So the first daemon stores the two reports' readings (and believes
    it acknowledged them) while mosquitto still holds them as in flight. After ``kill -9`` a
    second daemon on the same state_dir resumes the persistent session (clean_session false,
    same client id) and mosquitto re-sends both (DUP set): the keys committed with the first
    readings in the queue file must make the second daemon acknowledge them without storing
    them again. Then a gateway's retry (the same bytes published anew) is not stored either,
    and a new report is. The sink must hold exactly one reading per meter."""
    from gatewayd.plugins.heating.simulator import make_meters
    from gatewayd.protocols import hygw

    from .brokers import PubackSwallowingProxy
    from .vectors import FRAME_53, FRAME_55, GW_ID, METER_53, METER_55, SET_TOPIC, meter_report

    proxy = PubackSwallowingProxy(mosquitto.port).start()
    proxy.swallow_pubacks = True
    api_port, db = free_port(), tmp_path / "events.db"
    config = daemon_config(
        tmp_path,
        api_port,
        f"""\
plugins:
  heating:
    type: heating
    broker: {{host: 127.0.0.1, port: {proxy.port}, client_id: gatewayd-redelivery,
              clean_session: false, probe_interval: 0, reconnect_initial: 0.1s,
              reconnect_max: 0.5s}}
sinks:
  store: {{type: sqlite, path: {db}}}
routes:
  - {{match: {{type: "*"}}, sinks: [store]}}
""",
    )
    reports = [meter_report(METER_55, FRAME_55), meter_report(METER_53, FRAME_53)]
    third = make_meters(0, 3, seed=1)[2]
    new_report = hygw.build_meter_report(GW_ID, third.meter_id, third.reading())
    gateway = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=GW_ID)
    gateway.connect("127.0.0.1", mosquitto.port)
    gateway.loop_start()

    def publish(payload: bytes) -> None:
        gateway.publish(SET_TOPIC, payload, qos=1).wait_for_publish(5)

    daemon = child("run", "-c", str(config))
    try:
        assert wait_until(lambda: proxy.seen("down", "SUBACK", 1))
        for report in reports:
            publish(report)
        assert wait_until(lambda: len(proxy.seen("up", "PUBACK", 1)) == 2)  # swallowed
        assert wait_until(lambda: db.exists() and sum(readings_by_meter(db).values()) == 2)
        daemon.kill()  # kill -9
        daemon.wait(10)
        proxy.swallow_pubacks = False

        daemon = child("run", "-c", str(config))
        assert wait_until(lambda: len(proxy.seen("up", "PUBACK", 2)) == 2)
        redelivered = proxy.seen("down", "PUBLISH", 2)
        assert [(qos, dup) for qos, dup, _, _ in redelivered] == [(1, True), (1, True)]
        publish(reports[0])  # the gateway's own retry: a new PUBLISH, the same bytes
        publish(new_report)
        assert wait_until(lambda: len(proxy.seen("up", "PUBACK", 2)) == 4)
        assert wait_until(lambda: readings_by_meter(db).get(third.meter_id) == 1)
        # The queue hands out in order: what came before the new report is in the sink too.
        assert readings_by_meter(db) == {METER_55: 1, METER_53: 1, third.meter_id: 1}
        assert metric(api_port, "gatewayd_queue_deduplicated_total") == 3
    finally:
        gateway.loop_stop()
        gateway.disconnect()
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            raise
        proxy.stop()
    assert code == 0, daemon.stderr.read().decode()[-3000:]
    assert readings_by_meter(db) == {METER_55: 1, METER_53: 1, third.meter_id: 1}
