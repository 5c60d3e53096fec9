"""plugins/powerbank/server.py and plugin.py: framing, limits and the plugin over real sockets.

The framing tests run the connection on a ``StringTransport`` and a ``Clock``; the plugin tests
use ``PluginHarness`` with raw TCP clients (``gatewayd.testing.connect_line_client``).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable

import pytest
import pytest_twisted
from gatewayd.plugins.powerbank import PowerbankConfig, PowerbankPlugin
from gatewayd.plugins.powerbank.idlists import IdList
from gatewayd.plugins.powerbank.plugin import BANK_PATTERN, CrcConfig
from gatewayd.plugins.powerbank.server import CabinetServer
from gatewayd.protocols import crc as crc_module
from gatewayd.protocols import powerbank as pb
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from gatewayd import cli
from gatewayd.testing import PluginHarness, connect_line_client, free_port

IMEI = "860000000000001"
BANK = "0000000012"
CODEC = pb.Codec()


def frame(packet: pb.Packet) -> bytes:
    return CODEC.build(packet)


# --- framing on a StringTransport ------------------------------------------------------------


class Recorder:
    """A CabinetHandler that records what the connection reports."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.too_long: list[bytes] = []
        self.lost: list[str] = []

    def frame_received(self, conn, data: bytes) -> None:
        self.frames.append(data)

    def frame_too_long(self, conn, data: bytes) -> None:
        self.too_long.append(data)

    def connection_lost(self, conn, reason: str) -> None:
        self.lost.append(reason)

    def encode(self, packet) -> bytes:
        return b"built\r\n"


def connection(**options):
    clock = Clock()
    recorder = Recorder()
    server = CabinetServer(recorder, clock, **options)
    conn = server.buildProtocol(None)
    transport = StringTransportWithDisconnection()
    transport.protocol = conn
    conn.makeConnection(transport)
    return conn, transport, recorder, clock, server


def test_frames_end_at_newline_carriage_return_or_closing_quote_brace():
    conn, _, recorder, _, _ = connection()
    conn.dataReceived(b'{"A"}\r\n{"B"}\n{"C"}\r{"D"}{"E"}')
    assert recorder.frames == [b'{"A"}', b'{"B"}', b'{"C"}', b'{"D"}', b'{"E"}']


def test_a_frame_split_across_reads_is_reassembled():
    conn, _, recorder, _, _ = connection()
    data = frame(pb.ReturnQuery(IMEI, 2, BANK)) + frame(pb.Heartbeat(IMEI))
    for byte in data:
        conn.dataReceived(bytes([byte]))
    assert recorder.frames == [line.rstrip() for line in data.splitlines(keepends=True)]


def test_modem_noise_is_dropped_and_frames_resynchronise_on_brace_quote():
    conn, _, recorder, _, server = connection()
    conn.dataReceived(b'AT\r\n+CSQ: 23,99\r{"A"}\r\nRING\r\nxx{"B"}  \r\n\r\n')
    assert recorder.frames == [b'{"A"}', b'{"B"}']
    assert server.noise == 4  # AT, +CSQ, RING, xx


def powerbank_log_lines() -> tuple[list[str], Callable[[], None]]:
    """(lines the power-bank server logs, a function that stops collecting them)."""
    from twisted.logger import formatEvent, globalLogPublisher

    logged: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "gatewayd.plugins.powerbank.server":
            logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    return logged, lambda: globalLogPublisher.removeObserver(observe)


def test_a_connection_sending_only_noise_is_logged_once_with_a_masked_sample():
    logged, stop = powerbank_log_lines()
    try:
        conn, _, recorder, clock, server = connection()
        conn.dataReceived(b"+CSQ: 23,99\r\n" * 19)
        assert logged == []  # modem chatter alone is not news
        conn.dataReceived(b'AT+QICSGP=1,"cmnet","user","secret-pw",1\r\n')
        conn.dataReceived(b"+CSQ: 23,99\r\n" * 50)
    finally:
        stop()
    assert server.noise == 70 and recorder.frames == []
    [line] = logged
    assert "sent 20 lines the codec cannot use and no valid frame yet" in line
    assert 'b\'AT+QICSGP=1,"...","...","...",1\'' in line
    assert "secret" not in line and "user" not in line.split("yet")[1]


