"""What plugin authors need in their tests: a harness, free ports, TCP and UDP peers, a fake
reactor, brokers, PostgreSQL, a pty.

``PluginHarness`` runs one plugin with an in-memory ``EventCollector`` in place of the pipeline,
so a test sees every event and can decide when an event becomes "durable". The pytest fixtures
of ``gatewayd.testing.fixtures`` wrap these (``pytest_plugins = ["gatewayd.testing.fixtures"]``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import tty
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import LineOnlyReceiver

from gatewayd.events import Event
from gatewayd.plugin import Plugin, PluginContext
from gatewayd.plugin import describe_validation_error as _describe
from gatewayd.testing.nats import NatsCluster
from gatewayd.testing.postgres import PostgresCluster
from gatewayd.testing.reactors import FakeReactor, FakeUdpPort, ListeningReactor, port_address
from gatewayd.testing.udp import DatagramPeer, free_udp_port, open_datagram_peer

__all__ = [
    "ApiServer",
    "DaemonView",
    "DatagramPeer",
    "FakeReactor",
    "FakeUdpPort",
    "ListeningReactor",
    "EventCollector",
    "HostView",
    "PipelineCounters",
    "LineClient",
    "connect_line_client",
    "Mosquitto",
    "NatsCluster",
    "PluginHarness",
    "PostgresCluster",
    "free_port",
    "free_udp_port",
    "open_datagram_peer",
    "port_address",
    "pty_pair",
    "sleep",
    "wait_for_port",
    "wait_until",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")
            time.sleep(0.01)


def sleep(seconds: float) -> defer.Deferred:
    """A Deferred that fires after ``seconds`` on the running reactor: a pause in a test."""
    from twisted.internet import reactor, task  # not at import: leave the reactor choice open

    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    """Fires once ``predicate()`` is true, polled every ``step`` s without blocking the reactor;
    fails with AssertionError after ``timeout`` s. Use it with ``await`` or ``yield``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        yield sleep(step)


@dataclass
class EventCollector:
    """Stands in for the pipeline: records events; ``durable`` decides when emit() fires.

    ``durable = "now"`` fires every emit at once; ``"manual"`` holds them until
    ``release()``, so a test can check that a plugin waits for durability before it acks.

    Keyed events (``emit(..., key=...)``) are stored once, as the queues do: a repeat goes to
    ``deduplicated`` and fires at once. ``keys`` are the keys stored so far; hand them to the
    collector of a second harness to test what a plugin does after a restart.
    """

    durable: str = "now"
    events: list[Event] = field(default_factory=list)
    deduplicated: list[Event] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    _held: list[defer.Deferred] = field(default_factory=list)
    _waiters: list[tuple[Callable[[list[Event]], bool], defer.Deferred]] = field(
        default_factory=list
    )

    def __call__(self, event: Event) -> defer.Deferred:
        if event.key is not None:
            if event.key[0] in self.keys:
                self.deduplicated.append(event)
                return defer.succeed(None)
            self.keys.add(event.key[0])
        self.events.append(event)
        if self.durable == "now":
            durable = defer.succeed(None)
        else:  # held before the waiters run: a test resumed by them may release it at once
            durable = defer.Deferred()
            self._held.append(durable)
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate(self.events):
                self._waiters.remove(waiter)
                d.callback(self.events)
        return durable

    def seen(self, key: str) -> bool:
        return key in self.keys

    def forget(self, key: str) -> None:
        self.keys.discard(key)

    def release(self) -> None:
        """Make every held event durable (fires their emit Deferreds, in order)."""
        held, self._held = self._held, []
        for d in held:
            d.callback(None)

    def refuse(self) -> None:
        """Answer every held emit as a full ``drop_newest`` queue does: with a ``Refused``."""
        from gatewayd.queue import Refused

        held, self._held = self._held, []
        for d in held:
            d.callback(Refused(("test",)))

    def fail(self, error: Exception | None = None) -> None:
        """Fail every held emit, as a queue that cannot write (disk full, store stopped)."""
        held, self._held = self._held, []
        for d in held:
            d.errback(error or OSError("disk full"))

    def of_type(self, type_pattern: str) -> list[Event]:
        from fnmatch import fnmatchcase

        return [e for e in self.events if fnmatchcase(e.type, type_pattern)]

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def wait_for(self, type_pattern: str, count: int = 1) -> defer.Deferred:
        """Fires (with all events so far) once ``count`` events of ``type_pattern`` were seen.

        Add a timeout in the test: ``.addTimeout(5, reactor)``.
        """
        from fnmatch import fnmatchcase

        def enough(events: list[Event]) -> bool:
            return sum(fnmatchcase(e.type, type_pattern) for e in events) >= count

        if enough(self.events):
            return defer.succeed(self.events)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((enough, d))
        return d


