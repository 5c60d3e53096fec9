"""The daemon as a real process: sd_notify, SIGTERM, kill -9 durability, bad config, the unit.

These start ``python -m gatewayd run`` as a child with the example plugin on a free port, talk to
it over TCP like a device would, and read the sqlite sink's file afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gatewayd.testing import free_port, wait_for_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def daemon_config(tmp_path: Path, api_port: int, sections: str) -> Path:
    """``tmp_path/gatewayd.yaml``: gateway ``t1`` with its state in ``tmp_path``, the API on
    ``api_port``, then ``sections`` (plugins, sinks, routes) as YAML."""
    config = tmp_path / "gatewayd.yaml"
    config.write_text(
        f"""\
gateway: {{id: t1, state_dir: {tmp_path / "state"}, log_level: info, shutdown_timeout: 8s}}
api: {{listen: "127.0.0.1:{api_port}"}}
"""
        + sections
    )
    return config


def write_config(tmp_path: Path, device_port: int, api_port: int, sink: str) -> Path:
    return daemon_config(
        tmp_path,
        api_port,
        f"""\
plugins:
  thermo: {{type: example, listen: "127.0.0.1:{device_port}"}}
sinks:
  store: {sink}
routes:
  - {{match: {{type: reading}}, sinks: [store]}}
""",
    )


def start_daemon(config: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


class Device:
    """A blocking TCP thermometer: sends readings, counts the OKs it gets back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send_readings(self, names: list[str]) -> None:
        self.sock.sendall(b"".join(f"T {n} 1.0\n".encode() for n in names))

    def read_oks(self, count: int, timeout: float = 20.0) -> int:
        """Read until ``count`` OK lines arrived (or the connection dropped); return how many."""
        seen, deadline = 0, time.monotonic() + timeout
        while seen < count and time.monotonic() < deadline:
            while b"\n" in self.buffer and seen < count:
                line, self.buffer = self.buffer.split(b"\n", 1)
                seen += line == b"OK"
            if seen >= count:
                break
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            self.buffer += chunk
        return seen

    def close(self) -> None:
        self.sock.close()


