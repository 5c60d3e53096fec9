"""The serial-reader backend: the link (reopen with backoff, fail fast, timeouts, stale replies),
the card slot's 61xx/6Cxx/chaining rules, the backend's error codes, and the whole serial path
end to end on a real pseudo-terminal with the reader simulator, through the control API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import serial
from gatewayd.plugins.esam import EsamPlugin
from gatewayd.plugins.esam.reader import (
    STABLE_AFTER,
    CardSlot,
    LinkDown,
    ReaderBackend,
    ReaderLink,
    ReaderTimeout,
)
from gatewayd.plugins.esam.simulator import EsamReaderSimulator, MasterCard, SimulatedReader
from gatewayd.plugins.esam.soft import SoftBackend
from gatewayd.protocols.esam import FUNCTIONS, EsamError, output_sizes, validate_arguments
from gatewayd.protocols.reader_framing import (
    GatewayV1Framer,
    ReaderCommand,
    ReaderFrame,
    ReaderStatus,
    Rejected,
)
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from gatewayd.testing import PluginHarness

from .helpers import DIV, ApiServer, calls, demo_keys, meter

# --- fakes: a port whose far end is a script or the simulated reader ------------------------------


class FakePort:
    """A transport standing in for the serial port; ``answer(frame)`` gives the reply bytes."""

    def __init__(self, protocol: Any, answer: Any = None) -> None:
        self.protocol = protocol
        self.answer = answer
        self.framer = GatewayV1Framer()
        self.written = b""
        self.requests: list[ReaderFrame] = []
        self.open = True
        protocol.makeConnection(self)

    def write(self, data: bytes) -> None:
        self.written += data
        for item in self.framer.feed(data):
            if isinstance(item, ReaderFrame):
                self.requests.append(item)
                reply = self.answer(item) if self.answer else b""
                if reply:
                    self.protocol.dataReceived(reply)

    def loseConnection(self) -> None:
        self.unplug()

    def unplug(self) -> None:
        if self.open:
            self.open = False
            self.protocol.connectionLost(Failure(ConnectionDone()))


class Opener:
    """``open_port`` for a ReaderLink: fails while ``absent``, else builds a FakePort."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer
        self.absent = False
        self.attempts = 0
        self.ports: list[FakePort] = []

    def __call__(self, protocol: Any) -> FakePort:
        self.attempts += 1
        if self.absent:
            raise serial.SerialException("[Errno 2] could not open port /dev/ttyUSB9")
        port = FakePort(protocol, self.answer)
        self.ports.append(port)
        return port


def make_link(clock: task.Clock, opener: Opener, **options: Any) -> ReaderLink:
    options.setdefault("response_timeout", 2.0)
    return ReaderLink(
        clock,
        opener,
        GatewayV1Framer(),
        jitter=lambda: 0.0,
        retry_initial=0.5,
        retry_max=4.0,
        **options,
    )


def reader_answers(reader: SimulatedReader):
    return reader.handle


def simulated_reader(mode: str = "normal") -> SimulatedReader:
    return SimulatedReader(MasterCard(SoftBackend(demo_keys())), mode)


# --- the link -------------------------------------------------------------------------------------


def test_reopens_with_capped_exponential_backoff_then_connects():
    clock, opener = task.Clock(), Opener()
    opener.absent = True
    link = make_link(clock, opener)
    ups = []
    link.on_up = lambda: ups.append(clock.seconds())
    link.start()
    delays = []
    for _ in range(6):
        (call,) = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert link.state == "down" and "could not open port" in link.last_error
    opener.absent = False
    (call,) = clock.getDelayedCalls()
    clock.advance(call.getTime() - clock.seconds())
    assert link.state == "up" and ups == [clock.seconds()] and link.attempts == 0
    assert clock.getDelayedCalls() == []


def test_unplug_fails_the_pending_request_fast_and_reopens():
    clock, opener = task.Clock(), Opener()  # a port that never answers
    link = make_link(clock, opener)
    downs = []
    link.on_down = downs.append
    link.start()
    pending = link.request(ReaderCommand.POWER_ON, 0)
    opener.ports[0].unplug()  # a clean ConnectionDone, as Twisted reports a pulled USB reader
    failure = []
    pending.addErrback(failure.append)
    assert failure[0].check(LinkDown) and link.state == "down" and len(downs) == 1
    # During the outage a request fails at once, without waiting for any timeout.
    quick = []
    link.request(ReaderCommand.STATUS, 0).addErrback(quick.append)
    assert quick[0].check(LinkDown)
    opener.absent = True
    clock.advance(0.5)
    assert link.state == "down" and opener.attempts == 2
    opener.absent = False
    clock.advance(1.0)
    assert link.state == "up" and opener.attempts == 3


