"""``gatewayd simulate FAMILY`` prints what it did when it stops: one JSON line with ``--json``.

Each test runs a simulator in a child process against a bare peer that counts on its own side
(a TCP listener, a broker subscriber, the far end of the reader's pty) and checks the summary's
counts against that peer's: what a load test does to compare sent with stored.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
from gatewayd.protocols import hygw
from gatewayd.protocols.powerbank import Codec, Heartbeat, StatusQuery, StatusReport
from gatewayd.protocols.reader_framing import (
    DEFAULT_FRAMING,
    ReaderCommand,
    ReaderFrame,
    framer_for,
    request,
)

from gatewayd.testing import free_port

#: The peer's answer to one line a simulator sent: bytes to send back, or None.
Answer = Callable[[bytes], bytes | None]


class Listener:
    """A bare TCP server in threads: keeps every line each connection sent until it closed."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.lines: list[bytes] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.readers: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            reader = threading.Thread(target=self._read, args=(conn,), daemon=True)
            self.readers.append(reader)
            reader.start()

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            greeting = self.answer(b"")  # what the peer says when a device connects
            if greeting:
                conn.sendall(greeting)
            while data := conn.recv(65536):
                *lines, buffer = (buffer + data).split(b"\n")
                for line in lines:
                    self.lines.append(line)
                    reply = self.answer(line)
                    if reply:
                        conn.sendall(reply)

    def close(self) -> None:
        """Stop accepting; wait for every connection's end (the simulator closes them)."""
        self.server.close()
        for reader in self.readers:
            reader.join(5)