class PluginHarness:
    """Builds one plugin from a config dict, as the daemon would, with an EventCollector.

    ``harness = PluginHarness(MyPlugin, {"listen": "127.0.0.1:0"}, reactor=fake_or_real)``;
    then ``harness.start()``, ``harness.address()`` (the port a ``:0`` listener got),
    ``harness.collector.events``, ``harness.call("cmd", {...})``, ``harness.stop()``.

    Without ``state_dir`` the plugin gets a new temporary directory, removed by ``stop()`` (and,
    for a harness never stopped, once its plugin is garbage or the process exits); a
    ``state_dir`` given is never removed: pass one to keep state across two harnesses.
    """

    def __init__(
        self,
        plugin_class: type[Plugin],
        config: dict[str, Any],
        *,
        reactor: Any = None,
        state_dir: Path | None = None,
        name: str = "test",
        durable: str = "now",
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        from pydantic import ValidationError

        section = {"type": plugin_class.protocol, **config}
        try:
            self.config = plugin_class.Config.model_validate(section)
        except ValidationError as exc:
            raise ValueError(f"bad plugin config: {_describe(exc)}") from None
        self.collector = EventCollector(durable=durable)
        self.failures: list[BaseException] = []
        self.reactor = reactor
        #: The plugin's reactor: ``reactor``, recording the ports it listens on.
        self.listening = ListeningReactor(reactor)
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="gatewayd-test-"))
        self.context = PluginContext(
            name=name,
            protocol=plugin_class.protocol,
            gateway_id="test-gw",
            reactor=self.listening,
            state_dir=self.state_dir,
            sink=self.collector,
            on_failure=self.failures.append,
            keys=self.collector,
        )
        self.plugin = plugin_class(name, self.config, self.context)
        # Tied to the context, which the plugin keeps: not removed while the plugin may write.
        self._remove_state_dir = (
            weakref.finalize(self.context, shutil.rmtree, str(self.state_dir), True)
            if state_dir is None
            else None
        )

    def start(self) -> defer.Deferred:
        self.state_dir.mkdir(parents=True, exist_ok=True)  # again after a stop()
        return defer.maybeDeferred(self.plugin.start)

    def stop(self) -> defer.Deferred:
        """Stop the plugin; then remove the temporary state directory, if the harness made it."""

        def remove(result: Any) -> Any:
            if self._remove_state_dir is not None:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            return result

        return defer.maybeDeferred(self.plugin.stop).addBoth(remove)

    def address(self, index: int = 0) -> tuple[str, int]:
        """``(host, port)`` of the ``index``-th port the plugin listens on (TCP or UDP, in the
        order it opened them): the real port of a ``listen: "127.0.0.1:0"``."""
        ports = self.listening.ports
        if index >= len(ports):
            raise IndexError(f"the plugin opened {len(ports)} listening port(s), not {index + 1}")
        return port_address(ports[index])

    def call(self, command: str, arguments: dict[str, Any] | None = None) -> defer.Deferred:
        """Run a command as the control API would (arguments validated by its model)."""
        return self.plugin.commands()[command].call(arguments or {})


class LineClient(LineOnlyReceiver):
    """A raw test device: ``send(text)`` a line, ``next_line()`` waits for the next one."""

    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self._unread: list[bytes] = []
        self._readers: list[defer.Deferred] = []
        self.closed: defer.Deferred = defer.Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        if self._readers:
            self._readers.pop(0).callback(line)
        else:
            self._unread.append(line)

    def send(self, text: str | bytes) -> None:
        self.sendLine(text.encode() if isinstance(text, str) else text)

    def next_line(self, timeout: float = 5.0) -> defer.Deferred:
        """The next line not yet read; fails with TimeoutError after ``timeout`` seconds."""
        if self._unread:
            return defer.succeed(self._unread.pop(0))
        d: defer.Deferred = defer.Deferred(lambda d: self._readers.remove(d))
        self._readers.append(d)
        from twisted.internet import reactor

        return d.addTimeout(timeout, reactor)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.closed.called:
            self.closed.callback(getattr(reason, "value", reason))

    def close(self) -> None:
        self.transport.loseConnection()


