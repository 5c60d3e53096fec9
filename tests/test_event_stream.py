"""``GET /api/v1/events/stream`` over real TCP: filters, keepalive, limits, slow clients, stop."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, threads
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from gatewayd.api import listen_api
from gatewayd.api.events import EventStream
from gatewayd.config_model import ApiSection
from gatewayd.events import Event
from gatewayd.testing import sleep, wait_until
from tests.test_api import TOKEN, assert_error, http, make_daemon


class Watchers:
    """The daemon's ``watch_events`` and the emit side of it, as ``gatewayd.service`` has them."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Event], None]] = []
        self.emitted = 0

    def watch(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback) if callback in self.callbacks else None

    def emit(self, event: Event) -> None:
        self.emitted += 1
        for callback in tuple(self.callbacks):
            callback(event)


@dataclass
class Streaming:
    daemon: Any
    watchers: Watchers
    api: Any  # the ApiState
    base: str

    def url(self, path: str) -> bytes:
        return (self.base + path).encode("ascii")


@pytest.fixture
def streaming(tmp_path):
    """``start(token=None, **api_options)`` → Streaming over a real listening API."""
    from twisted.internet import reactor

    ports = []

    def start(token: str | None = None, **options: Any) -> Streaming:
        daemon = make_daemon(reactor, tmp_path, token)
        watchers = Watchers()
        daemon.watch_events = watchers.watch
        port = listen_api(daemon, ApiSection(listen="127.0.0.1:0", **options), reactor)
        ports.append(port)
        base = f"http://127.0.0.1:{port.getHost().port}"
        return Streaming(daemon, watchers, port.factory.api, base)

    yield start
    for port in ports:
        port.factory.api.close_streams()
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


class SseClient(protocol.Protocol):
    """Collects the messages (blocks ending in a blank line) of one event stream."""

    def __init__(self) -> None:
        self.buffer = b""
        self.messages: list[str] = []
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            message, self.buffer = self.buffer.split(b"\n\n", 1)
            self.messages.append(message.decode("utf-8"))

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(m[len("data: ") :]) for m in self.messages if m.startswith("data: ")]

    def disconnect(self) -> None:
        self.transport.stopProducing()


@defer.inlineCallbacks
def open_stream(served: Streaming, query: str = "", token: str | None = None):
    """(response, SseClient) of one stream, once it said ``: connected``."""
    from twisted.internet import reactor

    headers = Headers({b"authorization": [f"Bearer {token}".encode()]} if token else {})
    url = served.url("/api/v1/events/stream" + query)
    response = yield Agent(reactor).request(b"GET", url, headers)
    client = SseClient()
    response.deliverBody(client)
    if response.code == 200:
        yield wait_until(lambda: client.messages, timeout=5)
    return response, client


def event(plugin: str = "cabinets", type_: str = "lend.succeeded", device: str | None = "8601"):
    return Event(type=type_, device=device, data={"slot": 2}, plugin=plugin, protocol="powerbank")


@pytest_twisted.inlineCallbacks
def test_stream_sends_connected_then_only_the_events_its_globs_match(streaming):
    served = streaming()
    response, client = yield open_stream(served, "?plugin=cab*&type=lend.*&device=86*")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    assert response.headers.getRawHeaders(b"cache-control") == [b"no-store"]
    assert response.headers.getRawHeaders(b"x-accel-buffering") == [b"no"]
    assert client.messages == [": connected"]
    wanted = event()
    for sent in (
        wanted,
        event(plugin="heating"),
        event(type_="device.online"),
        event(device="999"),
        event(device=None),
        event(type_="lend.failed", device="8602"),
    ):
        served.watchers.emit(sent)
    yield wait_until(lambda: len(client.events()) >= 2, timeout=5)
    assert client.events()[0] == json.loads(wanted.to_json())
    assert [(e["type"], e["device"]) for e in client.events()] == [
        ("lend.succeeded", "8601"),
        ("lend.failed", "8602"),
    ]
    assert all("\n" not in m[6:] for m in client.messages if m.startswith("data: "))
    client.disconnect()
    yield wait_until(lambda: not served.watchers.callbacks and not served.api.streams, timeout=5)


