"""``format: thingsboard`` on the mqtt sink: ThingsBoard's gateway MQTT API (the public "MQTT
Gateway API Reference"; /work/shared/reference/northbound.md). First the mapping of events to
connect, disconnect and telemetry messages and of RPC requests to commands, with a stand-in
dispatcher; then against real mosquitto brokers with a paho client playing ThingsBoard: an
in-process sink (the token as the MQTT username, the document's shapes) and a real daemon whose
thermometer answers an RPC."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import textwrap
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import Logger

from gatewayd.config import ConfigError, check_config_main, load_config
from gatewayd.events import Event
from gatewayd.sinks.base import SinkContext
from gatewayd.sinks.mqtt import MqttSink
from gatewayd.sinks.mqtt_config import MqttSinkConfig
from gatewayd.sinks.thingsboard import (
    CONNECT_TOPIC,
    DISCONNECT_TOPIC,
    OWN_TELEMETRY_TOPIC,
    RPC_TOPIC,
    TELEMETRY_TOPIC,
    ThingsBoardConfig,
    ThingsBoardGateway,
    flatten,
    ts_millis,
)
from gatewayd.testing import free_port, wait_for_port, wait_until

from .heating.brokers import ConfiguredMosquitto

TS = "2026-12-05T10:00:00.123456+00:00"
MS = 1796464800123


def event(type_: str = "reading", device: str | None = "kitchen", **fields: Any) -> Event:
    base: dict[str, Any] = {
        "gateway": "edge",
        "plugin": "thermo",
        "protocol": "example",
        "ts": TS,
        "data": {},
    }
    base.update(fields)
    return Event(type=type_, device=device, **base)


def gateway(**config: Any) -> tuple[ThingsBoardGateway, list[tuple[str, Any]]]:
    """A mapping with a list for what it publishes, as (topic, decoded JSON)."""
    sent: list[tuple[str, Any]] = []

    def publish(topic: str, payload: bytes, qos: int, retain: bool) -> defer.Deferred:
        sent.append((topic, json.loads(payload)))
        return defer.succeed(None)

    dispatcher = config.pop("dispatcher", None)
    tb = ThingsBoardGateway(
        "edge",
        ThingsBoardConfig.model_validate({"token": "t", **config}),
        publish=publish,
        dispatcher=dispatcher,
        now=lambda: 1000.0,
    )
    return tb, sent


def decoded(messages: list[tuple[str, bytes, int, bool]]) -> list[tuple[str, Any]]:
    return [(topic, json.loads(payload)) for topic, payload, _, _ in messages]


# --- the mapping ----------------------------------------------------------------------------------


def test_flatten_keeps_scalars_joins_nested_keys_and_writes_lists_as_json() -> None:
    data = {
        "celsius": 21.5,
        "ok": True,
        "n": 3,
        "name": "Zähler 7",
        "meter": {"total": {"kwh": 12.5}, "unit": "kWh"},
        "slots": [1, {"bank": "x"}],
        "none": None,
        "nan": float("nan"),
        "huge": 2**70,
        "empty": {},
    }
    assert flatten(data) == {
        "celsius": 21.5,
        "ok": True,
        "n": 3,
        "name": "Zähler 7",
        "meter.total.kwh": 12.5,
        "meter.unit": "kWh",
        "slots": '[1,{"bank":"x"}]',
        "huge": str(2**70),
    }


def test_ts_is_milliseconds_since_the_epoch() -> None:
    assert ts_millis(TS) == MS
    assert ts_millis("2026-12-05T10:00:00.123999") == MS  # no zone: UTC; cut, not rounded
    assert ts_millis("yesterday") is None


def test_telemetry_is_one_entry_per_event_with_the_event_type() -> None:
    tb, _ = gateway()
    batch = [
        event(data={"celsius": 21.5, "event": "x"}),
        event(data={"celsius": 21.6}),  # the same millisecond: kept apart, never merged
        event(device="hall", data={"celsius": 19.0}),
        event(data={"celsius": 21.7}, ts="2026-12-05T10:00:01+00:00"),
    ]
    assert decoded(tb.messages(batch)) == [
        (
            TELEMETRY_TOPIC,
            {
                "kitchen": [
                    {"ts": MS, "values": {"event": "reading", "celsius": 21.5, "data.event": "x"}},
                    {"ts": MS, "values": {"event": "reading", "celsius": 21.6}},
                    {"ts": MS - 123 + 1000, "values": {"event": "reading", "celsius": 21.7}},
                ],
                "hall": [{"ts": MS, "values": {"event": "reading", "celsius": 19.0}}],
            },
        )
    ]
    assert all(qos == 1 and not retain for _, _, qos, retain in tb.messages(batch))


def test_online_connects_before_telemetry_and_offline_disconnects_after() -> None:
    tb, _ = gateway()
    batch = [
        event(data={"celsius": 1.0}),
        event("device.online"),
        event("device.online", device="hall"),
        event(data={"celsius": 2.0}),
        event("device.offline", data={"reason": "closed"}),
        event("device.offline", device="hall"),
        event("device.online", device="hall"),  # back again: no disconnect for it
    ]
    assert decoded(tb.messages(batch)) == [
        (CONNECT_TOPIC, {"device": "kitchen", "type": "example"}),
        (CONNECT_TOPIC, {"device": "hall", "type": "example"}),
        (
            TELEMETRY_TOPIC,
            {
                "kitchen": [
                    {"ts": MS, "values": {"event": "reading", "celsius": 1.0}},
                    {"ts": MS, "values": {"event": "reading", "celsius": 2.0}},
                ]
            },
        ),
        (DISCONNECT_TOPIC, {"device": "kitchen"}),
    ]


def test_device_name_and_type_templates_and_events_without_a_device() -> None:
    tb, _ = gateway(device_name="{gateway}/{plugin}/{device}", device_type="")
    batch = [
        event("device.online"),
        event(data={"celsius": 1.0}, gateway=""),
        event("frame.invalid", device=None, data={"reason": "format"}),
    ]
    assert decoded(tb.messages(batch)) == [
        (CONNECT_TOPIC, {"device": "edge/thermo/kitchen"}),  # no type
        (
            TELEMETRY_TOPIC,
            {"edge/thermo/kitchen": [{"ts": MS, "values": {"event": "reading", "celsius": 1.0}}]},
        ),
        # The gateway device's own telemetry: ThingsBoard's device API, a plain list.
        (
            OWN_TELEMETRY_TOPIC,
            [{"ts": MS, "values": {"event": "frame.invalid", "reason": "format"}}],
        ),
    ]


def test_large_batches_are_split_below_max_message_never_inside_an_entry() -> None:
    tb, _ = gateway(max_message=2048)
    batch = [event(device=f"d{n % 3}", data={"text": "x" * 100, "n": n}) for n in range(60)]
    batch.append(event(device="huge", data={"text": "y" * 5000}))  # alone too large: left out
    messages = tb.messages(batch)
    assert len(messages) > 3 and all(len(payload) <= 2048 for _, payload, _, _ in messages)
    entries = [
        (name, entry["values"]["n"])
        for _, body in decoded(messages)
        for name, items in body.items()
        for entry in items
    ]
    assert sorted(n for _, n in entries) == list(range(60))
    assert all(name == f"d{n % 3}" for name, n in entries)


class FakeDispatcher:
    """Answers like ``CommandDispatcher.call``: ``answers[(plugin, command)]`` or 404."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, dict]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, dict, str, str]] = []

    def call(self, plugin: str, command: str, arguments: dict, *, source: str, request_id: str):
        self.calls.append((plugin, command, arguments, source, request_id))
        default = (404, {"ok": False, "error": {"code": "not_found", "message": "no such"}})
        return defer.succeed(self.answers.get((plugin, command), default))


