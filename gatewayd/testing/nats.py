"""A private NATS cluster with its MQTT listeners, for tests: ``NatsCluster``.

``with NatsCluster(nodes=3) as nats: ... nats.mqtt_ports[0] ...``: every node gets its own
config file, free loopback ports (client, cluster route, MQTT, monitoring) and a JetStream
store in a temporary directory; nothing is shared with a NATS server that happens to run.
NATS serves MQTT 3.1.1 on top of JetStream, so ``start()`` returns only once the JetStream
meta leader is elected and every node answers an MQTT CONNECT with a persistent session.
``kill(i)`` is a SIGKILL (a crash), ``start_node(i)`` brings one node back with its store.
The binary comes from ``PATH`` or Debian's ``/usr/sbin/nats-server`` (``apt-get install
nats-server``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from gatewayd.testing.processes import signal_and_wait

__all__ = ["NatsCluster", "find_nats_server", "mqtt_connack", "nats_server_version"]


def find_nats_server() -> str:
    """The ``nats-server`` binary: on PATH, else Debian's /usr/sbin/nats-server."""
    for candidate in ("nats-server", "/usr/sbin/nats-server"):
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError("nats-server is not installed (apt-get install nats-server)")


def nats_server_version(binary: str) -> tuple[int, ...]:
    """``nats-server --version`` as numbers: ``(2, 9, 10)``; ``()`` when it cannot be read."""
    try:
        output = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", output)
    return tuple(int(part) for part in match.groups()) if match else ()


def mqtt_connack(port: int, client_id: str, clean_session: bool, timeout: float = 5.0) -> int:
    """Send one MQTT 3.1.1 CONNECT to 127.0.0.1:``port``; the CONNACK's return code (0: accepted).

    Raises OSError when nothing answers (refused, closed, timed out).
    """
    name = client_id.encode()
    flags = 0x02 if clean_session else 0x00
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x3c" + len(name).to_bytes(2, "big") + name
    packet = bytes([0x10, len(body)]) + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(packet)
        answer = b""
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:
                raise ConnectionResetError(f"no CONNACK from 127.0.0.1:{port}")
            answer += chunk
        if answer[0] != 0x20:
            raise ConnectionError(f"not a CONNACK from 127.0.0.1:{port}: {answer!r}")
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        return answer[3]


