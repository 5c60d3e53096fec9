"""Request ids across ``kill -9`` of the daemon itself (``python -m gatewayd run``).

The daemon wires one command path and one request id store (``<state_dir>/commands.db``) into
the control API. A thermometer (the example plugin, a blocking TCP device here) receives PINGs:
a command answered before the crash is answered again after it, from the record, and a command
that was running when the daemon was killed is answered 500 ``outcome_unknown``; neither reaches
the device a second time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import urllib.error
import urllib.request

from gatewayd.testing import free_port, wait_for_port
from tests.test_service import daemon_config, start_daemon


class Thermometer:
    """A blocking TCP thermometer that reports once and then collects the PINGs it gets."""

    def __init__(self, port: int, name: str = "kitchen") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"T {name} 21.5\n".encode())
        self.buffer = b""

    def next_line(self, timeout: float = 10.0) -> bytes | None:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(4096)
            except (TimeoutError, OSError):
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def next_ping(self, timeout: float = 10.0) -> bool:
        while (line := self.next_line(timeout)) is not None:
            if line == b"PING":
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def ping(api_port: int, key: str) -> tuple[int, dict, str | None]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/api/v1/plugins/thermo/commands/ping",
        data=json.dumps({"device": "kitchen"}).encode(),
        headers={"content-type": "application/json", "idempotency-key": key},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer), answer.headers.get("idempotent-replayed")
    except urllib.error.HTTPError as error:
        return error.code, json.load(error), error.headers.get("idempotent-replayed")


def ping_unanswered(api_port: int, key: str) -> None:
    """A ping whose daemon is killed before it answers: the connection just closes."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        ping(api_port, key)


def test_request_ids_survive_kill_9_of_the_daemon(tmp_path):
    device_port, api_port = free_port(), free_port()
    config = daemon_config(
        tmp_path,
        api_port,
        f"""\
plugins:
  thermo: {{type: example, listen: "127.0.0.1:{device_port}", ping_timeout: 60s}}
sinks:
  store: {{type: sqlite, path: events.db}}
routes:
  - {{match: {{type: "*"}}, sinks: [store]}}
""",
    )
    proc = start_daemon(config)
    try:
        wait_for_port(api_port, timeout=15)
        device = Thermometer(device_port)
        assert device.next_line() == b"OK"
        # Answered before the crash.
        answered: list = []
        call = threading.Thread(target=lambda: answered.append(ping(api_port, "ping-1")))
        call.start()
        assert device.next_ping()
        device.sock.sendall(b"PONG\n")
        call.join(30)
        assert answered == [(200, {"ok": True, "result": {"pong": True}}, None)]
        # Running when the daemon is killed: recorded, executed, never answered.
        hanging = threading.Thread(target=ping_unanswered, args=(api_port, "ping-2"), daemon=True)
        hanging.start()
        assert device.next_ping()
        proc.kill()
        proc.wait(10)
        device.close()

        proc = start_daemon(config)
        wait_for_port(api_port, timeout=15)
        device = Thermometer(device_port)
        assert device.next_line() == b"OK"
        assert ping(api_port, "ping-1") == (200, answered[0][1], "true")
        status, body, replayed = ping(api_port, "ping-2")
        assert (status, body["error"]["code"], replayed) == (500, "outcome_unknown", "true")
        assert not device.next_ping(timeout=0.5)  # neither reached the device again
        device.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
