"""``fleet: true`` on the heating plugin, Clock-driven: each gateway handled by one box."""

from __future__ import annotations

import json

from gatewayd.plugins.heating.fleet import FleetShare
from twisted.internet.task import Clock

from gatewayd.fleet.membership import Membership, rendezvous_owner
from gatewayd.testing import PluginHarness

from .test_plugin_unit import PluginUnderTest
from .vectors import FRAME_55, METER_55, meter_report

BOXES = {"t1", "t2"}
IDS = [f"0234567{n:04d}" for n in range(40)]
MINE = next(g for g in IDS if rendezvous_owner(g, BOXES) == "t1")
THEIRS = next(g for g in IDS if rendezvous_owner(g, BOXES) == "t2")


def topic(gw_id: str) -> str:
    return f"hy/gw/set/{gw_id}"


def start(**config):
    clock = Clock()
    harness = PluginHarness(
        PluginUnderTest,
        {"broker": {"client_id": "gatewayd-test"}, "offline_after": 60, "fleet": True, **config},
        reactor=clock,
    )
    membership = Membership("t1", clock, settle=1.0)
    harness.context.fleet = membership
    harness.start()
    membership.link_up()
    membership.status("t2", json.dumps({"status": "online"}).encode())
    clock.advance(1.0)
    return harness, clock, membership, harness.plugin.link


def report(link, gw_id: str):
    return link.deliver(meter_report(METER_55, FRAME_55, gw_id=gw_id), topic=topic(gw_id))


def test_only_this_boxs_gateways_are_decoded():
    harness, _, _, link = start()
    report(link, MINE)
    report(link, THEIRS)
    assert {e.device for e in harness.collector.events} == {MINE, METER_55}
    assert harness.plugin.fleet.skipped == 1 and harness.context.metrics.frames_in == 1
    assert isinstance(harness.plugin.fleet, FleetShare)
    gauges = harness.context.metrics.gauges
    assert gauges["fleet_skipped_total"][1]() == 1 and gauges["fleet_gateways_owned"][1]() == 1


def test_a_box_that_dies_hands_over_and_one_that_returns_takes_back():
    harness, clock, membership, link = start()
    report(link, MINE)
    report(link, THEIRS)
    membership.status("t2", b"offline")  # t2's last will: t1 owns everything now
    online = [e for e in harness.collector.of_type("device.online") if e.device == THEIRS]
    assert [e.data for e in online] == [{"reason": "taken_over"}]
    assert harness.plugin.registry.get(THEIRS).online
    report(link, THEIRS)
    assert harness.plugin.fleet.skipped == 1  # handled now
    membership.status("t2", b"online")  # t2 is back: THEIRS goes back to it
    offline = [e for e in harness.collector.of_type("device.offline") if e.device == THEIRS]
    assert [e.data for e in offline] == [{"reason": "moved_elsewhere", "box": "t2"}]
    assert harness.plugin.registry.get(MINE).online


def test_a_gateway_heard_too_long_ago_is_not_taken_over():
    harness, clock, membership, link = start(offline_after=30)
    report(link, THEIRS)
    clock.advance(31)
    membership.status("t2", b"offline")
    assert not [e for e in harness.collector.of_type("device.online") if e.device == THEIRS]


def test_commands_for_another_boxs_gateway_are_404_naming_the_box():
    harness, _, membership, link = start()
    failures = []
    harness.call("refresh", {"gw_id": THEIRS}).addErrback(failures.append)
    assert failures[0].value.status == 404
    assert failures[0].value.message == f"gateway {THEIRS} is handled by box t2"
    membership.link_down()  # the fleet broker is gone: this box owns nothing
    failures.clear()
    harness.call("refresh", {"gw_id": MINE}).addErrback(failures.append)
    assert "not ready" in failures[0].value.message


def test_a_lost_fleet_link_sets_the_gateways_offline_here():
    harness, _, membership, link = start()
    report(link, MINE)
    membership.link_down()
    offline = [e.data for e in harness.collector.of_type("device.offline") if e.device == MINE]
    assert offline == [{"reason": "fleet_unavailable"}]
    report(link, MINE)
    assert harness.plugin.fleet.skipped == 1


def test_fleet_without_a_membership_refuses_to_start():
    harness = PluginHarness(
        PluginUnderTest, {"broker": {"client_id": "gatewayd-test"}, "fleet": True}, reactor=Clock()
    )
    try:
        harness.plugin.start()
    except ValueError as exc:
        assert "needs an mqtt sink" in str(exc)
    else:
        raise AssertionError("started without a membership")


def test_check_config_refuses_fleet_without_an_mqtt_sink(tmp_path):
    from gatewayd.config import ConfigError, load_config

    path = tmp_path / "gatewayd.yaml"
    path.write_text(
        f"""\
gateway: {{id: t1, state_dir: {tmp_path}}}
plugins:
  heating:
    type: heating
    broker: {{host: 127.0.0.1, port: 1883}}
    fleet: true
sinks:
  store: {{type: sqlite, path: events.db}}
routes:
  - {{sinks: [store]}}
"""
    )
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}:6: plugins.heating.fleet: fleet: true needs an mqtt")
    else:
        raise AssertionError("accepted")
    text = path.read_text().replace(
        "routes:", "  north: {type: mqtt, broker: {host: 127.0.0.1, port: 1883}}\nroutes:"
    )
    path.write_text(text)
    assert load_config(path, environ={}).plugins["heating"].fleet is True
