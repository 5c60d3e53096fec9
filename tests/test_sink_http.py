"""The http sink against a real HTTP(S) server in the test process (twisted.web on 127.0.0.1).

The server records every request (headers, body un-gzipped, the client certificate's name) and
answers from a script: 200, 503 with Retry-After, 429, 400, a redirect, or never. The runner's
timing is checked with a Clock while the HTTP exchange runs on the real reactor; one test streams
events through the real pipeline, queue and runner while the server is down for a while.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import json
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from twisted.internet import defer, reactor, task
from twisted.internet import error as neterror
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from gatewayd.config import load_config
from gatewayd.config_model import RouteConfig
from gatewayd.delivery import EventBatch, SinkRunner
from gatewayd.events import Event
from gatewayd.pipeline import Pipeline
from gatewayd.queue import QueueStore
from gatewayd.sinks.base import SinkContext
from gatewayd.sinks.http import HttpError, HttpSink, parse_retry_after
from gatewayd.testing import sleep, wait_until
from tests.test_delivery import MemoryQueue, payload, settle
from tests.test_queue_faults import scrape

TOKEN = "s3cret-token-0123"


@dataclass
class Answer:
    """What the server answers to one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Callable[[dict[str, str]], bytes] = b""
    hang: bool = False  # no answer, ever
    drop: bool = False  # the connection closed without an answer


@dataclass
class Received:
    headers: dict[str, str]  # lower-case names
    body: bytes  # un-gzipped
    events: list[dict[str, Any]]
    at: float
    peer: str | None  # the client certificate's common name (TLS)
    status: int = 0  # what the server answered (0: nothing yet)


class Receiver(Resource):
    """An ingest endpoint: records requests, answers from ``script`` then ``default``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.url = ""
        self.requests: list[Received] = []
        self.script: list[Answer] = []
        self.default = Answer()
        self.stored: list[str] = []  # ids of events in batches answered 2xx
        self.hung: list[Request] = []
        self.lost: list[Request] = []  # hung requests whose connection the client closed

    def render_POST(self, request: Request) -> bytes | int:
        raw = request.content.read()
        headers = {
            name.decode().lower(): values[0].decode()
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        body = gzip.decompress(raw) if headers.get("content-encoding") == "gzip" else raw
        if headers.get("content-type") == "application/json":
            events = json.loads(body)
        else:
            events = [json.loads(line) for line in body.split(b"\n") if line]
        peer = None
        if hasattr(request.transport, "getPeerCertificate"):
            certificate = request.transport.getPeerCertificate()
            if certificate is not None:
                names = certificate.to_cryptography().subject
                peer = names.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        received = Received(headers, body, events, reactor.seconds(), peer)
        self.requests.append(received)
        answer = self.script.pop(0) if self.script else self.default
        if answer.drop:
            request.transport.abortConnection()
            return NOT_DONE_YET
        if answer.hang:
            self.hung.append(request)
            request.notifyFinish().addErrback(lambda _: self.lost.append(request))
            return NOT_DONE_YET
        received.status = answer.status
        request.setResponseCode(answer.status)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        if 200 <= answer.status <= 299:
            self.stored.extend(event["id"] for event in events)
        return answer.body(headers) if callable(answer.body) else answer.body


@pytest.fixture
def server() -> Any:
    receiver = Receiver()
    port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
    receiver.url = f"http://127.0.0.1:{port.getHost().port}/ingest"
    yield receiver
    port.stopListening()


def context(tmp_path: Path, log: list | None = None) -> SinkContext:
    logger = Logger(namespace="test.http", observer=log.append if log is not None else None)
    return SinkContext("north", "gw", reactor, tmp_path, logger)


def make_sink(tmp_path: Path, url: str, log: list | None = None, **config: Any) -> HttpSink:
    settings = {"batch_size": 10, "replay_rate": None, **config}
    return HttpSink("north", HttpSink.Config(url=url, **settings), context(tmp_path, log))


def batch(first: int, count: int) -> EventBatch:
    return EventBatch([payload(n) for n in range(first, first + count)])


async def until(clock: Clock, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run the Clock's due calls and the real reactor in turns until ``predicate()``."""
    for _ in range(int(timeout / 0.01)):
        settle(clock)
        if predicate():
            return
        await sleep(0.01)
    raise AssertionError("condition not met")


