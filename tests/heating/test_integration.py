"""Simulator <-> plugin through a real mosquitto: every msg_id and command, a broker killed and
restarted mid-stream, a gateway that goes silent, a power loss, the demo broker."""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from gatewayd.plugins.heating import HeatingConfig, HeatingPlugin, HeatingSimulator
from twisted.internet import reactor

from gatewayd.cli import main as cli_main
from gatewayd.mqtt import BrokerConfig
from gatewayd.plugin import DeviceRefused, DeviceTimeout
from gatewayd.testing import PluginHarness, free_port, sleep, wait_until

pytestmark = pytest.mark.integration

FAST = {"reconnect_initial": 0.05, "reconnect_max": 0.3, "connect_timeout": 2}
GW = "02345678903"
GW2 = "02345678904"
METER_55, METER_53, HEAT_METER = "27100000203400", "27100001200800", "27100002018801"


def make_plugin(port: int, **config) -> PluginHarness:
    settings = {
        "broker": {
            "host": "127.0.0.1",
            "port": port,
            "client_id": "gatewayd-test",
            "probe_interval": 0.5,
            "probe_timeout": 0.5,
            **FAST,
        },
        "offline_after": 30,
        "poll_after": None,
        "command_timeout": 2,
        "transparent_timeout": 2,
        **config,
    }
    return PluginHarness(HeatingPlugin, settings)


def make_simulator(port: int, gateways: int = 1, interval: float = 0.3) -> HeatingSimulator:
    return HeatingSimulator(
        reactor,
        BrokerConfig(host="127.0.0.1", port=port, **FAST),
        gateways=gateways,
        meters=3,
        interval=interval,
        heartbeat=0,
        answer_delay=0.01,
        bus_delay=0.02,
        seed=1,
    )


def readings(harness, meter_id=None):
    return [e for e in harness.collector.of_type("meter.reading") if meter_id in (None, e.device)]


