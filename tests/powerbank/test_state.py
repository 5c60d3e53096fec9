"""The cabinet flows of plugins/powerbank/state.py, driven by a Clock and a fake connection.

Events go to an ``EventCollector(durable="manual")``: a test decides when an event becomes
durable and checks that AM / AR never leave before that. The collector also keeps the
idempotency keys as the queue files do, so ``Flows.restart()`` plays the daemon after a crash.
"""

from __future__ import annotations

import pytest
from gatewayd.plugins.powerbank.state import MAX_REMEMBERED, CabinetRegistry, FlowSettings
from gatewayd.protocols.powerbank import (
    Heartbeat,
    LendRequest,
    LendResult,
    LendResultAck,
    ReturnQuery,
    ReturnQueryAnswer,
    ReturnResult,
    ReturnResultAck,
    SlotState,
    SlotStatus,
    StatusQuery,
    StatusReport,
)
from twisted.internet import defer
from twisted.internet.task import Clock

from gatewayd.events import Event
from gatewayd.plugin import Busy, DeviceRefused, DeviceTimeout, NotFound
from gatewayd.testing import EventCollector

IMEI = "860000000000001"
OTHER = "860000000000002"
BANK = "0000000012"


class FakeConnection:
    """Records what the registry sends and why it closed the connection."""

    def __init__(self, address: str = "10.0.0.1:4000") -> None:
        self.address = address
        self.imei: str | None = None
        self.sent: list = []
        self.closed: str | None = None

    def send_packet(self, packet) -> None:
        self.sent.append(packet)

    def close(self, reason: str) -> None:
        self.closed = reason


class Flows:
    """A registry on a Clock with manual durability, plus helpers to play a cabinet.

    Keyed events go to the collector as the queues take them: stored once while the key is
    kept, for its window on the Clock (the collector alone keeps keys for ever). ``restart()``
    is a new registry (a new process) on the same durable keys.
    """

    def __init__(
        self, durable: str = "manual", *, keys: dict[str, float] | None = None, **settings
    ) -> None:
        self.clock = Clock()
        self.collector = EventCollector(durable=durable)
        #: key -> expiry on the Clock: what the queue files hold, shared across restarts
        self.expires: dict[str, float] = {} if keys is None else keys
        self.collector.keys = {k for k, t in self.expires.items() if t > self.clock.seconds()}
        self.banks: set[str] | None = settings.pop("banks", None)
        self.allowed: set[str] | None = settings.pop("allowed", None)
        self.settings = settings
        self.registry = CabinetRegistry(
            self.clock,
            self.emit,
            FlowSettings(**settings),
            is_allowed=lambda imei: self.allowed is None or imei in self.allowed,
            accepts_bank=lambda bank: self.banks is None or bank in self.banks,
            seen=self.seen,
            forget=self.forget,
        )

    def emit(self, type_, device, data, raw, *, key=None, window=600.0) -> defer.Deferred:
        if key is not None:
            now = self.clock.seconds()
            if self.expires.get(key, now) <= now:
                self.collector.keys.discard(key)
            if key not in self.collector.keys:
                self.expires[key] = now + window
        event = Event(type_, device, data, raw, key=None if key is None else (key, window))
        return self.collector(event)

    def seen(self, key: str) -> bool:
        return self.collector.seen(key) and self.expires[key] > self.clock.seconds()

    def forget(self, key: str) -> None:
        self.collector.forget(key)
        self.expires.pop(key, None)

    def restart(self, durable: str = "manual", **settings) -> Flows:
        """The daemon after a crash: nothing in memory, the durable keys kept."""
        flows = Flows(durable, keys=self.expires, **{**self.settings, **settings})
        flows.clock.advance(self.clock.seconds())
        return flows

    def connect(self, imei: str = IMEI, address: str = "10.0.0.1:4000") -> FakeConnection:
        conn = FakeConnection(address)
        self.registry.packet_received(conn, Heartbeat(imei), "CH")
        return conn

    def receive(self, conn: FakeConnection, packet) -> None:
        self.registry.packet_received(conn, packet, f"raw {packet.command}")

    def types(self) -> list[str]:
        return self.collector.types()

    def data(self, type_name: str) -> list[dict]:
        return [e.data for e in self.collector.of_type(type_name)]

    def release(self) -> None:
        self.collector.release()


def results(d: defer.Deferred) -> list:
    """Collect a Deferred's outcome (value or Failure) without waiting."""
    out: list = []
    d.addBoth(out.append)
    return out


def status(*slots: SlotStatus) -> StatusReport:
    return StatusReport(IMEI, tuple(slots))


# --- binding, online / offline ---------------------------------------------------------------


