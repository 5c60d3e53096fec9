"""The northbound MQTT link of a real daemon (``python -m gatewayd run``): events, status and
presence reach a backend's broker, and the backend's commands come back over it.

A mosquitto on a free port stands for the backend's broker; the backend is a plain paho client
in the test. A thermometer (the example plugin, a blocking TCP device) reports and answers PING.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from gatewayd.testing import free_port, wait_for_port
from tests.test_service import daemon_config, start_daemon

pytestmark = pytest.mark.integration


class Backend:
    """A paho client on the broker that collects every message under ``gatewayd/t1/#``."""

    def __init__(self, port: int) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="backend")
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, m.retain))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([("gatewayd/t1/#", 1), ("backend/answers", 1)])
        self.client.loop_start()

    def next(self, topic: str, timeout: float = 15.0) -> tuple[bytes, bool]:
        """The next message on ``topic`` (others are skipped)."""
        while True:
            got_topic, payload, retain = self.messages.get(timeout=timeout)
            if got_topic == topic:
                return payload, retain

    def command(self, plugin: str, command: str, body: dict) -> None:
        topic = f"gatewayd/t1/commands/{plugin}/{command}"
        self.client.publish(topic, json.dumps(body), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Thermometer:
    """A blocking TCP thermometer: reports once, answers every PING with PONG, counts them."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(b"T kitchen 21.5\n")
        self.pings = 0

    def answer_pings(self, count: int, timeout: float = 15.0) -> None:
        self.sock.settimeout(timeout)
        buffer = b""
        while self.pings < count:
            chunk = self.sock.recv(4096)
            assert chunk, "the daemon closed the thermometer's connection"
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line == b"PING":
                    self.pings += 1
                    self.sock.sendall(b"PONG\n")

    def close(self) -> None:
        self.sock.close()


def test_events_status_presence_and_commands_over_the_northbound_broker(tmp_path: Path, mosquitto):
    device_port, api_port = free_port(), free_port()
    config = daemon_config(
        tmp_path,
        api_port,
        f"""\
plugins:
  thermo: {{type: example, listen: "127.0.0.1:{device_port}"}}
sinks:
  north:
    type: mqtt
    broker: {{host: 127.0.0.1, port: {mosquitto.port}, client_id: box-t1}}
    commands: {{allow: [thermo.ping]}}
    status_interval: 1s
routes:
  - {{match: {{type: "*"}}, sinks: [north]}}
""",
    )
    backend = Backend(mosquitto.port)
    daemon = start_daemon(config)
    try:
        status = json.loads(backend.next("gatewayd/t1/status")[0])
        assert (status["status"], status["gateway"], status["version"]) == ("online", "t1", "0.1.0")
        assert status["plugins"]["thermo"]["type"] == "example"
        assert status["queues"]["north"]["queued"] is not None and status["updated"]
        wait_for_port(device_port)
        thermometer = Thermometer(device_port)
        reading, _ = backend.next("gatewayd/t1/events/thermo/reading")
        event = json.loads(reading)
        assert (event["device"], event["data"]["celsius"]) == ("kitchen", 21.5)
        presence, retained = backend.next("gatewayd/t1/devices/thermo/kitchen")
        assert json.loads(presence)["online"] is True and json.loads(presence)["gateway"] == "t1"
        # The status is published again every status_interval, with the devices now online.
        updated = json.loads(backend.next("gatewayd/t1/status")[0])
        assert updated["plugins"]["thermo"]["devices_online"] == 1

        # A command over MQTT, answered on reply_to; the same id again is not executed again.
        request = {"id": "r-1", "args": {"device": "kitchen"}, "reply_to": "backend/answers"}
        backend.command("thermo", "ping", request)
        thermometer.answer_pings(1)
        answer = json.loads(backend.next("backend/answers")[0])
        assert (answer["id"], answer["status"], answer["ok"]) == ("r-1", 200, True)
        backend.command("thermo", "ping", request)
        again = json.loads(backend.next("backend/answers")[0])
        assert again["status"] == 200 and again["id"] == "r-1"
        assert thermometer.pings == 1  # one PING reached the device for two requests

        # Outside `allow`: refused on the default response topic, never executed.
        backend.command("thermo", "missing", {"id": "r-2", "args": {}})
        refused = json.loads(backend.next("gatewayd/t1/responses/thermo/missing")[0])
        assert (refused["status"], refused["error"]["code"]) == (403, "forbidden")
        thermometer.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    final = json.loads(backend.next("gatewayd/t1/status")[0])
    assert (final["status"], final["gateway"]) == ("offline", "t1")
    backend.close()


class Consumer:
    """A backend's persistent QoS 1 subscriber: collects events by id, counting repeats."""

    def __init__(self, port: int) -> None:
        self.ids: dict[str, int] = {}
        self.devices: set[str] = set()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id="consumer", clean_session=False
        )
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("gatewayd/t1/events/#", qos=1)
        self.client.loop_start()

    def _message(self, client, userdata, message) -> None:
        event = json.loads(message.payload)
        self.ids[event["id"]] = self.ids.get(event["id"], 0) + 1
        self.devices.add(event["device"])

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_kill_9_with_messages_in_flight_loses_no_acknowledged_event(tmp_path: Path):
    """Readings stream in while the mqtt sink publishes; the daemon is killed -9 mid-stream and
    started again on the same state_dir. Every reading the device was told is stored (OK) reaches
    the backend, each with one id; repeats are counted apart, and delivery says the same."""
    from tests.heating.brokers import ConfiguredMosquitto
    from tests.test_service import Device

    broker = ConfiguredMosquitto(["allow_anonymous true", "max_queued_messages 0"]).start()
    device_port, api_port = free_port(), free_port()
    config = daemon_config(
        tmp_path,
        api_port,
        f"""\
plugins:
  thermo: {{type: example, listen: "127.0.0.1:{device_port}"}}
sinks:
  north:
    type: mqtt
    broker: {{host: 127.0.0.1, port: {broker.port}, client_id: box-t1}}
    batch_size: 50
routes:
  - {{match: {{type: reading}}, sinks: [north]}}
""",
    )
    consumer = Consumer(broker.port)
    try:
        daemon = start_daemon(config)
        wait_for_port(device_port)
        device = Device(device_port)
        names = [f"r{n:05d}" for n in range(3000)]
        device.send_readings(names[:1500])
        acknowledged = device.read_oks(1500)
        device.send_readings(names[1500:])  # in flight when the daemon dies
        acknowledged += device.read_oks(200, timeout=5)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        device.close()
        assert acknowledged >= 1500

        daemon = start_daemon(config)  # the queue holds what was not yet published
        try:
            wanted = set(names[:acknowledged])
            deadline = time.monotonic() + 30
            while not wanted <= consumer.devices and time.monotonic() < deadline:
                time.sleep(0.2)
            missing = wanted - consumer.devices
            assert not missing, f"{len(missing)} acknowledged readings never reached the backend"
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(20) == 0
        repeats = sum(count - 1 for count in consumer.ids.values())
        # One id per reading: a repeat is the same event again, never a new id for it.
        assert len(consumer.ids) == len(consumer.devices)
        assert repeats <= 2 * 50 + 100  # at most the batches in flight when it died
    finally:
        consumer.close()
        broker.stop()


def test_metrics_show_the_mqtt_link_and_the_command_channel(tmp_path: Path, mosquitto):
    import urllib.request

    api_port = free_port()
    config = daemon_config(
        tmp_path,
        api_port,
        f"""\
plugins:
  thermo: {{type: example, listen: "127.0.0.1:{free_port()}"}}
sinks:
  north:
    type: mqtt
    broker: {{host: 127.0.0.1, port: {mosquitto.port}}}
    commands: {{allow: [thermo.ping]}}
routes:
  - {{match: {{type: "*"}}, sinks: [north]}}
""",
    )
    backend = Backend(mosquitto.port)
    daemon = start_daemon(config)
    try:
        assert json.loads(backend.next("gatewayd/t1/status")[0])["status"] == "online"
        backend.command("thermo", "nope", {"id": "x-1", "args": {}})
        backend.next("gatewayd/t1/responses/thermo/nope")
        url = f"http://127.0.0.1:{api_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'gatewayd_sink_mqtt_connected{sink="north"} 1.0' in text
        assert 'gatewayd_sink_commands_received_total{sink="north"} 1.0' in text
        assert 'gatewayd_sink_commands_refused_total{sink="north"} 1.0' in text
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        backend.close()