def test_noise_from_a_cabinet_that_sent_a_valid_frame_is_only_counted():
    logged, stop = powerbank_log_lines()
    try:
        conn, _, _, _, server = connection()
        conn.imei = IMEI  # the registry sets it on the first valid frame
        conn.dataReceived(b"RING\r\n" * 40)
    finally:
        stop()
    assert server.noise == 40 and logged == []


def test_noise_warnings_about_many_connections_come_at_most_every_10_s():
    logged, stop = powerbank_log_lines()
    try:
        first, _, _, clock, server = connection()
        first.dataReceived(b"xx\r\n" * 20)
        second = server.buildProtocol(None)
        second.makeConnection(StringTransportWithDisconnection())
        second.dataReceived(b"yy\r\n" * 20)  # within 10 s of the first: not logged
        clock.advance(10)
        third = server.buildProtocol(None)
        third.makeConnection(StringTransportWithDisconnection())
        third.dataReceived(b"zz\r\n" * 20)
    finally:
        stop()
    assert len(logged) == 2 and "b'xx'" in logged[0] and "b'zz'" in logged[1]


def test_non_ascii_lines_go_to_the_codec_even_without_brace_quote():
    conn, _, recorder, _, _ = connection()
    fullwidth = "｛“860000000000001，CH，0C49”｝".encode()
    conn.dataReceived(fullwidth + b"\r\n")
    assert recorder.frames == [fullwidth]
    assert CODEC.parse(recorder.frames[0]) == pb.Heartbeat(IMEI)


def test_more_than_max_line_bytes_closes_the_connection():
    conn, transport, recorder, _, server = connection(max_line=64)
    conn.dataReceived(b'{"' + b"9" * 70)
    assert recorder.too_long == [b'{"' + b"9" * 62]
    assert not transport.connected
    assert recorder.lost == ["line_too_long"]
    assert server.lines_too_long == 1
    conn.dataReceived(b'"}\r\n')  # whatever still arrives is ignored
    assert recorder.frames == []


def test_a_complete_line_over_max_line_also_closes():
    conn, transport, recorder, _, _ = connection(max_line=64)
    conn.dataReceived(b'{"A"}\r\n{"' + b"x" * 80 + b'"}\r\n{"B"}\r\n')
    assert recorder.frames == [b'{"A"}']
    assert recorder.lost == ["line_too_long"]


@pytest.mark.parametrize("end", [b"\r\n", b"\r", b"\n", b""])
def test_max_line_counts_one_frame_not_the_whole_read(end):
    """Cabinets send frames back to back: five 32-byte frames in one read of 160+ bytes."""
    conn, transport, recorder, _, _ = connection(max_line=64)
    one = frame(pb.Heartbeat(IMEI)).rstrip()
    conn.dataReceived((one + end) * 5 + one[:20])  # and the start of a sixth
    assert recorder.frames == [one] * 5
    assert transport.connected and recorder.lost == []
    conn.dataReceived(one[20:] + end)
    assert recorder.frames == [one] * 6


def test_rate_limit_pauses_reading_and_delivers_later_without_loss():
    conn, transport, recorder, clock, server = connection(rate=10.0, burst=2)
    conn.dataReceived(b"".join(b'{"%d"}\r\n' % n for n in range(5)))
    assert recorder.frames == [b'{"0"}', b'{"1"}']
    assert transport.producerState == "paused"
    conn.dataReceived(b'{"5"}\r\n')  # already in flight: queued behind, order kept
    clock.advance(0.1)
    assert len(recorder.frames) == 3
    for _ in range(3):
        clock.advance(0.1)
    assert recorder.frames == [b'{"%d"}' % n for n in range(6)]
    assert transport.producerState == "producing"
    assert server.rate_limited >= 1


def test_idle_timeout_is_reset_by_each_frame():
    conn, transport, recorder, clock, _ = connection(idle_timeout=180.0)
    clock.advance(179)
    conn.dataReceived(b'{"A"}\r\n')
    clock.advance(179)
    assert transport.connected
    clock.advance(2)
    assert not transport.connected
    assert recorder.lost == ["idle_timeout"]
    assert clock.getDelayedCalls() == []


def test_max_connections_refuses_further_connections():
    _, _, _, _, server = connection(max_connections=1)
    assert server.buildProtocol(None) is None
    assert server.refused == 1


# --- config ----------------------------------------------------------------------------------


