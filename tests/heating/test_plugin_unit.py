"""The heating plugin without a broker: a fake MQTT link and a Clock.

Events from the seed's messages, frame.invalid, offline_after, polling, command correlation
(one in flight -> 409), stat mapping (-> 502), timeouts (-> 504), set_valve frames, and the
idempotency keys of reports that can be redelivered.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from gatewayd.plugins.heating import BrokerUnavailable, HeatingPlugin
from gatewayd.protocols import cjt188
from twisted.internet import defer
from twisted.internet.task import Clock

from gatewayd.mqtt import CONNECTED, WAITING, NotConnected
from gatewayd.plugin import (
    BadArguments,
    Busy,
    DeviceRefused,
    DeviceTimeout,
    Invocation,
    NotFound,
)
from gatewayd.testing import PluginHarness

from .vectors import (
    FRAME_53,
    FRAME_53_BAD_CHECKSUM,
    FRAME_55,
    GET_TOPIC,
    GW_ID,
    LAST_WILL,
    METER_53,
    METER_55,
    PERIODS_REPORT,
    SET_TOPIC,
    STATUS_REPORT,
    VALVE_53_OPEN_50,
    VALVE_53_REPLY_50,
    VALVE_55_ACK,
    VALVE_55_OPEN_50,
    meter_report,
    stat_reply,
    transparent_reply,
)


class FakeLink:
    """Stands in for gatewayd.mqtt.MqttClient: records publications, delivers on request."""

    def __init__(self, reactor, config, *, client_id, on_message, subscriptions, **options):
        self.config = config
        self.client_id = client_id
        self.on_message = on_message
        self.subscriptions = subscriptions
        self.options = options
        self.published: list[tuple[str, bytes, int]] = []
        self.state = "stopped"
        self.listeners = []

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED

    def add_state_listener(self, listener):
        self.listeners.append(listener)

    def register_metrics(self, metrics, prefix="mqtt_"):
        metrics.gauge(prefix + "connected", "", lambda: float(self.connected))

    def set_state(self, state):
        self.state = state
        for listener in self.listeners:
            listener(state)

    def start(self):
        self.set_state(CONNECTED)

    def stop(self):
        self.set_state("stopped")

    def publish(self, topic, payload, qos=0, retain=False):
        if not self.connected:
            raise NotConnected("down")
        self.published.append((topic, payload, qos))
        return defer.succeed(None)

    def deliver(self, payload, topic=SET_TOPIC, qos=0):
        if isinstance(payload, str):
            payload = payload.encode()
        return self.on_message(topic, payload, qos, False)


class PluginUnderTest(HeatingPlugin):
    link_factory = FakeLink


def make(**config):
    clock = Clock()
    settings = {
        "broker": {"client_id": "gatewayd-test"},
        "offline_after": 60,
        "poll_after": None,
        "command_timeout": 5,
        "transparent_timeout": 10,
        **config,
    }
    harness = PluginHarness(PluginUnderTest, settings, reactor=clock)
    harness.start()
    return harness, clock, harness.plugin.link


def result_of(d: defer.Deferred) -> list:
    seen: list = []
    d.addBoth(seen.append)
    return seen


def data_of(harness, type_):
    return [e.data for e in harness.collector.of_type(type_)]


# --- config -------------------------------------------------------------------------------------


def test_client_id_must_not_look_like_a_gateway_id():
    with pytest.raises(ValueError, match="looks like a gateway id"):
        PluginHarness(PluginUnderTest, {"broker": {"client_id": "02345678903"}})


def test_subscription_and_default_client_id():
    harness, _, link = make(broker={})
    assert link.subscriptions == [("hy/gw/set/#", 1)]
    assert link.options["manual_ack"] is True
    assert link.client_id.startswith("gatewayd-") and link.client_id.endswith("-test")


# --- inbound ------------------------------------------------------------------------------------


def test_status_report_with_unquoted_csq_gives_online_and_status():
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    assert harness.collector.types() == ["device.online", "gateway.status"]
    online, status = harness.collector.events
    assert (online.device, online.data) == (GW_ID, {"reason": "first_seen", "msg_id": 1})
    assert status.device == GW_ID
    assert status.raw == STATUS_REPORT
    assert status.data == {
        "csq": {"raw": "99,99", "rssi": None, "ber": None},
        "rssi": -98,
        "sinr": 13,
        "iccid": "89860025102250386087",
        "version": "V1.0",
        "mbus_mv": 29392,
        "mbus_ma": 3,
        "model": 136,
        "main_meter_total": 5,
        "copy_meter_total": 96,
        "has_reset": False,
        "stat": {"code": 2, "ok": True, "name": "ok"},
        "quirks": ["csq_unquoted"],
    }
    assert harness.context.metrics.frames_in == 1


def test_periods_report():
    harness, _, link = make()
    link.deliver(PERIODS_REPORT)
    assert data_of(harness, "gateway.periods") == [
        {
            "not_intimer_interval": 1440,
            "heating_start": "09-01",
            "heating_end": "05-01",
            "main_interval": 10,
            "copy_interval": 60,
            "copy_statistics": 1,
            "stat": {"code": 2, "ok": True, "name": "ok"},
        }
    ]


def test_meter_reports_decode_55h_and_53h():
    harness, _, link = make()
    link.deliver(meter_report(METER_55, FRAME_55))
    link.deliver(meter_report(METER_53, FRAME_53))
    first, second = harness.collector.of_type("meter.reading")
    assert (first.device, first.raw) == (METER_55, FRAME_55)
    data = first.data
    assert {k: data[k] for k in ("gateway", "meter_id", "number", "protocol", "port")} == {
        "gateway": GW_ID,
        "meter_id": METER_55,
        "number": "27100583",
        "protocol": "2034",
        "port": 0,
    }
    assert (data["meter_type"], data["address"], data["di"]) == ("55", "27100583001111", "901F")
    assert data["decoder"] == "building_valve_55"
    fields = data["fields"]
    assert fields["heat_total"]["value"] == 4532312.0 and fields["heat_total"]["unit"] == "kWh"
    assert fields["heat_total"]["bcd"] == "04532312"
    assert fields["supply_temperature"]["value"] == 28.87
    assert fields["return_temperature"]["value"] == 28.93
    assert fields["valve_opening"]["value"] == 25.0
    h = second.data
    assert (second.device, h["meter_type"], h["decoder"]) == (METER_53, "53", "household_valve_53")
    assert h["fields"]["room_temperature"]["value"] == 22.0
    assert h["fields"]["valve_opening"]["value"] == 100.0
    assert h["fields"]["supply_temperature"]["value"] == 29.1
    assert h["fields"]["battery_voltage"]["value"] == 3.6
    devices = {d.id: d for d in harness.plugin.devices()}
    assert devices[METER_55].details["address"] == "27100583001111"
    assert devices[GW_ID].details["meters"] == 2


def test_bcd_decimals_2_scales_the_55h_totals():
    harness, _, link = make(bcd_decimals=2)
    link.deliver(meter_report(METER_55, FRAME_55))
    (reading,) = data_of(harness, "meter.reading")
    assert reading["fields"]["heat_total"]["value"] == 45323.12


def test_bad_frame_is_frame_invalid_and_the_others_still_decode():
    harness, _, link = make()
    link.deliver(meter_report(METER_53, FRAME_53_BAD_CHECKSUM, FRAME_53))
    (invalid,) = harness.collector.of_type("frame.invalid")
    assert invalid.device == METER_53
    assert invalid.raw == FRAME_53_BAD_CHECKSUM
    assert invalid.data["reason"] == "checksum"
    assert invalid.data["message"] == "CS is 8B, byte sum is 91"
    assert (invalid.data["gateway"], invalid.data["meter_id"]) == (GW_ID, METER_53)
    assert len(harness.collector.of_type("meter.reading")) == 1
    assert harness.context.metrics.frames_invalid == 1


@pytest.mark.parametrize(
    ("entry", "reason"),
    [("68532232ZZ", "format"), ("6853", "truncated"), ("685", "format"), ("", "truncated")],
)
def test_an_entry_that_is_no_frame_is_frame_invalid_not_dropped(entry, reason):
    harness, _, link = make()
    link.deliver(meter_report(METER_53, entry, FRAME_53))
    (invalid,) = harness.collector.of_type("frame.invalid")
    assert invalid.data["reason"] == reason
    assert invalid.raw == entry
    assert len(harness.collector.of_type("meter.reading")) == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json at all", "json"),
        (b'{"gw":{"msg_gw_pr":0,"gw_id":"02345678903"},"data":{}}', "msg_id"),
        (b"\xff\xfe", "encoding"),
        (
            b'{"gw":{"msg_id":20,"msg_gw_pr":0,"gw_id":"02345678903"},'
            b'"data":{"meter_id":"2710","meter_data":["00"]}}',
            "meter_id",
        ),
        (
            b'{"gw":{"msg_id":20,"msg_gw_pr":0,"gw_id":"02345678903"},'
            b'"data":{"meter_id":"27100583203400","meter_data":[]}}',
            "no_frames",
        ),
    ],
)
def test_undecodable_payload_is_frame_invalid_with_reason_and_raw(payload, reason):
    harness, _, link = make()
    link.deliver(payload)
    (invalid,) = harness.collector.of_type("frame.invalid")
    assert invalid.data["reason"] == reason
    assert invalid.raw == payload.decode("utf-8", "replace")
    assert invalid.device in (GW_ID, "27100583203400")


def test_oversized_payload_is_not_decoded():
    harness, _, link = make()
    link.deliver(b"{" + b" " * 70000 + b"}")
    (invalid,) = harness.collector.of_type("frame.invalid")
    assert invalid.data["reason"] == "length"
    assert len(invalid.raw) == 4096 and invalid.data["raw_truncated"] == 70002


def test_unknown_msg_id_is_counted_not_fatal():
    harness, _, link = make()
    gauges = harness.context.metrics.gauges
    link.deliver(b'{"gw":{"msg_id":45,"msg_gw_pr":0,"gw_id":"02345678903"},"data":{}}')
    link.deliver(b'{"gw":{"msg_id":99,"msg_gw_pr":0,"gw_id":"02345678903"},"data":{}}')
    assert harness.collector.types() == ["device.online"]
    assert gauges["unknown_messages"][1]() == 2
    assert harness.plugin.unknown_msg_ids == {45: 1, 99: 1}


def test_exception_in_handling_one_message_does_not_stop_the_next(monkeypatch):
    harness, _, link = make()
    plugin = harness.plugin
    original = plugin._on_meter_report
    calls = []

    def explode_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return original(*args)

    monkeypatch.setitem(plugin._handlers, 20, explode_once)
    link.deliver(meter_report(METER_55, FRAME_55))
    link.deliver(meter_report(METER_55, FRAME_55))
    assert harness.collector.types() == ["device.online", "frame.invalid", "meter.reading"]
    assert harness.collector.events[1].data["reason"] == "internal_error"
    assert "RuntimeError: boom" in harness.collector.events[1].data["message"]
    assert harness.context.metrics.internal_errors == 1
    assert harness.failures == []  # not marked failed: one message, not the plugin


def test_handler_result_fires_only_when_events_are_durable():
    clock = Clock()
    harness = PluginHarness(
        PluginUnderTest,
        {"broker": {"client_id": "gatewayd-test"}, "poll_after": None},
        reactor=clock,
        durable="manual",
    )
    harness.start()
    link = harness.plugin.link
    durable = result_of(link.deliver(meter_report(METER_55, FRAME_55), qos=1))
    assert durable == []
    harness.collector.release()
    assert len(durable) == 1


# --- redelivered reports (idempotency keys) ----------------------------------------------------

OTHER_GW_ID = "02345678904"


def keys_of(events) -> list[str | None]:
    return [None if e.key is None else e.key[0] for e in events]


def test_a_redelivered_qos1_report_is_stored_once_and_acknowledged_again():
    harness, _, link = make()
    report = meter_report(METER_53, FRAME_53_BAD_CHECKSUM, FRAME_53, FRAME_53)
    first = result_of(link.deliver(report, qos=1))
    assert harness.collector.types() == [
        "device.online",
        "frame.invalid",
        "meter.reading",
        "meter.reading",
    ]
    identity = f"{GW_ID}:{hashlib.blake2b(report, digest_size=12).hexdigest()}"
    stored = harness.collector.events[1:]
    # One key per event, by its index in the message: two equal frames are two readings.
    assert keys_of(stored) == [f"test:{identity}:{n}" for n in range(3)]
    assert {e.key[1] for e in stored} == {300.0}
    assert keys_of(harness.collector.events[:1]) == [None]  # device.online: the run's view

    again = result_of(link.deliver(report, qos=1))  # the broker's redelivery
    assert len(harness.collector.events) == 4
    assert keys_of(harness.collector.deduplicated) == keys_of(stored)
    assert first == again == [None]  # fired, not failed: the link acknowledges it again
    assert harness.context.metrics.frames_invalid == 2  # counted as received, stored once


def test_a_different_report_from_the_same_gateway_is_new():
    harness, _, link = make()
    link.deliver(meter_report(METER_55, FRAME_55), qos=1)
    link.deliver(meter_report(METER_53, FRAME_53), qos=1)
    link.deliver(meter_report(METER_53, FRAME_53_BAD_CHECKSUM), qos=1)
    assert harness.collector.types() == [
        "device.online",
        "meter.reading",
        "meter.reading",
        "frame.invalid",
    ]
    keys = keys_of(harness.collector.events[1:])
    assert None not in keys and len(set(keys)) == 3
    assert harness.collector.deduplicated == []


def test_the_same_payload_from_another_gateway_is_new():
    harness, _, link = make()
    report = meter_report(METER_55, FRAME_55)
    link.deliver(report, qos=1)
    # The very same bytes on another gateway's topic, and that gateway's own report.
    link.deliver(report, topic=f"hy/gw/set/{OTHER_GW_ID}", qos=1)
    link.deliver(
        meter_report(METER_55, FRAME_55, gw_id=OTHER_GW_ID), topic=f"hy/gw/set/{OTHER_GW_ID}", qos=1
    )
    readings = harness.collector.of_type("meter.reading")
    assert len(readings) == 3
    keys = keys_of(readings)
    assert None not in keys and len(set(keys)) == 3
    assert keys[1].startswith(f"test:{OTHER_GW_ID}:")
    assert harness.collector.deduplicated == []


def test_a_redelivery_after_a_restart_is_stored_once_but_the_gateway_is_new_to_the_run():
    harness, _, link = make()
    report = meter_report(METER_55, FRAME_55)
    link.deliver(report, qos=1)
    # A new process on the same queues: they still hold the keys (EventCollector.keys).
    restarted, _, relink = make()
    restarted.collector.keys = set(harness.collector.keys)
    assert result_of(relink.deliver(report, qos=1)) == [None]
    assert restarted.collector.types() == ["device.online"]  # first_seen by this run
    assert restarted.collector.events[0].data["reason"] == "first_seen"
    assert [e.type for e in restarted.collector.deduplicated] == ["meter.reading"]


def test_the_keys_do_not_depend_on_a_device_online_in_the_same_delivery():
    harness, _, link = make()
    report = meter_report(METER_55, FRAME_55)
    link.deliver(report, qos=1)
    link.deliver(LAST_WILL, topic=SET_TOPIC + "/", qos=1)
    link.deliver(report, qos=1)  # redelivered after the gateway went offline: it returns
    assert harness.collector.types() == [
        "device.online",
        "meter.reading",
        "device.offline",
        "device.online",
    ]
    assert [e.type for e in harness.collector.deduplicated] == ["meter.reading"]


def test_a_retained_report_replayed_on_subscribe_is_stored_once():
    harness, _, link = make()
    report = meter_report(METER_55, FRAME_55)
    link.on_message(SET_TOPIC, report, 0, True)
    link.on_message(SET_TOPIC, report, 0, True)
    assert len(harness.collector.of_type("meter.reading")) == 1
    assert len(harness.collector.deduplicated) == 1


def test_qos0_reports_heartbeats_replies_and_wills_are_never_suppressed():
    """A QoS 0 message is never redelivered, so an equal one is a new report (a valve whose
    reading did not change); status (a heartbeat), periods and the last will repeat legitimately
    with the same bytes, so they carry no key even with QoS 1."""
    harness, _, link = make()
    report = meter_report(METER_55, FRAME_55)
    link.deliver(report)
    link.deliver(report)
    for _ in range(2):
        link.deliver(STATUS_REPORT, qos=1)
        link.deliver(PERIODS_REPORT, qos=1)
        link.deliver(LAST_WILL, topic=SET_TOPIC + "/", qos=1)
    assert harness.collector.types() == [
        "device.online",
        "meter.reading",
        "meter.reading",
        "gateway.status",
        "gateway.periods",
        "device.offline",
        "device.online",
        "gateway.status",
        "gateway.periods",
        "device.offline",
    ]
    assert keys_of(harness.collector.events) == [None] * 10
    assert harness.collector.deduplicated == []


@pytest.mark.parametrize(("window", "expected"), [(0, None), (None, None), ("5m", 300.0)])
def test_dedupe_window(window, expected):
    harness, _, link = make(dedupe_window=window)
    report = meter_report(METER_55, FRAME_55)
    link.deliver(report, qos=1)
    link.deliver(report, qos=1)
    readings = harness.collector.of_type("meter.reading")
    if expected is None:  # off: every delivery is stored, unkeyed
        assert keys_of(readings) == [None, None]
    else:
        assert [e.key[1] for e in readings] == [expected]
        assert len(harness.collector.deduplicated) == 1


# --- online / offline ---------------------------------------------------------------------------


def test_last_will_is_offline_and_next_message_is_returned_online():
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    link.deliver(LAST_WILL, topic=SET_TOPIC + "/")
    link.deliver(LAST_WILL, topic=SET_TOPIC + "/")  # a second will: no second event
    link.deliver(meter_report(METER_55, FRAME_55))
    assert harness.collector.types() == [
        "device.online",
        "gateway.status",
        "device.offline",
        "device.online",
        "meter.reading",
    ]
    assert harness.collector.events[2].data == {"reason": "last_will"}
    assert harness.collector.events[3].data == {"reason": "returned", "msg_id": 20}


def test_silence_longer_than_offline_after_is_offline_but_not_while_the_link_is_down():
    harness, clock, link = make(offline_after=60)
    link.deliver(STATUS_REPORT)
    clock.advance(30)
    link.set_state(WAITING)  # our broker link is down: silence is ours, not the gateway's
    for _ in range(20):
        clock.advance(6)
    assert harness.collector.of_type("device.offline") == []
    link.set_state(CONNECTED)  # back at t=150: the gateway gets a full offline_after again
    for _ in range(9):
        clock.advance(6)
    assert harness.collector.of_type("device.offline") == []
    clock.advance(6)
    clock.advance(6)
    (offline,) = harness.collector.of_type("device.offline")
    assert offline.data["reason"] == "silent"
    assert offline.data["silent_for"] >= 60
    assert [(d.id, d.online) for d in harness.plugin.devices()] == [(GW_ID, False)]


def test_poll_after_asks_a_silent_gateway_once():
    harness, clock, link = make(poll_after=20, offline_after=60)
    link.deliver(STATUS_REPORT)
    for _ in range(12):
        clock.advance(2)
    assert link.published == [(GET_TOPIC, _status_request(), 1)]
    link.deliver(STATUS_REPORT)  # it answers: heard again, polled again only after 20 s more
    for _ in range(11):
        clock.advance(2)
    assert len(link.published) == 2


def _status_request() -> bytes:
    return b'{"gw":{"msg_id":1,"msg_gw_pr":0,"gw_id":"02345678903"},"data":{}}'


# --- commands -----------------------------------------------------------------------------------


def test_refresh_publishes_msg_1_and_returns_the_status():
    harness, _, link = make()
    d = result_of(harness.call("refresh", {"gw_id": GW_ID}))  # unknown gateway: allowed
    assert link.published == [(GET_TOPIC, _status_request(), 1)]
    assert harness.context.metrics.frames_out == 1
    link.deliver(STATUS_REPORT)
    assert d[0]["rssi"] == -98 and d[0]["csq"]["raw"] == "99,99"
    (result,) = data_of(harness, "command.result")
    assert result["command"] == "refresh" and result["ok"] is True and result["msg_id"] == 1
    assert (result["source"], result["request_id"]) == (None, None)  # a direct call


def test_command_result_says_who_asked():
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    with harness.context.invoked(Invocation("mqtt", "req-7")):
        ok = result_of(harness.call("refresh", {"gw_id": GW_ID}))
    assert harness.context.invocation == Invocation()  # restored after the call
    with harness.context.invoked(Invocation("http", None)):
        late = result_of(harness.call("reboot", {"gw_id": GW_ID}))
    link.deliver(STATUS_REPORT)  # answers the refresh (msg 1)
    link.deliver(stat_reply(30, 1))  # refuses the reboot
    assert ok[0]["rssi"] == -98 and late[0].check(DeviceRefused)
    results = data_of(harness, "command.result")
    assert [(r["command"], r["ok"], r["source"], r["request_id"]) for r in results] == [
        ("refresh", True, "mqtt", "req-7"),
        ("reboot", False, "http", None),
    ]


def test_commands_need_a_known_online_gateway():
    harness, _, link = make()
    unknown = result_of(harness.call("get_periods", {"gw_id": GW_ID}))[0]
    assert unknown.check(NotFound) and "has not been heard from" in unknown.getErrorMessage()
    link.deliver(STATUS_REPORT)
    link.deliver(LAST_WILL, topic=SET_TOPIC + "/")
    offline = result_of(harness.call("reboot", {"gw_id": GW_ID}))[0]
    assert offline.check(NotFound) and "offline" in offline.getErrorMessage()
    assert offline.value.status == 404
    assert link.published == []


def test_command_while_the_broker_link_is_down_is_503():
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    link.set_state(WAITING)
    failure = result_of(harness.call("get_periods", {"gw_id": GW_ID}))[0]
    assert failure.check(BrokerUnavailable) and failure.value.status == 503
    assert harness.plugin.correlator.pending == {}


def test_second_command_for_the_same_msg_id_is_409_until_the_first_is_answered():
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    first = result_of(harness.call("get_periods", {"gw_id": GW_ID}))
    second = result_of(harness.call("get_periods", {"gw_id": GW_ID}))
    assert second[0].check(Busy) and second[0].value.status == 409
    other = result_of(harness.call("read_now", {"gw_id": GW_ID, "main": True}))
    assert other == []  # msg 18 is independent of msg 2
    link.deliver(PERIODS_REPORT)
    assert first[0]["main_interval"] == 10
    link.deliver(stat_reply(18, 2))
    assert other == [{"stat": {"code": 2, "ok": True, "name": "ok"}}]
    assert result_of(harness.call("get_periods", {"gw_id": GW_ID})) == []  # free again


@pytest.mark.parametrize(
    ("command", "arguments", "msg_id", "expected"),
    [
        (
            "set_periods",
            {
                "main_interval": 10,
                "copy_interval": 60,
                "heating_start": "11-15",
                "heating_end": "03-15",
            },
            12,
            b'{"main_interval":10,"copy_interval":60,"heating_start":"20XX-11-15",'
            b'"heating_end":"20XX-03-15"}',
        ),
        (
            "read_now",
            {"main": True, "copy": False, "upload": True},
            18,
            b'{"main_immediately":1,"copy_immediately":0,"up_immediately":1}',
        ),
        ("reboot", {}, 30, b"{}"),
        ("get_periods", {}, 2, b"{}"),
    ],
)
def test_stat_commands_publish_the_firmware_format_and_map_stat(
    command, arguments, msg_id, expected
):
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    ok = result_of(harness.call(command, {"gw_id": GW_ID, **arguments}))
    topic, payload, qos = link.published[-1]
    assert (topic, qos) == (GET_TOPIC, 1)
    assert payload == (
        f'{{"gw":{{"msg_id":{msg_id},"msg_gw_pr":0,"gw_id":"{GW_ID}"}},"data":'.encode()
        + expected
        + b"}"
    )
    link.deliver(stat_reply(msg_id, 2))
    assert ok[0]["stat"] == {"code": 2, "ok": True, "name": "ok"}
    # stat 1 from the gateway: 502 with the gateway's own code.
    refused = result_of(harness.call(command, {"gw_id": GW_ID, **arguments}))
    link.deliver(stat_reply(msg_id, 1))
    assert refused[0].check(DeviceRefused)
    assert refused[0].value.status == 502 and refused[0].value.code == 1
    assert "stat 1 (failed)" in refused[0].getErrorMessage()
    results = data_of(harness, "command.result")
    assert [r["ok"] for r in results] == [True, False]
    assert results[1]["error"]["code"] == 1


def test_no_answer_is_504_and_a_late_answer_is_counted():
    harness, clock, link = make(command_timeout=5)
    link.deliver(STATUS_REPORT)
    d = result_of(harness.call("reboot", {"gw_id": GW_ID}))
    clock.advance(5)
    assert d[0].check(DeviceTimeout) and d[0].value.status == 504
    link.deliver(stat_reply(30, 2))
    assert harness.context.metrics.gauges["unsolicited_replies"][1]() == 1
    assert data_of(harness, "command.result")[0]["error"]["code"] == "timeout"


def test_bad_arguments_are_400():
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    for command, arguments, message in [
        ("reboot", {"gw_id": "123"}, "gw_id"),
        ("set_valve", {"gw_id": GW_ID, "meter_id": METER_55, "opening": 101}, "opening"),
        ("set_valve", {"gw_id": GW_ID, "meter_id": METER_55, "opening": 50.05}, "0.1 %"),
        ("set_valve", {"gw_id": GW_ID, "meter_id": METER_53, "opening": 50.5}, "whole percent"),
        ("set_valve", {"gw_id": GW_ID, "meter_id": "27100583018801", "opening": 5}, "not a known"),
        ("transparent", {"gw_id": GW_ID, "frame": "ABC"}, "odd number"),
        ("transparent", {"gw_id": GW_ID, "frame": "6816", "port": 6}, "port"),
        ("read_now", {"gw_id": GW_ID, "everything": True}, "unknown argument"),
        ("refresh", {"gw_id": "FFFFFFFFFFF"}, "broadcast"),
        ("set_valve", {"gw_id": GW_ID, "meter_id": "27100583203406", "opening": 5}, "port"),
    ]:
        failure = result_of(harness.call(command, arguments))[0]
        assert failure.check(BadArguments), (command, arguments, failure)
        assert message in failure.getErrorMessage(), failure.getErrorMessage()
    assert link.published == []


def test_set_valve_55h_sends_the_vendor_frame_and_reports_the_ack():
    harness, clock, link = make()
    link.deliver(meter_report(METER_55, FRAME_55))  # the address comes from this report
    d = result_of(harness.call("set_valve", {"gw_id": GW_ID, "meter_id": METER_55, "opening": 50}))
    topic, payload, _ = link.published[-1]
    sent = json.loads(payload)
    assert topic == GET_TOPIC
    assert sent["data"] == {
        "transparent_port": 0,
        "transparent": VALVE_55_OPEN_50,
        "transparent_count": 5,
    }
    link.deliver(stat_reply(40, 2))
    clock.advance(8)  # past command_timeout (5 s): now the reply phase runs
    assert d == []
    link.deliver(transparent_reply(VALVE_55_ACK))
    assert d[0] == {
        "gw_id": GW_ID,
        "meter_id": METER_55,
        "meter_type": "55",
        "address": "27100583001111",
        "opening_requested": 50.0,
        "frame_sent": VALVE_55_OPEN_50,
        "stat": {"code": 2, "ok": True, "name": "ok"},
        "reply_frame": VALVE_55_ACK,
        "state": "done",
        "confirmed": True,
        "opening_percent": None,
    }


def test_set_valve_53h_unseen_meter_uses_the_manufacturer_code_and_checks_the_echo():
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    d = result_of(harness.call("set_valve", {"gw_id": GW_ID, "meter_id": METER_53, "opening": 50}))
    assert json.loads(link.published[-1][1])["data"]["transparent"] == VALVE_53_OPEN_50
    link.deliver(stat_reply(40, 2))
    link.deliver(transparent_reply(VALVE_53_REPLY_50))
    assert (d[0]["state"], d[0]["confirmed"], d[0]["opening_percent"]) == ("done", True, 50.0)


def test_set_valve_reply_timeout_is_504_and_failures_are_502():
    harness, clock, link = make(transparent_timeout=10)
    link.deliver(STATUS_REPORT)
    args = {"gw_id": GW_ID, "meter_id": METER_55, "opening": 50}
    d = result_of(harness.call("set_valve", args))
    link.deliver(stat_reply(40, 2))
    clock.advance(10)
    assert d[0].check(DeviceTimeout) and "meter's reply did not come" in d[0].getErrorMessage()
    # 401: the gateway refused the msg 40 itself.
    d = result_of(harness.call("set_valve", args))
    link.deliver(stat_reply(40, 401))
    assert d[0].check(DeviceRefused) and d[0].value.code == 401
    assert "bad_request" in d[0].getErrorMessage()
    # The valve's 96H ack with another DI: the vendor's "failed".
    d = result_of(harness.call("set_valve", args))
    link.deliver(stat_reply(40, 2))
    failed_ack = cjt188.build_frame(0x55, "27100583001111", 0x96, 0xA019, 1).hex().upper()
    link.deliver(transparent_reply(failed_ack))
    assert d[0].check(DeviceRefused) and d[0].value.code == "failed"
    # A garbled reply frame: 502 invalid_reply and a frame.invalid event.
    d = result_of(harness.call("set_valve", args))
    link.deliver(stat_reply(40, 2))
    link.deliver(transparent_reply(VALVE_55_ACK[:-4] + "0016"))
    assert d[0].check(DeviceRefused) and d[0].value.code == "invalid_reply"
    assert data_of(harness, "frame.invalid")[-1]["reason"] == "checksum"


def test_transparent_passes_the_frame_and_decodes_the_reply():
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    request = _with_checksum("6853232273100011110103901F00")
    d = result_of(
        harness.call("transparent", {"gw_id": GW_ID, "frame": "fefefe" + request, "count": 3})
    )
    sent = json.loads(link.published[-1][1])["data"]
    assert sent == {
        "transparent_port": 0,
        "transparent": "FEFEFE" + request,
        "transparent_count": 3,
    }
    link.deliver(stat_reply(40, 2))
    link.deliver(transparent_reply(FRAME_53))
    (frame,) = d[0]["frames"]
    assert d[0]["stat"]["code"] == 2
    assert frame["hex"] == FRAME_53
    assert frame["payload"]["decoder"] == "household_valve_53"
    assert frame["frame"]["address"] == "23227310001111"


def test_transparent_without_waiting_for_the_meter_returns_on_stat():
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    d = result_of(
        harness.call("transparent", {"gw_id": GW_ID, "frame": "6816", "wait_reply": False})
    )
    link.deliver(stat_reply(40, 2))
    assert d[0]["frames"] == [] and d[0]["stat"]["code"] == 2


def test_cancelled_command_frees_its_slot_and_stop_fails_the_rest():
    harness, _, link = make()
    link.deliver(STATUS_REPORT)
    d = harness.call("get_periods", {"gw_id": GW_ID})
    d.addErrback(lambda f: None)
    d.cancel()
    assert harness.plugin.correlator.pending == {}
    pending = result_of(harness.call("get_periods", {"gw_id": GW_ID}))
    harness.stop()
    assert pending[0].check(BrokerUnavailable)


def test_a_message_of_several_events_that_fail_is_an_error_value_not_a_failure():
    """QoS 0: nobody holds the result, so it must not fail (a traceback per message at GC);
    QoS 1: the link logs the error value before acknowledging."""
    harness, _, _ = make()
    harness.collector.durable = "manual"
    d = harness.plugin.on_mqtt_message(f"hy/gw/set/{GW_ID}", STATUS_REPORT, 0, False)
    assert harness.collector.types() == ["device.online", "gateway.status"]
    harness.collector.fail(OSError("No space left on device"))
    outcome = []
    d.addBoth(outcome.append)
    assert isinstance(outcome[0], OSError) and "No space" in str(outcome[0])


def test_gauges():
    harness, _, link = make()
    link.deliver(meter_report(METER_55, FRAME_55))
    gauges = {name: read() for name, (_, read) in harness.context.metrics.gauges.items()}
    assert gauges["gateways_known"] == 1 and gauges["gateways_online"] == 1
    assert gauges["meters_known"] == 1 and gauges["mqtt_connected"] == 1.0
    assert gauges["commands_in_flight"] == 0
    online = sum(1 for device in harness.plugin.devices() if device.online)
    assert harness.plugin.devices_online() == online == 2  # the gateway and its meter


def test_decoders_are_registered_for_the_cli():
    assert set(HeatingPlugin.decoders) == {"cjt188", "hygw"}
    decoded = HeatingPlugin.decoders["cjt188"](VALVE_55_ACK)
    assert decoded["payload"]["decoder"] == "valve_55_ack"


def _with_checksum(hex_without_cs: str) -> str:
    body = bytes.fromhex(hex_without_cs)
    return (body + bytes([sum(body) & 0xFF, 0x16])).hex().upper()


def test_config_file_with_password_file_and_env(tmp_path, monkeypatch):
    from gatewayd.config import load_config

    (tmp_path / "mqtt.password").write_text("hunter2\n")
    monkeypatch.setenv("HEATING_BROKER", "broker.example")
    (tmp_path / "gatewayd.yaml").write_text(
        "gateway: {id: edge-01, state_dir: state}\n"
        "plugins:\n"
        "  heating:\n"
        "    type: heating\n"
        "    broker:\n"
        '      host: "${HEATING_BROKER}"\n'
        "      username: gatewayd\n"
        "      password_file: mqtt.password\n"
        "      client_id: gatewayd-edge-01\n"
        "      tls: {ca_file: /etc/ssl/certs/ca-certificates.crt}\n"
        "    offline_after: 45m\n"
        "sinks: {store: {type: sqlite, path: events.db}}\n"
        "routes: [{match: {type: '*'}, sinks: [store]}]\n"
    )
    config = load_config(tmp_path / "gatewayd.yaml").plugins["heating"]
    assert config.broker.host == "broker.example"
    assert config.broker.password.get_secret_value() == "hunter2"
    assert config.offline_after == 2700.0
    assert "hunter2" not in repr(config) and "hunter2" not in config.model_dump_json()


def test_a_gateway_another_box_hears_later_goes_offline_here_once():
    import time

    harness, clock, link = make()
    link.deliver(STATUS_REPORT)
    gw_id = next(iter(harness.plugin.registry.gateways))
    came = harness.plugin.registry.gateways[gw_id].online_since_wall
    harness.plugin.device_elsewhere(gw_id, "box-b", since=came - 5)  # ours is newer: kept
    assert harness.plugin.registry.gateways[gw_id].online
    harness.plugin.device_elsewhere(gw_id, "box-b", since=time.time() + 1)
    harness.plugin.device_elsewhere(gw_id, "box-b", since=time.time() + 2)  # said once
    assert not harness.plugin.registry.gateways[gw_id].online
    assert data_of(harness, "device.offline") == [{"reason": "moved_elsewhere", "box": "box-b"}]
    harness.plugin.device_elsewhere("unknown", "box-b", since=time.time())  # nothing to do