def rpc(device: Any, rpc_id: Any, method: Any, params: Any = None) -> bytes:
    data: dict[str, Any] = {"id": rpc_id, "method": method}
    if params is not None:
        data["params"] = params
    return json.dumps({"device": device, "data": data}).encode()


def test_rpc_runs_the_command_of_the_device_the_name_was_learned_from() -> None:
    dispatcher = FakeDispatcher(
        {
            ("cabinets", "query"): (200, {"ok": True, "result": {"slots": 6}}),
            ("cabinets", "lend"): (409, {"ok": False, "error": {"code": "busy", "message": "b"}}),
        }
    )
    tb, sent = gateway(
        device_name="cab-{device}", allow=["cabinets.*", "meters.read"], dispatcher=dispatcher
    )
    tb.messages([event("device.online", device="8600", plugin="cabinets", protocol="powerbank")])
    tb.messages([event(device="M1", plugin="meters", protocol="esam")])
    assert set(tb.names) == {"cab-8600", "cab-M1"}

    tb.handle(RPC_TOPIC, rpc("cab-8600", 7, "query", {"full": True}), 1, False)
    tb.handle(RPC_TOPIC, rpc("cab-8600", 8, "lend"), 1, False)
    tb.handle(RPC_TOPIC, rpc("cab-M1", 9, "read"), 1, False)  # esam: no device argument
    assert dispatcher.calls == [
        ("cabinets", "query", {"full": True, "imei": "8600"}, "thingsboard", "tb-cab-8600-7"),
        ("cabinets", "lend", {"imei": "8600"}, "thingsboard", "tb-cab-8600-8"),
        ("meters", "read", {}, "thingsboard", "tb-cab-M1-9"),
    ]
    busy = {"error": "b", "code": "busy", "status": 409}
    missing = {"error": "no such", "code": "not_found", "status": 404}
    assert sent == [
        (RPC_TOPIC, {"device": "cab-8600", "id": 7, "data": {"slots": 6}}),
        (RPC_TOPIC, {"device": "cab-8600", "id": 8, "data": busy}),
        (RPC_TOPIC, {"device": "cab-M1", "id": 9, "data": missing}),
    ]
    assert (tb.stats.received, tb.stats.executed, tb.stats.answers) == (3, 3, 3)


