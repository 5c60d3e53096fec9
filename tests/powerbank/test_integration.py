"""The power-bank plugin end to end.

* The simulator against the plugin in this process (``PluginHarness``, real sockets).
* ``python -m gatewayd run`` as a child with a real ``sqlite`` sink and the control API: every
  flow through ``POST /api/v1/plugins/cabinets/commands/...`` played by a raw blocking cabinet,
  a ``kill -9`` in the middle of a lend that loses nothing the cabinet had acknowledged, and
  results resent after ``kill -9`` that are answered but not recorded twice.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytest_twisted
from gatewayd.plugins.powerbank import PowerbankPlugin
from gatewayd.plugins.powerbank.simulator import PowerbankSimulator, SimulatorOptions
from gatewayd.protocols import powerbank as pb
from twisted.internet import reactor

from gatewayd.plugin import DeviceRefused
from gatewayd.testing import PluginHarness, free_port, sleep, wait_for_port, wait_until
from tests.test_service import daemon_config
from tests.test_service import wait_until as wait_for  # blocking: for the daemon as a process

IMEI = "860000000000001"
CODEC = pb.Codec()


# --- the simulator against the plugin ----------------------------------------------------------


def harness_and_simulator(config: dict, **options):
    port = free_port()
    harness = PluginHarness(
        PowerbankPlugin, {"listen": f"127.0.0.1:{port}", **config}, name="cabinets"
    )
    defaults = dict(
        cabinets=3,
        heartbeat=0.5,
        eject_delay=0.02,
        answer_delay=0.01,
        resend_interval=0.3,
        return_interval=0,
        seed=7,
    )
    simulator = PowerbankSimulator(
        reactor, f"127.0.0.1:{port}", SimulatorOptions(**{**defaults, **options})
    )
    return harness, simulator


@pytest_twisted.inlineCallbacks
def test_simulated_cabinets_answer_queries_lend_and_return_without_double_events():
    harness, sim = harness_and_simulator(
        {}, fail_rate=0.0, duplicate_rate=0.5, return_interval=0.2, return_fail_rate=0.3
    )
    yield harness.start()
    sim.start()
    try:
        yield harness.collector.wait_for("device.online", 3).addTimeout(5, reactor)
        for cabinet in sim.cabinets:
            result = yield harness.call("query", {"imei": cabinet.imei})
            expected = {s["slot"]: s for s in result["slots"]}
            for number, content in cabinet.slots.items():
                if content is None:
                    continue
                assert expected[number]["bank"] == content[1]
        # Lend every bank that can be lent: each answers succeeded, the simulator gives it out.
        lent = 0
        for cabinet in sim.cabinets:
            for number, content in list(cabinet.slots.items()):
                if content is None or content[0] == "ER" or cabinet.returning:
                    continue
                args = {"imei": cabinet.imei, "slot": number, "bank": content[1]}
                try:
                    result = yield harness.call("lend", args)
                except DeviceRefused:  # a return moved into the slot meanwhile
                    continue
                assert result["outcome"] == "succeeded"
                lent += 1
        assert lent >= 2
        # A bank that is not there: MR,BF → 502.
        with pytest.raises(DeviceRefused):
            yield harness.call("lend", {"imei": IMEI, "slot": 1, "bank": "NOTHERE"})
        yield wait_until(lambda: sim.stats.returns_ok + sim.stats.returns_failed >= 4)
        yield wait_until(lambda: not any(c.awaiting for c in sim.cabinets))
        events = harness.collector
        assert len(events.of_type("lend.succeeded")) == sim.stats.lends_ok == lent
        # Every result the cabinets saw acknowledged is recorded exactly once despite resends.
        yield sleep(0.2)
        assert len(events.of_type("return.succeeded")) == sim.stats.returns_ok
        assert len(events.of_type("return.failed")) == sim.stats.returns_failed
        assert sim.stats.duplicates > 0 and harness.plugin.registry.duplicates > 0
        assert events.of_type("frame.invalid") == []
    finally:
        sim.stop()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_simulated_lost_result_is_reconciled_from_the_status():
    harness, sim = harness_and_simulator(
        {"lend_timeout": 0.3, "query_timeout": 1}, cabinets=1, lost_rate=1.0
    )
    yield harness.start()
    sim.start()
    try:
        yield harness.collector.wait_for("device.online").addTimeout(5, reactor)
        [cabinet] = sim.cabinets
        number, content = next(
            (n, c) for n, c in cabinet.slots.items() if c is not None and c[0] != "ER"
        )
        result = yield harness.call("lend", {"imei": IMEI, "slot": number, "bank": content[1]})
        assert result == {
            "outcome": "reconciled",
            "slot": number,
            "bank": content[1],
            "via": "status",
        }
        assert sim.stats.lends_lost == 1
    finally:
        sim.stop()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_simulated_reconnects_without_close_are_replaced():
    harness, sim = harness_and_simulator({}, cabinets=2, heartbeat=0.1, reconnect_rate=1.0)
    yield harness.start()
    sim.start()
    try:
        yield wait_until(
            lambda: sum(e.data["replaced"] for e in harness.collector.of_type("device.online")) >= 4
        )
        assert "device.offline" not in harness.collector.types()
        yield sleep(0.1)
        # The replaced connections were closed by the server: at most one spare per cabinet.
        assert len(harness.plugin.server.connections) <= 4
        assert [d.online for d in harness.plugin.devices()] == [True, True]
        result = yield harness.call("query", {"imei": IMEI})
        assert len(result["slots"]) == 3
    finally:
        sim.stop()
        yield harness.stop()


# --- the daemon as a process -------------------------------------------------------------------


def write_config(
    tmp_path: Path, device_port: int, api_port: int, rate_limit: str = "{rate: 20, burst: 40}"
) -> Path:
    return daemon_config(
        tmp_path,
        api_port,
        f"""\