def test_first_frame_binds_connection_and_emits_online():
    flows = Flows(durable="now")
    conn = flows.connect()
    assert conn.imei == IMEI
    assert flows.types() == ["device.online"]
    assert flows.data("device.online") == [{"address": "10.0.0.1:4000", "replaced": False}]
    assert flows.registry.online_count == 1
    flows.registry.connection_lost(conn, "idle_timeout")
    assert flows.data("device.offline") == [{"reason": "idle_timeout", "address": "10.0.0.1:4000"}]
    assert flows.registry.online_count == 0


def test_heartbeat_is_an_event_only_when_enabled():
    quiet = Flows(durable="now")
    conn = quiet.connect()
    quiet.clock.advance(5)
    quiet.receive(conn, Heartbeat(IMEI))
    assert quiet.types() == ["device.online"]
    assert quiet.registry.cabinets[IMEI].last_seen == 5
    loud = Flows(durable="now", emit_heartbeats=True)
    loud.connect()
    assert loud.types() == ["device.online", "heartbeat"]


def test_new_connection_of_same_imei_replaces_old_and_inherits_pending_lend():
    flows = Flows()
    old = flows.connect(address="10.0.0.1:1")
    outcome = results(flows.registry.lend(IMEI, 2, BANK))
    new = flows.connect(address="10.0.0.1:2")
    assert old.closed == "replaced"
    assert flows.data("device.online")[-1] == {"address": "10.0.0.1:2", "replaced": True}
    # The old connection's close does not take the cabinet offline.
    flows.registry.connection_lost(old, "replaced")
    assert "device.offline" not in flows.types()
    # The pending lend goes on; its acknowledgement goes to the new connection.
    flows.receive(new, LendResult(IMEI, 2, BANK, True))
    flows.release()
    assert new.sent == [LendResultAck(IMEI, 2, BANK, True)]
    assert old.sent == [LendRequest(IMEI, 2, BANK)]
    assert outcome == [{"outcome": "succeeded", "slot": 2, "bank": BANK}]


def test_frames_of_another_imei_on_a_bound_connection_are_invalid():
    flows = Flows(durable="now")
    conn = flows.connect()
    flows.receive(conn, ReturnQuery(OTHER, 1, BANK))
    assert flows.types() == ["device.online", "frame.invalid"]
    assert flows.data("frame.invalid")[0]["reason"] == "imei_mismatch"
    assert conn.sent == []
    assert OTHER not in flows.registry.cabinets


def test_allow_imei_refuses_other_cabinets_and_closes():
    flows = Flows(durable="now", allowed={IMEI})
    stranger = FakeConnection()
    flows.receive(stranger, Heartbeat(OTHER))
    assert stranger.closed == "unknown_device"
    assert flows.types() == ["frame.invalid"]
    event = flows.collector.events[0]
    assert (event.device, event.data["reason"]) == (OTHER, "unknown_device")
    assert OTHER not in flows.registry.cabinets
    flows.connect(IMEI)
    assert flows.types() == ["frame.invalid", "device.online"]


def test_commands_for_unknown_or_offline_cabinets_are_404():
    flows = Flows(durable="now")
    with pytest.raises(NotFound, match="unknown"):
        flows.registry.lend(IMEI, 1, BANK)
    conn = flows.connect()
    flows.registry.connection_lost(conn, "closed")
    with pytest.raises(NotFound, match="offline"):
        flows.registry.query(IMEI)


def test_server_commands_from_a_cabinet_are_invalid():
    flows = Flows(durable="now")
    conn = flows.connect()
    flows.receive(conn, StatusQuery(IMEI))
    assert flows.data("frame.invalid")[0]["reason"] == "unexpected_command"


# --- query -----------------------------------------------------------------------------------


def test_query_sends_cq_and_answers_with_the_status():
    flows = Flows(durable="now")
    conn = flows.connect()
    outcome = results(flows.registry.query(IMEI))
    assert conn.sent == [StatusQuery(IMEI)]
    flows.receive(
        conn,
        status(
            SlotStatus(1, SlotState.FULL, BANK),
            SlotStatus(2, SlotState.NOT_FULL, "B2"),
            SlotStatus(3, SlotState.FAULT),
        ),
    )
    slots = [
        {"slot": 1, "state": "full", "bank": BANK},
        {"slot": 2, "state": "not_full", "bank": "B2"},
        {"slot": 3, "state": "fault", "bank": None},
    ]
    assert outcome == [{"slots": slots}]
    # command.result is the core's (Command.call), not the registry's: see test_plugin_commands
    assert flows.types() == ["device.online", "slots.status", "alarm.slot_fault"]
    assert flows.data("slots.status") == [{"slots": slots}]
    assert flows.data("alarm.slot_fault") == [{"slot": 3, "bank": None}]
    # A slot that stays faulted raises no new alarm; a newly faulted one does.
    flows.receive(conn, status(SlotStatus(2, SlotState.FAULT), SlotStatus(3, SlotState.FAULT)))
    assert flows.data("alarm.slot_fault") == [{"slot": 3, "bank": None}, {"slot": 2, "bank": None}]
    assert flows.data("slots.status")[-1]["slots"][0] == {"slot": 1, "state": "empty", "bank": None}


