"""A cabinet that the balancer moves to another box: the new box announces it, and the old box,
still holding a half-open connection of it, sees the newer presence and lets go.

Two real daemons (``python -m gatewayd run``), each with the power-bank plugin and an mqtt sink
with ``watch_presence: true``, meet on one mosquitto; a raw TCP cabinet speaks the protocol.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from gatewayd.protocols import powerbank as pb

from gatewayd.testing import free_port, wait_for_port
from tests.powerbank.test_integration import IMEI, RawCabinet

pytestmark = pytest.mark.integration


def box_config(tmp_path: Path, name: str, broker_port: int) -> tuple[Path, int]:
    device_port, api_port = free_port(), free_port()
    directory = tmp_path / name
    directory.mkdir()
    config = directory / "gatewayd.yaml"
    config.write_text(
        f"""\
gateway: {{id: {name}, state_dir: {directory / "state"}, log_level: info, shutdown_timeout: 8s}}
api: {{listen: "127.0.0.1:{api_port}"}}
plugins:
  cabinets: {{type: powerbank, listen: "127.0.0.1:{device_port}"}}
sinks:
  north:
    type: mqtt
    broker: {{host: 127.0.0.1, port: {broker_port}, client_id: {name}}}
    watch_presence: true
routes:
  - {{match: {{type: "*"}}, sinks: [north]}}
"""
    )
    return config, device_port


class Watcher:
    """Collects the retained presence of IMEI on every box."""

    def __init__(self, port: int) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="watcher")
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"gatewayd/+/devices/cabinets/{IMEI}", qos=1)
        self.client.loop_start()

    def next_on(self, box: str, timeout: float = 15.0) -> dict:
        topic = f"gatewayd/{box}/devices/cabinets/{IMEI}"
        while True:
            got, payload = self.messages.get(timeout=timeout)
            if got == topic:
                return json.loads(payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_cabinet_moved_to_another_box_is_let_go_by_the_old_one(tmp_path: Path, mosquitto):
    config_a, port_a = box_config(tmp_path, "box-a", mosquitto.port)
    config_b, port_b = box_config(tmp_path, "box-b", mosquitto.port)
    watcher = Watcher(mosquitto.port)
    boxes = [
        subprocess.Popen(
            [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for config in (config_a, config_b)
    ]
    try:
        wait_for_port(port_a)
        wait_for_port(port_b)
        stale = RawCabinet(port_a)
        stale.send(pb.Heartbeat(IMEI))
        assert watcher.next_on("box-a")["online"] is True

        moved = RawCabinet(port_b)  # the balancer sent the cabinet's new connection to box-b
        moved.send(pb.Heartbeat(IMEI))
        assert watcher.next_on("box-b")["online"] is True
        offline = watcher.next_on("box-a")  # box-a saw the newer presence and let go
        assert offline["online"] is False
        with pytest.raises(ConnectionError):
            stale.read(timeout=10)  # its half-open connection was closed
        moved.send(pb.Heartbeat(IMEI))  # box-b keeps the cabinet
        with pytest.raises(queue.Empty):
            watcher.next_on("box-b", timeout=2)
        moved.close()
    finally:
        for box in boxes:
            box.send_signal(signal.SIGTERM)
        for box in boxes:
            assert box.wait(20) == 0, box.stderr.read().decode()[-2000:]
        watcher.close()
    log_a = boxes[0].stderr.read().decode()
    assert f"cabinet {IMEI} is on box box-b now" in log_a


def test_presence_messages_are_read_for_the_fleet() -> None:
    from gatewayd.sinks.mqtt import parse_presence

    body = b'{"online": true, "since": "2026-12-05T01:00:00+00:00", "gateway": "b"}'
    plugin, device, gateway, since = parse_presence("gatewayd/b%2F2/devices/cab/86%2B1", body)
    assert (plugin, device, gateway) == ("cab", "86+1", "b/2") and since == 1796432400.0
    assert parse_presence("gatewayd/b/devices/cab/1", body.replace(b"true", b"false")) is None
    assert parse_presence("gatewayd/b/status", body) is None
    assert parse_presence("gatewayd/b/devices/cab/1", b"not json") is None
    assert parse_presence("gatewayd/b/devices/cab/1", b'{"online": true}') is None
