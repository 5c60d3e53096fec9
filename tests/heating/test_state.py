"""Registry and correlation of the heating plugin, driven by a Clock (no reactor, no broker)."""

from __future__ import annotations

import pytest
from gatewayd.plugins.heating.state import (
    FIRST_SEEN,
    REPLY,
    RETURNED,
    Correlator,
    GatewayRegistry,
)
from twisted.internet import defer
from twisted.internet.task import Clock

from gatewayd.plugin import Busy, DeviceTimeout


def outcome(d: defer.Deferred) -> list:
    """What a Deferred fired with so far: [] (nothing), [result] or [Failure]."""
    seen: list = []
    d.addBoth(seen.append)
    return seen


def test_one_command_per_gateway_and_msg_id_then_resolve_frees_the_slot():
    clock = Clock()
    correlator = Correlator(clock)
    pending = correlator.begin("02345678903", 12, "set_periods", 5.0)
    with pytest.raises(Busy, match="msg 12 .set_periods. in flight"):
        correlator.begin("02345678903", 12, "set_periods", 5.0)
    # Another msg_id, or another gateway, is independent.
    other = correlator.begin("02345678903", 18, "read_now", 5.0)
    third = correlator.begin("02345678904", 12, "set_periods", 5.0)
    got = outcome(pending.deferred)
    correlator.resolve(pending, "reply")
    assert got == ["reply"]
    assert correlator.get("02345678903", 12) is None
    again = correlator.begin("02345678903", 12, "set_periods", 5.0)
    assert again is not pending
    assert {p.key for p in correlator.pending.values()} == {
        ("02345678903", 12),
        ("02345678903", 18),
        ("02345678904", 12),
    }
    for p in (other, third, again):
        correlator.discard(p)
    assert clock.getDelayedCalls() == []


def test_timeout_is_device_timeout_and_frees_the_slot():
    clock = Clock()
    correlator = Correlator(clock)
    pending = correlator.begin("02345678903", 30, "reboot", 5.0)
    got = outcome(pending.deferred)
    clock.advance(4.9)
    assert got == []
    clock.advance(0.1)
    assert got[0].check(DeviceTimeout)
    assert "did not answer msg 30 (reboot) within 5 s" in got[0].getErrorMessage()
    assert got[0].value.status == 504
    assert correlator.pending == {}
    # A late reply finds nothing to resolve.
    correlator.resolve(pending, "late")
    assert len(got) == 1


def test_transparent_reply_phase_has_its_own_deadline():
    clock = Clock()
    correlator = Correlator(clock)
    pending = correlator.begin("02345678903", 40, "set_valve", 2.0, wait_reply=True)
    got = outcome(pending.deferred)
    clock.advance(1.5)
    correlator.await_reply(pending, {"code": 2, "ok": True, "name": "ok"}, 10.0)
    assert pending.phase == REPLY
    clock.advance(5.0)  # past the stat deadline: the stat timer was replaced
    assert got == []
    clock.advance(5.0)
    assert got[0].check(DeviceTimeout)
    assert "accepted set_valve (stat 2) but the meter's reply did not come within 10 s" in (
        got[0].getErrorMessage()
    )


def test_cancelling_a_command_frees_the_slot():
    clock = Clock()
    correlator = Correlator(clock)
    pending = correlator.begin("02345678903", 1, "refresh", 5.0)
    got = outcome(pending.deferred)
    pending.deferred.cancel()
    assert got[0].check(defer.CancelledError)
    assert correlator.pending == {}
    assert clock.getDelayedCalls() == []
    correlator.begin("02345678903", 1, "refresh", 5.0)


def test_fail_all_rejects_every_command():
    correlator = Correlator(Clock())
    a = outcome(correlator.begin("02345678903", 1, "refresh", 5.0).deferred)
    b = outcome(correlator.begin("02345678904", 2, "get_periods", 5.0).deferred)
    correlator.fail_all(lambda p: RuntimeError(p.command))
    assert [a[0].getErrorMessage(), b[0].getErrorMessage()] == ["refresh", "get_periods"]


def test_registry_online_transitions_and_silence():
    clock = Clock()
    registry = GatewayRegistry(clock)
    gateway, came = registry.heard("02345678903")
    assert came == FIRST_SEEN and gateway.online
    assert registry.heard("02345678903")[1] is None
    clock.advance(10)
    assert registry.silent(10.0, since=0.0) == [gateway]
    # Silence while our link was down (link up again at t=5) does not count.
    assert registry.silent(10.0, since=5.0) == []
    assert registry.went_offline("02345678903") is True
    assert registry.went_offline("02345678903") is False  # already offline
    assert registry.heard("02345678903")[1] == RETURNED
    # A last will from a gateway never heard: it is recorded offline, and reported.
    assert registry.went_offline("02345678999") is True
    assert registry.counts() == (2, 1, 0)


def test_registry_poll_once_per_silence():
    clock = Clock()
    registry = GatewayRegistry(clock)
    gateway, _ = registry.heard("02345678903")
    clock.advance(6)
    assert registry.to_poll(5.0, since=0.0) == [gateway]
    gateway.polled_at = clock.seconds()
    clock.advance(1)
    assert registry.to_poll(5.0, since=0.0) == []
    registry.heard("02345678903")
    clock.advance(6)
    assert registry.to_poll(5.0, since=0.0) == [gateway]


def test_registry_is_bounded():
    registry = GatewayRegistry(Clock(), max_gateways=2)
    registry.heard("00000000001")
    registry.heard("00000000002")
    assert registry.heard("00000000003") == (None, None)
    assert registry.untracked == 1
    assert registry.went_offline("00000000003") is False


def test_a_full_registry_forgets_the_gateway_offline_longest_for_a_new_one():
    clock = Clock()
    registry = GatewayRegistry(clock, max_gateways=3)
    for n in (1, 2, 3):
        registry.heard(f"0000000000{n}")
        clock.advance(1)
    registry.went_offline("00000000002")
    registry.went_offline("00000000001")
    gateway, came_online = registry.heard("00000000004")
    assert gateway is not None and came_online == "first_seen"
    assert set(registry.gateways) == {"00000000002", "00000000003", "00000000004"}
    assert (registry.forgotten, registry.untracked) == (1, 0)