def test_query_without_answer_is_504():
    flows = Flows(durable="now", query_timeout=10)
    flows.connect()
    outcome = results(flows.registry.query(IMEI))
    flows.clock.advance(9.9)
    assert outcome == []
    flows.clock.advance(0.2)
    assert outcome[0].check(DeviceTimeout)
    assert flows.clock.getDelayedCalls() == []


# --- lend ------------------------------------------------------------------------------------


def test_lend_succeeded_is_acknowledged_only_after_the_event_is_durable():
    flows = Flows()
    conn = flows.connect()
    flows.release()
    outcome = results(flows.registry.lend(IMEI, 2, BANK))
    assert conn.sent == [LendRequest(IMEI, 2, BANK)]
    flows.receive(conn, LendResult(IMEI, 2, BANK, True))
    assert flows.data("lend.succeeded") == [{"slot": 2, "bank": BANK, "requested": True}]
    assert flows.collector.of_type("lend.succeeded")[0].raw == "raw MC"
    assert conn.sent == [LendRequest(IMEI, 2, BANK)]  # no AM yet
    assert outcome == []
    flows.release()
    assert conn.sent[1:] == [LendResultAck(IMEI, 2, BANK, True)]
    assert outcome == [{"outcome": "succeeded", "slot": 2, "bank": BANK}]
    assert flows.clock.getDelayedCalls() == []  # the lend timer is gone
    assert flows.registry.cabinets[IMEI].inventory[2] == {"slot": 2, "state": "empty", "bank": None}


def test_lend_failed_is_refused_502_and_ar_after_durable():
    flows = Flows()
    conn = flows.connect()
    outcome = results(flows.registry.lend(IMEI, 1, BANK))
    flows.receive(conn, LendResult(IMEI, 1, BANK, False))
    assert flows.data("lend.failed") == [{"slot": 1, "bank": BANK, "requested": True}]
    assert conn.sent == [LendRequest(IMEI, 1, BANK)]
    flows.release()
    assert conn.sent[1:] == [LendResultAck(IMEI, 1, BANK, False)]
    assert outcome[0].check(DeviceRefused)
    assert outcome[0].value.code == "lend_failed"


def test_second_lend_on_the_same_cabinet_is_busy():
    flows = Flows(durable="now")
    conn = flows.connect()
    flows.registry.lend(IMEI, 1, BANK)
    with pytest.raises(Busy):
        flows.registry.lend(IMEI, 2, "B2")
    assert conn.sent == [LendRequest(IMEI, 1, BANK)]  # never a second CC
    other = flows.connect(OTHER)
    flows.registry.lend(OTHER, 1, "B3")  # other cabinets are not blocked
    assert other.sent == [LendRequest(OTHER, 1, "B3")]


def test_lend_timeout_is_reconciled_when_the_bank_left_the_slot():
    flows = Flows(durable="now", lend_timeout=20, query_timeout=10)
    conn = flows.connect()
    outcome = results(flows.registry.lend(IMEI, 2, BANK))
    flows.clock.advance(19.9)
    assert conn.sent == [LendRequest(IMEI, 2, BANK)]
    flows.clock.advance(0.1)
    assert conn.sent == [LendRequest(IMEI, 2, BANK), StatusQuery(IMEI)]  # CQ, never CC again
    flows.receive(conn, status(SlotStatus(1, SlotState.FULL, "B1")))
    assert flows.data("lend.reconciled") == [{"slot": 2, "bank": BANK, "via": "status"}]
    assert outcome == [{"outcome": "reconciled", "slot": 2, "bank": BANK, "via": "status"}]
    # A late MC after that is acknowledged, but the lend is not recorded twice.
    flows.receive(conn, LendResult(IMEI, 2, BANK, True))
    assert conn.sent[-1] == LendResultAck(IMEI, 2, BANK, True)
    assert len(flows.data("lend.reconciled")) == 1
    assert "lend.succeeded" not in flows.types()


