"""The helpers ``gatewayd.testing`` offers plugin authors: waiting on the reactor, the harness's
listening addresses and state directory, UDP peers and the fake reactor."""

from __future__ import annotations

import gc
import socket
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.interfaces import IReactorUDP
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

from gatewayd.plugin import Plugin, PluginConfig
from gatewayd.schema import HostPort, UdpHostPort, split_host_port
from gatewayd.testing import (
    FakeReactor,
    PluginHarness,
    open_datagram_peer,
    sleep,
    wait_until,
)


@pytest_twisted.ensureDeferred
async def test_sleep_lets_the_reactor_run_for_that_long():
    started = time.monotonic()
    await sleep(0.05)
    assert time.monotonic() - started >= 0.05


@pytest_twisted.ensureDeferred
async def test_wait_until_fires_once_the_condition_holds():
    calls = []

    def third_time() -> bool:
        calls.append(None)
        return len(calls) == 3

    await wait_until(third_time, step=0.001)
    assert len(calls) == 3


@pytest_twisted.ensureDeferred
async def test_wait_until_fails_with_the_timeout_named():
    started = time.monotonic()
    with pytest.raises(AssertionError, match="within 0.1 s"):
        await wait_until(lambda: False, timeout=0.1)
    assert 0.1 <= time.monotonic() - started < 2


class _Listener(Plugin):
    """Listens on TCP ``listen`` and UDP ``listen_udp``, in that order."""

    protocol = "listener"

    class Config(PluginConfig):
        listen: HostPort = "127.0.0.1:0"
        listen_udp: UdpHostPort = "127.0.0.1:0"

    def start(self) -> None:
        host, port = split_host_port(self.config.listen)
        self.tcp = self.reactor.listenTCP(port, Factory.forProtocol(Protocol), interface=host)
        host, port = split_host_port(self.config.listen_udp)
        self.udp = self.reactor.listenUDP(port, Echo(), interface=host)

    def stop(self) -> defer.Deferred:
        return defer.gatherResults(
            [
                defer.maybeDeferred(self.tcp.stopListening),
                defer.maybeDeferred(self.udp.stopListening),
            ]
        )


class Echo(DatagramProtocol):
    noisy = False

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.write(data.upper(), addr)


@pytest_twisted.ensureDeferred
async def test_harness_address_is_the_real_port_of_each_listener_and_a_peer_talks_udp() -> None:
    harness = PluginHarness(_Listener, {})
    await harness.start()
    tcp, udp = harness.address(0), harness.address(1)
    assert tcp[0] == udp[0] == "127.0.0.1" and 0 not in (tcp[1], udp[1])
    with pytest.raises(IndexError, match="opened 2 listening port"):
        harness.address(2)
    peer = open_datagram_peer(target=udp)
    try:
        peer.send("ping")
        peer.send(b"again", to=f"127.0.0.1:{udp[1]}")
        assert await peer.next_datagram() == (b"PING", udp)
        assert await peer.next_datagram() == (b"AGAIN", udp)
        with pytest.raises(defer.TimeoutError):
            await peer.next_datagram(timeout=0.05)
        assert len(peer.received) == 2
    finally:
        await peer.close()
        await harness.stop()


@pytest_twisted.ensureDeferred
async def test_harness_removes_the_state_directory_it_made_and_keeps_one_given(
    tmp_path: Path,
) -> None:
    made = PluginHarness(_Listener, {})
    await made.start()
    assert made.state_dir.is_dir()
    await made.stop()
    assert not made.state_dir.exists()
    given = PluginHarness(_Listener, {}, state_dir=tmp_path)
    await given.start()
    await given.stop()
    assert tmp_path.is_dir()


def test_a_harness_never_stopped_removes_its_directory_once_its_plugin_is_gone() -> None:
    harness = PluginHarness(_Listener, {}, reactor=FakeReactor())
    directory = harness.state_dir
    assert directory.is_dir()
    del harness
    gc.collect()
    assert not directory.exists()


def test_fake_reactor_listens_without_the_network_and_runs_a_clock() -> None:
    reactor = FakeReactor()
    harness = PluginHarness(
        _Listener, {"listen": "[::1]:0", "listen_udp": "127.0.0.1:5683"}, reactor=reactor
    )
    harness.start()
    assert harness.address(0)[0] == "::1" and harness.address(0)[1] >= 40000
    assert harness.address(1) == ("127.0.0.1", 5683)
    (udp,) = reactor.udpPorts
    udp.deliver(b"hi", ("192.0.2.1", 7))
    assert udp.transport.written == [(b"HI", ("192.0.2.1", 7))]
    fired: list[float] = []
    reactor.callLater(5, lambda: fired.append(reactor.seconds()))
    reactor.advance(5)
    assert fired == [5.0]
    assert IReactorUDP.providedBy(harness.context.reactor)  # the recorder keeps the interfaces
    harness.stop()
    assert not udp.listening


def test_udp_port_fixture_is_a_free_udp_port(udp_port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", udp_port))


def test_a_configured_mosquitto_leaves_no_directory_behind() -> None:
    from tests.heating.brokers import ConfiguredMosquitto, tls_broker

    closed = ConfiguredMosquitto(["allow_anonymous true"])
    closed.close()
    assert not closed.directory.exists()
    forgotten, _paths = tls_broker()
    directory = forgotten.directory
    assert (directory / "ca.pem").exists()
    del forgotten
    gc.collect()
    assert not directory.exists()
