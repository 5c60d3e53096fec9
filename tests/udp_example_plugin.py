"""The UDP example of the README's "Write a plugin" guide: weather stations sending datagrams.

The README quotes this file (``tests/test_udp_example_plugin.py`` checks that the quoted blocks
are still in it, and runs the plugin over real UDP), so the guide cannot drift from working code.

Wire protocol, one datagram each way:
  station → gateway  ``W <station-id> <celsius>``   answered ``OK`` once durable, else ``ERR ...``
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol

from gatewayd.plugin import Device, Plugin, PluginConfig
from gatewayd.schema import UdpHostPort, split_host_port

WEATHER = re.compile(rb"W (?P<station>[A-Za-z0-9_-]{1,32}) (?P<celsius>-?\d{1,3}(?:\.\d{1,2})?)")


class WeatherConfig(PluginConfig):
    listen: UdpHostPort = "127.0.0.1:9101"  # UDP: may share its port number with a TCP listener


class WeatherProtocol(DatagramProtocol):
    noisy = False  # no "Starting protocol" log line when the port opens and closes

    def __init__(self, plugin: WeatherPlugin) -> None:
        self.plugin = plugin

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        context = self.plugin.context
        context.frame_in()  # every datagram, valid or not
        match = WEATHER.fullmatch(data.strip())
        if match is None:
            context.record("frame.invalid", None, {"reason": "format"}, raw=data.hex())
            return
        with context.handling(None, data.hex, address=f"{addr[0]}:{addr[1]}"):
            station, celsius = match["station"].decode(), float(match["celsius"])
            self.plugin.reading(station, celsius, data.decode(), addr)

    def answer(self, text: str, addr: tuple[str, int]) -> None:
        self.plugin.context.frame_out()
        self.transport.write(text.encode(), addr)


class WeatherPlugin(Plugin):
    protocol = "weather"
    Config = WeatherConfig

    def init(self) -> None:
        self.last_seen: dict[str, float] = {}
        self.datagrams = WeatherProtocol(self)
        self.port: Any = None

    def start(self) -> None:
        host, port = split_host_port(self.config.listen)
        self.port = self.reactor.listenUDP(port, self.datagrams, interface=host)

    def stop(self) -> defer.Deferred:
        if self.port is None:  # start() failed before it listened
            return defer.succeed(None)
        return defer.maybeDeferred(self.port.stopListening)

    def reading(self, station: str, celsius: float, raw: str, addr: tuple[str, int]) -> None:
        self.last_seen[station] = self.reactor.seconds()
        durable = self.context.emit("reading", station, {"celsius": celsius}, raw=raw)
        durable.addCallbacks(
            lambda refused: self.datagrams.answer("ERR not stored" if refused else "OK", addr),
            lambda failure: self.context.note_not_stored(failure),  # no answer: it sends again
        )

    def devices(self) -> list[Device]:
        return [Device(id=s, online=True, last_seen=t) for s, t in sorted(self.last_seen.items())]