def simulate(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gatewayd", "simulate", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def one_json_line(stdout: str) -> dict:
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout  # nothing else on stdout
    return json.loads(lines[0])


def test_powerbank_summary_counts_what_the_listener_received():
    codec = Codec()
    queried: set[str] = set()

    def answer(line: bytes) -> bytes | None:
        """Ask each cabinet for its status once, on its first heartbeat."""
        packet = codec.parse(line) if line else None
        if isinstance(packet, Heartbeat) and packet.imei not in queried:
            queried.add(packet.imei)
            return codec.build(StatusQuery(packet.imei))
        return None

    listener = Listener(answer)
    result = simulate(
        "powerbank",
        *("--connect", f"127.0.0.1:{listener.port}", "--cabinets", "2"),
        *("--heartbeat", "0.1", "--return-interval", "0", "--duration", "2", "--json"),
    )
    listener.close()
    assert result.returncode == 0, result.stderr
    summary = one_json_line(result.stdout)
    got = Counter(type(codec.parse(line)).__name__ for line in listener.lines)
    assert summary["family"] == "powerbank" and 1.5 < summary["seconds"] < 5
    assert summary["sent"] == {"heartbeat": got["Heartbeat"], "status_report": 2}
    assert got["Heartbeat"] > 10 and got[StatusReport.__name__] == 2
    assert summary["received"] == {"status_query": 2}
    assert summary["errors"] == {}
    assert (summary["cabinets"], summary["connects"], summary["reconnects"]) == (2, 2, 0)


def test_powerbank_summary_on_sigterm_counts_failed_connects():
    command = [sys.executable, "-m", "gatewayd", "simulate", "powerbank", "--json"]
    command += ["--connect", f"127.0.0.1:{free_port()}", "--cabinets", "3"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:  # running: the first refused connect is logged
            if "cannot connect" in line:
                break
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0
    summary = one_json_line(stdout)
    assert summary["sent"] == {} and summary["received"] == {}
    assert summary["errors"]["connect_failed"] >= 1 and summary["connects"] == 0


def test_example_summary_counts_readings_oks_and_pongs():
    def answer(line: bytes) -> bytes | None:
        if not line:
            return b"PING\n"
        return b"OK\n" if line.startswith(b"T ") else None

    listener = Listener(answer)
    args = ("--connect", f"127.0.0.1:{listener.port}", "--interval", "0.1", "--duration", "1.5")
    result = simulate("example", *args, "--json")
    listener.close()
    assert result.returncode == 0, result.stderr
    summary = one_json_line(result.stdout)
    readings = sum(1 for line in listener.lines if line.startswith(b"T "))
    assert readings > 10 and summary["sent"] == {"reading": readings, "pong": 3}
    assert listener.lines.count(b"PONG") == 3
    received = summary["received"]
    assert received["ping"] == 3 and readings - 3 <= received["ok"] <= readings
    assert summary["errors"] == {} and summary["connects"] == 3


def test_the_summary_without_json_is_one_readable_line():
    result = simulate("example", "--connect", f"127.0.0.1:{free_port()}", "--duration", "1")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"example simulator: 0 lines sent, 0 lines received, 3 errors \(connect_failed 3\), "
        r"devices 3, connects 0, 1\.\d s\n",
        result.stdout,
    ), result.stdout


def test_heating_summary_counts_what_the_broker_delivered(mosquitto):
    seen: Counter[str] = Counter()
    by_gateway: Counter[str] = Counter()
    subscriber = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="summary-test")

    def on_message(client, userdata, message):  # noqa: ANN001, ANN202
        decoded = hygw.decode_message(message.payload, topic=message.topic)
        seen[f"msg_{decoded.msg_id}"] += 1
        by_gateway[decoded.gw_id] += 1
        # Ask each gateway for its status once, after its power-up report: it subscribes to
        # its commands right after publishing that report, so a command sent then may be lost.
        if by_gateway[decoded.gw_id] == 2:
            client.publish(
                hygw.topic("get", decoded.gw_id), hygw.build_status_request(decoded.gw_id)
            )

    subscriber.on_message = on_message
    subscriber.connect("127.0.0.1", mosquitto.port)
    subscriber.subscribe(f"{hygw.DEFAULT_PREFIX}/set/#")
    subscriber.loop_start()
    try:
        result = simulate(
            "heating",
            *("--broker", mosquitto.address, "--gateways", "2", "--interval", "0.3"),
            *("--heartbeat", "0.5", "--duration", "2", "--json"),
        )
        assert result.returncode == 0, result.stderr
        summary = one_json_line(result.stdout)
        deadline = time.monotonic() + 5
        while seen != summary["sent"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()
    assert summary["sent"] == dict(seen) and seen["msg_20"] >= 6 and seen["msg_1"] >= 4
    assert summary["received"] == {"msg_1": 2}
    assert set(summary["errors"]) <= {"not_connected"}  # a report due before the link was up
    assert (summary["gateways"], summary["meters"], summary["connects"]) == (2, 6, 2)


def test_esam_summary_counts_requests_answers_and_rejected_bytes(tmp_path: Path):
    link = tmp_path / "reader"
    command = [sys.executable, "-m", "gatewayd", "simulate", "esam", "--link", str(link)]
    process = subprocess.Popen(
        [*command, "--duration", "2", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not link.is_symlink() and time.monotonic() < deadline:
            time.sleep(0.02)
        replies = talk_to_reader(link)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert [frame.command & 0x7F for frame in replies] == [1, 1, 1, 0x10]
    summary = one_json_line(stdout)  # the pty's path went to stderr
    assert "/dev/pts/" in stderr
    assert summary["received"] == {"status": 3, "power_on": 1} == summary["sent"]
    assert summary["statuses"] == {"ok": 4} and summary["unanswered"] == 0
    assert summary["errors"] == {"rejected_garbage": 1} and summary["mode"] == "normal"


def talk_to_reader(link: Path) -> list[ReaderFrame]:
    """Garbage, three STATUS requests and a POWER_ON to the reader; its four replies."""
    framer = framer_for(DEFAULT_FRAMING)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        requests = [request(n, ReaderCommand.STATUS, 0) for n in range(3)]
        requests.append(request(3, ReaderCommand.POWER_ON, 0))
        os.write(fd, b"noise" + b"".join(framer.encode(frame) for frame in requests))
        replies: list[ReaderFrame] = []
        deadline = time.monotonic() + 10
        while len(replies) < 4 and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                items = framer.feed(os.read(fd, 4096))
                replies += [item for item in items if isinstance(item, ReaderFrame)]
        return replies
    finally:
        os.close(fd)
