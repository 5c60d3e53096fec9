"""Brokers for the MQTT tests: mosquitto with a config file (TLS, passwords), a silent one, and
a proxy that can swallow our PUBACKs (so the broker redelivers)."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

from twisted.internet import protocol

from gatewayd.testing import free_port, wait_for_port


class ConfiguredMosquitto:
    """mosquitto -c FILE on a free loopback port; ``lines`` are added to the config.

    Its directory (config, certificates, log) is removed by ``close()``, else once the broker
    object is garbage or the test process exits: ``stop()`` keeps it, for a ``start()`` again or
    a log read after the stop.
    """

    def __init__(self, lines: list[str], directory: Path | None = None) -> None:
        self.directory = directory or Path(tempfile.mkdtemp(prefix="gatewayd-mosquitto-"))
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        os.chmod(self.directory, 0o755)  # mosquitto drops root for the mosquitto user
        self.port = free_port()
        self.config = self.directory / "mosquitto.conf"
        self.config.write_text(
            "\n".join([f"listener {self.port} 127.0.0.1", "persistence false", *lines]) + "\n"
        )
        for path in self.directory.iterdir():
            os.chmod(path, 0o644)
        self.process: subprocess.Popen | None = None

    def start(self) -> ConfiguredMosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen(
            [binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)
        self.process = None

    def close(self) -> None:
        """Stop the broker and remove its directory."""
        self.stop()
        self._remove()


def password_broker(username: str, password: str) -> ConfiguredMosquitto:
    directory = Path(tempfile.mkdtemp(prefix="gatewayd-mosquitto-"))
    passwd = directory / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), username, password],
        check=True,
        capture_output=True,
    )
    return ConfiguredMosquitto(
        ["allow_anonymous false", f"password_file {passwd}"], directory=directory
    )


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: Any, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("gatewayd test CA"))
        .issuer_name(name("gatewayd test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    import ipaddress

    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(f"gatewayd test {role}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if role == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        paths[f"{role}_cert"] = directory / f"{role}.pem"
        paths[f"{role}_key"] = directory / f"{role}.key"
        paths[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, paths[f"{role}_key"])
    return paths


def tls_broker() -> tuple[ConfiguredMosquitto, dict[str, Path]]:
    """A mosquitto that needs TLS and a client certificate signed by the test CA."""
    directory = Path(tempfile.mkdtemp(prefix="gatewayd-mosquitto-"))
    paths = make_certificates(directory)
    broker = ConfiguredMosquitto(
        [
            "allow_anonymous true",
            f"cafile {paths['ca']}",
            f"certfile {paths['server_cert']}",
            f"keyfile {paths['server_key']}",
            "require_certificate true",
        ],
        directory=directory,
    )
    return broker, paths


class SilentBrokerProtocol(protocol.Protocol):
    """Speaks just enough MQTT 3.1.1 to look healthy: CONNACK, SUBACK, PINGRESP; never
    delivers a PUBLISH (a broker whose routing is stuck)."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            packet = self._next_packet()
            if packet is None:
                return
            kind, body = packet
            if kind == 0x10:  # CONNECT
                self.transport.write(b"\x20\x02\x00\x00")
            elif kind == 0x80:  # SUBSCRIBE: mid, then (topic, qos) pairs
                mid = body[:2]
                count, position = 0, 2
                while position < len(body):
                    length = int.from_bytes(body[position : position + 2], "big")
                    position += 2 + length + 1
                    count += 1
                self.transport.write(bytes([0x90, 2 + count]) + mid + bytes(count))
            elif kind == 0xC0:  # PINGREQ
                self.transport.write(b"\xd0\x00")

    def _next_packet(self) -> tuple[int, bytes] | None:
        if len(self.buffer) < 2:
            return None
        length, multiplier, position = 0, 1, 1
        while True:
            if position >= len(self.buffer):
                return None
            byte = self.buffer[position]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            position += 1
            if not byte & 0x80:
                break
        if len(self.buffer) < position + length:
            return None
        kind = self.buffer[0] & 0xF0
        body = self.buffer[position : position + length]
        self.buffer = self.buffer[position + length :]
        return kind, body


class SilentBrokerFactory(protocol.Factory):
    protocol = SilentBrokerProtocol

    def __init__(self) -> None:
        self.connections = 0


def mqtt_packets(buffer: bytearray) -> list[bytes]:
    """Take the whole MQTT packets off the front of ``buffer`` (fixed header included)."""
    packets = []
    while len(buffer) >= 2:
        length, multiplier, position = 0, 1, 1
        while True:
            if position >= len(buffer):
                return packets
            byte = buffer[position]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            position += 1
            if not byte & 0x80:
                break
        if len(buffer) < position + length:
            return packets
        packets.append(bytes(buffer[: position + length]))
        del buffer[: position + length]
    return packets


class PubackSwallowingProxy:
    """A TCP proxy in front of a broker that reads the MQTT packets going through it.

    While ``swallow_pubacks`` is true it drops the client's PUBACKs: the client believes it has
    acknowledged, the broker still holds the QoS 1 messages as in flight and re-sends them (DUP
    set) when the client's persistent session reconnects. ``log`` lists what passed, per
    connection (numbered from 1): ``(connection, direction, kind, detail)`` with direction
    ``down`` (broker -> client) or ``up``; PUBLISH details are ``(qos, dup, packet id, topic)``,
    PUBACK details ``(packet id, swallowed)``.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.swallow_pubacks = False
        self.log: list[tuple[int, str, str, Any]] = []
        self._lock = threading.Lock()
        self._connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = [self._server]

    def start(self) -> PubackSwallowingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def seen(self, direction: str, kind: str, connection: int | None = None) -> list[Any]:
        """Details of the packets of ``kind`` seen going ``direction`` (on one connection)."""
        with self._lock:
            return [
                detail
                for number, way, what, detail in self.log
                if way == direction and what == kind and connection in (None, number)
            ]

    @property
    def connections(self) -> int:
        return self._connections

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            with self._lock:
                self._connections += 1
                number = self._connections
            threading.Thread(
                target=self._pump, args=(client, upstream, number, "up"), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, number, "down"), daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, number: int, way: str) -> None:
        buffer = bytearray()
        try:
            while data := source.recv(65536):
                buffer += data
                for packet in mqtt_packets(buffer):
                    if self._note(number, way, packet):
                        sink.sendall(packet)
        except OSError:
            pass
        for sock in (source, sink):  # one side gone: close both, as a dead peer would
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _note(self, number: int, way: str, packet: bytes) -> bool:
        """Log the packet; False to drop it."""
        kind = packet[0] >> 4
        body = packet[1:]
        while body[0] & 0x80:  # skip the remaining-length bytes
            body = body[1:]
        body = body[1:]
        forward, entry = True, None
        if kind == 3:  # PUBLISH
            qos, dup = (packet[0] >> 1) & 3, bool(packet[0] & 8)
            length = int.from_bytes(body[:2], "big")
            topic = body[2 : 2 + length].decode("utf-8", "replace")
            mid = int.from_bytes(body[2 + length : 4 + length], "big") if qos else None
            entry = ("PUBLISH", (qos, dup, mid, topic))
        elif kind == 4:  # PUBACK
            forward = not (way == "up" and self.swallow_pubacks)
            entry = ("PUBACK", (int.from_bytes(body[:2], "big"), not forward))
        elif kind == 9:
            entry = ("SUBACK", None)
        if entry is not None:
            with self._lock:
                self.log.append((number, way, *entry))
        return forward
