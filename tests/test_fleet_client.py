"""``gatewayd.fleet``: the presence map (pure), the blocking FleetClient against a real mosquitto
with stand-in boxes (the retry-on-move rule), and against two real daemons (``box-a``,
``box-b``), each with the example plugin and an mqtt sink taking commands; the CLI too."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from gatewayd.client import UsageError
from gatewayd.fleet import CommandTimeout, FleetClient, PresenceMap
from gatewayd.fleet.cli import device_of
from gatewayd.testing import free_port, wait_for_port
from tests.test_service import start_daemon


def claim(online: bool, since: str, gateway: str = "x") -> bytes:
    return json.dumps({"online": online, "since": since, "gateway": gateway}).encode()


# --- the presence map --------------------------------------------------------------------------


def test_topic_levels_are_percent_decoded():
    presence = PresenceMap()
    got = presence.update(
        "gatewayd/box-a/devices/th%2Bermo/Z%C3%A4hler%2F7%23%25",
        claim(True, "2026-12-05T10:00:00Z"),
    )
    assert (got.gateway, got.plugin, got.device) == ("box-a", "th+ermo", "Zähler/7#%")
    assert presence.locate("th+ermo", "Zähler/7#%").gateway == "box-a"
    # "-" is "no device" (nothing to locate); "%2D" is the device named "-".
    assert presence.update("gatewayd/box-a/devices/thermo/-", claim(True, "t")) is None
    assert presence.update("gatewayd/box-a/devices/thermo/%2D", claim(True, "t")).device == "-"


def test_other_topics_and_unreadable_payloads_are_ignored():
    presence = PresenceMap()
    assert presence.update("other/box-a/status", b"online") is None
    assert presence.update("gatewayd/box-a/events/thermo/reading", b"{}") is None
    assert presence.update("gatewayd/box-a/devices/thermo/k/extra", claim(True, "t")) is None
    assert presence.update("gatewayd/box-a/devices/thermo/k", b"not json") is None
    assert presence.update("gatewayd/box-a/devices/thermo/k", b'{"online": "yes"}') is None
    assert presence.devices() == [] and presence.ignored == 2


def test_the_newest_online_since_wins():
    presence = PresenceMap()
    presence.update("gatewayd/box-a/devices/thermo/k", claim(True, "2026-12-05T10:00:00+00:00"))
    presence.update("gatewayd/box-b/devices/thermo/k", claim(True, "2026-12-05T10:05:00+00:00"))
    assert presence.locate("thermo", "k").gateway == "box-b"
    # Times compare as times, not text: 11:00+02:00 is 09:00 UTC, older than both.
    presence.update("gatewayd/box-c/devices/thermo/k", claim(True, "2026-12-05T11:00:00+02:00"))
    assert presence.locate("thermo", "k").gateway == "box-b"
    presence.update("gatewayd/box-a/devices/thermo/k", claim(True, "2026-12-05T10:06:00Z"))
    assert presence.locate("thermo", "k").gateway == "box-a"
    assert [c.gateway for c in presence.devices()] == ["box-a", "box-b", "box-c"]


def test_offline_removes_the_device_from_its_box():
    presence = PresenceMap()
    presence.update("gatewayd/box-a/devices/thermo/k", claim(True, "2026-12-05T10:00:00Z"))
    presence.update("gatewayd/box-a/devices/thermo/k", claim(False, "2026-12-05T10:01:00Z"))
    assert presence.locate("thermo", "k") is None
    assert [(c.gateway, c.online) for c in presence.devices()] == [("box-a", False)]
    assert presence.devices(online_only=True) == []
    presence.update("gatewayd/box-a/devices/thermo/k", b"")  # the retained claim cleared
    assert presence.devices() == []


def test_box_status_is_a_json_object_or_the_plain_word():
    presence = PresenceMap()
    assert presence.update("gatewayd/box-a/status", b"online").status == "online"
    box = presence.update("gatewayd/box-b/status", b'{"online": true, "version": "0.2"}')
    assert box.status == {"online": True, "version": "0.2"} and box.online and box.word == "online"
    assert presence.update("gatewayd/box-c/status", b"[1]").status == "[1]"  # not an object
    assert not presence.update("gatewayd/box-d/status", b'{"status": "offline"}').online
    assert [(b.gateway, b.online) for b in presence.boxes()] == [
        ("box-a", True),
        ("box-b", True),
        ("box-c", False),
        ("box-d", False),
    ]
    assert presence.update("gatewayd/box-a/status", b"") == "box-a"  # cleared
    assert [b.gateway for b in presence.boxes()] == ["box-b", "box-c", "box-d"]


def test_a_box_whose_status_is_offline_holds_no_device():
    """Its last will says offline while its retained presence still says online: stale."""
    presence = PresenceMap()
    presence.update("gatewayd/box-a/devices/thermo/k", claim(True, "2026-12-05T10:00:00Z"))
    presence.update("gatewayd/box-a/status", b"offline")
    assert presence.locate("thermo", "k") is None
    presence.update("gatewayd/box-a/status", b"online")
    assert presence.locate("thermo", "k").gateway == "box-a"


def test_the_device_of_a_cli_command():
    assert device_of({"device": "k"}, None) == "k"
    assert device_of({"imei": "8612", "slot": "1"}, None) == "8612"
    assert device_of({"gw_id": "A"}, "B") == "B"
    with pytest.raises(UsageError, match="--device"):
        device_of({"slot": "1"}, None)
    with pytest.raises(UsageError, match="more than one"):
        device_of({"device": "a", "imei": "b"}, None)


# --- the client against stand-in boxes (a real broker) -----------------------------------------


class FakeBox:
    """A paho client playing a box: retained status and presence, and a command handler."""

    def __init__(self, port: int, gateway: str) -> None:
        self.gateway = gateway
        self.requests: list[dict] = []
        self.on_request: Callable[[FakeBox, dict], Any] = lambda box, request: None
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"fake-{gateway}")
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"gatewayd/{gateway}/commands/+/+", qos=1)
        self.publish(f"gatewayd/{gateway}/status", b"online", retain=True)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def claim(self, device: str, online: bool, since: str) -> None:
        topic = f"gatewayd/{self.gateway}/devices/thermo/{device}"
        self.publish(topic, claim(online, since, self.gateway), retain=True)

    def answer(self, request: dict, status: int, **body: Any) -> None:
        self.publish(
            request["reply_to"],
            json.dumps({**body, "id": request["id"], "status": status}).encode(),
        )

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        request = json.loads(message.payload)
        self.requests.append(request)
        threading.Thread(target=self.on_request, args=(self, request)).start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def fakes(mosquitto):
    boxes = [FakeBox(mosquitto.port, "box-a"), FakeBox(mosquitto.port, "box-b")]
    yield boxes
    for box in boxes:
        box.close()


def test_a_command_goes_to_the_box_holding_the_device(mosquitto, fakes):
    box_a, box_b = fakes
    box_a.claim("kitchen", True, "2026-12-05T10:00:00Z")
    box_a.on_request = lambda box, request: box.answer(request, 200, ok=True, result={"pong": True})
    with FleetClient("127.0.0.1", mosquitto.port) as fleet:
        assert [b.gateway for b in fleet.boxes()] == ["box-a", "box-b"]  # retained, at connect
        answer = fleet.command("thermo", "ping", "kitchen", {"device": "kitchen"}, request_id="r1")
    assert (answer.status, answer.ok, answer.result, answer.gateway) == (
        200,
        True,
        {"pong": True},
        "box-a",
    )
    assert answer.sent_to == ["box-a"] and box_b.requests == []
    request = box_a.requests[0]
    assert request["id"] == "r1" and request["args"] == {"device": "kitchen"}
    assert request["reply_to"].startswith(f"gatewayd-fleet/{fleet.client_id}/answers/")
    assert request["expires"].endswith("Z")


def test_an_unknown_device_is_404_without_sending(mosquitto, fakes):
    with FleetClient("127.0.0.1", mosquitto.port) as fleet:
        answer = fleet.command("thermo", "ping", "attic", {"device": "attic"})
    assert (answer.status, answer.error["code"], answer.gateway, answer.sent_to) == (
        404,
        "not_found",
        None,
        [],
    )
    assert fakes[0].requests == [] and fakes[1].requests == []


def test_a_404_from_the_old_box_is_sent_again_to_the_new_box_with_the_same_id(mosquitto, fakes):
    box_a, box_b = fakes
    box_a.claim("kitchen", True, "2026-12-05T10:00:00Z")

    def moved_away(box: FakeBox, request: dict) -> None:
        box.answer(request, 404, ok=False, error={"code": "not_found", "message": "not connected"})
        time.sleep(0.3)  # the 404 first; the new box's presence within move_grace
        box_b.claim("kitchen", True, "2026-12-05T10:01:00Z")

    box_a.on_request = moved_away
    box_b.on_request = lambda box, request: box.answer(request, 200, ok=True, result={"pong": True})
    with FleetClient("127.0.0.1", mosquitto.port, move_grace=5) as fleet:
        answer = fleet.command("thermo", "ping", "kitchen", {"device": "kitchen"}, timeout=10)
    assert (answer.status, answer.gateway, answer.sent_to) == (200, "box-b", ["box-a", "box-b"])
    assert box_a.requests[0]["id"] == box_b.requests[0]["id"] == answer.body["id"]


def test_a_move_seen_in_flight_sends_again_to_the_new_box(mosquitto, fakes):
    box_a, box_b = fakes
    box_a.claim("kitchen", True, "2026-12-05T10:00:00Z")
    box_a.on_request = lambda box, request: box_b.claim("kitchen", True, "2026-12-05T10:01:00Z")
    box_b.on_request = lambda box, request: box.answer(request, 200, ok=True, result=None)
    with FleetClient("127.0.0.1", mosquitto.port) as fleet:
        answer = fleet.command("thermo", "ping", "kitchen", {"device": "kitchen"}, timeout=10)
    assert (answer.status, answer.gateway, answer.sent_to) == (200, "box-b", ["box-a", "box-b"])
    assert box_a.requests[0]["id"] == box_b.requests[0]["id"]


def test_a_404_with_the_device_nowhere_else_is_the_answer(mosquitto, fakes):
    box_a, _ = fakes
    box_a.claim("kitchen", True, "2026-12-05T10:00:00Z")
    box_a.on_request = lambda box, r: box.answer(
        r, 404, ok=False, error={"code": "not_found", "message": "gone"}
    )
    with FleetClient("127.0.0.1", mosquitto.port, move_grace=0.2) as fleet:
        answer = fleet.command("thermo", "ping", "kitchen", {"device": "kitchen"})
    assert (answer.status, answer.gateway, answer.sent_to) == (404, "box-a", ["box-a"])


def test_no_answer_in_time_raises_with_the_request_id(mosquitto, fakes):
    fakes[0].claim("kitchen", True, "2026-12-05T10:00:00Z")
    with FleetClient("127.0.0.1", mosquitto.port) as fleet, pytest.raises(CommandTimeout) as caught:
        fleet.command(
            "thermo", "ping", "kitchen", {"device": "kitchen"}, timeout=0.5, request_id="slow"
        )
    assert (caught.value.request_id, caught.value.gateway) == ("slow", "box-a")


# --- two real daemons --------------------------------------------------------------------------


class Thermometer:
    """A blocking TCP thermometer on a thread: reports once, answers every PING with PONG."""

    def __init__(self, port: int, name: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"T {name} 21.5\n".encode())
        self.pings = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        buffer = b""
        self.sock.settimeout(None)
        while True:
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line == b"PING":
                    self.pings += 1
                    self.sock.sendall(b"PONG\n")

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def box_config(tmp_path: Path, gateway: str, broker_port: int) -> tuple[Path, int]:
    """A box ``gateway`` with the example plugin on a free port and an mqtt sink taking
    ``thermo.ping``; returns (config file, device port)."""
    directory = tmp_path / gateway
    directory.mkdir()
    device_port, api_port = free_port(), free_port()
    config = directory / "gatewayd.yaml"
    config.write_text(
        f"""\