def test_config_defaults_and_idle_timeout_from_heartbeat():
    config = PowerbankConfig(type="powerbank")
    assert (config.listen, config.max_line, config.max_connections) == ("0.0.0.0:9000", 512, 20000)
    assert (config.lend_timeout, config.banks, config.emit_heartbeats) == (
        20.0,
        "accept_all",
        False,
    )
    assert config.effective_idle_timeout == 180.0
    assert PowerbankConfig(type="powerbank", heartbeat_interval="30s").effective_idle_timeout == 90
    assert PowerbankConfig(type="powerbank", idle_timeout=0).effective_idle_timeout is None


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="a string of 1..32 letters or digits"):
        PowerbankConfig(type="powerbank", banks=[12])
    with pytest.raises(ValueError, match="expected accept_all, a list"):
        PowerbankConfig(type="powerbank", banks="accept-all")
    with pytest.raises(ValueError, match="IMEI of 15 digits"):
        PowerbankConfig(type="powerbank", allow_imei=["12345"])
    with pytest.raises(ValueError, match="no such file"):
        PowerbankConfig(type="powerbank", allow_imei_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="lend_timeout"):
        PowerbankConfig(type="powerbank", lend_timeout=0)
    assert PowerbankConfig(type="powerbank", allow_imei=[860000000000001]).allow_imei == [IMEI]


def test_crc_mode_spelling_of_the_specification_still_works():
    assert PowerbankConfig(type="powerbank", crc_mode="log").crc.mode == "log"
    both = PowerbankConfig(type="powerbank", crc_mode="off", crc={"algorithm": "xmodem"}).crc
    assert (both.mode, both.algorithm) == ("off", "xmodem")
    with pytest.raises(ValueError, match="give crc.mode or crc_mode, not both"):
        PowerbankConfig(type="powerbank", crc_mode="off", crc={"mode": "log"})


def test_crc_config_choices_are_the_codecs():
    fields = CrcConfig.model_fields
    assert set(fields["algorithm"].annotation.__args__) == set(crc_module.ALGORITHMS)
    assert set(fields["span"].annotation.__args__) == set(pb.SPANS)
    assert set(fields["mode"].annotation.__args__) == set(pb.CRC_MODES)


def test_id_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "banks.txt"
    path.write_text("# our banks\nB1 B2, B3\nnot-valid!\n")
    clock = Clock()
    banks = IdList("banks", BANK_PATTERN, (), path, clock=clock)
    banks.load()
    assert "B2" in banks and "B4" not in banks and "not-valid!" not in banks
    path.write_text("B4\n")
    assert "B4" not in banks  # checked at most once a second
    clock.advance(1)
    assert "B4" in banks and "B1" not in banks
    path.unlink()
    clock.advance(1)
    assert "B4" in banks  # an unreadable file keeps the last list


# --- the plugin over real TCP ------------------------------------------------------------------


def start(durable="now", **config):
    port = free_port()
    harness = PluginHarness(
        PowerbankPlugin, {"listen": f"127.0.0.1:{port}", **config}, durable=durable, name="cabinets"
    )
    return harness, port


def parse(line: bytes) -> pb.Packet:
    return CODEC.parse(line)