def clock_runner(sink: HttpSink, count: int) -> tuple[Clock, MemoryQueue, SinkRunner]:
    """A runner on a Clock (its backoff a flat 1 s) over ``count`` queued events."""
    clock = Clock()
    queue = MemoryQueue(clock, count)
    runner = SinkRunner(sink, queue, sink.config, clock, backoff=lambda attempt: 1.0)
    return clock, queue, runner


# --- bodies and headers ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_batch_is_posted_as_ndjson_with_its_headers(tmp_path: Path, server) -> None:
    config = tmp_path / "gatewayd.yaml"
    (tmp_path / "token").write_text(TOKEN + "\n")
    config.write_text(
        "gateway: {id: gw, state_dir: state}\napi: {enabled: false}\nsinks:\n"
        f"  north: {{type: http, url: '{server.url}', token_file: token,"
        " headers: {X-Tenant: acme}}\nroutes:\n  - {match: {type: '*'}, sinks: [north]}\n"
    )
    sink = HttpSink("north", load_config(config).sinks["north"], context(tmp_path))
    events = batch(0, 3)
    await sink.open()
    try:
        await sink.write(events)
    finally:
        await sink.close()
    [request] = server.requests
    assert request.body == ("\n".join(events.payloads) + "\n").encode()  # as queued
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["idempotency-key"] == "id000000..id000002"
    assert request.headers["content-type"] == "application/x-ndjson"
    assert request.headers["x-tenant"] == "acme"
    assert "content-encoding" not in request.headers
    assert server.stored == ["id000000", "id000001", "id000002"]


@pytest_twisted.ensureDeferred
async def test_json_format_gzip_and_basic_auth_from_a_password_file(tmp_path: Path, server) -> None:
    (tmp_path / "pw").write_text("pa:ss word\n")
    config = tmp_path / "gatewayd.yaml"
    config.write_text(
        "gateway: {id: gw, state_dir: state}\napi: {enabled: false}\nsinks:\n"
        f"  north: {{type: http, url: '{server.url}', format: json, gzip: true,"
        " username: gw-01, password_file: pw}\nroutes:\n  - {match: {type: '*'}, sinks: [north]}\n"
    )
    sink = HttpSink("north", load_config(config).sinks["north"], context(tmp_path))
    events = batch(5, 4)
    await sink.open()
    try:
        await sink.write(events)
        await sink.write([Event(type="t", device="d", id="plain")])  # a list, as in tests
    finally:
        await sink.close()
    first, second = server.requests
    assert first.headers["content-encoding"] == "gzip"
    assert first.headers["content-type"] == "application/json"
    assert first.body == ("[" + ",".join(events.payloads) + "]").encode()
    assert [e["data"]["n"] for e in first.events] == [5, 6, 7, 8]
    expected = base64.b64encode(b"gw-01:pa:ss word").decode()
    assert first.headers["authorization"] == f"Basic {expected}"
    assert first.headers["idempotency-key"] == "id000005..id000008"
    assert second.headers["idempotency-key"] == "plain..plain"


def test_config_errors(tmp_path: Path) -> None:
    def problems(**config: Any) -> str:
        with pytest.raises(ValidationError) as caught:
            HttpSink.Config(**config)
        return str(caught.value)

    assert "http:// or https://" in problems(url="ftp://host/x")
    assert "no credentials in the URL" in problems(url="https://u:p@host/x")
    assert "set by the sink" in problems(url="http://h/", headers={"Idempotency-Key": "x"})
    assert "not both" in problems(url="http://h/", token="t", username="u", password="p")
    assert "both username and password" in problems(url="http://h/", username="u")
    assert "need an https:// url" in problems(url="http://h/", ca_file=__file__)
    assert "cannot read" in problems(url="https://h/", ca_file=str(tmp_path / "missing"))
    assert "only 4xx" in problems(url="http://h/", retry_statuses=[500])
    assert "token" not in repr(HttpSink.Config(url="http://h/", token=TOKEN).token)


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    now = 1_700_000_000.0
    date = datetime.datetime.fromtimestamp(now + 30, datetime.UTC)
    http_date = date.strftime("%a, %d %b %Y %H:%M:%S GMT").encode()
    assert parse_retry_after([b"7"], now) == 7.0
    assert parse_retry_after([http_date], now) == 30.0
    assert parse_retry_after([b"soon"], now) is None
    assert parse_retry_after(None, now) is None