plugins:
  cabinets:
    type: powerbank
    listen: "127.0.0.1:{device_port}"
    lend_timeout: 1s
    query_timeout: 1s
    banks: ["B1", "B2", "B3"]
    rate_limit: {rate_limit}
sinks:
  store: {{type: sqlite, path: {tmp_path / "events.db"}}}
routes:
  - {{match: {{type: "*"}}, sinks: [store]}}
""",
    )


def start_daemon(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )


def stop_daemon(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RawCabinet:
    """A blocking cabinet speaking the protocol line by line (built and parsed by the codec)."""

    def __init__(self, port: int, imei: str = IMEI) -> None:
        self.imei = imei
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, packet: pb.Packet | bytes) -> None:
        data = packet if isinstance(packet, bytes) else CODEC.build(packet)
        self.sock.sendall(data)

    def read(self, timeout: float = 10.0) -> pb.Packet:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the daemon")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return CODEC.parse(line)

    def expect(self, expected: pb.Packet, timeout: float = 10.0) -> None:
        got = self.read(timeout)
        assert got == expected, f"expected {expected}, got {got}"

    def close(self) -> None:
        self.sock.close()


def post(api_port: int, command: str, arguments: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/api/v1/plugins/cabinets/commands/{command}",
        data=json.dumps(arguments).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def rows(db: Path) -> list[tuple[str, str | None, dict]]:
    """The sqlite sink's rows; none while the sink has not created its table yet."""
    with sqlite3.connect(db) as conn:
        try:
            found = conn.execute("SELECT type, device, data FROM events ORDER BY id").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return []
    return [(type_, device, json.loads(data)) for type_, device, data in found]