def test_lend_timeout_when_the_bank_is_still_in_the_slot():
    flows = Flows(durable="now", lend_timeout=20)
    conn = flows.connect()
    outcome = results(flows.registry.lend(IMEI, 2, BANK))
    flows.clock.advance(20)
    flows.receive(conn, status(SlotStatus(2, SlotState.FULL, BANK)))
    assert flows.data("lend.timeout") == [
        {"slot": 2, "bank": BANK, "bank_in_slot": True, "why": "bank_in_slot"}
    ]
    assert outcome[0].check(DeviceTimeout)
    assert "still shows the bank" in outcome[0].value.message
    assert flows.registry.cabinets[IMEI].lend is None  # the next lend may go


def test_months_of_timed_out_lends_leave_a_bounded_record():
    flows = Flows(durable="now", lend_timeout=20, query_timeout=10)
    flows.connect()
    for n in range(300):  # each lend times out, its bank never comes back to that slot
        results(flows.registry.lend(IMEI, n % 3 + 1, f"{n:010d}"))
        flows.clock.advance(20)  # no MC: ask for the status
        flows.clock.advance(10)  # no answer either: lend.timeout
    assert len(flows.data("lend.timeout")) == 300
    assert len(flows.registry.cabinets[IMEI].closed_lends) <= MAX_REMEMBERED


def test_lend_timeout_when_the_status_query_is_not_answered_either():
    flows = Flows(durable="now", lend_timeout=20, query_timeout=10)
    flows.connect()
    outcome = results(flows.registry.lend(IMEI, 3, BANK))
    flows.clock.advance(20)
    flows.clock.advance(10)
    assert flows.data("lend.timeout") == [
        {"slot": 3, "bank": BANK, "bank_in_slot": None, "why": "no_status"}
    ]
    assert outcome[0].check(DeviceTimeout)
    assert flows.clock.getDelayedCalls() == []


def test_late_mc_after_lend_timeout_is_acknowledged_and_reconciles_once():
    flows = Flows(lend_timeout=20, query_timeout=10)
    conn = flows.connect()
    outcome = results(flows.registry.lend(IMEI, 1, BANK))
    flows.clock.pump([20, 10])  # no MC, no AQ
    assert outcome[0].check(DeviceTimeout)
    flows.release()
    flows.receive(conn, LendResult(IMEI, 1, BANK, True))
    assert flows.data("lend.reconciled") == [{"slot": 1, "bank": BANK, "via": "late_result"}]
    assert conn.sent[-1] == StatusQuery(IMEI)  # AM only once durable
    flows.release()
    assert conn.sent[-1] == LendResultAck(IMEI, 1, BANK, True)
    # Its duplicate is answered again, still one lend.reconciled.
    flows.receive(conn, LendResult(IMEI, 1, BANK, True))
    assert conn.sent[-2:] == [LendResultAck(IMEI, 1, BANK, True)] * 2
    assert len(flows.data("lend.reconciled")) == 1


def test_mc_while_reconciling_settles_the_lend_as_reconciled():
    flows = Flows(durable="now", lend_timeout=20, query_timeout=10)
    conn = flows.connect()
    outcome = results(flows.registry.lend(IMEI, 1, BANK))
    flows.clock.advance(20)  # CQ sent
    flows.receive(conn, LendResult(IMEI, 1, BANK, True))
    assert outcome == [{"outcome": "reconciled", "slot": 1, "bank": BANK, "via": "late_result"}]
    flows.receive(conn, status(SlotStatus(2, SlotState.FULL, "B2")))  # the AQ comes after
    assert flows.types().count("lend.reconciled") == 1
    assert "lend.timeout" not in flows.types()


def test_duplicate_mc_is_answered_each_time_but_recorded_once():
    flows = Flows()
    conn = flows.connect()
    outcome = results(flows.registry.lend(IMEI, 2, BANK))
    mc = LendResult(IMEI, 2, BANK, True)
    flows.receive(conn, mc)
    flows.receive(conn, mc)  # resent before our AM: answered when the event is durable
    assert conn.sent == [LendRequest(IMEI, 2, BANK)]
    flows.release()
    assert conn.sent[1:] == [mc.ack(), mc.ack()]
    flows.receive(conn, mc)  # resent after (our AM was lost): answered at once
    assert conn.sent[3:] == [mc.ack()]
    assert len(flows.data("lend.succeeded")) == 1
    assert len(outcome) == 1
    assert flows.registry.duplicates == 2


def test_duplicate_window_is_configurable():
    flows = Flows(durable="now", duplicate_window=60)
    conn = flows.connect()
    mc = ReturnResult(IMEI, 1, BANK, True)
    flows.receive(conn, mc)
    flows.clock.advance(59)
    flows.receive(conn, mc)
    assert len(flows.data("return.succeeded")) == 1
    flows.clock.advance(2)
    flows.receive(conn, mc)
    assert len(flows.data("return.succeeded")) == 2
    assert conn.sent == [mc.ack()] * 3


