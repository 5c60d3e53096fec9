"""``gatewayd esam capture``: a relay between two ptys records both directions; a recorded file
replays through the framer; ``gatewayd esam replay`` prints the frames."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from gatewayd.plugins.esam import EsamPlugin
from gatewayd.plugins.esam.capture import (
    HOST_TO_READER,
    READER_TO_HOST,
    CaptureFormatError,
    CaptureRecord,
    CaptureRelay,
    CaptureWriter,
    load_capture,
    replay,
)
from gatewayd.plugins.esam.reader import SerialSettings, serial_opener
from gatewayd.plugins.esam.simulator import EsamReaderSimulator
from gatewayd.protocols.reader_framing import (
    GatewayV1Framer,
    ReaderCommand,
    ReaderFrame,
    ReaderStatus,
    Rejected,
    request,
)
from twisted.internet import reactor

from gatewayd.cli import main as cli_main
from gatewayd.testing import PluginHarness

from .helpers import DIV


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_capture_between_the_plugin_and_a_reader_records_both_directions(tmp_path):
    simulator = EsamReaderSimulator(reactor)  # the "real" reader
    simulator.start()
    out = tmp_path / "session.jsonl"
    handle = open(out, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    writer = CaptureWriter(handle)
    writer.header(port=simulator.path, baudrate=115200, parity="none")
    opener = serial_opener(SerialSettings(port=simulator.path), reactor)
    relay = CaptureRelay(reactor, opener, writer, link=tmp_path / "vendor")
    relay.start()
    harness = PluginHarness(
        EsamPlugin, {"backend": "reader", "port": str(tmp_path / "vendor")}, name="vendor"
    )
    try:
        await harness.start()
        await harness.collector.wait_for("device.online").addTimeout(5, reactor)
        result = await harness.call("identity_authentication", {"flag": 0, "div": DIV})
        await harness.call("infrared_rand", {})
    finally:
        await harness.stop()
        relay.stop()
        simulator.stop()
        handle.close()
    records = load_capture(out)
    assert {r.direction for r in records} == {HOST_TO_READER, READER_TO_HOST}
    assert [r.t for r in records] == sorted(r.t for r in records)
    link = harness.plugin.link
    sent = b"".join(r.data for r in records if r.direction == HOST_TO_READER)
    received = b"".join(r.data for r in records if r.direction == READER_TO_HOST)
    assert (len(sent), len(received)) == (link.bytes_out, link.bytes_in)
    requests = replay(records, HOST_TO_READER)
    replies = replay(records, READER_TO_HOST)
    assert all(isinstance(item, ReaderFrame) for item in requests + replies)
    assert [f.seq for f in requests] == [f.seq for f in replies]
    assert [f.command for f in requests][:2] == [ReaderCommand.POWER_ON, ReaderCommand.APDU]
    assert replies[0].data.startswith(bytes.fromhex("3B68"))  # the ATR
    # identity_authentication: 61 10, then GET RESPONSE brings R1 ‖ K1 back.
    answer = bytes.fromhex(result["rand"] + result["endata"]) + b"\x90\x00"
    assert any(reply.data == answer for reply in replies)
    assert not (tmp_path / "vendor").exists()


def write_capture(path: Path, records: list[tuple[float, str, bytes]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        clock = iter([0.0] + [t for t, _, _ in records])
        writer = CaptureWriter(handle, clock=lambda: next(clock))
        writer.header(port="/dev/ttyUSB0", baudrate=115200, parity="none")
        for _, direction, data in records:
            writer.record(direction, data)


def test_a_recorded_file_replays_through_the_framer(tmp_path):
    framer = GatewayV1Framer()
    power_on = request(7, ReaderCommand.POWER_ON, 0)
    answer = framer.encode(power_on.reply(ReaderStatus.OK, bytes.fromhex("3B680000")))
    path = tmp_path / "capture.jsonl"
    write_capture(
        path,
        [
            (0.001, HOST_TO_READER, framer.encode(power_on)),
            (0.010, READER_TO_HOST, b"\xff\xff" + answer[:5]),  # line noise, then half a frame
            (0.012, READER_TO_HOST, answer[5:]),
        ],
    )
    records = load_capture(path)
    assert records[1] == CaptureRecord(0.01, READER_TO_HOST, b"\xff\xff" + answer[:5])
    assert replay(records, HOST_TO_READER) == [power_on]
    assert replay(records, READER_TO_HOST) == [
        Rejected("garbage", b"\xff\xff"),
        ReaderFrame(7, 0x90, bytes.fromhex("003B680000")),
    ]


def test_load_capture_refuses_other_files(tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(CaptureFormatError, match="not a gatewayd-esam capture"):
        load_capture(other)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"capture": "gatewayd-esam", "version": 1}\n{"t": 1, "dir": "x"}\n')
    with pytest.raises(CaptureFormatError, match=":2: not a capture record"):
        load_capture(broken)


def test_two_runs_appended_to_one_file_replay_as_one(tmp_path):
    framer = GatewayV1Framer()
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    write_capture(first, [(0.1, HOST_TO_READER, framer.encode(request(1, 0x10, 0)))])
    write_capture(second, [(0.2, HOST_TO_READER, framer.encode(request(2, 0x10, 0)))])
    both = tmp_path / "both.jsonl"
    both.write_text(first.read_text() + second.read_text())  # what a second `capture --out` does
    assert [r.data for r in load_capture(both)] == [r.data for r in load_capture(first)] + [
        r.data for r in load_capture(second)
    ]


@pytest.mark.parametrize("case", ["unwritable_out", "missing_port"])
def test_capture_that_cannot_start_says_why_in_one_line_and_records_nothing(tmp_path, case):
    out = tmp_path / ("missing-dir" if case == "unwritable_out" else "") / "cap.jsonl"
    command = [sys.executable, "-m", "gatewayd", "esam", "capture", "--out", str(out)]
    command += ["--port", str(tmp_path / "no-such-tty"), "--duration", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    expected = "capture: cannot write" if case == "unwritable_out" else "capture: cannot start"
    assert expected in result.stderr
    assert not out.exists() or out.read_text() == ""  # no header without a capture


def test_replay_command_prints_frames(tmp_path, capsys):
    framer = GatewayV1Framer()
    path = tmp_path / "capture.jsonl"
    write_capture(path, [(0.5, HOST_TO_READER, framer.encode(request(1, 0x10, 0)) + b"\x00")])
    assert cli_main(["esam", "replay", str(path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        {
            "dir": HOST_TO_READER,
            "seq": 1,
            "direction": "request",
            "command": "POWER_ON",
            "slot": 0,
            "data": "",
        },
        {"dir": HOST_TO_READER, "rejected": "garbage", "hex": "00"},
    ]


def test_writer_lines_are_json_with_relative_time():
    handle = io.StringIO()
    ticks = iter([100.0, 100.25])
    writer = CaptureWriter(handle, clock=lambda: next(ticks))
    writer.record(READER_TO_HOST, b"\x02\x03")
    assert json.loads(handle.getvalue()) == {"t": 0.25, "dir": READER_TO_HOST, "hex": "0203"}
