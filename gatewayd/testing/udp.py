"""A UDP device for plugin tests: send datagrams to the plugin, wait for its answers.

``DatagramPeer`` is the UDP counterpart of ``LineClient``: bound to a free loopback port on the
real reactor, ``send(data, to)`` sends one datagram and ``next_datagram()`` fires with the next
``(data, (host, port))`` received, or fails with ``TimeoutError``.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol

__all__ = ["DatagramPeer", "free_udp_port", "open_datagram_peer"]

Address = tuple[str, int]


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _as_address(to: Address | str) -> Address:
    if isinstance(to, str):
        host, _, port = to.rpartition(":")
        return host.strip("[]"), int(port)
    return to


class DatagramPeer(DatagramProtocol):
    """A raw UDP test device. ``send(data, to)``; ``next_datagram()`` → ``(data, address)``.

    ``to`` is ``(host, port)`` or ``"host:port"``, and may be left out when ``target`` was given.
    ``received`` keeps every datagram, read or not.
    """

    noisy = False  # no "Starting protocol" lines in test logs

    def __init__(self, target: Address | str | None = None) -> None:
        self.target = _as_address(target) if target is not None else None
        self.received: list[tuple[bytes, Address]] = []
        self._unread: list[tuple[bytes, Address]] = []
        self._readers: list[defer.Deferred] = []
        self.port: Any = None

    @property
    def address(self) -> Address:
        """``(host, port)`` this peer is bound to: where the plugin's answers must go."""
        host = self.port.getHost()
        return host.host, host.port

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        self.received.append((data, addr))
        if self._readers:
            self._readers.pop(0).callback((data, addr))
        else:
            self._unread.append((data, addr))

    def send(self, data: bytes | str, to: Address | str | None = None) -> None:
        address = _as_address(to) if to is not None else self.target
        if address is None:
            raise ValueError("send(data, to): no address, and the peer has no target")
        self.transport.write(data.encode() if isinstance(data, str) else data, address)

    def next_datagram(self, timeout: float = 5.0) -> defer.Deferred:
        """The next datagram not yet read, as ``(data, (host, port))``; fails with
        ``defer.TimeoutError`` after ``timeout`` seconds."""
        if self._unread:
            return defer.succeed(self._unread.pop(0))
        d: defer.Deferred = defer.Deferred(lambda d: self._readers.remove(d))
        self._readers.append(d)
        from twisted.internet import reactor

        return d.addTimeout(timeout, reactor)

    def close(self) -> defer.Deferred:
        """Stop listening; fires once the port is closed."""
        return defer.maybeDeferred(self.port.stopListening)


def open_datagram_peer(
    target: Address | str | None = None, host: str = "127.0.0.1", reactor: Any = None
) -> DatagramPeer:
    """A ``DatagramPeer`` bound to a free port on ``host`` (synchronous: UDP has no handshake).

    ``target`` is where ``send(data)`` goes by default: the plugin's ``harness.address()``.
    """
    if reactor is None:
        from twisted.internet import reactor
    peer = DatagramPeer(target)
    peer.port = reactor.listenUDP(0, peer, interface=host)
    return peer