def test_rpc_refusals_are_answered_and_never_executed() -> None:
    dispatcher = FakeDispatcher({})
    tb, sent = gateway(
        allow=["thermo.ping"], dispatcher=dispatcher, device_argument={"thermo": "id"}
    )
    tb.messages([event()])
    requests = [
        rpc("nobody", 1, "ping"),  # never seen: which plugin would it be?
        rpc("kitchen", 2, "reboot"),  # not in allow
        rpc("kitchen", 3, "ping", {"id": "hall"}),  # another device than the name's
        rpc("kitchen", 4, "ping", [1, 2]),  # params not an object
        rpc("kitchen", 5, ""),  # no method
    ]
    for payload in requests:
        tb.handle(RPC_TOPIC, payload, 1, False)
    assert dispatcher.calls == []
    codes = [(body["id"], body["data"]["code"], body["data"]["status"]) for _, body in sent]
    assert codes == [
        (1, "not_found", 404),
        (2, "forbidden", 403),
        (3, "bad_arguments", 400),
        (4, "bad_request", 400),
        (5, "bad_request", 400),
    ]
    assert "thermo.reboot is not in thingsboard.allow" in sent[1][1]["data"]["error"]
    assert tb.stats.refused == 5

    # Unreadable ones are only logged; our own answers (echoed by the broker) are skipped.
    sent.clear()
    for payload in (b"{not json", b"[1]", rpc("kitchen", None, "ping"), rpc(None, 1, "ping")):
        tb.handle(RPC_TOPIC, payload, 1, False)
    tb.handle(RPC_TOPIC, json.dumps({"device": "kitchen", "id": 1, "data": {}}).encode(), 1, False)
    tb.handle(RPC_TOPIC, rpc("kitchen", 6, "ping"), 1, True)  # retained
    assert sent == [] and dispatcher.calls == [] and tb.stats.dropped == 5


def test_the_token_becomes_the_username_and_the_probe_is_off() -> None:
    config = MqttSinkConfig.model_validate(
        {"format": "thingsboard", "thingsboard": {"token": "A1B2"}, "broker": {"password": "p"}}
    )
    tb = ThingsBoardGateway("edge", config.thingsboard, now=lambda: 0.0)
    broker = tb.broker(config.broker)
    assert (broker.username, broker.password, broker.probe_interval) == ("A1B2", None, 0)
    assert "A1B2" not in repr(config)