class NatsCluster:
    """``nodes`` nats-server processes in one cluster, each with JetStream and MQTT on loopback.

    ``stream_replicas`` is the MQTT block's replica count for its streams (sessions, retained
    messages, QoS 1 messages); ``mqtt`` adds keys to every node's ``mqtt {}`` block (for example
    ``{"max_ack_pending": 1000, "ack_wait": "30s"}``). Ports: ``mqtt_ports``, ``client_ports``,
    ``http_ports`` (monitoring: ``/jsz``, ``/healthz``), by node index from 0.
    """

    cluster_name = "gatewayd-test"

    def __init__(
        self,
        nodes: int = 3,
        stream_replicas: int | None = 3,
        *,
        mqtt: dict[str, Any] | None = None,
        binary: str | None = None,
    ) -> None:
        from gatewayd.testing import free_port  # not at import: gatewayd.testing imports us

        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.binary = binary or find_nats_server()
        self.version = nats_server_version(self.binary)
        self.nodes = nodes
        self.stream_replicas = stream_replicas
        self.mqtt_settings = dict(mqtt or {})
        ports = [free_port() for _ in range(4 * nodes)]
        while len(set(ports)) < len(ports):  # free_port may hand out the same port twice
            ports = [free_port() for _ in range(4 * nodes)]
        self.client_ports = ports[0:nodes]
        self.route_ports = ports[nodes : 2 * nodes]
        self.mqtt_ports = ports[2 * nodes : 3 * nodes]
        self.http_ports = ports[3 * nodes : 4 * nodes]
        self.directory: Path | None = None
        self.processes: list[subprocess.Popen | None] = [None] * nodes

    # --- where things are ------------------------------------------------------------------

    def name(self, index: int) -> str:
        """The ``server_name`` of node ``index`` (``n1``, ``n2``, ...)."""
        return f"n{index + 1}"

    def mqtt_address(self, index: int) -> str:
        """``127.0.0.1:<mqtt port>`` of node ``index``."""
        return f"127.0.0.1:{self.mqtt_ports[index]}"

    def config_path(self, index: int) -> Path:
        assert self.directory is not None, "start() first"
        return self.directory / f"{self.name(index)}.conf"

    def log_path(self, index: int) -> Path:
        """The node's own log (stdout and stderr): read it when a test fails."""
        assert self.directory is not None, "start() first"
        return self.directory / f"{self.name(index)}.log"

    def running(self, index: int) -> bool:
        process = self.processes[index]
        return process is not None and process.poll() is None

    def config_text(self, index: int) -> str:
        """The config file of node ``index``."""
        assert self.directory is not None, "start() first"
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.route_ports)
        mqtt = [f"listen: 127.0.0.1:{self.mqtt_ports[index]}"]
        if self.stream_replicas is not None:
            mqtt.append(f"stream_replicas: {self.stream_replicas}")
        mqtt += [f"{key}: {_value(value)}" for key, value in self.mqtt_settings.items()]
        store = self.directory / f"js-{self.name(index)}"
        lines = [
            f"server_name: {self.name(index)}",
            f"listen: 127.0.0.1:{self.client_ports[index]}",
            f"http: 127.0.0.1:{self.http_ports[index]}",
            f"jetstream {{ store_dir: {json.dumps(str(store))} }}",
        ]
        if self.nodes > 1:
            lines.append(
                f"cluster {{ name: {self.cluster_name}, "
                f"listen: 127.0.0.1:{self.route_ports[index]}, routes: [{routes}] }}"
            )
        lines.append("mqtt { " + ", ".join(mqtt) + " }")
        return "\n".join(lines) + "\n"

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every node; returns once a JetStream meta leader is elected and every node
        accepts a persistent MQTT session."""
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="gatewayd-nats-"))
        deadline = time.monotonic() + timeout
        try:
            for index in range(self.nodes):
                self._spawn(index)
            for index in range(self.nodes):
                self._wait_ready(index, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, index: int, timeout: float = 30.0) -> None:
        """Start one (killed or stopped) node again, with its JetStream store; returns once it
        accepts a persistent MQTT session."""
        if self.running(index):
            return
        self._spawn(index)
        self._wait_ready(index, time.monotonic() + timeout)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``: its connections drop at once, as in a crash."""
        self._signal(index, signal.SIGKILL)

    def stop_node(self, index: int, timeout: float = 10.0) -> None:
        """Stop node ``index`` cleanly (SIGTERM; SIGKILL after ``timeout``)."""
        self._signal(index, signal.SIGTERM, timeout)

    def stop(self) -> None:
        """Stop every node and delete the configs and JetStream stores."""
        for index in range(self.nodes):
            self._signal(index, signal.SIGKILL)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- what the cluster says -------------------------------------------------------------

    def jsz(self, index: int) -> dict[str, Any]:
        """Node ``index``'s ``/jsz`` monitoring answer (JetStream state, ``meta_cluster``)."""
        url = f"http://127.0.0.1:{self.http_ports[index]}/jsz"
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())

    def meta_leader(self, index: int) -> str | None:
        """The JetStream meta leader's server name as node ``index`` sees it; None: none yet
        (and always for a single node, which has no cluster)."""
        try:
            return self.jsz(index).get("meta_cluster", {}).get("leader") or None
        except (OSError, ValueError):
            return None

    # --- helpers ---------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        path = self.config_path(index)
        path.write_text(self.config_text(index), encoding="utf-8")
        with open(self.log_path(index), "ab") as log:
            self.processes[index] = subprocess.Popen(
                [self.binary, "-c", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _wait_ready(self, index: int, deadline: float) -> None:
        """Until the node sees a meta leader and answers CONNECT (clean session off) with 0."""
        process = self.processes[index]
        assert process is not None
        last = "not started"
        probe = f"gatewayd-ready-{self.name(index)}-{os.getpid()}"
        while True:
            if process.poll() is not None:
                self.processes[index] = None
                raise RuntimeError(
                    f"nats-server {self.name(index)} exited ({process.returncode}); "
                    f"its log ends:\n{self.log_tail(index)}"
                )
            if self.nodes > 1 and self.meta_leader(index) is None:
                last = "no JetStream meta leader"
            else:
                try:
                    code = mqtt_connack(self.mqtt_ports[index], probe, clean_session=False)
                except OSError as exc:
                    last = f"MQTT: {exc!r}"
                else:
                    if code == 0:
                        # and leave no session behind
                        with contextlib.suppress(OSError):
                            mqtt_connack(self.mqtt_ports[index], probe, clean_session=True)
                        return
                    last = f"MQTT CONNACK return code {code}"
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nats-server {self.name(index)} not ready ({last}); "
                    f"its log ends:\n{self.log_tail(index)}"
                )
            time.sleep(0.1)

    def log_tail(self, index: int, size: int = 3000, warnings: bool = False) -> str:
        """The end of node ``index``'s log; ``warnings``: only its warnings, errors and leader
        changes (what explains a stall)."""
        try:
            text = self.log_path(index).read_text(errors="replace")
        except (OSError, AssertionError):
            return "(no log)"
        if warnings:
            lines = text.splitlines()
            text = "\n".join(line for line in lines if "[INF]" not in line or "leader" in line)
        return text[-size:]

    def _signal(self, index: int, signum: int, timeout: float = 10.0) -> None:
        process, self.processes[index] = self.processes[index], None
        signal_and_wait(process, signum, timeout)


def _value(value: Any) -> str:
    """A config value in NATS's syntax (numbers and booleans bare, strings quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))