@pytest_twisted.inlineCallbacks
def test_acknowledgement_leaves_only_after_the_event_is_durable():
    harness, port = start(durable="manual")
    yield harness.start()
    client = yield connect_line_client(port)
    try:
        client.send(frame(pb.ReturnResult(IMEI, 1, BANK, True)).rstrip())
        yield harness.collector.wait_for("return.succeeded").addTimeout(5, reactor)
        event = harness.collector.of_type("return.succeeded")[0]
        assert (event.device, event.data, event.protocol) == (
            IMEI,
            {"slot": 1, "bank": BANK},
            "powerbank",
        )
        assert event.raw == frame(pb.ReturnResult(IMEI, 1, BANK, True)).decode().rstrip()
        with pytest.raises(defer.TimeoutError):
            yield client.next_line(timeout=0.3)
        harness.collector.release()
        answer = yield client.next_line()
        assert answer + b"\n" == frame(pb.ReturnResultAck(IMEI, 1, BANK, True))
        assert harness.context.metrics.frames_in == 1
        assert harness.context.metrics.frames_out == 1
    finally:
        client.close()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_bad_crc_is_frame_invalid_and_the_connection_stays_usable():
    harness, port = start()
    yield harness.start()
    client = yield connect_line_client(port)
    try:
        good = frame(pb.ReturnQuery(IMEI, 2, BANK)).decode().rstrip()
        bad = re.sub(r",[0-9A-F]{4}\"\}$", ',0000"}', good)
        client.send(bad)
        client.send("hello?{")
        client.send(good)
        answer = yield client.next_line()
        assert parse(answer) == pb.ReturnQueryAnswer(IMEI, 2, BANK, True)
        invalid = harness.collector.of_type("frame.invalid")
        assert [(e.data["reason"], e.raw, e.device) for e in invalid] == [
            ("crc", bad, IMEI),  # not yet bound, but the frame names its cabinet
            ("format", "hello?{", None),
        ]
        assert harness.context.metrics.frames_invalid == 2
        assert harness.collector.types()[-1] == "device.online"
    finally:
        client.close()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_line_over_the_limit_closes_only_that_connection():
    harness, port = start(max_line=64)
    yield harness.start()
    bad = yield connect_line_client(port)
    good = yield connect_line_client(port)
    try:
        bad.send('{"' + "8" * 100 + '"}')
        yield bad.closed.addTimeout(5, reactor)
        good.send(frame(pb.ReturnQuery(IMEI, 1, BANK)).rstrip())
        assert parse((yield good.next_line())) == pb.ReturnQueryAnswer(IMEI, 1, BANK, True)
        invalid = harness.collector.of_type("frame.invalid")
        assert [e.data["reason"] for e in invalid] == ["length"]
        assert len(invalid[0].raw) == 64
    finally:
        good.close()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_second_connection_of_an_imei_replaces_the_first():
    harness, port = start()
    yield harness.start()
    first = yield connect_line_client(port)
    second = yield connect_line_client(port)
    try:
        first.send(frame(pb.Heartbeat(IMEI)).rstrip())
        yield harness.collector.wait_for("device.online").addTimeout(5, reactor)
        second.send(frame(pb.Heartbeat(IMEI)).rstrip())
        yield first.closed.addTimeout(5, reactor)
        online = harness.collector.of_type("device.online")
        assert [e.data["replaced"] for e in online] == [False, True]
        assert "device.offline" not in harness.collector.types()
        query = harness.call("query", {"imei": IMEI})
        assert parse((yield second.next_line())) == pb.StatusQuery(IMEI)
        second.send(frame(pb.StatusReport(IMEI, (pb.SlotStatus(1, pb.SlotState.FULL, BANK),))))
        result = yield query
        assert result["slots"][0] == {"slot": 1, "state": "full", "bank": BANK}
        [device] = harness.plugin.devices()
        assert (device.id, device.online, device.details["slots"][0]["bank"]) == (IMEI, True, BANK)
    finally:
        second.close()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_allow_imei_closes_unknown_cabinets(tmp_path):
    allowed = tmp_path / "imeis.txt"
    allowed.write_text("860000000000009\n")
    harness, port = start(allow_imei=[IMEI], allow_imei_file=str(allowed))
    yield harness.start()
    stranger = yield connect_line_client(port)
    known = yield connect_line_client(port)
    listed = yield connect_line_client(port)
    try:
        stranger.send(frame(pb.Heartbeat("860000000000002")).rstrip())
        yield stranger.closed.addTimeout(5, reactor)
        known.send(frame(pb.Heartbeat(IMEI)).rstrip())
        listed.send(frame(pb.Heartbeat("860000000000009")).rstrip())
        yield harness.collector.wait_for("device.online", 2).addTimeout(5, reactor)
        invalid = harness.collector.of_type("frame.invalid")
        assert [(e.device, e.data["reason"]) for e in invalid] == [
            ("860000000000002", "unknown_device")
        ]
    finally:
        known.close()
        listed.close()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_lend_and_query_commands_over_tcp_with_404_and_504():
    harness, port = start(query_timeout=0.3)
    yield harness.start()
    client = yield connect_line_client(port)
    try:
        from gatewayd.plugin import BadArguments, DeviceTimeout, NotFound

        with pytest.raises(NotFound):
            yield harness.call("query", {"imei": IMEI})
        with pytest.raises(BadArguments, match="slot"):
            yield harness.call("lend", {"imei": IMEI, "slot": 4, "bank": BANK})
        client.send(frame(pb.Heartbeat(IMEI)).rstrip())
        yield harness.collector.wait_for("device.online").addTimeout(5, reactor)
        with pytest.raises(DeviceTimeout):
            yield harness.call("query", {"imei": IMEI})
        yield client.next_line()  # the unanswered CQ
        lend = harness.call("lend", {"imei": IMEI, "slot": 3, "bank": BANK})
        assert parse((yield client.next_line())) == pb.LendRequest(IMEI, 3, BANK)
        client.send(frame(pb.LendResult(IMEI, 3, BANK, True)).rstrip())
        assert parse((yield client.next_line())) == pb.LendResultAck(IMEI, 3, BANK, True)
        assert (yield lend) == {"outcome": "succeeded", "slot": 3, "bank": BANK}
    finally:
        client.close()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_idle_cabinet_goes_offline_and_keepalive_is_on():
    harness, port = start(heartbeat_interval=0.1)  # idle timeout 0.3 s
    yield harness.start()
    client = yield connect_line_client(port)
    client.send(frame(pb.Heartbeat(IMEI)).rstrip())
    yield harness.collector.wait_for("device.online").addTimeout(5, reactor)
    [conn] = harness.plugin.server.connections
    assert conn.transport.getTcpKeepAlive()
    started = time.monotonic()
    yield client.closed.addTimeout(5, reactor)
    assert 0.2 < time.monotonic() - started < 2
    assert harness.collector.of_type("device.offline")[0].data["reason"] == "idle_timeout"
    assert [(d.id, d.online) for d in harness.plugin.devices()] == [(IMEI, False)]
    yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_max_connections_over_tcp_and_stop_closes_everything():
    harness, port = start(max_connections=2)
    yield harness.start()
    clients = []
    for _ in range(3):
        clients.append((yield connect_line_client(port)))
    yield clients[2].closed.addTimeout(5, reactor)
    assert harness.plugin.server.refused == 1
    clients[0].send(frame(pb.Heartbeat(IMEI)).rstrip())
    yield harness.collector.wait_for("device.online").addTimeout(5, reactor)
    yield harness.stop()
    yield clients[0].closed.addTimeout(5, reactor)
    yield clients[1].closed.addTimeout(5, reactor)
    assert harness.collector.of_type("device.offline")[0].data["reason"] == "shutdown"