def test_a_flood_of_distinct_packets_keeps_the_duplicate_cache_bounded():
    flows = Flows(durable="now")
    conn = flows.connect()
    for slot in range(1, 201):  # 200 different returns within one duplicate window
        flows.receive(conn, ReturnResult(IMEI, slot % 3 + 1, f"{slot:010d}", True))
    cabinet = flows.registry.cabinets[IMEI]
    assert len(cabinet.replies) <= MAX_REMEMBERED
    assert len(flows.data("return.succeeded")) == 200
    newest = ReturnResult(IMEI, 200 % 3 + 1, f"{200:010d}", True)
    flows.receive(conn, newest)  # the newest are still remembered: recorded once
    assert len(flows.data("return.succeeded")) == 200


def test_mc_without_a_lend_of_this_run_is_recorded_and_acknowledged():
    """After a restart the cabinet resends the MC of a lend the new process never asked for."""
    flows = Flows()
    conn = flows.connect()
    flows.receive(conn, LendResult(IMEI, 3, BANK, True))
    assert flows.data("lend.succeeded") == [{"slot": 3, "bank": BANK, "requested": False}]
    assert conn.sent == []
    flows.release()
    assert conn.sent == [LendResultAck(IMEI, 3, BANK, True)]


def test_a_new_lend_of_the_same_bank_is_not_mistaken_for_a_duplicate():
    flows = Flows(durable="now")
    conn = flows.connect()
    first = results(flows.registry.lend(IMEI, 1, BANK))
    flows.receive(conn, LendResult(IMEI, 1, BANK, True))
    flows.receive(conn, ReturnResult(IMEI, 1, BANK, True))  # returned into the same slot
    second = results(flows.registry.lend(IMEI, 1, BANK))
    flows.receive(conn, LendResult(IMEI, 1, BANK, True))
    assert len(flows.data("lend.succeeded")) == 2
    assert first[0]["outcome"] == second[0]["outcome"] == "succeeded"


def test_event_that_cannot_be_stored_is_not_acknowledged():
    flows = Flows()
    conn = flows.connect()
    flows.release()
    outcome = results(flows.registry.lend(IMEI, 1, BANK))
    flows.receive(conn, LendResult(IMEI, 1, BANK, True))
    held = flows.collector._held.pop()
    held.errback(RuntimeError("disk full"))
    assert conn.sent == [LendRequest(IMEI, 1, BANK)]
    assert outcome[0].value.status == 500
    # The cabinet resends; this time it is stored and acknowledged.
    flows.receive(conn, LendResult(IMEI, 1, BANK, True))
    flows.release()
    assert conn.sent[-1] == LendResultAck(IMEI, 1, BANK, True)


# --- return ----------------------------------------------------------------------------------


def test_return_accepted_then_succeeded_ack_after_durable():
    flows = Flows()
    conn = flows.connect()
    flows.receive(conn, ReturnQuery(IMEI, 3, BANK))
    assert conn.sent == [ReturnQueryAnswer(IMEI, 3, BANK, True)]
    assert "return.rejected" not in flows.types()
    flows.receive(conn, ReturnResult(IMEI, 3, BANK, True))
    assert flows.data("return.succeeded") == [{"slot": 3, "bank": BANK}]
    assert len(conn.sent) == 1
    flows.release()
    assert conn.sent[1:] == [ReturnResultAck(IMEI, 3, BANK, True)]
    assert flows.registry.cabinets[IMEI].inventory[3]["bank"] == BANK


def test_return_rejected_for_a_bank_not_in_the_list():
    flows = Flows(durable="now", banks={"B1"})
    conn = flows.connect()
    query = ReturnQuery(IMEI, 2, BANK)
    flows.receive(conn, query)
    flows.receive(conn, query)  # our RQ was lost: answered again, rejected once
    assert conn.sent == [ReturnQueryAnswer(IMEI, 2, BANK, False)] * 2
    assert flows.data("return.rejected") == [{"slot": 2, "bank": BANK}]
    # Added to the list meanwhile: the next MQ is let in at once.
    flows.banks.add(BANK)
    flows.receive(conn, query)
    assert conn.sent[-1] == ReturnQueryAnswer(IMEI, 2, BANK, True)
    assert len(flows.data("return.rejected")) == 1


