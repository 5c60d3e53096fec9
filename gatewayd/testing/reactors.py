"""Reactors for plugin tests: a fake one driven by a clock, and a recorder of listening ports.

``FakeReactor`` is for unit tests that must not touch the network: it is Twisted's
``MemoryReactorClock`` (``listenTCP``, ``connectTCP`` and the ``Clock``'s ``callLater`` /
``advance``) plus ``listenUDP``, which Twisted's memory reactor lacks. Nothing is bound; the test
reads what the plugin asked for (``tcpServers``, ``udpPorts``, ``tcpClients``) and drives time
with ``advance(seconds)``.

``ListeningReactor`` wraps a real (or fake) reactor and remembers every port the plugin opened,
so ``PluginHarness.address()`` can tell a test which port a ``listen: "127.0.0.1:0"`` got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorUDP
from twisted.internet.testing import FakeDatagramTransport, MemoryReactorClock
from zope.interface import directlyProvides, implementer, providedBy

__all__ = ["FakeReactor", "FakeUdpPort", "ListeningReactor", "port_address"]


def _address(kind: str, interface: str, port: int) -> IPv4Address | IPv6Address:
    if ":" in interface:
        return IPv6Address(kind, interface, port)
    return IPv4Address(kind, interface or "0.0.0.0", port)


class _FakeListeningPort:
    """What ``FakeReactor.listenTCP`` returns: ``getHost()`` is the address asked for."""

    def __init__(self, address: IPv4Address | IPv6Address) -> None:
        self._host = address
        self.listening = True

    def getHost(self) -> IPv4Address | IPv6Address:
        return self._host

    def startListening(self) -> None:
        self.listening = True

    def stopListening(self) -> None:
        self.listening = False


@dataclass
class FakeUdpPort:
    """One ``listenUDP`` call on a ``FakeReactor``.

    ``transport.written`` holds ``(datagram, address)`` for every ``transport.write`` of the
    protocol; ``deliver(data, ("192.0.2.1", 5000))`` hands it a datagram as if one arrived.
    """

    port: int
    protocol: Any
    interface: str
    max_packet_size: int
    transport: FakeDatagramTransport
    listening: bool = True

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address("UDP", self.interface, self.port)

    def deliver(self, data: bytes, address: tuple[str, int]) -> None:
        self.protocol.datagramReceived(data, address)

    def stopListening(self) -> None:
        if self.listening:
            self.listening = False
            self.protocol.doStop()

    loseConnection = stopListening


@implementer(IReactorUDP)
class FakeReactor(MemoryReactorClock):
    """A reactor for unit tests: a ``Clock`` (``callLater``, ``advance``, ``seconds``) plus
    in-memory ``listenTCP``, ``connectTCP`` and ``listenUDP``; nothing touches the network.

    Port 0 is given a made-up port from 40000 up, so ``getHost().port`` is never 0, as with a
    real reactor. ``tcpServers`` and ``tcpClients`` are Twisted's records of the calls;
    ``udpPorts`` is a list of ``FakeUdpPort``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.udpPorts: list[FakeUdpPort] = []
        self._next_port = 40000

    def _port_number(self, port: int) -> int:
        if port:
            return port
        self._next_port += 1
        return self._next_port

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        super().listenTCP(port, factory, backlog, interface)
        return _FakeListeningPort(_address("TCP", interface, self._port_number(port)))

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeUdpPort:
        transport = FakeDatagramTransport()
        fake = FakeUdpPort(self._port_number(port), protocol, interface, maxPacketSize, transport)
        self.udpPorts.append(fake)
        protocol.makeConnection(transport)
        return fake


class ListeningReactor:
    """A reactor that records the ports ``listenTCP`` and ``listenUDP`` return, in order.

    Every other attribute is the wrapped reactor's, and it provides the same zope interfaces,
    so a plugin cannot tell the difference. ``ports`` is the list of listening ports.
    """

    def __init__(self, reactor: Any) -> None:
        self.wrapped = reactor
        self.ports: list[Any] = []
        directlyProvides(self, *providedBy(reactor))

    def listenTCP(self, *args: Any, **kwargs: Any) -> Any:
        port = self.wrapped.listenTCP(*args, **kwargs)
        self.ports.append(port)
        return port

    def listenUDP(self, *args: Any, **kwargs: Any) -> Any:
        port = self.wrapped.listenUDP(*args, **kwargs)
        self.ports.append(port)
        return port

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def port_address(port: Any) -> tuple[str, int]:
    """``(host, port)`` a listening port is bound to (the real port of a ``:0`` listener)."""
    host = port.getHost()
    return host.host, host.port