# --- status handling --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_503_fails_the_write_and_the_runner_waits_at_least_retry_after(
    tmp_path: Path, server
) -> None:
    server.script = [Answer(503, {"Retry-After": "7"}, b"overloaded, come back later")]
    sink = make_sink(tmp_path, server.url)
    clock, queue, runner = clock_runner(sink, 3)
    runner.start()
    try:
        await until(clock, lambda: runner.state == "retrying")
        assert runner.last_error == (
            "HttpError: HTTP 503 Service Unavailable, retry after 7 s: overloaded, come back later"
        )
        [retry] = clock.getDelayedCalls()
        assert retry.getTime() - clock.seconds() >= 7.0  # not the 1 s backoff
        clock.advance(6.9)
        await sleep(0.1)
        assert len(server.requests) == 1
        clock.advance(0.1)
        await until(clock, lambda: runner.delivered == 3)
        assert len(server.requests) == 2 and server.stored == [f"id{n:06d}" for n in range(3)]
        assert server.requests[0].headers["idempotency-key"] == "id000000..id000002"
        assert server.requests[1].headers["idempotency-key"] == "id000000..id000002"
    finally:
        await runner.stop()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("status", [408, 429, 500, 502])
async def test_transient_statuses_fail_the_write(tmp_path: Path, server, status: int) -> None:
    server.script = [Answer(status)]
    sink = make_sink(tmp_path, server.url)
    await sink.open()
    try:
        with pytest.raises(HttpError) as caught:
            await sink.write(batch(0, 2))
        assert caught.value.status == status and caught.value.retry_after is None
        await sink.write(batch(0, 2))  # the same batch again: taken
    finally:
        await sink.close()
    assert sink.dead_letters == 0 and not sink.dead_letter_path.exists()
    assert server.stored == ["id000000", "id000001"]


@pytest_twisted.ensureDeferred
async def test_a_refused_batch_goes_to_the_dead_letter_file_and_the_queue_moves_on(
    tmp_path: Path, server
) -> None:
    server.script = [Answer(400, body=b'{"error": "event 3: unknown type"}' + b" " * 2000)]
    log: list[dict] = []
    sink = make_sink(tmp_path, server.url, log)
    clock, queue, runner = clock_runner(sink, 25)
    queued = [json.loads(text) for _, text in queue.entries]
    runner.start()
    try:
        await until(clock, lambda: runner.delivered == 25 and not queue.entries)
        assert runner.state == "ok" and runner.failures == 0
    finally:
        await runner.stop()
    assert server.stored == [f"id{n:06d}" for n in range(10, 25)]
    path = tmp_path / "north.dead.jsonl"
    assert sink.dead_letter_path == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    [line] = path.read_text().splitlines()
    record = json.loads(line)
    assert record["status"] == 400 and record["sink"] == "north"
    assert record["answer"].startswith('{"error": "event 3: unknown type"}')
    assert len(record["answer"]) == 1024  # the first KiB
    assert record["idempotency_key"] == "id000000..id000009"
    assert record["events"] == queued[:10]
    assert sink.dead_letters == 10
    [logged] = [e for e in log if e.get("log_level").name == "error"]
    assert logged["status"] == 400 and logged["count"] == 10
    figures = SimpleNamespace(state="ok", delivered=25, failures=0, sink=sink)  # no queue
    daemon = SimpleNamespace(sinks={"north": figures}, reactor=reactor)
    assert 'gatewayd_sink_dead_letter_total{sink="north"} 10.0' in scrape(daemon)


