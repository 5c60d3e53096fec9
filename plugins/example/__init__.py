"""The example plugin: TCP thermometers speaking one text line per reading.

It is the plugin of the README's "write a plugin" guide and exercises the whole plugin API:
a config model, a listener, events (with acknowledgement only after the event is durable),
``frame.invalid`` for bad input, a device list, a command with 404 and 504, and a simulator.

Wire protocol (one line each way, ``\\n``-terminated, at most ``max_line`` bytes):
  device → gateway  ``T <device-id> <celsius>``   answered ``OK`` once durable, ``ERR <reason>``
  gateway → device  ``PING``                       answered ``PONG``
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from typing import Any

from pydantic import Field
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from gatewayd.plugin import (
    Busy,
    Device,
    DeviceTimeout,
    NotFound,
    Plugin,
    PluginConfig,
    Simulator,
    command,
)
from gatewayd.schema import (
    ConfigModel,
    HostPort,
    PositiveDuration,
    count_argument,
    host_port_argument,
    seconds_argument,
    split_host_port,
)

READING = re.compile(r"T (?P<device>[A-Za-z0-9_-]{1,32}) (?P<celsius>-?\d{1,3}(?:\.\d{1,2})?)")


class ThermometerConfig(PluginConfig):
    listen: HostPort = "127.0.0.1:9100"
    max_line: int = Field(256, ge=16, le=65536)
    ping_timeout: PositiveDuration = 5.0


class PingArgs(ConfigModel):
    device: str


class ThermometerProtocol(LineOnlyReceiver):
    """One thermometer connection: framing comes from LineOnlyReceiver, parsing is ours."""

    delimiter = b"\n"

    def __init__(self, plugin: ThermometerPlugin) -> None:
        self.plugin = plugin
        self.MAX_LENGTH = plugin.config.max_line
        self.device: str | None = None
        self.pending_ping: defer.Deferred | None = None

    def lineReceived(self, line: bytes) -> None:
        self.plugin.context.frame_in()
        text = line.decode("utf-8", "replace").strip()
        if text == "PONG":  # a late PONG (after the timeout) is dropped quietly
            ping, self.pending_ping = self.pending_ping, None
            if ping is not None:
                ping.callback({"pong": True})
            return
        match = READING.fullmatch(text)
        if match is None:
            self.plugin.context.record("frame.invalid", self.device, {"reason": "format"}, raw=text)
            self.send("ERR format")
            return
        # One line that hits a bug costs that line: frame.invalid (internal_error), not the plugin.
        with self.plugin.context.handling(self.device, text):
            self.plugin.reading(self, match["device"], float(match["celsius"]), text)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.plugin.context.record("frame.invalid", self.device, {"reason": "length"})
        self.transport.loseConnection()

    def send(self, text: str) -> None:
        self.plugin.context.frame_out()
        self.sendLine(text.encode())

    def connectionLost(self, reason: Any = None) -> None:
        self.plugin.disconnected(self)


class ThermometerPlugin(Plugin):
    """Plugin type ``example``: a TCP server for thermometers."""

    protocol = "example"
    Config = ThermometerConfig

    def init(self) -> None:
        self.port: Any = None  # the listening port, once start() opened it
        self.connections: dict[str, ThermometerProtocol] = {}
        self.last_seen: dict[str, float] = {}

    def start(self) -> None:
        factory = protocol.Factory.forProtocol(lambda: ThermometerProtocol(self))
        host, port = split_host_port(self.config.listen)
        self.port = self.reactor.listenTCP(port, factory, interface=host)

    def stop(self) -> defer.Deferred:
        for connection in list(self.connections.values()):
            connection.transport.loseConnection()
        if self.port is None:  # start() failed before it listened
            return defer.succeed(None)
        return defer.maybeDeferred(self.port.stopListening)

    def reading(self, conn: ThermometerProtocol, device: str, celsius: float, raw: str) -> None:
        if conn.device != device:
            conn.device = device
            old = self.connections.get(device)
            if old is not None and old is not conn:
                old.transport.loseConnection()
            self.connections[device] = conn
            self.context.record("device.online", device)
        self.last_seen[device] = time.time()
        durable = self.context.emit("reading", device, {"celsius": celsius}, raw=raw)
        # Acknowledge only once the event is safe on disk: a device that got OK may forget it.
        # None: stored. A Refused: a full drop_newest queue did not take it. Failure: not stored.
        durable.addCallbacks(
            lambda refused: conn.send("ERR not stored" if refused else "OK"),
            lambda failure: self.not_stored(conn, device, failure),
        )

    def not_stored(self, conn: ThermometerProtocol, device: str, failure: Any) -> None:
        # Counted in events_not_stored_total and logged at most every 10 s: a full disk fails
        # every reading, and one log line each would fill what is left of it.
        self.context.note_not_stored(failure)
        conn.send("ERR not stored")

    def disconnected(self, conn: ThermometerProtocol) -> None:
        if conn.pending_ping is not None:
            ping, conn.pending_ping = conn.pending_ping, None
            ping.errback(DeviceTimeout(f"{conn.device} disconnected"))
        if conn.device and self.connections.get(conn.device) is conn:
            del self.connections[conn.device]
            self.context.record("device.offline", conn.device, {"reason": "closed"})

    def devices(self) -> list[Device]:
        return [
            Device(id=d, online=d in self.connections, last_seen=seen)
            for d, seen in sorted(self.last_seen.items())
        ]

    @command("ping", args=PingArgs, device="device")
    def ping(self, args: PingArgs) -> defer.Deferred:
        """Send PING to a thermometer and wait for its PONG."""
        conn = self.connections.get(args.device)
        if conn is None:
            raise NotFound(f"device {args.device!r} is not connected")
        if conn.pending_ping is not None:
            raise Busy(f"a PING to {args.device!r} is already outstanding")
        conn.pending_ping = answered = defer.Deferred()
        conn.send("PING")

        def timed_out(result: Any, timeout: float) -> Any:
            conn.pending_ping = None
            raise DeviceTimeout(f"{args.device} did not answer PING within {timeout} s")

        return answered.addTimeout(self.config.ping_timeout, self.reactor, timed_out)


# --- simulator ------------------------------------------------------------------------------


class SimulatedThermometer(LineOnlyReceiver):
    """Sends a reading every ``interval`` seconds, answers PING, counts what it sends and gets."""

    delimiter = b"\n"

    def __init__(self, sim: ThermometerSimulator, device: str) -> None:
        self.sim, self.device = sim, device
        self.closed: defer.Deferred = defer.Deferred()  # fires once the connection is gone

    def connectionMade(self) -> None:
        self.sim.connects += 1
        self.sim.connected.append(self)
        self.loop_call = self.sim.reactor.callLater(random.uniform(0, 0.2), self.send_reading)

    def send_reading(self) -> None:
        celsius = round(random.gauss(21.0, 1.5), 1)
        self.sendLine(f"T {self.device} {celsius}".encode())
        self.sim.sent["reading"] += 1
        self.loop_call = self.sim.reactor.callLater(self.sim.interval, self.send_reading)

    def lineReceived(self, line: bytes) -> None:
        kind = {b"PING": "ping", b"OK": "ok"}.get(line, "err" if line.startswith(b"ERR") else "")
        if not kind:
            self.sim.errors["unexpected_line"] += 1
            return
        self.sim.received[kind] += 1
        if kind == "ping":
            self.sendLine(b"PONG")
            self.sim.sent["pong"] += 1

    def connectionLost(self, reason: Any = None) -> None:
        if self.loop_call.active():
            self.loop_call.cancel()
        if self in self.sim.connected:
            self.sim.connected.remove(self)
        if not self.sim.stopping:
            self.sim.errors["connection_lost"] += 1
        self.closed.callback(None)


class _ThermometerFactory(protocol.ClientFactory):
    """One simulated thermometer's connection; a refused connect is said, not swallowed."""

    def __init__(self, sim: ThermometerSimulator, device: str) -> None:
        self.sim, self.device = sim, device

    def buildProtocol(self, addr: Any) -> SimulatedThermometer:
        return SimulatedThermometer(self.sim, self.device)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.sim.errors["connect_failed"] += 1
        self.sim.log.warn(
            "{device}: cannot connect to {target}: {error}",
            device=self.device,
            target=self.sim.target,
            error=reason.getErrorMessage(),
        )