gateway: {{id: {gateway}, state_dir: {directory / "state"}, log_level: info, shutdown_timeout: 8s}}
api: {{listen: "127.0.0.1:{api_port}"}}
plugins:
  thermo: {{type: example, listen: "127.0.0.1:{device_port}"}}
sinks:
  north:
    type: mqtt
    broker: {{host: 127.0.0.1, port: {broker_port}}}
    commands: {{allow: [thermo.ping]}}
routes:
  - {{match: {{type: "device.*"}}, sinks: [north]}}
"""
    )
    return config, device_port


def fleet_cli(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", "fleet", *args, "--broker", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def at(fleet: FleetClient, device: str, gateway: str | None) -> bool:
    """Wait until presence puts ``device`` on ``gateway`` (None: on no box)."""
    return fleet.wait_for(
        lambda p: getattr(p.locate("thermo", device), "gateway", None) == gateway, 15
    )


@pytest.mark.integration
def test_two_daemons_behind_one_broker(tmp_path: Path, mosquitto):
    config_a, port_a = box_config(tmp_path, "box-a", mosquitto.port)
    config_b, port_b = box_config(tmp_path, "box-b", mosquitto.port)
    sent: list[str] = []  # every command message on the broker
    spy = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="spy")
    spy.on_message = lambda c, u, m: sent.append(m.topic)
    spy.connect("127.0.0.1", mosquitto.port)
    spy.subscribe("gatewayd/+/commands/#", qos=1)
    spy.loop_start()
    daemons = [start_daemon(config_a), start_daemon(config_b)]
    devices: list[Thermometer] = []
    fleet = FleetClient("127.0.0.1", mosquitto.port).connect()
    try:
        assert fleet.wait_for(
            lambda p: all(p.box_alive(g) and g in p.statuses for g in ("box-a", "box-b")), 20
        )
        wait_for_port(port_a)
        wait_for_port(port_b)
        kitchen, hall = Thermometer(port_a, "kitchen"), Thermometer(port_b, "hall")
        devices += [kitchen, hall]
        assert at(fleet, "kitchen", "box-a") and at(fleet, "hall", "box-b")
        assert {(c.device, c.gateway, c.online) for c in fleet.devices()} == {
            ("kitchen", "box-a", True),
            ("hall", "box-b", True),
        }

        answer = fleet.command("thermo", "ping", "kitchen", {"device": "kitchen"}, timeout=15)
        assert (answer.status, answer.result, answer.gateway) == (200, {"pong": True}, "box-a")
        assert (kitchen.pings, hall.pings) == (1, 0)

        answer = fleet.command("thermo", "ping", "attic", {"device": "attic"})
        assert (answer.status, answer.error["code"], answer.sent_to) == (404, "not_found", [])

        # The kitchen thermometer moves from box-a to box-b.
        kitchen.close()
        assert at(fleet, "kitchen", None)
        moved = Thermometer(port_b, "kitchen")
        devices.append(moved)
        assert at(fleet, "kitchen", "box-b")
        answer = fleet.command("thermo", "ping", "kitchen", {"device": "kitchen"}, timeout=15)
        assert (answer.status, answer.gateway, answer.sent_to) == (200, "box-b", ["box-b"])
        assert (moved.pings, kitchen.pings) == (1, 1)

        # The command line: the same through `python -m gatewayd fleet`.
        listed = fleet_cli(mosquitto.port, "devices")
        assert listed.returncode == 0, listed.stderr
        lines = [line.split() for line in listed.stdout.splitlines()]
        assert lines[0] == ["PLUGIN", "DEVICE", "GATEWAY", "ONLINE", "SINCE"]
        assert [row[:4] for row in lines[1:]] == [
            ["thermo", "hall", "box-b", "yes"],
            ["thermo", "kitchen", "box-a", "no"],
            ["thermo", "kitchen", "box-b", "yes"],
        ]
        boxes = fleet_cli(mosquitto.port, "boxes")
        assert [line.split() for line in boxes.stdout.splitlines()] == [
            ["GATEWAY", "STATUS", "DEVICES"],
            ["box-a", "online", "0"],
            ["box-b", "online", "2"],
        ]
        done = fleet_cli(
            mosquitto.port, "command", "thermo", "ping", "device=hall", "--id", "cli-1"
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "ok": True,
            "result": {"pong": True},
            "id": "cli-1",
            "status": 200,
        }
        assert hall.pings == 1
        missing = fleet_cli(mosquitto.port, "command", "thermo", "ping", "device=attic")
        assert missing.returncode == 1 and json.loads(missing.stdout)["status"] == 404
        assert "not_found" in missing.stderr
        usage = fleet_cli(mosquitto.port, "command", "thermo", "ping", "slot=1")
        assert usage.returncode == 2 and "--device" in usage.stderr

        fleet.sync()
        spy_deadline = time.monotonic() + 5
        while len(sent) < 3 and time.monotonic() < spy_deadline:
            time.sleep(0.05)
        assert sent == [
            "gatewayd/box-a/commands/thermo/ping",
            "gatewayd/box-b/commands/thermo/ping",
            "gatewayd/box-b/commands/thermo/ping",
        ]  # the unknown devices were never sent
    finally:
        fleet.close()
        for device in devices:
            device.close()
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon in daemons:
            assert daemon.wait(20) == 0
        spy.loop_stop()
        spy.disconnect()