@pytest_twisted.ensureDeferred
async def test_retry_statuses_and_redirects_are_failed_writes_not_dead_letters(
    tmp_path: Path, server
) -> None:
    server.script = [
        Answer(401, body=b"token expired"),
        Answer(302, {"Location": "https://elsewhere.example/ingest"}),
    ]
    sink = make_sink(tmp_path, server.url, dead_letter="dead/refused.jsonl", retry_statuses=[401])
    await sink.open()
    try:
        with pytest.raises(HttpError, match="HTTP 401 Unauthorized: token expired"):
            await sink.write(batch(0, 1))
        with pytest.raises(HttpError, match="to https://elsewhere.example/ingest: set url"):
            await sink.write(batch(0, 1))
        server.script = [Answer(404)]
        await sink.write(batch(0, 1))  # any other 4xx: dead letter
    finally:
        await sink.close()
    assert len(server.requests) == 3  # the redirect was not followed
    assert sink.dead_letters == 1
    assert json.loads((tmp_path / "dead" / "refused.jsonl").read_text())["status"] == 404


@pytest_twisted.ensureDeferred
async def test_secrets_are_masked_even_when_the_server_echoes_them(tmp_path: Path, server) -> None:
    server.script = [Answer(500, body=lambda headers: headers["authorization"].encode())]
    log: list[dict] = []
    sink = make_sink(tmp_path, server.url, log, token=TOKEN)
    await sink.open()
    try:
        with pytest.raises(HttpError) as caught:
            await sink.write(batch(0, 1))
        server.script = [Answer(422, body=lambda headers: headers["authorization"].encode())]
        await sink.write(batch(0, 1))
    finally:
        await sink.close()
    assert str(caught.value) == "HTTP 500 Internal Server Error: Bearer **********"
    assert TOKEN not in sink.dead_letter_path.read_text()
    assert TOKEN not in repr(log)


@pytest_twisted.ensureDeferred
async def test_a_hung_request_is_ended_by_the_cores_write_timeout(tmp_path: Path, server) -> None:
    server.script = [Answer(hang=True)]
    sink = make_sink(tmp_path, server.url, write_timeout=5.0, timeout=60.0)
    clock, queue, runner = clock_runner(sink, 3)
    runner.start()
    try:
        await until(clock, lambda: len(server.hung) == 1)
        clock.advance(5.0)
        assert runner.state == "retrying" and runner.last_error == "timed out after 5s"
        await wait_until(lambda: server.lost, timeout=5)  # the connection was closed
        clock.advance(1.0)  # the retry: answered
        await until(clock, lambda: runner.delivered == 3)
    finally:
        await runner.stop()
    assert len(server.requests) == 2 and server.stored == [f"id{n:06d}" for n in range(3)]


@pytest_twisted.ensureDeferred
async def test_the_sinks_own_timeout_names_the_server(tmp_path: Path, server) -> None:
    server.script = [Answer(hang=True)]
    sink = make_sink(tmp_path, server.url, timeout=0.3)
    await sink.open()
    try:
        with pytest.raises(HttpError, match=r"no answer from 127\.0\.0\.1:\d+ within 0\.3 s"):
            await sink.write(batch(0, 1))
        await wait_until(lambda: server.lost, timeout=5)
    finally:
        await sink.close()


@pytest_twisted.ensureDeferred
async def test_connection_errors_fail_the_write(tmp_path: Path, server) -> None:
    server.script = [Answer(drop=True)]
    sink = make_sink(tmp_path, server.url)
    down = make_sink(tmp_path, "http://127.0.0.1:1/ingest")
    await sink.open()
    await down.open()
    try:
        with pytest.raises(ResponseNeverReceived):
            await sink.write(batch(0, 1))
        with pytest.raises(neterror.ConnectionRefusedError):
            await down.write(batch(0, 1))
        await sink.write(batch(0, 1))
    finally:
        await sink.close()
        await down.close()
    assert sink.dead_letters == down.dead_letters == 0
    assert server.stored == ["id000000"]


# --- TLS ----------------------------------------------------------------------------------------