def test_a_flapping_port_keeps_backing_off_and_a_stable_one_starts_over():
    clock, opener = task.Clock(), Opener()
    link = make_link(clock, opener)
    link.start()
    delays = []
    for _ in range(5):  # open, then unplugged at once, five times
        opener.ports[-1].unplug()
        (call,) = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    clock.advance(STABLE_AFTER)  # this time the port stays up
    opener.ports[-1].unplug()
    (call,) = clock.getDelayedCalls()
    assert call.getTime() - clock.seconds() == 0.5


def test_timeout_then_a_late_reply_is_dropped_and_the_next_request_works():
    clock = task.Clock()
    late: list[bytes] = []
    framer = GatewayV1Framer()

    def answer(frame: ReaderFrame) -> bytes:
        wire = framer.encode(frame.reply(ReaderStatus.OK, b"\x01\x00"))
        if frame.seq == 1:
            late.append(wire)  # answers after the timeout
            return b""
        return wire

    opener = Opener(answer)
    link = make_link(clock, opener)
    link.start()
    first = link.request(ReaderCommand.STATUS, 0)
    clock.advance(2.0)
    errors = []
    first.addErrback(errors.append)
    assert errors[0].check(ReaderTimeout)
    link.data_received(late[0])
    assert link.stale_replies == 1
    second = []
    link.request(ReaderCommand.STATUS, 0).addCallback(second.append)
    assert second[0].seq == 2 and second[0].data == b"\x01\x00"


def test_garbage_is_reported_and_ends_in_a_timeout():
    clock = task.Clock()
    opener = Opener(lambda frame: b"\xff\xfe garbage \x00")
    link = make_link(clock, opener, response_timeout=1.0)
    rejected: list[Rejected] = []
    link.on_rejected = rejected.append
    link.start()
    result = []
    link.request(ReaderCommand.POWER_ON, 0).addErrback(result.append)
    clock.advance(1.0)
    assert result[0].check(ReaderTimeout)
    assert [r.reason for r in rejected] == ["garbage"] and rejected[0].raw.startswith(b"\xff")


def test_stop_closes_the_port_and_stops_retrying():
    clock, opener = task.Clock(), Opener()
    link = make_link(clock, opener)
    link.start()
    stopped = []
    link.stop().addCallback(stopped.append)
    assert stopped == [None] and link.state == "stopped" and not opener.ports[0].open
    assert clock.getDelayedCalls() == []


# --- the card slot: T=0 rules -------------------------------------------------------------------


class ScriptedCard:
    """Answers APDUs from a script of response APDUs and records what it was sent."""

    def __init__(self, responses: list[str]) -> None:
        self.responses = [bytes.fromhex(r) for r in responses]
        self.apdus: list[str] = []
        self.framer = GatewayV1Framer()

    def __call__(self, frame: ReaderFrame) -> bytes:
        self.apdus.append(frame.data.hex().upper())
        response = self.responses.pop(0) if self.responses else bytes.fromhex("6F00")
        return self.framer.encode(frame.reply(ReaderStatus.OK, response))


def run_slot(responses: list[str], apdus: list[str]) -> tuple[Any, ScriptedCard]:
    clock, card = task.Clock(), ScriptedCard(responses)
    link = make_link(clock, Opener(card))
    link.start()
    slot = CardSlot(link)
    outcome: list[Any] = []
    d = slot.transmit_chain([bytes.fromhex(a) for a in apdus])
    d = defer.ensureDeferred(d) if not isinstance(d, defer.Deferred) else d
    d.addBoth(outcome.append)
    return outcome[0], card


def test_61xx_is_followed_by_get_response():
    data = "11" * 16
    outcome, card = run_slot(["6110", data + "9000"], ["8033000009000000000000000100"])
    assert outcome == (bytes.fromhex(data), 0x9000)
    assert card.apdus[1] == "00C0000010"


def test_6cxx_resends_the_command_with_the_right_le():
    outcome, card = run_slot(["6C08", "01020304050607089000"], ["803D000000"])
    assert outcome == (bytes.fromhex("0102030405060708"), 0x9000)
    assert card.apdus == ["803D000000", "803D000008"]


def test_long_answers_come_in_several_get_responses_and_6c_applies_to_them_too():
    outcome, card = run_slot(
        ["6100", "AA" * 256 + "6120", "6C10", "BB" * 16 + "9000"], ["8033000001AA00"]
    )
    assert outcome == (bytes.fromhex("AA" * 256 + "BB" * 16), 0x9000)
    assert card.apdus[1:] == ["00C0000000", "00C0000020", "00C0000010"]