# --- check-config ---------------------------------------------------------------------------------


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gatewayd.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def test_check_config_names_the_key_and_line(tmp_path: Path) -> None:
    (tmp_path / "tb.token").write_text("A1B2C3\n")
    path = write_yaml(
        tmp_path,
        """
        sinks:
          tb:
            type: mqtt
            format: thingsboard
            topic: "gw/{device}"
            commands: {allow: [thermo.ping]}
            thingsboard:
              token_file: tb.token
              device_name: "{plugin}-{devcie}"
              allow: [thermo]
          notoken:
            type: mqtt
            format: thingsboard
          plain:
            type: mqtt
            thingsboard: {token: x}
        routes:
          - sinks: [tb, notoken, plain]
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.errors == [
        f"{path}:5: sinks.tb.topic: does not apply with format: thingsboard (its topics are fixed)",
        f"{path}:6: sinks.tb.commands: with format: thingsboard, commands arrive as ThingsBoard "
        "RPC on v1/gateway/rpc: list them in thingsboard.allow instead",
        f"{path}:9: sinks.tb.thingsboard.device_name: unknown placeholder {{devcie}} (known: "
        "{gateway} {plugin} {protocol} {device} {type}); did you mean {device}?",
        f"{path}:10: sinks.tb.thingsboard.allow: 'thermo' is not a plugin.command pattern (such "
        "as cabinets.query, heating.* or *.*)",
        f"{path}:11: sinks.notoken: format: thingsboard needs the gateway device's access token: "
        "set thingsboard.token_file (or broker.username/password for basic MQTT credentials)",
        f"{path}:16: sinks.plain.thingsboard: applies only with format: thingsboard",
    ]
    assert check_config_main(path) == 2


def test_a_good_config_loads_with_the_token_from_its_file(tmp_path: Path) -> None:
    (tmp_path / "tb.token").write_text("A1B2C3\n")
    path = write_yaml(
        tmp_path,
        """
        sinks:
          tb:
            type: mqtt
            format: thingsboard
            broker: {host: tb.example.net, port: 1883}
            thingsboard: {token_file: tb.token, allow: ["thermo.*"]}
        routes:
          - sinks: [tb]
        """,
    )
    config = load_config(path, environ={})
    tb = config.sinks["tb"].thingsboard
    assert tb.token.get_secret_value() == "A1B2C3" and tb.allow == ["thermo.*"]


# --- against a broker -----------------------------------------------------------------------------


def logging_broker() -> ConfiguredMosquitto:
    """A mosquitto that logs each CONNECT with its username (``u'...'``) to ``broker.log``."""
    broker = ConfiguredMosquitto(["allow_anonymous true", "connection_messages true"])
    broker.log = broker.directory / "broker.log"  # type: ignore[attr-defined]
    broker.log.touch()
    os.chmod(broker.log, 0o666)  # mosquitto runs as its own user
    with broker.config.open("a") as config:
        config.write(f"log_dest file {broker.log}\nlog_type all\n")
    return broker


class Platform:
    """A paho client playing ThingsBoard: collects ``v1/gateway/#`` as (topic, JSON)."""

    def __init__(self, port: int) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.seen: list[tuple[str, Any]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="thingsboard")
        self.client.on_message = lambda c, u, m: self._got(m.topic, m.payload)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("v1/gateway/#", qos=1)
        self.client.loop_start()

    def _got(self, topic: str, payload: bytes) -> None:
        body = json.loads(payload)
        if topic == RPC_TOPIC and "method" in (body.get("data") or {}):
            return  # our own request, back from the broker
        self.seen.append((topic, body))
        self.messages.put((topic, body))

    def next(self, topic: str, timeout: float = 15.0) -> Any:
        """The next message on ``topic`` (blocking; others are skipped)."""
        while True:
            got, body = self.messages.get(timeout=timeout)
            if got == topic:
                return body

    def rpc(self, device: str, rpc_id: int, method: str, params: dict | None = None) -> None:
        self.client.publish(RPC_TOPIC, rpc(device, rpc_id, method, params), qos=1).wait_for_publish(
            10
        )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest_twisted.ensureDeferred
async def test_an_in_process_sink_speaks_the_gateway_api_with_the_token_as_username(
    tmp_path: Path,
) -> None:
    broker = logging_broker().start()
    platform = Platform(broker.port)
    config = MqttSinkConfig.model_validate(
        {
            "format": "thingsboard",
            "broker": {"port": broker.port, "reconnect_initial": 0.05, "client_id": "box-edge"},
            "thingsboard": {"token": "A1B2C3", "device_name": "{plugin} {device}"},
        }
    )
    context = SinkContext("tb", "edge", reactor, tmp_path, Logger(namespace="test.tb"))
    sink = MqttSink("tb", config, context)
    try:
        await sink.open()
        assert "u'A1B2C3'" in broker.log.read_text()  # type: ignore[attr-defined]
        batch = [
            event("device.online"),
            event(data={"celsius": 21.5, "probe": {"battery": 88}}),
            event(data={"celsius": 21.6}),
        ]
        assert await sink.write(batch) == 2  # connect + one telemetry message
        await wait_until(lambda: len(platform.seen) == 2)
        first = {"event": "reading", "celsius": 21.5, "probe.battery": 88}
        second = {"event": "reading", "celsius": 21.6}
        assert platform.seen == [
            (CONNECT_TOPIC, {"device": "thermo kitchen", "type": "example"}),
            (
                TELEMETRY_TOPIC,
                {"thermo kitchen": [{"ts": MS, "values": first}, {"ts": MS, "values": second}]},
            ),
        ]
        assert await sink.write([event("device.offline")]) == 1
        await wait_until(lambda: len(platform.seen) == 3)
        assert platform.seen[2] == (DISCONNECT_TOPIC, {"device": "thermo kitchen"})
        # Without a dispatcher (outside the daemon) an RPC is still answered, with an error.
        await wait_until(lambda: sink.client is not None and sink.client.subscribed)
        platform.client.publish(RPC_TOPIC, rpc("thermo kitchen", 1, "ping"), qos=1)
        await wait_until(lambda: len(platform.seen) == 4)
        assert platform.seen[3][1]["data"]["code"] == "forbidden"  # allow is empty
    finally:
        await sink.close()
        platform.close()
        broker.stop()


@pytest.mark.integration
def test_a_daemon_answers_thingsboard_rpc_for_its_thermometer(tmp_path: Path) -> None:
    from tests.test_northbound_daemon import Thermometer
    from tests.test_service import daemon_config, start_daemon

    broker = logging_broker().start()
    (tmp_path / "tb.token").write_text("GATEWAY-TOKEN\n")
    device_port, api_port = free_port(), free_port()
    config = daemon_config(
        tmp_path,
        api_port,
        f"""\
plugins:
  thermo: {{type: example, listen: "127.0.0.1:{device_port}"}}
sinks:
  tb:
    type: mqtt
    format: thingsboard
    broker: {{host: 127.0.0.1, port: {broker.port}, client_id: box-t1}}
    thingsboard: {{token_file: {tmp_path / "tb.token"}, allow: [thermo.ping]}}
routes:
  - {{match: {{type: "*"}}, sinks: [tb]}}
""",
    )
    platform = Platform(broker.port)
    daemon = start_daemon(config)
    try:
        wait_for_port(device_port)
        thermometer = Thermometer(device_port)
        assert platform.next(CONNECT_TOPIC) == {"device": "kitchen", "type": "example"}
        telemetry = platform.next(TELEMETRY_TOPIC)
        [entry] = telemetry["kitchen"]
        assert entry["values"] == {"event": "reading", "celsius": 21.5}
        assert isinstance(entry["ts"], int)
        assert "u'GATEWAY-TOKEN'" in broker.log.read_text()  # type: ignore[attr-defined]

        platform.rpc("kitchen", 1, "ping")
        thermometer.answer_pings(1)
        assert platform.next(RPC_TOPIC) == {"device": "kitchen", "id": 1, "data": {"pong": True}}

        platform.rpc("kitchen", 2, "reboot")  # outside allow
        refused = platform.next(RPC_TOPIC)
        assert (refused["device"], refused["id"]) == ("kitchen", 2)
        assert (refused["data"]["code"], refused["data"]["status"]) == ("forbidden", 403)
        platform.rpc("cellar", 3, "ping")  # a device this box never reported
        unknown = platform.next(RPC_TOPIC)
        assert (unknown["id"], unknown["data"]["code"]) == (3, "not_found")

        thermometer.sock.settimeout(1.0)  # executed once: no second PING
        with pytest.raises(socket.timeout):
            thermometer.sock.recv(4096)
        thermometer.close()
        assert platform.next(DISCONNECT_TOPIC) == {"device": "kitchen"}
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        platform.close()
        broker.stop()