def _certificate(name: str, key: Any, issuer: Any, issuer_key: Any, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca and name == "127.0.0.1":
        import ipaddress

        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(certificate: x509.Certificate, key: Any) -> tuple[bytes, bytes]:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_server(tmp_path: Path) -> Any:
    """An HTTPS receiver whose certificate a test CA signed; it requires a client certificate
    from the same CA. Writes ca.pem, client.pem and client.key into tmp_path."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test CA", ca_key, None, None, ca=True)
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("server", "client")}
    server_cert = _certificate("127.0.0.1", keys["server"], ca.subject, ca_key, ca=False)
    client_cert = _certificate("gateway-01", keys["client"], ca.subject, ca_key, ca=False)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    client_pem, client_key = _pem(client_cert, keys["client"])
    (tmp_path / "client.pem").write_bytes(client_pem)
    (tmp_path / "client.key").write_bytes(client_key)
    server_pem = b"".join(_pem(server_cert, keys["server"]))
    options = PrivateCertificate.loadPEM(server_pem).options(Certificate.loadPEM(ca_pem))
    receiver = Receiver()
    port = reactor.listenSSL(0, Site(receiver), options, interface="127.0.0.1")
    receiver.url = f"https://127.0.0.1:{port.getHost().port}/ingest"
    yield receiver
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tls_with_a_private_ca_and_a_client_certificate(tmp_path: Path, tls_server) -> None:
    sink = make_sink(
        tmp_path,
        tls_server.url,
        ca_file=str(tmp_path / "ca.pem"),
        cert_file=str(tmp_path / "client.pem"),
        key_file=str(tmp_path / "client.key"),
    )
    await sink.open()
    try:
        await sink.write(batch(0, 2))
    finally:
        await sink.close()
    assert tls_server.stored == ["id000000", "id000001"]
    assert tls_server.requests[0].peer == "gateway-01"


@pytest_twisted.ensureDeferred
async def test_tls_refuses_a_server_its_ca_file_does_not_vouch_for(
    tmp_path: Path, tls_server
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    foreign = _certificate("another CA", ca_key, None, None, ca=True)
    (other / "ca.pem").write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
    sink = make_sink(
        tmp_path,
        tls_server.url,
        ca_file=str(other / "ca.pem"),
        cert_file=str(tmp_path / "client.pem"),
        key_file=str(tmp_path / "client.key"),
    )
    await sink.open()
    try:
        with pytest.raises(Exception, match="certificate verify failed|SSL"):
            await sink.write(batch(0, 1))
    finally:
        await sink.close()
    assert tls_server.requests == []


# --- end to end -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_steady_stream_through_an_outage_reaches_the_server_once(
    tmp_path: Path, server
) -> None:
    """500 events/s for 10 s through the real pipeline, queue and runner; the server answers
    503 (Retry-After: 1) for the first 3 s. Afterwards it holds every stored event exactly once."""
    server.default = Answer(503, {"Retry-After": "1"}, b"starting up")
    store = QueueStore(tmp_path / "queues", reactor)
    store.start()
    sink = make_sink(
        tmp_path, server.url, batch_size=100, replay_rate=2000.0, retry_initial=0.1, retry_max=0.2
    )
    queue = store.queue("north", max_bytes=1 << 30, max_age=3600, overflow="drop_oldest")
    runner = SinkRunner(sink, queue, sink.config, reactor)
    pipeline = Pipeline([RouteConfig(sinks=["north"])], {"north": queue}, {"north": runner})
    emitted: list[defer.Deferred] = []
    events: list[Event] = []

    def emit_ten() -> None:
        for _ in range(10):
            event = Event(type="meter.reading", device="m1", data={"n": len(events)})
            events.append(event)
            emitted.append(pipeline.emit(event))

    def server_up() -> None:
        server.default = Answer(200)

    runner.start()
    reactor.callLater(3.0, server_up)
    stream = task.LoopingCall(emit_ten)
    try:
        await queue.when_open()
        stream.start(0.02)
        await sleep(10.0)
        stream.stop()
        results = await defer.DeferredList(emitted, consumeErrors=True)
        stored = [e.id for e, (ok, _) in zip(events, results, strict=True) if ok]
        assert len(stored) == len(events) >= 4500
        await wait_until(lambda: runner.delivered >= len(stored), timeout=20)
    finally:
        if stream.running:
            stream.stop()
        await runner.stop()
        await store.stop()
    counts = Counter(server.stored)
    repeats = sum(count - 1 for count in counts.values())
    assert set(counts) == set(stored) and repeats == 0
    assert runner.delivered == len(stored) and queue.depth == 0
    refused = [r.at for r in server.requests if r.status == 503]
    assert len(refused) >= 2, "the server never answered 503"
    assert all(b - a >= 0.95 for a, b in zip(refused, refused[1:], strict=False))  # Retry-After