def test_return_failed_ar_after_durable():
    flows = Flows()
    conn = flows.connect()
    flows.receive(conn, ReturnQuery(IMEI, 1, BANK))
    flows.receive(conn, ReturnResult(IMEI, 1, BANK, False))
    flows.receive(conn, ReturnResult(IMEI, 1, BANK, False))
    assert flows.data("return.failed") == [{"slot": 1, "bank": BANK}]
    assert conn.sent == [ReturnQueryAnswer(IMEI, 1, BANK, True)]
    flows.release()
    assert conn.sent[1:] == [ReturnResultAck(IMEI, 1, BANK, False)] * 2
    # Trying again later is a new return, not a duplicate.
    flows.receive(conn, ReturnQuery(IMEI, 1, BANK))
    flows.receive(conn, ReturnResult(IMEI, 1, BANK, True))
    flows.release()
    assert flows.data("return.succeeded") == [{"slot": 1, "bank": BANK}]
    assert conn.sent[-1] == ReturnResultAck(IMEI, 1, BANK, True)


def test_answers_due_while_offline_are_dropped_and_given_on_the_resend():
    flows = Flows()
    conn = flows.connect()
    flows.receive(conn, ReturnResult(IMEI, 1, BANK, True))
    flows.registry.connection_lost(conn, "closed")
    flows.release()
    assert conn.sent == []
    assert flows.registry.replies_dropped == 1
    again = flows.connect()
    flows.receive(again, ReturnResult(IMEI, 1, BANK, True))
    assert again.sent == [ReturnResultAck(IMEI, 1, BANK, True)]
    assert len(flows.data("return.succeeded")) == 1


def test_stop_fails_waiting_commands_and_cancels_timers():
    flows = Flows(durable="now")
    flows.connect()
    lend = results(flows.registry.lend(IMEI, 1, BANK))
    query = results(flows.registry.query(IMEI))
    flows.registry.stop()
    assert lend[0].check(DeviceTimeout) and query[0].check(DeviceTimeout)
    assert flows.clock.getDelayedCalls() == []


# --- resends after a restart (durable idempotency keys) ----------------------------------------


def test_result_events_carry_the_frame_key_and_nothing_else_does():
    flows = Flows(durable="now", emit_heartbeats=True, lend_timeout=20, query_timeout=10)
    conn = flows.connect()
    flows.receive(conn, Heartbeat(IMEI))
    flows.receive(conn, status(SlotStatus(1, SlotState.FAULT)))
    results(flows.registry.lend(IMEI, 2, BANK))
    flows.receive(conn, LendResult(IMEI, 2, BANK, True))
    flows.receive(conn, ReturnQuery(IMEI, 3, BANK))
    flows.receive(conn, ReturnResult(IMEI, 3, BANK, False))
    results(flows.registry.lend(IMEI, 1, "B1"))
    flows.clock.pump([20, 10])
    keys = {e.type: e.key for e in flows.collector.events if e.key is not None}
    assert keys == {
        "lend.succeeded": (f"result:{IMEI}:MC:BO:2:{BANK}", 600.0),
        "return.failed": (f"result:{IMEI}:MR:RF:3:{BANK}", 600.0),
        "lend.timeout": (f"closed:{IMEI}:1:B1:timeout", 600.0),
    }
    unkeyed = {e.type for e in flows.collector.events if e.key is None}
    assert unkeyed == {
        "device.online",
        "heartbeat",
        "slots.status",
        "alarm.slot_fault",
    }


def test_no_keys_when_the_duplicate_window_is_0():
    flows = Flows(durable="now", duplicate_window=0)
    conn = flows.connect()
    flows.receive(conn, ReturnResult(IMEI, 1, BANK, True))
    flows.receive(conn, ReturnResult(IMEI, 1, BANK, True))
    assert [e.key for e in flows.collector.of_type("return.*")] == [None, None]


def test_return_result_resent_after_a_restart_is_answered_not_recorded_again():
    flows = Flows()
    conn = flows.connect()
    flows.receive(conn, ReturnQuery(IMEI, 3, BANK))
    result = ReturnResult(IMEI, 3, BANK, True)
    flows.receive(conn, result)
    flows.release()  # durable; the process dies before the cabinet reads the AM
    assert flows.data("return.succeeded") == [{"slot": 3, "bank": BANK}]

    again = flows.restart()
    conn = again.connect()
    again.receive(conn, result)
    assert conn.sent == [result.ack()]  # at once: its event is durable
    again.receive(conn, result)
    assert conn.sent == [result.ack()] * 2
    assert again.types() == ["device.online"]
    assert again.registry.duplicates == 2


def test_a_repeat_not_known_yet_is_still_stored_once_and_answered_when_durable():
    """Should ``seen`` not know the key yet, the key on the emit still stores it once."""
    flows = Flows()
    conn = flows.connect()
    result = ReturnResult(IMEI, 3, BANK, True)
    flows.receive(conn, result)
    flows.release()
    again = flows.restart()
    again.registry.seen = lambda key: False
    conn = again.connect()
    again.receive(conn, result)
    assert again.collector.events[-1].type == "device.online"
    assert [e.type for e in again.collector.deduplicated] == ["return.succeeded"]
    assert conn.sent == [result.ack()]