def test_a_card_that_never_finishes_is_an_error_not_a_loop():
    outcome, _ = run_slot(["6101"] * 40, ["8033000001AA00"])
    assert isinstance(outcome, Failure) and outcome.value.code == 900


def test_chained_parts_stop_at_the_first_refusal():
    outcome, card = run_slot(["6F13"], ["9035000001AA", "8035000001BB00"])
    assert outcome == (b"", 0x6F13) and len(card.apdus) == 1


# --- the backend on the simulated reader (deterministic clock) -----------------------------------


def backend_on(reader: SimulatedReader) -> tuple[ReaderBackend, task.Clock]:
    clock = task.Clock()
    link = make_link(clock, Opener(reader.handle))
    backend = ReaderBackend(link)
    link.start()
    return backend, clock


def run(deferred: defer.Deferred) -> Any:
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "did not finish synchronously"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def test_every_card_function_through_the_simulated_reader():
    reader = simulated_reader()
    backend, _ = backend_on(reader)
    for function, arguments in calls().items():
        args = validate_arguments(function, arguments)
        result = run(backend.call(function, args))
        if function in ("open_device", "close_device"):
            assert result == {}
            if function == "close_device":
                run(backend.call("open_device", {"reader_type": 0}))
            continue
        sizes = output_sizes(function, args)
        if function == "mac_check":
            assert result == {"valid": True}
        else:
            assert {k: len(v) // 2 for k, v in result.items()} == sizes, function
    assert backend.card_state == "ready" and backend.atr.startswith(b"\x3b\x68")


def test_backend_outputs_are_what_the_soft_meter_accepts():
    reader = simulated_reader()
    backend, _ = backend_on(reader)
    soft_meter = meter(0)
    auth = run(backend.call("identity_authentication", {"flag": 0, "div": bytes.fromhex(DIV)}))
    r2, _ = soft_meter.authenticate(bytes.fromhex(auth["rand"]), bytes.fromhex(auth["endata"]))
    args = validate_arguments(
        "user_control",
        {
            "flag": 0,
            "rand": r2.hex(),
            "div": DIV,
            "esam_no": "0001111100000032",
            "data": "1A00140730104001",
        },
    )
    result = run(backend.call("user_control", args))
    assert soft_meter.accept_user_control(bytes.fromhex(result["endata"])) == bytes.fromhex(
        "1A00140730104001"
    )


def code_of(deferred: defer.Deferred) -> int:
    with pytest.raises(EsamError) as error:
        run(deferred)
    return error.value.code


def test_backend_codes_no_card_wrong_card_closed_and_refusals():
    reader = simulated_reader("no-card")
    backend, _ = backend_on(reader)
    assert code_of(backend.call("infrared_rand", {})) == 301 and backend.card_state == "absent"
    reader.set_mode("wrong-card")
    assert code_of(backend.call("infrared_rand", {})) == 302 and backend.card_state == "wrong"
    reader.set_mode("normal")
    assert set(run(backend.call("infrared_rand", {}))) == {"rand1"}
    # A card swapped behind our back is found by its "not powered" answer and reopened once.
    reader.set_mode("wrong-card")
    assert code_of(backend.call("infrared_rand", {})) == 302
    reader.set_mode("normal")
    run(backend.call("open_device", {"reader_type": 0}))
    assert run(backend.call("close_device", {})) == {}
    assert code_of(backend.call("infrared_rand", {})) == 202
    assert code_of(backend.call("close_device", {})) == 203  # not open: as the soft backend
    run(backend.call("open_device", {"reader_type": 0}))
    bad = dict(calls()["mac_check"], mac="00000000")
    assert code_of(backend.call("mac_check", validate_arguments("mac_check", bad))) == 810
    bad = dict(calls()["infrared_auth"], rand1_endata="00" * 8)
    assert code_of(backend.call("infrared_auth", validate_arguments("infrared_auth", bad))) == 1100


def test_backend_fails_fast_with_202_while_unplugged():
    reader = simulated_reader()
    clock = task.Clock()
    opener = Opener(reader.handle)
    link = make_link(clock, opener)
    backend = ReaderBackend(link)
    link.start()
    run(backend.call("infrared_rand", {}))
    opener.ports[-1].unplug()
    assert code_of(backend.call("infrared_rand", {})) == 202 and backend.card_state == "unknown"
    clock.advance(0.5)
    assert set(run(backend.call("infrared_rand", {}))) == {"rand1"}


# --- end to end on a real pty, through the control API --------------------------------------------


def reader_config(link: Path, **extra: Any) -> dict[str, Any]:
    return {
        "backend": "reader",
        "port": str(link),
        "response_timeout": 0.3,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.2,
        "call_timeout": 5,
        **extra,
    }


async def started(tmp_path: Path) -> tuple[EsamReaderSimulator, PluginHarness, ApiServer]:
    link = tmp_path / "reader"
    simulator = EsamReaderSimulator(reactor, link=link)
    simulator.start()
    harness = PluginHarness(EsamPlugin, reader_config(link), name="esam", state_dir=tmp_path)
    await harness.start()
    await harness.collector.wait_for("device.online").addTimeout(5, reactor)
    return simulator, harness, ApiServer(harness, reactor)


async def stopped(simulator, harness, api) -> None:
    await api.stop()
    await harness.stop()
    simulator.stop()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_every_function_through_the_control_api_on_a_pty(tmp_path):
    simulator, harness, api = await started(tmp_path)
    try:
        arguments = calls()
        results = {}
        order = [f for f in FUNCTIONS if f != "close_device"] + ["close_device"]
        for function in order:
            status, body = await api.command(function, arguments[function])
            assert (status, body["ok"]) == (200, True), (function, body)
            results[function] = body["result"]
        assert results["mac_check"] == {"valid": True}
        assert len(results["key_update_v2"]["data"]) == 2 * (4 * 36 + 4)
        assert len(results["price2_update"]["data"]) == 2 * 255  # chained in, 61xx out
        # Closed: 202 until open_device.
        status, body = await api.command("infrared_rand", {})
        assert (status, body["error"]["code"]) == (502, 202)
        status, body = await api.command("open_device", {})
        assert status == 200 and body["result"] == {}
        operations = harness.collector.of_type("esam.operation")
        assert [e.data["function"] for e in operations] == [*order, "infrared_rand", "open_device"]
        assert [e.data["outcome"] for e in operations].count("ok") == len(order) + 1
        assert operations[1].data["meter"] == "000000000001" and operations[1].device == "esam"
        assert [e.data["reason"] for e in harness.collector.of_type("device.offline")] == ["closed"]
        # Results and keys never appear in events.
        text = repr([(e.data, e.raw) for e in harness.collector.events])
        for result in results.values():
            for value in result.values():
                if isinstance(value, str) and len(value) >= 8:
                    assert value not in text
        assert "00112233445566778899AABBCCDDEEFF" not in text
        status, devices = await api.request("GET", "/api/v1/devices")
        (device,) = devices["devices"]
        assert device["online"] and device["details"]["card"] == "ready"
        assert device["details"]["atr"] == "3B6800004757444D53430001"
        status, metrics = await api.request("GET", "/metrics")
        assert 'gatewayd_plugin_queue_length{plugin="esam"} 0.0' in metrics
        metrics = harness.context.metrics
        assert metrics.frames_in == metrics.frames_out == harness.plugin.link.frames_out > 40
    finally:
        await stopped(simulator, harness, api)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_unplug_fails_fast_with_202_and_replug_recovers(tmp_path):
    simulator, harness, api = await started(tmp_path)
    try:
        simulator.unplug()
        await harness.collector.wait_for("device.offline").addTimeout(5, reactor)
        assert harness.collector.of_type("device.offline")[0].data == {"reason": "unplugged"}
        began = time.monotonic()
        status, body = await api.command("infrared_rand", {})
        assert (status, body["error"]["code"]) == (502, 202)
        assert time.monotonic() - began < 0.25  # no waiting for a timeout
        simulator.replug()
        await harness.collector.wait_for("device.online", 2).addTimeout(5, reactor)
        status, body = await api.command("identity_authentication", {"flag": 0, "div": DIV})
        assert status == 200 and len(body["result"]["endata"]) == 16
    finally:
        await stopped(simulator, harness, api)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_wrong_card_no_card_silence_and_garbage_through_the_api(tmp_path):
    simulator, harness, api = await started(tmp_path)
    try:
        expected = {
            "wrong-card": (502, 302),
            "no-card": (502, 301),
            "silence": (504, "timeout"),
            "garbage": (504, "timeout"),
            "normal": (200, None),
        }
        for mode, (status_wanted, code) in expected.items():
            simulator.set_mode(mode)
            status, body = await api.command("infrared_rand", {})
            got = body["error"]["code"] if not body["ok"] else None
            assert (status, got) == (status_wanted, code), mode
        invalid = harness.collector.of_type("frame.invalid")
        assert invalid and {e.data["reason"] for e in invalid} <= {
            "garbage",
            "crc",
            "length",
            "format",
        }
        reasons = [e.data["reason"] for e in harness.collector.of_type("device.offline")]
        assert reasons[0] == "wrong_card"
        outcomes = [e.data["outcome"] for e in harness.collector.of_type("esam.operation")]
        assert outcomes == ["refused", "refused", "timeout", "timeout", "ok"]
    finally:
        await stopped(simulator, harness, api)