class ThermometerSimulator(Simulator):
    """``gatewayd simulate example --connect HOST:PORT --devices N --interval S``."""

    family = "example"
    sent_noun, received_noun = "lines", "lines"
    log = Logger(namespace="gatewayd.simulate.example")

    def __init__(self, reactor: Any, target: str, devices: int = 3, interval: float = 2.0):
        self.reactor, self.target = reactor, target
        self.devices, self.interval = devices, interval
        self.connected: list[SimulatedThermometer] = []
        #: What the thermometers sent (reading, pong), got (ok, err, ping) and what went wrong.
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.connects = 0
        self.stopping = False

    @property
    def acknowledged(self) -> int:
        """Readings the plugin answered OK (stored)."""
        return self.received["ok"]

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        parser.add_argument(
            "--connect",
            default="127.0.0.1:9100",
            type=host_port_argument,
            metavar="HOST:PORT",
            help="plugin address",
        )
        parser.add_argument("--devices", type=count_argument, default=3, help="how many")
        parser.add_argument(
            "--interval", type=seconds_argument, default=2.0, help="seconds per reading"
        )

    @classmethod
    def from_args(cls, args: Any, reactor: Any) -> ThermometerSimulator:
        return cls(reactor, args.connect, args.devices, args.interval)

    @classmethod
    def for_demo(cls, plugin_config: Any, reactor: Any) -> ThermometerSimulator:
        return cls(reactor, plugin_config.listen, devices=3, interval=2.0)

    def start(self) -> None:
        host, port = split_host_port(self.target)
        for n in range(self.devices):
            factory = _ThermometerFactory(self, f"thermo-{n + 1}")
            self.reactor.connectTCP(host, port, factory)

    def stop(self) -> defer.Deferred:
        """Close every connection; fires once they are closed (what was counted as sent is on
        its way), or after 5 s."""
        self.stopping = True
        closing = [conn.closed for conn in self.connected]
        for conn in list(self.connected):
            conn.transport.loseConnection()
        waiting = defer.DeferredList(closing, consumeErrors=True)
        return waiting.addTimeout(5, self.reactor, lambda *_: None)

    def summary(self) -> dict[str, Any]:
        """Lines sent and received by kind, errors, and how many connects there were."""
        return {
            "sent": dict(self.sent),
            "received": dict(self.received),
            "errors": dict(self.errors),
            "devices": self.devices,
            "connects": self.connects,
        }


ThermometerPlugin.simulator = ThermometerSimulator