def test_lend_result_resent_after_a_restart_is_answered_not_recorded_again():
    flows = Flows()
    conn = flows.connect()
    outcome = results(flows.registry.lend(IMEI, 2, BANK))
    mc = LendResult(IMEI, 2, BANK, True)
    flows.receive(conn, mc)  # the lend was pending; its event becomes durable, then the crash
    flows.release()
    assert outcome == [{"outcome": "succeeded", "slot": 2, "bank": BANK}]

    again = flows.restart()
    conn = again.connect()
    again.receive(conn, mc)
    assert conn.sent == [mc.ack()]
    assert again.types() == ["device.online"]  # no lend.succeeded with requested: false
    # The same for a refused lend.
    again.registry.cabinets[IMEI].lend = None
    outcome = results(again.registry.lend(IMEI, 1, "B1"))
    mr = LendResult(IMEI, 1, "B1", False)
    again.receive(conn, mr)
    again.release()
    assert outcome[0].check(DeviceRefused)
    third = again.restart()
    conn = third.connect()
    third.receive(conn, mr)
    assert conn.sent == [mr.ack()]
    assert third.types() == ["device.online"]


def test_late_result_of_a_lend_that_timed_out_before_a_restart_is_reconciled_once():
    flows = Flows(durable="now", lend_timeout=20, query_timeout=10)
    flows.connect()
    outcome = results(flows.registry.lend(IMEI, 1, BANK))
    flows.clock.pump([20, 10])  # no MC, no AQ: lend.timeout
    assert outcome[0].check(DeviceTimeout)
    assert flows.types()[-1] == "lend.timeout"

    again = flows.restart()
    conn = again.connect()
    mc = LendResult(IMEI, 1, BANK, True)
    again.receive(conn, mc)
    assert again.data("lend.reconciled") == [{"slot": 1, "bank": BANK, "via": "late_result"}]
    assert "lend.succeeded" not in again.types()
    assert conn.sent == []  # AM once durable
    again.release()
    assert conn.sent == [mc.ack()]
    again.receive(conn, mc)  # its resend in this run
    assert conn.sent == [mc.ack()] * 2

    third = again.restart()  # and after another restart: answered, nothing new
    conn = third.connect()
    third.receive(conn, mc)
    assert conn.sent == [mc.ack()]
    assert third.types() == ["device.online"]


def test_late_mr_of_a_lend_that_timed_out_before_a_restart_is_recorded_once():
    flows = Flows(durable="now", lend_timeout=20, query_timeout=10)
    flows.connect()
    results(flows.registry.lend(IMEI, 1, BANK))
    flows.clock.pump([20, 10])
    again = flows.restart(durable="now")
    conn = again.connect()
    mr = LendResult(IMEI, 1, BANK, False)
    again.receive(conn, mr)
    assert again.data("lend.failed") == [{"slot": 1, "bank": BANK, "late": True}]
    third = again.restart(durable="now")
    conn = third.connect()
    third.receive(conn, mr)
    assert conn.sent == [mr.ack()]
    assert third.types() == ["device.online"]


def test_late_result_after_a_lend_reconciled_before_a_restart_is_only_answered():
    flows = Flows(durable="now", lend_timeout=20, query_timeout=10)
    conn = flows.connect()
    results(flows.registry.lend(IMEI, 2, BANK))
    flows.clock.advance(20)
    flows.receive(conn, status(SlotStatus(1, SlotState.FULL, "B1")))  # the bank left: reconciled
    results(flows.registry.lend(IMEI, 3, "B3"))
    flows.clock.advance(20)
    flows.receive(conn, LendResult(IMEI, 3, "B3", True))  # an MC while reconciling
    assert [d["via"] for d in flows.data("lend.reconciled")] == ["status", "late_result"]
    keys = [e.key[0] for e in flows.collector.of_type("lend.reconciled")]
    assert keys == [f"closed:{IMEI}:2:{BANK}:reconciled", f"closed:{IMEI}:3:B3:reconciled"]

    again = flows.restart(durable="now")
    conn = again.connect()
    for mc in (LendResult(IMEI, 2, BANK, True), LendResult(IMEI, 3, "B3", True)):
        again.receive(conn, mc)
        assert conn.sent[-1] == mc.ack()
    assert again.types() == ["device.online"]