@pytest_twisted.inlineCallbacks
def test_rate_limit_over_tcp_delays_but_loses_nothing():
    harness, port = start(rate_limit={"rate": 100, "burst": 5})
    yield harness.start()
    client = yield connect_line_client(port)
    try:
        started = time.monotonic()
        client.transport.write(b"".join(frame(pb.ReturnQuery(IMEI, 1, f"B{n}")) for n in range(25)))
        answers = []
        for _ in range(25):
            answers.append(parse((yield client.next_line())))
        assert [a.bank for a in answers] == [f"B{n}" for n in range(25)]
        assert time.monotonic() - started >= 0.15  # 20 frames beyond the burst at 100/s
        assert harness.plugin.server.rate_limited >= 1
    finally:
        client.close()
        yield harness.stop()


# --- command line ----------------------------------------------------------------------------


def test_decode_prints_the_packet_and_crc_check(capsys):
    line = frame(pb.LendResult(IMEI, 1, BANK, True)).decode().rstrip()
    assert cli.main(["decode", "powerbank", line]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["packet"]["type"] == "lend_result" and out["packet"]["slot"] == 1
    assert out["crc"]["ok"] is True
    broken = line[:-6] + '0000"}'
    assert cli.main(["decode", "powerbank", broken]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["crc"]["ok"], out["crc"]["expected"]) == (False, line[-6:-2])
    assert cli.main(["decode", "powerbank", "nonsense"]) == 1
    assert "invalid powerbank frame (format)" in capsys.readouterr().err


def test_crc_detect_prints_the_settings_that_match_all_lines(capsys):
    codec = pb.Codec(pb.CrcSettings("xmodem", "brace_to_last_comma", "little", "lower"))
    lines = [
        codec.build(pb.Heartbeat(IMEI)).decode().rstrip(),
        codec.build(pb.LendResult(IMEI, 2, BANK, True)).decode().rstrip() + "\\r\\n",
        codec.build(pb.ReturnQuery(IMEI, 3, BANK)).decode().rstrip(),
    ]
    assert cli.main(["crc-detect", *lines]) == 0
    out = capsys.readouterr().out
    assert (
        "crc: {algorithm: xmodem, span: brace_to_last_comma, byte_order: little, case: lower}"
        in out
    )
    assert cli.main(["crc-detect", "--json", *lines]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found[0] == {
        "algorithm": "xmodem",
        "span": "brace_to_last_comma",
        "byte_order": "little",
        "case": "lower",
    }
    assert cli.main(["crc-detect", lines[0][:-6] + 'ZZZZ"}']) == 1


def test_simulate_powerbank_runs_from_the_command_line(tmp_path):
    """``gatewayd simulate powerbank`` is registered and runs against a listener for a moment."""
    import socket
    import subprocess
    import sys

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gatewayd",
            "simulate",
            "powerbank",
            "--connect",
            f"127.0.0.1:{port}",
            "--cabinets",
            "2",
            "--heartbeat",
            "0.2",
            "--duration",
            "1.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    try:
        server.settimeout(10)
        conn, _ = server.accept()
        conn.settimeout(10)
        data = b""
        while data.count(b"\n") < 2:
            data += conn.recv(4096)
        assert parse(data.splitlines()[0]) == pb.Heartbeat(IMEI)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()


def test_reference_config_documents_every_key_with_its_default():
    """The commented section in etc/gatewayd.yaml, uncommented, is the default config."""
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "etc" / "gatewayd.yaml").read_text()
    start = text.index("  # cabinets:\n")
    block = text[start : text.index("\n\n", start)]
    uncommented = "\n".join(line.removeprefix("  # ") for line in block.splitlines())
    section = yaml.safe_load(uncommented)["cabinets"]
    config = PowerbankConfig(**section)
    assert set(section) == set(PowerbankConfig.model_fields)
    assert config.model_dump() == PowerbankConfig(type="powerbank").model_dump()


def test_frames_after_a_refusal_in_the_same_read_are_not_handled():
    clock = Clock()
    harness = PluginHarness(
        PowerbankPlugin, {"listen": "127.0.0.1:0", "allow_imei": [IMEI]}, reactor=clock
    )
    conn = harness.plugin.server.buildProtocol(None)
    transport = StringTransportWithDisconnection()
    transport.protocol = conn
    conn.makeConnection(transport)
    conn.dataReceived(frame(pb.Heartbeat("860000000000002")) * 3)
    assert [e.data["reason"] for e in harness.collector.events] == ["unknown_device"]
    assert not transport.connected


def test_sample_config_is_valid():
    from pathlib import Path

    from gatewayd.config import check_config_main

    sample = Path(__file__).resolve().parents[2] / "plugins" / "powerbank" / "sample.yaml"
    assert check_config_main(str(sample)) == 0


_FRAMES = [
    frame(pb.Heartbeat(IMEI)),
    frame(pb.ReturnQuery(IMEI, 2, BANK)),
    frame(pb.LendResult(IMEI, 1, BANK, True)),
    frame(pb.StatusReport(IMEI, (pb.SlotStatus(3, pb.SlotState.FAULT),))),
]


def _stream_parts():
    from hypothesis import strategies as st

    return st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.sampled_from(_FRAMES),
            st.sampled_from([b'{"', b'"}', b"\r", b"\n", b",", "，".encode(), b"\xff"]),
        ),
        max_size=30,
    )


def test_any_byte_stream_yields_only_events_never_an_exception():
    from hypothesis import given, settings

    @settings(max_examples=200, deadline=None)
    @given(parts=_stream_parts())
    def check(parts):
        clock = Clock()
        harness = PluginHarness(
            PowerbankPlugin, {"listen": "127.0.0.1:0", "max_line": 128}, reactor=clock
        )
        conn = harness.plugin.server.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = conn
        conn.makeConnection(transport)
        for part in parts:
            conn.dataReceived(part)
        clock.advance(1000)  # idle timeout, rate-limit resumes
        assert harness.failures == []
        assert harness.context.metrics.internal_errors == 0
        allowed = {"device.online", "device.offline", "frame.invalid", "lend.succeeded",
                   "slots.status", "alarm.slot_fault"}  # fmt: skip
        assert {e.type for e in harness.collector.events} <= allowed
        for event in harness.collector.of_type("frame.invalid"):
            assert event.data["reason"] in {*pb.ERROR_REASONS, "length", "imei_mismatch"}
        assert not transport.connected

    check()