def connect_line_client(
    port: int, host: str = "127.0.0.1", delimiter: bytes = b"\n", reactor: Any = None
) -> defer.Deferred:
    """Connect a ``LineClient`` over real TCP; fires with it once connected."""
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory

    if reactor is None:
        from twisted.internet import reactor

    def build() -> LineClient:
        client = LineClient()
        client.delimiter = delimiter
        return client

    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=5)
    return endpoint.connect(Factory.forProtocol(build))


@dataclass
class HostView:
    """One plugin instance as the control API sees it (the daemon's PluginHost, minus lifecycle)."""

    name: str
    type_name: str
    plugin: Any
    context: Any
    state: str = "running"
    error: str | None = None


@dataclass
class PipelineCounters:
    routed: int = 0
    unrouted: int = 0
    dropped: int = 0


@dataclass
class DaemonView:
    """The view of the daemon the control API and /metrics read (see gatewayd.api)."""

    reactor: Any
    gateway_id: str = "test-gw"
    plugins: dict[str, Any] = field(default_factory=dict)
    sinks: dict[str, Any] = field(default_factory=dict)
    pipeline: PipelineCounters = field(default_factory=PipelineCounters)
    reactor_lag: float = 0.0
    api_token: str | None = None


class _Body(Protocol):
    """Collects a response body (readBody warns about the proxied transport)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.chunks))


class ApiServer:
    """The real control API (``gatewayd.api.build_site``) on 127.0.0.1, around a DaemonView.

    ``ApiServer.for_harness(harness, "name")`` serves one harnessed plugin, so a plugin's
    commands can be tested over HTTP exactly as operators call them.
    """

    def __init__(self, daemon: DaemonView, reactor: Any = None, command_timeout: float = 30.0):
        from twisted.web.client import Agent

        from gatewayd.api import build_site
        from gatewayd.config_model import ApiSection

        if reactor is None:
            from twisted.internet import reactor
        self.reactor, self.daemon = reactor, daemon
        config = ApiSection(listen="127.0.0.1:0", command_timeout=command_timeout)
        self.port = reactor.listenTCP(0, build_site(daemon, config), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.agent = Agent(reactor)

    @classmethod
    def for_harness(
        cls, harness: PluginHarness, name: str, reactor: Any = None, command_timeout: float = 30.0
    ) -> ApiServer:
        daemon = DaemonView(reactor or harness.reactor)
        type_name = harness.config.type
        daemon.plugins[name] = HostView(name, type_name, harness.plugin, harness.context)
        return cls(daemon, reactor, command_timeout)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """``(status, decoded JSON)``; ``/metrics`` comes back as text."""
        import io
        import json

        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        producer = None
        if body is not None:
            producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode()))
        headers = Headers({b"content-type": [b"application/json"]})
        if self.daemon.api_token:
            headers.addRawHeader(b"authorization", f"Bearer {self.daemon.api_token}".encode())
        response = await self.agent.request(
            method.encode(), (self.base + path).encode(), headers, producer
        )
        collector = _Body()
        response.deliverBody(collector)
        content = await collector.done
        if path == "/metrics":
            return response.code, content.decode()
        return response.code, json.loads(content)

    def close(self) -> defer.Deferred:
        return defer.maybeDeferred(self.port.stopListening)


class Mosquitto:
    """Debian's ``mosquitto -p PORT`` on a free loopback port; ``stop()``/``start()`` again.

    Mosquitto 2.x without a config file listens on loopback only and allows anonymous clients.
    """

    def __init__(self, port: int | None = None, binary: str = "mosquitto") -> None:
        self.binary = shutil.which(binary) or shutil.which(f"/usr/sbin/{binary}")
        if self.binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.process = subprocess.Popen(
            [self.binary, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, timeout=timeout)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Die without a clean shutdown, as a crashed broker would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def pty_pair() -> Iterator[tuple[int, str]]:
    """A pseudo-terminal in raw mode: ``(master_fd, slave_path)``.

    Open ``slave_path`` as the serial device under test; read and write the device side on
    ``master_fd``. Closing ``master_fd`` looks like an unplugged device to the reader side.
    """
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        yield master, path
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)