@pytest_twisted.inlineCallbacks
def test_every_message_and_command_between_simulator_and_plugin(mosquitto):
    harness = make_plugin(mosquitto.port)
    yield harness.start()
    yield harness.plugin.link.when_subscribed().addTimeout(5, reactor)
    sim = make_simulator(mosquitto.port)
    sim.start()
    call = harness.call
    try:
        # msg 1 at power-up (with the unquoted CSQ), msg 20 for each meter type.
        yield harness.collector.wait_for("gateway.status").addTimeout(5, reactor)
        status = harness.collector.of_type("gateway.status")[0]
        assert status.device == GW and "csq_unquoted" in status.data["quirks"]
        assert (status.data["main_meter_total"], status.data["copy_meter_total"]) == (1, 2)
        assert harness.collector.of_type("device.online")[0].data["reason"] == "first_seen"
        yield wait_until(
            lambda: {e.device for e in readings(harness)} >= {METER_55, METER_53, HEAT_METER}
        )
        decoders = {e.device: e.data["decoder"] for e in readings(harness)}
        assert decoders == {
            METER_55: "building_valve_55",
            METER_53: "household_valve_53",
            HEAT_METER: "heat_meter",
        }
        heat = readings(harness, HEAT_METER)[0].data
        assert (heat["port"], heat["meter_type"], heat["protocol"]) == (1, "20", "0188")
        assert harness.collector.of_type("frame.invalid") == []

        # msg 1, 2, 12 round trips.
        status = yield call("refresh", {"gw_id": GW})
        assert status["stat"]["ok"] and status["iccid"] == "89860025102250386087"
        periods = yield call("get_periods", {"gw_id": GW})
        assert (periods["main_interval"], periods["heating_start"]) == (10, "09-01")
        changed = yield call(
            "set_periods",
            {
                "gw_id": GW,
                "main_interval": 15,
                "copy_interval": 45,
                "heating_start": "10-15",
                "heating_end": "04-15",
            },
        )
        assert changed == {"stat": {"code": 2, "ok": True, "name": "ok"}}
        periods = yield call("get_periods", {"gw_id": GW})
        assert (periods["main_interval"], periods["copy_interval"]) == (15, 45)
        assert (periods["heating_start"], periods["heating_end"]) == ("10-15", "04-15")
        assert len(harness.collector.of_type("gateway.periods")) == 2

        # msg 40: valves, then their next reports show the new opening.
        valve = yield call("set_valve", {"gw_id": GW, "meter_id": METER_55, "opening": 42.5})
        assert (valve["state"], valve["confirmed"]) == ("done", True)
        assert valve["frame_sent"].startswith("FEFEFE6855271000000011111605902F01A901")
        valve = yield call("set_valve", {"gw_id": GW, "meter_id": METER_53, "opening": 30})
        assert (valve["confirmed"], valve["opening_percent"]) == (True, 30.0)

        # msg 18: an immediate reading of the building valve follows the stat.
        before = len(readings(harness, METER_55))
        sim.interval = 1000  # only what read_now triggers from here on
        done = yield call("read_now", {"gw_id": GW, "main": True})
        assert done["stat"]["code"] == 2
        yield wait_until(lambda: len(readings(harness, METER_55)) > before)
        latest = readings(harness, METER_55)[-1].data["fields"]
        assert latest["valve_opening"]["value"] == 42.5

        # msg 40 raw: a 901F read request to the heat meter on port 1.
        body = bytes.fromhex("6820271000020011110103901F00")
        frame = "FEFEFE" + (body + bytes([sum(body) & 0xFF, 0x16])).hex()
        reply = yield call("transparent", {"gw_id": GW, "port": 1, "frame": frame})
        assert reply["frames"][0]["payload"]["decoder"] == "heat_meter"

        # Failures: the gateway's own stat codes, and no answer at all.
        sim.stat_overrides[12] = 1
        with pytest.raises(DeviceRefused) as refused:
            yield call(
                "set_periods",
                {
                    "gw_id": GW,
                    "main_interval": 5,
                    "copy_interval": 5,
                    "heating_start": "10-01",
                    "heating_end": "04-01",
                },
            )
        assert refused.value.code == 1
        sim.stat_overrides[40] = 401
        with pytest.raises(DeviceRefused) as refused:
            yield call("set_valve", {"gw_id": GW, "meter_id": METER_55, "opening": 10})
        assert refused.value.code == 401
        sim.unanswered.add(2)
        with pytest.raises(DeviceTimeout):
            yield call("get_periods", {"gw_id": GW})

        # msg 30: the gateway reboots: last will (msg 70), back online, has_reset.
        yield call("reboot", {"gw_id": GW})
        yield harness.collector.wait_for("device.offline").addTimeout(5, reactor)
        assert harness.collector.of_type("device.offline")[0].data == {"reason": "last_will"}
        yield harness.collector.wait_for("device.online", 2).addTimeout(5, reactor)
        assert harness.collector.of_type("device.online")[1].data["reason"] == "returned"
        yield wait_until(lambda: harness.collector.of_type("gateway.status")[-1].data["has_reset"])

        results = [e.data for e in harness.collector.of_type("command.result")]
        assert [r["command"] for r in results if r["ok"]][:3] == [
            "refresh",
            "get_periods",
            "set_periods",
        ]
        assert harness.failures == []
    finally:
        yield sim.stop()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_broker_killed_and_restarted_mid_stream(mosquitto):
    harness = make_plugin(mosquitto.port)
    yield harness.start()
    sim = make_simulator(mosquitto.port, gateways=2, interval=0.1)
    sim.start()
    link = harness.plugin.link
    try:
        yield harness.collector.wait_for("meter.reading", 12).addTimeout(5, reactor)
        mosquitto.kill()
        yield wait_until(lambda: not link.connected)
        yield sleep(0.5)
        state = harness.context.metrics.gauges["mqtt_state"][1]
        assert state() in (1.0, 3.0)  # connecting, or waiting to reconnect
        during = len(readings(harness))
        mosquitto.start()
        yield link.when_connected().addTimeout(5, reactor)
        yield wait_until(lambda: len(readings(harness)) >= during + 12, timeout=8)
        assert {e.data["gateway"] for e in readings(harness)[during:]} == {GW, GW2}
        assert link.stats.connects == 2 and link.stats.disconnects == 1
        gauges = {k: read() for k, (_, read) in harness.context.metrics.gauges.items()}
        assert gauges["mqtt_connected"] == 1.0 and gauges["mqtt_disconnects"] == 1
        assert gauges["mqtt_state"] == 2.0 and gauges["mqtt_connect_attempts"] >= 2
        assert harness.collector.of_type("device.offline") == []  # our outage, not theirs
        assert harness.failures == []
        # Commands work again on the new connection.
        status = yield harness.call("refresh", {"gw_id": GW2})
        assert status["stat"]["ok"]
    finally:
        yield sim.stop()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_gateway_that_goes_silent_goes_offline_and_returns(mosquitto):
    harness = make_plugin(mosquitto.port, offline_after=1.0)
    yield harness.start()
    yield harness.plugin.link.when_subscribed().addTimeout(5, reactor)
    sim = make_simulator(mosquitto.port, gateways=2, interval=0.2)
    sim.start()
    try:
        yield harness.collector.wait_for("device.online", 2).addTimeout(5, reactor)
        sim.gateways[GW].silent = True
        yield harness.collector.wait_for("device.offline").addTimeout(5, reactor)
        (offline,) = harness.collector.of_type("device.offline")
        assert offline.device == GW and offline.data["reason"] == "silent"
        assert offline.data["silent_for"] >= 1.0
        online = {
            d.id: d.online for d in harness.plugin.devices() if d.details["kind"] == "gateway"
        }
        assert online == {GW: False, GW2: True}
        sim.gateways[GW].silent = False
        yield harness.collector.wait_for("device.online", 3).addTimeout(5, reactor)
        assert harness.collector.of_type("device.online")[-1].data["reason"] == "returned"
    finally:
        yield sim.stop()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_power_loss_is_the_last_will(mosquitto):
    harness = make_plugin(mosquitto.port)
    yield harness.start()
    yield harness.plugin.link.when_subscribed().addTimeout(5, reactor)
    sim = make_simulator(mosquitto.port, interval=0)
    sim.start()
    try:
        yield harness.collector.wait_for("gateway.status").addTimeout(5, reactor)
        sim.gateways[GW].power_loss()
        yield harness.collector.wait_for("device.offline").addTimeout(5, reactor)
        offline = harness.collector.of_type("device.offline")[0]
        assert offline.data == {"reason": "last_will"}
        assert json.loads(offline.raw)["gw"]["msg_id"] == 70
    finally:
        yield sim.stop()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_demo_simulator_brings_its_own_broker_when_none_listens():
    port = free_port()
    config = HeatingConfig.model_validate(
        {"type": "heating", "broker": {"host": "127.0.0.1", "port": port, **FAST}}
    )
    harness = make_plugin(port)
    yield harness.start()  # before the broker exists, as in the demo
    sim = HeatingSimulator.for_demo(config, reactor)
    sim.interval, sim.heartbeat = 0.2, 0
    sim.start()
    try:
        assert sim.mosquitto is not None
        yield harness.collector.wait_for("meter.reading", 6).addTimeout(8, reactor)
        assert {e.data["gateway"] for e in readings(harness)} == {GW, GW2}
    finally:
        yield sim.stop()
        yield harness.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_cli_decode_takes_the_plugins_bcd_decimals(capsys):
    from tests.protocols.test_cjt188 import SEED

    printed, repaired, _ = SEED[192]  # a 55H building-valve report
    frame = repaired or printed
    assert cli_main(["decode", "cjt188", frame]) == 0
    vendor = json.loads(capsys.readouterr().out)["payload"]["fields"]["heat_total"]
    assert cli_main(["decode", "cjt188", frame, "-o", "bcd_decimals=2"]) == 0
    standard = json.loads(capsys.readouterr().out)["payload"]["fields"]["heat_total"]
    assert (vendor["scaling"], standard["scaling"]) == ("vendor_integer", "standard")
    assert standard["value"] == 45323.12 and vendor["value"] == 4532312

    report = json.dumps(
        {
            "gw": {"msg_id": 20, "msg_gw_pr": 0, "gw_id": "02345678903"},
            "data": {"meter_id": "27100583203400", "meter_data": [frame]},
        }
    )
    assert cli_main(["decode", "hygw", report, "--option", "bcd_decimals=2"]) == 0
    [decoded] = json.loads(capsys.readouterr().out)["meter_frames"]
    assert decoded["payload"]["fields"]["heat_total"] == standard

    assert cli_main(["decode", "cjt188", frame, "-o", "bcd_decimals=1"]) == 2
    assert "-o bcd_decimals: expected 0 or 2, got '1'" in capsys.readouterr().err
    assert cli_main(["decode", "cjt188", frame, "-o", "decimals=2"]) == 2
    assert "no option 'decimals' (options: bcd_decimals)" in capsys.readouterr().err
    assert cli_main(["decode", "powerbank", "x", "-o", "settings=1"]) == 2
    assert "(options: none)" in capsys.readouterr().err


def test_cli_decode_and_simulate_help(capsys):
    assert cli_main(["decode", "cjt188", "6855271005830011119603902F01F716"]) == 0
    decoded = json.loads(capsys.readouterr().out)
    assert decoded["payload"]["fields"]["command_state"]["value"] == "done"
    assert (
        cli_main(
            [
                "decode",
                "hygw",
                '{"gw":{"msg_id":1,"msg_gw_pr":0,"gw_id":"02345678903"},"data":{"CSQ":99,99}}',
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["values"]["CSQ"] == {"rssi": None, "ber": None}
    report = (
        '{"gw":{"msg_id":20,"msg_gw_pr":0,"gw_id":"02345678903"},'
        '"data":{"meter_id":"27100583203400","meter_data":["6855271005830011119603902F01F716","68ZZ"]}}'
    )
    assert cli_main(["decode", "hygw", report]) == 0
    good, bad = json.loads(capsys.readouterr().out)["meter_frames"]
    assert good["payload"]["decoder"] == "valve_55_ack"
    assert bad == {"hex": "68ZZ", "error": "format", "message": "not a hex string"}
    with pytest.raises(SystemExit):
        cli_main(["simulate", "heating", "--help"])
    assert "--gateways" in capsys.readouterr().out