@pytest_twisted.inlineCallbacks
def test_no_filter_streams_everything_including_events_without_device(streaming):
    served = streaming()
    _, client = yield open_stream(served)
    served.watchers.emit(event(device=None))
    served.watchers.emit(event(plugin="heating", type_="frame.invalid"))
    yield wait_until(lambda: len(client.events()) == 2, timeout=5)
    assert client.events()[0]["device"] is None


@pytest_twisted.inlineCallbacks
def test_keepalive_comments_come_every_interval(streaming, monkeypatch):
    monkeypatch.setattr(EventStream, "keepalive_interval", 0.05)
    served = streaming()
    _, client = yield open_stream(served)
    yield wait_until(lambda: client.messages.count(": keepalive") >= 2, timeout=5)


@pytest_twisted.inlineCallbacks
def test_one_stream_more_than_max_streams_is_429_until_one_closes(streaming):
    served = streaming(max_streams=2)
    _, first = yield open_stream(served)
    yield open_stream(served)
    status, _, data = yield http(b"GET", served.url("/api/v1/events/stream"))
    assert status == 429
    assert_error(json.loads(data), "too_many_streams", "api.max_streams", "(2)")
    first.disconnect()
    yield wait_until(lambda: len(served.api.streams) == 1, timeout=5)
    response, _ = yield open_stream(served)
    assert response.code == 200


@pytest_twisted.inlineCallbacks
def test_unknown_arguments_are_400_and_the_token_is_needed(streaming):
    served = streaming(token=TOKEN)
    bearer = {b"authorization": f"Bearer {TOKEN}".encode()}
    status, _, data = yield http(b"GET", served.url("/api/v1/events/stream?plugin=x"))
    assert status == 401
    url = served.url("/api/v1/events/stream?plugins=x&kind=y")
    status, _, data = yield http(b"GET", url, headers=bearer)
    assert status == 400
    assert_error(json.loads(data), "bad_request", "kind, plugins", "accepted: plugin, type, device")
    status, _, data = yield http(b"POST", served.url("/api/v1/events/stream"), b"", bearer)
    assert status == 405
    response, client = yield open_stream(served, "?plugin=cabinets", token=TOKEN)
    assert response.code == 200 and client.messages == [": connected"]
    assert len(served.api.streams) == 1


@pytest_twisted.inlineCallbacks
def test_close_streams_ends_every_stream_with_a_reason(streaming):
    served = streaming()
    _, one = yield open_stream(served)
    _, two = yield open_stream(served, "?type=x")
    served.api.close_streams()
    assert not served.watchers.callbacks and not served.api.streams
    yield wait_until(lambda: one.closed and two.closed, timeout=5)
    for client in (one, two):
        assert client.messages[-1] == 'event: error\ndata: {"reason": "gatewayd is stopping"}'


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes (in a thread: the reactor must run)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks)


@pytest_twisted.inlineCallbacks
def test_a_client_that_never_reads_is_disconnected_and_the_others_get_everything(streaming):
    served = streaming()
    _, fast = yield open_stream(served)
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", int(served.base.rsplit(":", 1)[1])))
    slow.sendall(b"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    yield wait_until(lambda: len(served.api.streams) == 2, timeout=5)
    payload = "x" * 4000
    started = time.monotonic()
    batches, size = 40, 100  # 4,000 events of ~4 kB: 16 MB, past any socket buffer
    for batch in range(batches):
        for n in range(size):
            served.watchers.emit(
                Event(type="flood", device=f"{batch}-{n}", data={"p": payload}, plugin="cab")
            )
        yield sleep(0.005)  # the reactor runs: the fast client reads, the slow one does not
    flood_seconds = time.monotonic() - started
    assert served.watchers.emitted == batches * size  # the pipeline never waited
    assert len(served.api.streams) == 1 and len(served.watchers.callbacks) == 1
    yield wait_until(lambda: len(fast.events()) == batches * size, timeout=10)
    assert [e["device"] for e in fast.events()[:2]] == ["0-0", "0-1"]
    tail = yield threads.deferToThread(read_until_closed, slow, 5.0)
    slow.close()
    final = re.search(
        rb'event: error\ndata: \{"reason": "too slow: (\d+) events waiting"\}\n\n', tail
    )
    assert final is not None and tail.endswith(final.group(0) + b"\r\n0\r\n\r\n")  # the last
    assert flood_seconds < 10