def sink_devices(db: Path) -> list[str]:
    """Devices of the readings in the sqlite sink; none while the sink has not made its table."""
    with sqlite3.connect(db) as conn:
        try:
            rows = conn.execute("SELECT device FROM events WHERE type='reading'").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return []
        return [row[0] for row in rows]


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def test_notify_ready_watchdog_stopping_and_sigterm_flushes(tmp_path):
    device_port, api_port = free_port(), free_port()
    db = tmp_path / "events.db"
    config = write_config(tmp_path, device_port, api_port, f"{{type: sqlite, path: {db}}}")
    notify_path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(notify_path)
    server.settimeout(15)
    proc = start_daemon(config, {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"})
    try:
        messages = [server.recv(4096).decode()]
        assert messages[0].startswith("READY=1"), messages
        wait_for_port(device_port)
        watchdogs = 0
        deadline = time.monotonic() + 5
        while watchdogs < 3 and time.monotonic() < deadline:
            watchdogs += server.recv(4096) == b"WATCHDOG=1"
        assert watchdogs >= 3

        device = Device(device_port)
        names = [f"s{i}" for i in range(200)]
        device.send_readings(names)
        assert device.read_oks(200) == 200
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 10
        rest = []
        server.settimeout(0.5)
        try:
            while True:
                rest.append(server.recv(4096).decode())
        except TimeoutError:
            pass
        assert any(m.startswith("STOPPING=1") for m in rest), rest
        # Every acknowledged reading reached the sink before the process exited.
        assert sorted(sink_devices(db)) == sorted(names)
    finally:
        server.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_kill_9_loses_no_acknowledged_event(tmp_path):
    """Run 1 cannot deliver (the sink's directory is a file), is killed -9 mid-stream; run 2
    delivers every event that run 1 acknowledged."""
    device_port, api_port = free_port(), free_port()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    broken = write_config(
        tmp_path, device_port, api_port, f"{{type: sqlite, path: {blocker / 'events.db'}}}"
    )
    proc = start_daemon(broken)
    try:
        wait_for_port(device_port, timeout=15)
        device = Device(device_port)
        names = [f"k{i}" for i in range(3000)]
        device.send_readings(names)
        acknowledged = device.read_oks(1500)
        proc.send_signal(signal.SIGKILL)  # mid-stream: more lines are still being processed
        proc.wait(10)
        device.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert acknowledged == 1500

    db = tmp_path / "events.db"
    working = write_config(tmp_path, device_port, api_port, f"{{type: sqlite, path: {db}}}")
    proc = start_daemon(working)
    try:
        # OKs come back in the order the lines were sent, so the first 1500 are acknowledged.
        must_have = set(names[:acknowledged])
        assert wait_until(lambda: db.exists() and must_have <= set(sink_devices(db)), 30), (
            f"missing {len(must_have - set(sink_devices(db)))} acknowledged events"
        )
        delivered = sink_devices(db)
        assert len(delivered) == len(set(delivered)), "the sqlite sink stores each id once"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def private_modes(root: Path) -> dict[str, str]:
    """Every directory (``root`` too) and file under ``root`` that is not 0700 / 0600."""
    loose = {}
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        expected = 0o700 if path.is_dir() else 0o600
        if mode != expected:
            loose[str(path.relative_to(root.parent))] = f"{mode:04o}"
    return loose


def test_everything_in_state_dir_is_private_whatever_the_umask(tmp_path):
    """Started with the usual shell umask (0022): the state directory, the queues (with their
    -wal and -shm), the sink files inside it and the plugin's directory are 0700 / 0600."""
    device_port, api_port = free_port(), free_port()
    config = daemon_config(
        tmp_path,
        api_port,
        f"""\
plugins:
  thermo: {{type: example, listen: "127.0.0.1:{device_port}"}}
sinks:
  store: {{type: sqlite, path: events.db}}
  lines: {{type: jsonl, path: out/events.jsonl}}
routes:
  - {{match: {{type: "*"}}, sinks: [store, lines]}}
""",
    )
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.umask(0o022),
    )
    try:
        wait_for_port(device_port, timeout=15)
        device = Device(device_port)
        names = [f"p{i}" for i in range(20)]
        device.send_readings(names)
        assert device.read_oks(20) == 20
        device.close()
        assert wait_until(lambda: set(names) <= set(sink_devices(state / "events.db")))
        created = {p.name for p in state.rglob("*")}
        assert {"store.db-wal", "store.db-shm", "events.db-wal", "events.jsonl", "thermo"} <= (
            created
        )
        assert private_modes(state) == {}  # while running: the WAL files exist
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert private_modes(state) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_what_an_older_gatewayd_left_readable_is_made_private_at_start(tmp_path):
    """A state directory from before (0755, 0644 queue and sink files) is tightened once at
    start, with one log line counting what changed; what gatewayd did not make is left alone."""
    device_port, api_port = free_port(), free_port()
    config = write_config(tmp_path, device_port, api_port, "{type: sqlite, path: db/events.db}")
    state = tmp_path / "state"
    old_umask = os.umask(0o022)
    try:
        for directory in ("queues", "plugins/thermo", "db"):
            (state / directory).mkdir(parents=True)
        for name in ("queues/store.db", "queues/gone.db", "db/events.db", "db/events.db.bak"):
            sqlite3.connect(state / name).close()
        (state / "plugins" / "thermo" / "seen.json").write_text("{}")
        (state / "README.txt").write_text("not gatewayd's")
        os.chmod(state, 0o755)
    finally:
        os.umask(old_umask)
    before = private_modes(state)
    assert before["state"] == "0755" and before["state/queues/store.db"] == "0644"
    proc = start_daemon(config)
    try:
        wait_for_port(device_port, timeout=15)
        device = Device(device_port)
        device.send_readings(["r1"])
        assert device.read_oks(1) == 1  # the reactor runs: SIGTERM is handled
        device.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    stderr = proc.stderr.read().decode()
    # state, queues, store.db, gone.db, plugins, plugins/thermo, seen.json, db, db/events.db
    assert stderr.count(f"made 9 files and directories in {state} private") == 1, stderr
    assert private_modes(state) == {
        "state/README.txt": "0644",  # not gatewayd's: left as it was
        "state/db/events.db.bak": "0644",  # nor a file beside the sink's that is not its own
    }


def test_a_token_file_loosened_after_the_config_check_stops_the_start(tmp_path):
    from twisted.internet import reactor

    from gatewayd.config import load_config
    from gatewayd.service import Daemon

    token = tmp_path / "api.token"
    token.write_text("a-token\n")
    token.chmod(0o600)
    config = daemon_config(tmp_path, free_port(), "")
    config.write_text(config.read_text().replace("api: {", "api: {token_file: api.token, "))
    loaded = load_config(config, environ={})
    token.chmod(0o644)
    with pytest.raises(ValueError, match=f"{token} has mode 0644; it must be 0600 or stricter"):
        Daemon(loaded, reactor)


def test_bad_config_exits_2_naming_file_line_and_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "gateway: {id: t1}\nplugins:\n  thermo:\n    type: example\n    listen: 9000\nsinks: {}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f'{config}:5: plugins.thermo.listen: expected "host:port", got 9000' in result.stderr


def test_json_log_format_is_one_object_per_line_even_for_a_failure(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    taken = busy.getsockname()[1]
    config = write_config(tmp_path, taken, free_port(), "{type: stdout}")
    config.write_text(
        config.read_text().replace("log_level: info", "log_level: info, log_format: json")
    )
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        busy.close()
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line parses
    assert result.returncode == 1
    failed = [r for r in records if r["level"] == "critical"]
    assert failed and all(r["message"] for r in records)
    assert any("Address already in use" in r["message"] + r.get("traceback", "") for r in failed)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_unit_verifies(tmp_path):
    unit = (ROOT / "systemd" / "gatewayd.service").read_text()
    lines = [line.strip() for line in unit.splitlines()]
    assert not any(line.startswith("PrivateDevices") for line in lines)  # hides /dev/ttyUSB*
    for option in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=",
        "StateDirectoryMode=0700",
        "UMask=0077",
        "ConfigurationDirectory=",
        "SupplementaryGroups=dialout",
    ):
        assert option in unit
    executable = shutil.which("gatewayd") or sys.executable
    copy = tmp_path / "gatewayd.service"
    assert "ExecStart=/opt/gatewayd/bin/gatewayd run" in unit  # the README's install steps
    copy.write_text(unit.replace("/opt/gatewayd/bin/gatewayd", executable))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line for line in (result.stdout + result.stderr).splitlines() if "gatewayd.service" in line
    ]
    assert problems == [], problems
