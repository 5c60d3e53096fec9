"""Reload against a real daemon process: SIGHUP and ``POST /api/v1/reload``.

Three plugins with live links: a power-bank cabinet's TCP connection (a socket of this test), the
heating plugin's MQTT session (a private mosquitto) and the ESAM plugin's serial reader (the
reader simulator on a pseudo-terminal). A reload that adds a sink and a route leaves all three
untouched; an invalid file changes nothing and says why; a reload that changes the cabinets'
section restarts that plugin alone, and ``api.listen`` waits for a restart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from gatewayd.protocols import powerbank as pb

from gatewayd.testing import free_port, wait_for_port
from gatewayd.testing.processes import poll_until as wait_until
from gatewayd.testing.processes import signal_and_wait
from tests.test_supervision_daemon import events, get

IMEI = "860000000000001"
CODEC = pb.Codec()

CONFIG = """\
gateway: {{id: t1, state_dir: {state}, shutdown_timeout: 5s}}
api: {{listen: "127.0.0.1:{api}"}}
plugins:
  cabinets: {{type: powerbank, listen: "127.0.0.1:{cabinets}"{cabinets_extra}}}
  heating:
    type: heating
    broker: {{host: 127.0.0.1, port: {broker}, client_id: reload-test}}
  esam: {{type: esam, backend: reader, port: "{link}", reconnect_initial: 200ms}}
sinks:
  store: {{type: sqlite, path: events.db}}
{extra_sink}routes:
  - {{sinks: [store]}}
{extra_route}"""


class Cabinet:
    """A cabinet on a blocking socket: sends a return result, reads the acknowledgement."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def returned(self, slot: int, bank: str) -> bytes | None:
        """Send a return result; the acknowledgement line, or None if the connection closed."""
        self.sock.sendall(CODEC.build(pb.ReturnResult(IMEI, slot, bank, True)))
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def closed(self, timeout: float = 10.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096) == b""
        except OSError:
            return True


def post_reload(api_port: int) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/api/v1/reload", data=b"", method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def last_reload(api_port: int) -> dict | None:
    return get(api_port, "/health")[1]["config"]["last_reload"]


def test_reload_changes_only_what_changed(tmp_path, mosquitto):
    api, cabinets = free_port(), free_port()
    link = tmp_path / "esam-link"
    ports = {
        "state": tmp_path / "state",
        "api": api,
        "cabinets": cabinets,
        "broker": mosquitto.port,
        "link": link,
    }
    config = tmp_path / "gatewayd.yaml"

    def write(**parts: str) -> None:
        text = {"cabinets_extra": "", "extra_sink": "", "extra_route": "", **parts}
        config.write_text(CONFIG.format(**ports, **text))

    write()
    reader = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "simulate", "esam", "--link", str(link)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log_path = tmp_path / "daemon.log"
    log = log_path.open("w")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # systemd's side of sd_notify
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
    )
    output = lambda: log_path.read_text()  # noqa: E731
    try:
        wait_for_port(api, timeout=30)
        wait_until(
            lambda: "esam" in output() and "port open" in output() and "connected to" in output(),
            what="the reader's port and the MQTT session",
        )
        cabinet = Cabinet(cabinets)
        assert cabinet.returned(1, "1111111111") is not None
        assert last_reload(api) is None
        while b"READY=1" not in notify.recv(4096):
            pass

        # 1. SIGHUP: a new sink and a route; every link stays as it is.
        write(
            extra_sink="  extra: {type: jsonl, path: extra.jsonl}\n",
            extra_route="  - {match: {plugin: cabinets}, sinks: [extra]}\n",
        )
        daemon.send_signal(signal.SIGHUP)
        reloading = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert b"READY=1" in notify.recv(4096)  # systemd's reload job ends here
        record = wait_until(lambda: last_reload(api), what="the reload")
        assert record["ok"] is True, record
        assert record["applied"]["sinks"]["added"] == ["extra"] and record["applied"]["routes"]
        assert record["applied"]["plugins"] == {
            "added": [],
            "changed": [],
            "removed": [],
            "reconfigured": [],
        }
        assert cabinet.returned(2, "2222222222") is not None  # the same connection
        extra = tmp_path / "state" / "extra.jsonl"
        wait_until(lambda: extra.exists() and "2222222222" in extra.read_text(), what="extra")
        assert "1111111111" not in extra.read_text()  # routed before the reload: not re-sent
        text = output()
        assert text.count("connected to 127.0.0.1:") == 1, text  # the heating MQTT session
        assert text.count(": port open") == 1, text  # the ESAM reader's serial port
        assert text.count("plugin cabinets (powerbank) started") == 1, text
        health = get(api, "/health")[1]
        assert set(health["sinks"]) == {"store", "extra"}
        assert all(p["state"] == "running" for p in health["plugins"].values())

        # 2. An invalid file: 422 with file:line, nothing changes.
        write(cabinets_extra=", max_line: -5")
        status, body = post_reload(api)
        assert status == 422 and body["error"]["code"] == "invalid_config"
        (error,) = body["reload"]["errors"]
        assert error.startswith(f"{config}:4: plugins.cabinets.max_line:"), error
        health = get(api, "/health")[1]
        assert health["config"]["last_reload"]["ok"] is False
        assert set(health["sinks"]) == {"store", "extra"} and health["status"] == "ok"
        assert cabinet.returned(3, "3333333333") is not None

        # 3. The cabinets' section changes, the extra sink goes, api.listen needs a restart.
        ports["api"] = free_port()
        write(cabinets_extra=", max_line: 256")
        status, body = post_reload(api)
        assert status == 200, body
        applied = body["reload"]["applied"]
        assert applied["plugins"]["changed"] == ["cabinets"]
        assert applied["sinks"]["removed"] == ["extra"]
        assert body["reload"]["needs_restart"] == ["api.listen"]
        assert cabinet.closed()  # the changed plugin was restarted: its connections closed
        again = Cabinet(cabinets)
        assert again.returned(1, "4444444444") is not None
        text = output()
        assert text.count("plugin cabinets (powerbank) started") == 2, text
        assert text.count("connected to 127.0.0.1:") == 1 and text.count(": port open") == 1
        assert (tmp_path / "state" / "queues" / "extra.db").exists()  # the queue stays
        assert "api.listen changed; it takes effect at the next restart" in text
        wait_until(
            lambda: any(
                "4444444444" in json.dumps(d)
                for _, _, d in events(tmp_path / "state" / "events.db")
            ),
            what="the new cabinet connection's event stored",
        )
    finally:
        signal_and_wait(daemon, signal.SIGTERM, timeout=20)
        signal_and_wait(reader, signal.SIGTERM, timeout=10)
        log.close()
        notify.close()
    assert daemon.returncode == 0, output()