def test_a_new_return_of_the_same_bank_to_the_same_slot_after_a_restart_is_recorded():
    flows = Flows(durable="now")
    conn = flows.connect()
    flows.receive(conn, ReturnQuery(IMEI, 1, BANK))
    result = ReturnResult(IMEI, 1, BANK, True)
    flows.receive(conn, result)

    again = flows.restart(durable="now")
    conn = again.connect()
    again.receive(conn, result)  # the resend: answered only
    assert again.types() == ["device.online"]
    outcome = results(again.registry.lend(IMEI, 1, BANK))  # lent again ...
    again.receive(conn, LendResult(IMEI, 1, BANK, True))
    assert outcome[0]["outcome"] == "succeeded"
    again.receive(conn, ReturnQuery(IMEI, 1, BANK))  # ... and returned to the same slot
    again.receive(conn, result)
    assert again.data("return.succeeded") == [{"slot": 1, "bank": BANK}]
    assert conn.sent[-1] == result.ack()

    third = again.restart(durable="now")  # a third return, after one more restart
    conn = third.connect()
    results(third.registry.lend(IMEI, 1, BANK))
    third.receive(conn, LendResult(IMEI, 1, BANK, True))
    third.receive(conn, ReturnQuery(IMEI, 1, BANK))
    third.receive(conn, result)
    assert third.data("lend.succeeded") == [{"slot": 1, "bank": BANK, "requested": True}]
    assert third.data("return.succeeded") == [{"slot": 1, "bank": BANK}]


def test_a_new_lend_forgets_how_the_last_lend_of_that_bank_closed():
    flows = Flows(durable="now", lend_timeout=20, query_timeout=10)
    flows.connect()
    results(flows.registry.lend(IMEI, 1, BANK))
    flows.clock.pump([20, 10])  # lend.timeout, durable
    again = flows.restart(durable="now")
    conn = again.connect()
    outcome = results(again.registry.lend(IMEI, 1, BANK))  # tried again, and it works now
    again.receive(conn, LendResult(IMEI, 1, BANK, True))
    assert outcome == [{"outcome": "succeeded", "slot": 1, "bank": BANK}]
    assert again.data("lend.succeeded") == [{"slot": 1, "bank": BANK, "requested": True}]
    # Returned, lent once more, and this time it times out: recorded again, and reconciled.
    again.receive(conn, ReturnQuery(IMEI, 1, BANK))
    again.receive(conn, ReturnResult(IMEI, 1, BANK, True))
    results(again.registry.lend(IMEI, 1, BANK))
    again.clock.pump([20, 10])
    assert len(again.data("lend.timeout")) == 1
    third = again.restart(durable="now")
    conn = third.connect()
    third.receive(conn, LendResult(IMEI, 1, BANK, True))
    assert third.data("lend.reconciled") == [{"slot": 1, "bank": BANK, "via": "late_result"}]


def test_the_plugin_hands_its_registry_the_durable_keys_of_its_context():
    """Through ``PowerbankPlugin`` and ``PluginHarness``: keys scoped by the instance name,
    a second harness on the same keys is the daemon after a restart."""
    from gatewayd.plugins.powerbank import PowerbankPlugin

    from gatewayd.testing import PluginHarness

    def plugin(keys: set[str] | None = None):
        harness = PluginHarness(PowerbankPlugin, {}, reactor=Clock(), name="cabinets")
        if keys is not None:
            harness.collector.keys = keys
        return harness

    first = plugin()
    conn = FakeConnection()
    first.plugin.registry.packet_received(conn, ReturnQuery(IMEI, 2, BANK), "MQ")
    result = ReturnResult(IMEI, 2, BANK, True)
    first.plugin.registry.packet_received(conn, result, "MC")
    assert first.collector.keys == {f"cabinets:result:{IMEI}:MC:RO:2:{BANK}"}

    second = plugin(first.collector.keys)
    conn = FakeConnection()
    second.plugin.registry.packet_received(conn, result, "MC")
    assert conn.sent == [result.ack()]
    assert [e.type for e in second.collector.events] == ["device.online"]
    second.plugin.registry.packet_received(conn, ReturnQuery(IMEI, 2, BANK), "MQ")  # forgets
    assert second.collector.keys == set()


def test_a_cabinet_announced_on_another_box_later_is_let_go_here():
    flows = Flows(durable="now")
    flows.clock.advance(5)
    conn = flows.connect()  # bound at 5
    assert not flows.registry.moved_elsewhere(IMEI, "box-b", since=1.0)  # ours is newer
    assert conn.closed is None
    assert flows.registry.moved_elsewhere(IMEI, "box-b", since=9.0)
    assert conn.closed == "moved_elsewhere"
    flows.registry.connection_lost(conn, conn.closed)  # as the closed TCP connection reports
    assert flows.data("device.offline")[-1] == {
        "reason": "moved_elsewhere",
        "address": conn.address,
        "box": "box-b",
    }
    assert not flows.registry.moved_elsewhere("869999999999999", "box-b", since=9.0)