@pytest.mark.integration
def test_every_flow_through_the_control_api_into_sqlite(tmp_path):
    device_port, api_port = free_port(), free_port()
    proc = start_daemon(write_config(tmp_path, device_port, api_port))
    pool = ThreadPoolExecutor(4)
    cab = None
    try:
        wait_for_port(device_port, timeout=15)
        wait_for_port(api_port, timeout=15)
        assert post(api_port, "query", {"imei": IMEI})[0] == 404  # not connected yet
        cab = RawCabinet(device_port)
        cab.send(pb.Heartbeat(IMEI))
        inventory = (
            pb.SlotStatus(1, pb.SlotState.FULL, "B1"),
            pb.SlotStatus(2, pb.SlotState.NOT_FULL, "B2"),
            pb.SlotStatus(3, pb.SlotState.FAULT),
        )

        # query: CQ → AQ
        call = pool.submit(post, api_port, "query", {"imei": IMEI})
        cab.expect(pb.StatusQuery(IMEI))
        cab.send(pb.StatusReport(IMEI, inventory))
        status, body = call.result(20)
        assert status == 200 and body["result"]["slots"][2] == {
            "slot": 3,
            "state": "fault",
            "bank": None,
        }

        # lend succeeded: CC → MC(BO) → AM(BO)
        call = pool.submit(post, api_port, "lend", {"imei": IMEI, "slot": 1, "bank": "B1"})
        cab.expect(pb.LendRequest(IMEI, 1, "B1"))
        cab.send(pb.LendResult(IMEI, 1, "B1", True))
        cab.expect(pb.LendResultAck(IMEI, 1, "B1", True))
        assert call.result(20) == (
            200,
            {"ok": True, "result": {"outcome": "succeeded", "slot": 1, "bank": "B1"}},
        )

        # lend failed, and a second lend meanwhile is busy: CC → (409) → MR(BF) → AR(BF) → 502
        call = pool.submit(post, api_port, "lend", {"imei": IMEI, "slot": 2, "bank": "B2"})
        cab.expect(pb.LendRequest(IMEI, 2, "B2"))
        status, body = post(api_port, "lend", {"imei": IMEI, "slot": 3, "bank": "B3"})
        assert (status, body["error"]["code"]) == (409, "busy")
        cab.send(pb.LendResult(IMEI, 2, "B2", False))
        cab.expect(pb.LendResultAck(IMEI, 2, "B2", False))
        status, body = call.result(20)
        assert (status, body["error"]["code"]) == (502, "lend_failed")

        # lend without an answer, reconciled from the status: CC … CQ → AQ without the bank
        call = pool.submit(post, api_port, "lend", {"imei": IMEI, "slot": 2, "bank": "B2"})
        cab.expect(pb.LendRequest(IMEI, 2, "B2"))
        cab.expect(pb.StatusQuery(IMEI))
        cab.send(pb.StatusReport(IMEI, (inventory[2],)))
        assert call.result(20)[1]["result"]["outcome"] == "reconciled"

        # lend without any answer: 504; the late MC is still acknowledged and reconciles it
        call = pool.submit(post, api_port, "lend", {"imei": IMEI, "slot": 1, "bank": "B3"})
        cab.expect(pb.LendRequest(IMEI, 1, "B3"))
        cab.expect(pb.StatusQuery(IMEI))
        status, body = call.result(20)
        assert (status, body["error"]["code"]) == (504, "timeout")
        cab.send(pb.LendResult(IMEI, 1, "B3", True))
        cab.expect(pb.LendResultAck(IMEI, 1, "B3", True))

        # returns: rejected (not in banks), succeeded, failed; a duplicate answered twice
        cab.send(pb.ReturnQuery(IMEI, 1, "X9"))
        cab.expect(pb.ReturnQueryAnswer(IMEI, 1, "X9", False))
        cab.send(pb.ReturnQuery(IMEI, 1, "B1"))
        cab.expect(pb.ReturnQueryAnswer(IMEI, 1, "B1", True))
        cab.send(pb.ReturnResult(IMEI, 1, "B1", True))
        cab.send(pb.ReturnResult(IMEI, 1, "B1", True))
        cab.expect(pb.ReturnResultAck(IMEI, 1, "B1", True))
        cab.expect(pb.ReturnResultAck(IMEI, 1, "B1", True))
        cab.send(pb.ReturnQuery(IMEI, 2, "B2"))
        cab.expect(pb.ReturnQueryAnswer(IMEI, 2, "B2", True))
        cab.send(pb.ReturnResult(IMEI, 2, "B2", False))
        cab.expect(pb.ReturnResultAck(IMEI, 2, "B2", False))

        # a bad CRC: frame.invalid, and the connection goes on
        good = CODEC.build(pb.ReturnQuery(IMEI, 3, "B3"))
        cab.send(good.replace(good[-8:-4], b"0000"))
        cab.send(good)
        cab.expect(pb.ReturnQueryAnswer(IMEI, 3, "B3", True))

        # gatewayd command (the CLI client) with a query
        cli = pool.submit(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "gatewayd",
                "command",
                "--api",
                f"127.0.0.1:{api_port}",
                "cabinets",
                "query",
                f"imei={IMEI}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        cab.expect(pb.StatusQuery(IMEI))
        cab.send(pb.StatusReport(IMEI, inventory))
        done = cli.result(60)
        assert done.returncode == 0, done.stderr
        assert '"fault"' in done.stdout
        cab.close()
        db = tmp_path / "events.db"
        assert wait_for(lambda: db.exists() and any(r[0] == "device.offline" for r in rows(db)))
    finally:
        if cab is not None:
            cab.close()
        stop_daemon(proc)
        pool.shutdown(wait=False)

    found = rows(tmp_path / "events.db")
    flow = [
        (t, d.get("slot"), d.get("bank")) for t, _, d in found if t.startswith(("lend.", "return."))
    ]
    assert flow == [
        ("lend.succeeded", 1, "B1"),
        ("lend.failed", 2, "B2"),
        ("lend.reconciled", 2, "B2"),
        ("lend.timeout", 1, "B3"),
        ("lend.reconciled", 1, "B3"),
        ("return.rejected", 1, "X9"),
        ("return.succeeded", 1, "B1"),
        ("return.failed", 2, "B2"),
    ]
    types = [t for t, _, _ in found if t != "command.result"]
    assert types[0] == "device.online" and types[-1] == "device.offline"
    assert types.count("slots.status") == 3 and types.count("alarm.slot_fault") == 1
    invalid = [d for t, _, d in found if t == "frame.invalid"]
    assert [d["reason"] for d in invalid] == ["crc"]
    # The core's command.result for every command, refused ones too (404 offline, 409 busy).
    outcomes = [d["outcome"] for t, _, d in found if t == "command.result"]
    assert outcomes == [
        "rejected",
        "ok",
        "succeeded",
        "rejected",
        "failed",
        "reconciled",
        "timeout",
        "ok",
    ]
    results = [d for t, _, d in found if t == "command.result"]
    assert results[0]["error"]["code"] == "not_found" and results[0]["source"] == "http"
    assert results[2]["arguments"] == {"imei": IMEI, "slot": 1, "bank": "B1"}
    assert all(device == IMEI for _, device, _ in found)


@pytest.mark.integration
def test_kill_9_during_a_lend_loses_nothing_the_cabinet_saw_acknowledged(tmp_path):
    device_port, api_port = free_port(), free_port()
    # Past the first 20 frames the rate limit lets 10 a second through, so the kill below lands
    # while answers are still coming back however slow the machine is.
    config = write_config(tmp_path, device_port, api_port, rate_limit="{rate: 10, burst: 20}")
    banks = [f"R{n}" for n in range(40)]
    acknowledged: set[pb.Packet] = set()
    pool = ThreadPoolExecutor(2)
    proc = start_daemon(config)
    try:
        wait_for_port(device_port, timeout=15)
        wait_for_port(api_port, timeout=15)
        cab = RawCabinet(device_port)
        cab.send(pb.Heartbeat(IMEI))
        time.sleep(0.2)
        pool.submit(post, api_port, "lend", {"imei": IMEI, "slot": 2, "bank": "B2"})
        cab.expect(pb.LendRequest(IMEI, 2, "B2"))
        # The bank is out; the cabinet reports it together with a burst of returns and is
        # killed while the answers come back.
        results = [pb.LendResult(IMEI, 2, "B2", True)] + [
            pb.ReturnResult(IMEI, 1 + n % 3, bank, True) for n, bank in enumerate(banks)
        ]
        cab.send(b"".join(CODEC.build(p) for p in results))
        for _ in range(10):
            ack = cab.read()
            acknowledged.add(ack)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        try:  # whatever was already on its way
            while True:
                acknowledged.add(cab.read(timeout=0.5))
        except (OSError, ConnectionError):
            pass
        cab.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert 10 <= len(acknowledged) < len(results)

    # Run 2: the cabinet reconnects and resends every result it has no acknowledgement for.
    proc = start_daemon(config)
    try:
        wait_for_port(device_port, timeout=15)
        cab = RawCabinet(device_port)
        cab.send(pb.Heartbeat(IMEI))
        missing = [p for p in results if p.ack() not in acknowledged]
        cab.send(b"".join(CODEC.build(p) for p in missing))
        for _ in missing:
            acknowledged.add(cab.read())
        assert acknowledged == {p.ack() for p in results}
        cab.close()
        db = tmp_path / "events.db"
        wanted = {("return.succeeded", bank) for bank in banks} | {("lend.succeeded", "B2")}
        assert wait_for(
            lambda: db.exists() and wanted <= {(t, d.get("bank")) for t, _, d in rows(db)}
        ), "an acknowledged lend or return is missing from the sink"
    finally:
        stop_daemon(proc)
        pool.shutdown(wait=False)


@pytest.mark.integration
def test_results_resent_after_kill_9_are_answered_not_recorded_again(tmp_path):
    """Issue 12 item 6: the cabinet resends every MC it has no AM for; after a ``kill -9`` of
    the daemon that must not become a second lend or return (a return billed twice)."""
    device_port, api_port = free_port(), free_port()
    config = write_config(tmp_path, device_port, api_port)
    db = tmp_path / "events.db"
    lent = pb.LendResult(IMEI, 1, "B1", True)  # the result of a lend of this run
    returned = pb.ReturnResult(IMEI, 2, "B2", True)
    late = pb.LendResult(IMEI, 3, "B3", True)  # the result of a lend that timed out
    resent = [lent, returned, late]

    def has(type_: str, bank: str) -> bool:
        return db.exists() and any(t == type_ and d.get("bank") == bank for t, _, d in rows(db))

    def kill_9(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    pool = ThreadPoolExecutor(2)
    procs: list[subprocess.Popen] = []
    try:
        # Run 1: a lend, a return and a lend that times out; the cabinet reads none of the AMs
        # (as if they were lost), the daemon is killed once the events are in the sink.
        procs.append(proc := start_daemon(config))
        wait_for_port(device_port, timeout=15)
        wait_for_port(api_port, timeout=15)
        cab = RawCabinet(device_port)
        cab.send(pb.Heartbeat(IMEI))
        time.sleep(0.2)
        call = pool.submit(post, api_port, "lend", {"imei": IMEI, "slot": 1, "bank": "B1"})
        cab.expect(pb.LendRequest(IMEI, 1, "B1"))
        cab.send(lent)
        assert call.result(20) == (
            200,
            {"ok": True, "result": {"outcome": "succeeded", "slot": 1, "bank": "B1"}},
        )
        cab.expect(lent.ack())
        cab.send(pb.ReturnQuery(IMEI, 2, "B2"))
        cab.expect(pb.ReturnQueryAnswer(IMEI, 2, "B2", True))
        cab.send(returned)  # its AM is left unread
        call = pool.submit(post, api_port, "lend", {"imei": IMEI, "slot": 3, "bank": "B3"})
        status, body = call.result(20)  # no MC, no AQ: 504 and lend.timeout
        assert (status, body["error"]["code"]) == (504, "timeout")
        assert wait_for(lambda: has("return.succeeded", "B2") and has("lend.timeout", "B3")), (
            "run 1's events did not reach the sink"
        )
        kill_9(proc)
        cab.close()

        # Run 2: the cabinet resends the three results; each is answered once.
        procs.append(proc := start_daemon(config))
        wait_for_port(device_port, timeout=15)
        cab = RawCabinet(device_port)
        cab.send(b"".join(CODEC.build(p) for p in resent))
        assert {cab.read() for _ in resent} == {p.ack() for p in resent}
        assert wait_for(lambda: has("lend.reconciled", "B3")), "the late MC was not reconciled"
        kill_9(proc)
        cab.close()

        # Run 3: once more, the same three; then a clean stop after the connection's offline
        # event, which comes after anything the resends could have recorded.
        procs.append(proc := start_daemon(config))
        wait_for_port(device_port, timeout=15)
        cab = RawCabinet(device_port)
        cab.send(b"".join(CODEC.build(p) for p in resent))
        assert {cab.read() for _ in resent} == {p.ack() for p in resent}
        cab.close()
        assert wait_for(lambda: any(t == "device.offline" for t, _, _ in rows(db)))
        stop_daemon(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        pool.shutdown(wait=False)

    flow = [
        (t, d.get("slot"), d.get("bank"), d.get("requested", d.get("via")))
        for t, _, d in rows(db)
        if t.startswith(("lend.", "return."))
    ]
    assert flow == [
        ("lend.succeeded", 1, "B1", True),
        ("return.succeeded", 2, "B2", None),
        ("lend.timeout", 3, "B3", None),
        ("lend.reconciled", 3, "B3", "late_result"),
    ]
