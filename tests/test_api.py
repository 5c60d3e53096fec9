"""Control API: auth, every error path, commands and timeouts, /health, /metrics, devices.

Most tests go through a real listening site on 127.0.0.1 (pytest-twisted, real reactor); the
timing-sensitive ones (command timeout and cancellation, client disconnect) drive resources
directly with ``DummyRequest`` and a ``Clock``. The daemon is a small fake of the view the API
reads; its plugin is a real ``Plugin`` subclass with a real ``PluginContext``.
"""

from __future__ import annotations

import http.client as http_client
import io
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field
from twisted.internet import defer, protocol, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web import server
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from gatewayd.api import ApiChannel, ApiSetupError, build_site, is_loopback, listen_api
from gatewayd.config_model import ApiSection
from gatewayd.metrics import CONTENT_TYPE_LATEST
from gatewayd.plugin import (
    Busy,
    Device,
    DeviceRefused,
    DeviceTimeout,
    Plugin,
    PluginConfig,
    PluginContext,
    command,
)
from gatewayd.schema import ConfigModel
from gatewayd.testing import DaemonView as FakeDaemon
from gatewayd.testing import PipelineCounters as FakePipeline

TOKEN = "s3cret-token-value"
LAST_SEEN = 1716894111.123456  # 2024-05-28T11:01:51.123456+00:00


# --- a real plugin and a fake daemon view -------------------------------------------------------


class LendArgs(ConfigModel):
    slot: int = Field(ge=1, le=8)
    bank: str | None = None


class Cabinet(Plugin):
    """A power bank cabinet whose commands produce every answer the API maps."""

    protocol = "powerbank"

    def __init__(self, name: str, config: PluginConfig, context: PluginContext) -> None:
        super().__init__(name, config, context)
        self.pending: list[defer.Deferred] = []
        self.cancelled = 0
        self.fail_devices = False

    def devices(self) -> list[Device]:
        if self.fail_devices:
            raise RuntimeError("device table is broken")
        return [
            Device("860000000000001", True, LAST_SEEN, {"slots": 8}),
            Device("860000000000002", False, None),
        ]

    @command("lend", args=LendArgs)
    def lend(self, args: LendArgs) -> dict[str, Any]:
        """Lend a power bank from a slot.

        Second paragraph the listing does not show.
        """
        return {"slot": args.slot, "bank": args.bank or "0000000012"}

    @command("busy")
    def busy(self) -> None:
        raise Busy("slot 2 is already lending")

    @command("refuse")
    def refuse(self) -> None:
        raise DeviceRefused("the card refused the operation", code="6A82")

    @command("unanswered")
    def unanswered(self) -> None:
        raise DeviceTimeout("the cabinet did not answer within 10 s")

    @command("crash")
    def crash(self) -> None:
        raise RuntimeError("secret internal detail")

    @command("not_json")
    def not_json(self) -> object:
        return object()

    @command("hang")
    def hang(self) -> defer.Deferred:
        """Never answers by itself; counts cancellations."""

        def cancel(_: defer.Deferred) -> None:
            self.cancelled += 1

        result: defer.Deferred = defer.Deferred(cancel)
        self.pending.append(result)
        return result


@dataclass
class FakePluginHost:
    name: str
    type_name: str
    state: str
    plugin: Plugin | None
    context: PluginContext | None
    error: str | None = None


@dataclass
class FakeQueue:
    depth: int = 0
    bytes: int = 0
    oldest_ts: float | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    possible_duplicates: int = 0


@dataclass
class FakeSink:
    duplicates: int = 0


@dataclass
class FakeSinkRunner:
    state: str = "ok"
    last_error: str | None = None
    delivered: int = 0
    failures: int = 0
    sink: FakeSink = field(default_factory=FakeSink)
    queue: FakeQueue = field(default_factory=FakeQueue)


def cabinet_host(
    name: str, reactor: Any, state_dir: Path, state: str = "running", kind: type = Cabinet
) -> FakePluginHost:
    """A host of a real Cabinet plugin (or subclass ``kind``) with a real PluginContext."""
    context = PluginContext(
        name=name,
        protocol=Cabinet.protocol,
        gateway_id="edge-01",
        reactor=reactor,
        state_dir=state_dir,
        sink=lambda event: defer.succeed(None),
    )
    plugin = kind(name, PluginConfig(type="powerbank"), context)
    return FakePluginHost(name, "powerbank", state, plugin, context)


def make_daemon(reactor: Any, state_dir: Path, token: str | None = None) -> FakeDaemon:
    """One running cabinet plugin ``cabinets`` and one healthy sink ``store``."""
    daemon = FakeDaemon(reactor=reactor, gateway_id="edge-01", api_token=token)
    daemon.plugins["cabinets"] = cabinet_host("cabinets", reactor, state_dir)
    daemon.sinks["store"] = FakeSinkRunner()
    return daemon


def cabinet(daemon: FakeDaemon, name: str = "cabinets") -> Cabinet:
    return daemon.plugins[name].plugin  # type: ignore[return-value]


def command_counts(daemon: FakeDaemon, name: str = "cabinets") -> dict[str, int]:
    return daemon.plugins[name].context.metrics.commands


# --- a real listening site ---------------------------------------------------------------------


@dataclass
class Served:
    daemon: FakeDaemon
    base: str

    def url(self, path: str) -> bytes:
        return (self.base + path).encode("ascii")


@pytest.fixture
def serve(tmp_path):
    """``serve(token=..., **api_options)`` → Served, listening on 127.0.0.1:<free port>."""
    from twisted.internet import reactor

    ports = []

    def start(token: str | None = None, **options: Any) -> Served:
        daemon = make_daemon(reactor, tmp_path, token)
        config = ApiSection(listen="127.0.0.1:0", **options)
        port = listen_api(daemon, config, reactor)
        ports.append(port)
        return Served(daemon, f"http://127.0.0.1:{port.getHost().port}")

    yield start
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@defer.inlineCallbacks
def http(method: bytes, url: bytes, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one request with twisted.web.client.Agent."""
    from twisted.internet import reactor

    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    raw_headers = Headers({k: [v] for k, v in (headers or {}).items()})
    response = yield Agent(reactor).request(method, url, raw_headers, producer)
    body = _Body()
    response.deliverBody(body)
    data = yield body.done
    return response.code, response.headers, data


class _Body(protocol.Protocol):
    """Collects a response body (readBody warns about the proxied transport)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason) -> None:
        self.done.callback(b"".join(self.chunks))


@defer.inlineCallbacks
def post_json(served: Served, path: str, arguments: Any = None, token: str | None = None, raw=None):
    headers = {b"content-type": b"application/json"}
    if token is not None:
        headers[b"authorization"] = f"Bearer {token}".encode()
    body = (
        raw if raw is not None else json.dumps(arguments if arguments is not None else {}).encode()
    )
    status, response_headers, data = yield http(b"POST", served.url(path), body, headers)
    return status, response_headers, json.loads(data)


LEND = "/api/v1/plugins/cabinets/commands/lend"


def assert_error(body: dict, code: Any, *fragments: str) -> None:
    assert body["ok"] is False
    assert body["error"]["code"] == code
    for fragment in fragments:
        assert fragment in body["error"]["message"], body["error"]["message"]


# --- commands ----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_command_success_returns_result_and_counts_ok(serve):
    served = serve()
    status, headers, body = yield post_json(served, LEND, {"slot": "3"})
    assert status == 200
    assert headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
    assert body == {"ok": True, "result": {"slot": 3, "bank": "0000000012"}}
    assert command_counts(served.daemon) == {"lend:ok": 1}


@pytest_twisted.inlineCallbacks
def test_empty_body_means_no_arguments_given(serve):
    served = serve()
    status, _, body = yield post_json(served, LEND, raw=b"")
    assert status == 400
    assert_error(body, "bad_arguments", "slot: Field required")


@pytest_twisted.inlineCallbacks
def test_empty_body_reaches_a_command_without_arguments(serve):
    served = serve()
    status, _, body = yield post_json(served, "/api/v1/plugins/cabinets/commands/busy", raw=b"")
    assert status == 409
    status, _, body = yield post_json(served, "/api/v1/plugins/cabinets/commands/busy", {"x": 1})
    assert status == 400
    assert_error(body, "bad_arguments", "busy takes no arguments, got: x")


@pytest_twisted.inlineCallbacks
def test_bad_argument_is_named(serve):
    served = serve()
    status, _, body = yield post_json(served, LEND, {"slot": 9, "colour": "red"})
    assert status == 400
    assert_error(body, "bad_arguments", "slot: Input should be less than or equal to 8")
    assert "colour: unknown argument" in body["error"]["message"]
    assert command_counts(served.daemon) == {"lend:bad_arguments": 1}


@pytest_twisted.inlineCallbacks
def test_a_boolean_for_a_number_is_400_not_1(serve):
    served = serve()
    status, _, body = yield post_json(served, LEND, {"slot": True})
    assert status == 400
    assert_error(body, "bad_arguments", "slot: expected a number, got true")


@pytest_twisted.inlineCallbacks
def test_invalid_json_is_400_naming_the_problem(serve):
    served = serve()
    status, _, body = yield post_json(served, LEND, raw=b'{"slot": 3')
    assert status == 400
    assert_error(body, "bad_request", "not valid JSON", "char 10")


@pytest_twisted.inlineCallbacks
def test_body_must_be_an_object(serve):
    served = serve()
    status, _, body = yield post_json(served, LEND, raw=b"[1, 2]")
    assert status == 400
    assert_error(body, "bad_request", "JSON object", "got a JSON array")


@pytest.mark.parametrize(
    "raw",
    [b'{"slot": "\xff"}', '{"slot": 3}'.encode("utf-16"), b'\xef\xbb\xbf{"slot": 3}'],
    ids=["bad-utf8", "utf16", "utf8-bom"],
)
@pytest_twisted.inlineCallbacks
def test_body_not_utf8_is_400(serve, raw):
    served = serve()
    status, _, body = yield post_json(served, LEND, raw=raw)
    assert status == 400
    assert_error(body, "bad_request", "UTF-8")


@pytest_twisted.inlineCallbacks
def test_deeply_nested_json_is_400_and_logs_no_error(serve):
    served = serve()
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:  # 60 KB, under max_body_bytes: the standard library's parser would hit RecursionError
        raw = b"[" * 30_000 + b"]" * 30_000
        status, _, body = yield post_json(served, LEND, raw=raw)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert status == 400
    assert_error(body, "bad_request", "body: JSON nested too deeply", "more than 64 levels")
    assert [
        e
        for e in logged
        if "log_failure" in e or e.get("log_level") in (LogLevel.error, LogLevel.critical)
    ] == []
    assert command_counts(served.daemon) == {"lend:bad_request": 1}


@pytest_twisted.inlineCallbacks
def test_body_too_large_is_413(serve):
    served = serve(max_body_bytes=1024)
    raw = json.dumps({"slot": 1, "bank": "x" * 2000}).encode()
    status, _, body = yield post_json(served, LEND, raw=raw)
    assert status == 413
    assert_error(body, "too_large", "1024 bytes")
    # exactly at the limit is accepted (and then validated)
    at_limit = b'{"slot": 2}' + b" " * (1024 - 11)
    status, _, body = yield post_json(served, LEND, raw=at_limit)
    assert (status, body["ok"]) == (200, True)


def _chunked_post(base: str, path: str, chunks: list[bytes]) -> tuple[int, bytes]:
    """A blocking POST with Transfer-Encoding: chunked (no Content-Length up front)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http_client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("POST", path, body=iter(chunks), encode_chunked=True)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest_twisted.inlineCallbacks
def test_chunked_body_too_large_is_413(serve):
    served = serve(max_body_bytes=1024)
    status, data = yield threads.deferToThread(
        _chunked_post, served.base, LEND, [b'{"slot": 1, "bank": "'] + [b"x" * 300] * 5 + [b'"}']
    )
    assert status == 413
    assert_error(json.loads(data), "too_large", "1024 bytes")
    status, data = yield threads.deferToThread(
        _chunked_post, served.base, LEND, [b'{"slot":', b"5}"]
    )
    assert (status, json.loads(data)["result"]["slot"]) == (200, 5)


@pytest_twisted.inlineCallbacks
def test_unknown_plugin_and_command_are_404_listing_choices(serve):
    served = serve()
    status, _, body = yield post_json(served, "/api/v1/plugins/nope/commands/lend", {})
    assert status == 404
    assert_error(body, "not_found", "unknown plugin 'nope'", "(configured: cabinets)")
    status, _, body = yield post_json(served, "/api/v1/plugins/cabinets/commands/fly", {})
    assert status == 404
    assert_error(body, "not_found", "no command 'fly'", "available: busy, crash, hang, lend")
    assert command_counts(served.daemon) == {}  # unknown names are not metric labels


@pytest.mark.parametrize(
    ("name", "status", "code", "fragment"),
    [
        ("busy", 409, "busy", "already lending"),
        ("refuse", 502, "6A82", "card refused"),
        ("unanswered", 504, "timeout", "did not answer"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_command_errors_map_to_their_status(serve, name, status, code, fragment):
    served = serve()
    got, _, body = yield post_json(served, f"/api/v1/plugins/cabinets/commands/{name}", {})
    assert got == status
    assert_error(body, code, fragment)
    assert command_counts(served.daemon) == {f"{name}:{code}": 1}


@pytest_twisted.inlineCallbacks
def test_unexpected_exception_is_500_without_details(serve):
    served = serve()
    errors = []
    globalLogPublisher.addObserver(errors.append)
    try:
        status, _, body = yield post_json(served, "/api/v1/plugins/cabinets/commands/crash", {})
    finally:
        globalLogPublisher.removeObserver(errors.append)
    assert status == 500
    assert_error(body, "internal", "see the log")
    assert "secret internal detail" not in json.dumps(body)
    logged = [e for e in errors if "log_failure" in e]
    assert logged and "secret internal detail" in str(logged[0]["log_failure"].value)
    assert command_counts(served.daemon) == {"crash:internal": 1}


@pytest_twisted.inlineCallbacks
def test_result_that_is_not_json_is_500(serve):
    served = serve()
    status, _, body = yield post_json(served, "/api/v1/plugins/cabinets/commands/not_json", {})
    assert status == 500
    assert_error(body, "internal", "not JSON")


@pytest_twisted.inlineCallbacks
def test_command_timeout_is_504_over_real_tcp(serve):
    served = serve(command_timeout="0.2s")
    status, _, body = yield post_json(served, "/api/v1/plugins/cabinets/commands/hang", {})
    assert status == 504
    assert_error(body, "timeout", "within 0.2 s")
    assert cabinet(served.daemon).cancelled == 1
    assert command_counts(served.daemon) == {"hang:timeout": 1}


@pytest_twisted.inlineCallbacks
def test_plugin_not_running_is_503(serve):
    served = serve()
    host = served.daemon.plugins["cabinets"]
    host.state, host.error = "retrying", "start failed: address in use"
    status, _, body = yield post_json(served, LEND, {"slot": 1})
    assert status == 503
    assert_error(body, "unavailable", "'cabinets' is retrying", "address in use")
    host.plugin = None  # a failed plugin the host already dropped
    status, _, body = yield post_json(served, LEND, {"slot": 1})
    assert status == 503


# --- token -------------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_token_required_for_post(serve):
    served = serve(token=TOKEN)
    status, headers, body = yield post_json(served, LEND, {"slot": 1})
    assert status == 401
    assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="gatewayd"']
    assert_error(body, "unauthorized", "Authorization: Bearer")

    status, _, body = yield post_json(served, LEND, {"slot": 1}, token="wrong-token")
    assert status == 403
    assert_error(body, "forbidden", "not valid")
    assert "wrong-token" not in json.dumps(body) and TOKEN not in json.dumps(body)

    url = served.url(LEND)
    status, _, _ = yield http(b"POST", url, b"{}", {b"authorization": f"Basic {TOKEN}".encode()})
    assert status == 401

    status, _, body = yield post_json(served, LEND, {"slot": 1}, token=TOKEN)
    assert (status, body["ok"]) == (200, True)
    # auth is checked before anything else: no probing for plugin names without the token
    status, _, _ = yield post_json(served, "/api/v1/plugins/nope/commands/x", {})
    assert status == 401


@pytest_twisted.inlineCallbacks
def test_health_and_metrics_are_open_and_api_v1_gets_need_the_token(serve):
    served = serve(token=TOKEN)
    for path in ("/health", "/metrics", "/"):
        status, _, _ = yield http(b"GET", served.url(path))
        assert status == 200, path
    bearer = {b"authorization": f"Bearer {TOKEN}".encode()}
    wrong = {b"authorization": b"Bearer wrong-token"}
    paths = ("/api/v1/devices", "/api/v1/plugins", "/api/v1/status", "/api/v1/history")
    for path in paths + ("/api/v1", "/api/v1/", "/api/v1/nope", "/api/v1/plugins/nope"):
        status, headers, data = yield http(b"GET", served.url(path))
        assert status == 401, path
        assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="gatewayd"']
        assert_error(json.loads(data), "unauthorized", "Authorization: Bearer")
        status, _, data = yield http(b"GET", served.url(path), headers=wrong)
        assert status == 403, path
    for path in paths:
        status, _, _ = yield http(b"GET", served.url(path), headers=bearer)
        assert status == 200, path


def test_refuses_non_loopback_listen_without_token(tmp_path):
    clock = task.Clock()
    daemon = make_daemon(clock, tmp_path)
    with pytest.raises(ApiSetupError, match="without a token.*api.token_file"):
        listen_api(daemon, ApiSection(listen="0.0.0.0:8720"), clock)
    with pytest.raises(ApiSetupError):
        listen_api(daemon, ApiSection(listen="[::]:8720"), clock)


@pytest_twisted.inlineCallbacks
def test_non_loopback_listen_with_token_is_allowed(tmp_path):
    from twisted.internet import reactor

    daemon = make_daemon(reactor, tmp_path, token=TOKEN)
    port = listen_api(daemon, ApiSection(listen="0.0.0.0:0"), reactor)
    try:
        assert port.getHost().host == "0.0.0.0"
    finally:
        yield port.stopListening()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("gateway.example", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


# --- paths and methods -------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_unknown_path_and_wrong_method_are_json(serve):
    served = serve()
    status, _, data = yield http(b"GET", served.url("/api/v2/things"))
    assert status == 404
    assert_error(json.loads(data), "not_found", "no such endpoint: /api/v2/things")
    status, headers, data = yield http(b"POST", served.url("/health"), b"{}")
    assert status == 405
    assert headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
    assert_error(json.loads(data), "method_not_allowed", "POST is not allowed on /health")
    status, _, data = yield http(b"HEAD", served.url("/health"))
    assert (status, data) == (200, b"")
    status, _, data = yield http(b"DELETE", served.url(LEND))
    assert status == 405
    assert_error(json.loads(data), "method_not_allowed", "allowed: GET, POST")


@pytest_twisted.inlineCallbacks
def test_plugins_listing_describes_commands(serve):
    served = serve()
    status, _, data = yield http(b"GET", served.url("/api/v1/plugins"))
    assert status == 200
    (plugin,) = json.loads(data)["plugins"]
    assert (plugin["name"], plugin["type"], plugin["state"]) == ("cabinets", "powerbank", "running")
    commands = {c["name"]: c for c in plugin["commands"]}
    assert commands["lend"]["doc"] == "Lend a power bank from a slot."
    schema = commands["lend"]["arguments"]
    assert schema["required"] == ["slot"]
    assert schema["properties"]["slot"]["maximum"] == 8
    assert commands["busy"]["arguments"] is None
    status, _, data = yield http(b"GET", served.url(LEND))
    assert (status, json.loads(data)["name"]) == (200, "lend")
    status, _, data = yield http(b"GET", served.url("/api/v1/plugins/cabinets/commands/"))
    assert len(json.loads(data)["commands"]) == len(commands)


# --- health ------------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_health_ok_then_degraded_by_a_failed_plugin(serve):
    from twisted.internet import reactor

    served = serve()
    served.daemon.sinks["store"].queue = FakeQueue(depth=3, oldest_ts=reactor.seconds() - 42)
    status, _, data = yield http(b"GET", served.url("/health"))
    body = json.loads(data)
    assert status == 200
    assert body["status"] == "ok" and body["gateway"] == "edge-01"
    assert body["plugins"] == {
        "cabinets": {"type": "powerbank", "state": "running", "error": None, "restarts": 0}
    }
    sink = body["sinks"]["store"]
    assert (sink["state"], sink["last_error"], sink["queued"]) == ("ok", None, 3)
    assert 41.9 < sink["oldest_age_seconds"] < 50

    host = served.daemon.plugins["cabinets"]
    host.state, host.error = "failed", "runtime error: RuntimeError('boom')"
    status, _, data = yield http(b"GET", served.url("/health"))
    body = json.loads(data)
    assert status == 503
    assert body["status"] == "degraded"
    assert body["plugins"]["cabinets"]["error"] == "runtime error: RuntimeError('boom')"


@pytest_twisted.inlineCallbacks
def test_health_degraded_by_a_stopped_sink_not_by_a_retrying_one(serve):
    served = serve()
    runner = served.daemon.sinks["store"]
    runner.state, runner.last_error = "retrying", "disk full"
    status, _, data = yield http(b"GET", served.url("/health"))
    assert status == 200
    assert json.loads(data)["sinks"]["store"]["last_error"] == "disk full"
    runner.state = "stopped"
    status, _, _ = yield http(b"GET", served.url("/health"))
    assert status == 503


# --- devices -----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_devices_listing_and_filter(tmp_path, serve):
    from twisted.internet import reactor

    served = serve()
    served.daemon.plugins["other"] = cabinet_host("other", reactor, tmp_path)
    status, _, data = yield http(b"GET", served.url("/api/v1/devices"))
    body = json.loads(data)
    assert status == 200
    assert body["devices"][0] == {
        "plugin": "cabinets",
        "id": "860000000000001",
        "online": True,
        "last_seen": "2024-05-28T11:01:51.123456+00:00",
        "details": {"slots": 8},
    }
    assert body["devices"][1]["last_seen"] is None and body["devices"][1]["online"] is False
    assert [d["plugin"] for d in body["devices"]] == ["cabinets"] * 2 + ["other"] * 2

    status, _, data = yield http(b"GET", served.url("/api/v1/devices?plugin=other"))
    assert {d["plugin"] for d in json.loads(data)["devices"]} == {"other"}

    status, _, data = yield http(b"GET", served.url("/api/v1/devices?plugin=nope"))
    assert status == 404
    assert_error(json.loads(data), "not_found", "unknown plugin 'nope'", "cabinets, other")

    cabinet(served.daemon, "other").fail_devices = True
    status, _, data = yield http(b"GET", served.url("/api/v1/devices"))
    body = json.loads(data)
    assert status == 200
    assert {d["plugin"] for d in body["devices"]} == {"cabinets"}
    assert "other" in body["errors"] and "device table" not in body["errors"]["other"]


class Fleet(Cabinet):
    """A plugin with many devices, listed lazily, counting how many were built."""

    size = 2500
    built = 0

    def devices(self):
        for n in range(self.size):
            self.built += 1
            yield Device(f"{n:06d}", n % 3 != 0, None)


@pytest_twisted.inlineCallbacks
def test_devices_come_a_page_at_a_time_until_next_offset_is_null(tmp_path, serve):
    from twisted.internet import reactor

    served = serve()
    served.daemon.plugins["fleet"] = cabinet_host("fleet", reactor, tmp_path, kind=Fleet)
    status, _, data = yield http(b"GET", served.url("/api/v1/devices"))
    body = json.loads(data)
    assert status == 200
    assert len(body["devices"]) == 1000  # the default page
    assert body["offset"] == 0 and body["next_offset"] == 1000
    assert [d["id"] for d in body["devices"][:3]] == [
        "860000000000001",
        "860000000000002",
        "000000",
    ]
    assert cabinet(served.daemon, "fleet").built == 999  # the page and one more, not all 2,500

    seen, offset = [], 0
    while offset is not None:
        status, _, data = yield http(
            b"GET", served.url(f"/api/v1/devices?plugin=fleet&limit=700&offset={offset}")
        )
        body = json.loads(data)
        assert status == 200 and body["offset"] == offset and len(body["devices"]) <= 700
        seen += [d["id"] for d in body["devices"]]
        offset = body["next_offset"]
    assert seen == [f"{n:06d}" for n in range(2500)]

    status, _, data = yield http(b"GET", served.url("/api/v1/devices?offset=5000"))
    body = json.loads(data)
    assert status == 200 and body["devices"] == [] and body["next_offset"] is None


@pytest_twisted.inlineCallbacks
def test_devices_filtered_by_online(tmp_path, serve):
    from twisted.internet import reactor

    served = serve()
    served.daemon.plugins["fleet"] = cabinet_host("fleet", reactor, tmp_path, kind=Fleet)
    url = "/api/v1/devices?plugin=fleet&online=false&limit=10000"
    status, _, data = yield http(b"GET", served.url(url))
    offline = json.loads(data)["devices"]
    assert status == 200
    assert [d["id"] for d in offline] == [f"{n:06d}" for n in range(0, 2500, 3)]
    status, _, data = yield http(b"GET", served.url("/api/v1/devices?online=1&limit=10000"))
    online = json.loads(data)["devices"]
    assert all(d["online"] for d in online) and len(online) == 1 + 2500 - len(offline)


@pytest_twisted.inlineCallbacks
def test_devices_search_matches_part_of_the_id_ignoring_case_and_pages_after(tmp_path, serve):
    from twisted.internet import reactor

    served = serve()
    served.daemon.plugins["fleet"] = cabinet_host("fleet", reactor, tmp_path, kind=Fleet)
    status, _, data = yield http(b"GET", served.url("/api/v1/devices?search=0000000000"))
    body = json.loads(data)
    assert status == 200
    assert [d["id"] for d in body["devices"]] == ["860000000000001", "860000000000002"]
    url = "/api/v1/devices?plugin=fleet&search=99&limit=10"
    status, _, data = yield http(b"GET", served.url(url))
    body = json.loads(data)
    expected = [f"{n:06d}" for n in range(2500) if "99" in f"{n:06d}"]
    assert [d["id"] for d in body["devices"]] == expected[:10] and body["next_offset"] == 10
    status, _, data = yield http(b"GET", served.url(url + "&offset=40"))
    body = json.loads(data)
    assert [d["id"] for d in body["devices"]] == expected[40:50]

    class Named(Cabinet):
        def devices(self):
            return [Device("Reader-North", True, None), Device("reader-south", True, None)]

    served.daemon.plugins["esam"] = cabinet_host("esam", reactor, tmp_path, kind=Named)
    status, _, data = yield http(b"GET", served.url("/api/v1/devices?search=READER"))
    assert [d["id"] for d in json.loads(data)["devices"]] == ["Reader-North", "reader-south"]
    status, _, data = yield http(b"GET", served.url("/api/v1/devices?search=nothing-like-it"))
    assert json.loads(data)["devices"] == []
    status, _, data = yield http(b"GET", served.url("/api/v1/devices?search=a&search=b"))
    assert status == 400
    assert_error(json.loads(data), "bad_request", "'search'", "more than once")


@pytest.mark.parametrize(
    "query, fragments",
    [
        ("limit=0", ["'limit'", "from 1 to 10000", "'0'"]),
        ("limit=10001", ["'limit'", "from 1 to 10000"]),
        ("limit=ten", ["'limit'", "'ten'"]),
        ("limit=-1", ["'limit'"]),
        ("offset=1.5", ["'offset'", "whole number from 0"]),
        ("offset=99999999999999999999999", ["'offset'"]),
        ("limit=5&limit=6", ["'limit'", "more than once"]),
        ("online=maybe", ["'online'", "true or false", "'maybe'"]),
        ("plugins=cabinets", ["unknown query argument(s) plugins", "accepted: plugin"]),
    ],
)
@pytest_twisted.inlineCallbacks
def test_a_bad_devices_query_is_a_400_naming_the_argument(serve, query, fragments):
    served = serve()
    status, _, data = yield http(b"GET", served.url(f"/api/v1/devices?{query}"))
    assert status == 400
    assert_error(json.loads(data), "bad_request", *fragments)


# --- metrics -----------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text exposition, keyed by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def labels(**pairs: str) -> frozenset:
    return frozenset(pairs.items())


@pytest_twisted.inlineCallbacks
def test_metrics_parse_with_the_right_values(tmp_path, serve):
    from twisted.internet import reactor

    served = serve()
    daemon = served.daemon
    daemon.reactor_lag = 0.025
    daemon.pipeline = FakePipeline(routed=10, unrouted=2, dropped=1)
    metrics = daemon.plugins["cabinets"].context.metrics
    metrics.frames_in, metrics.frames_out, metrics.frames_invalid = 7, 5, 1
    metrics.count_command("lend", "ok")
    metrics.count_command("lend", "ok")
    metrics.count_command("lend", "6A82")
    metrics.gauge("pending_acks", "Events waiting to be acknowledged", lambda: 4)
    metrics.gauge("retries_total", "Retries so far", lambda: 9)
    metrics.gauge("broken", "A gauge that raises", lambda: 1 / 0)
    daemon.plugins["down"] = cabinet_host("down", reactor, tmp_path, state="failed")
    cabinet(daemon, "down").fail_devices = True
    daemon.sinks["store"] = FakeSinkRunner(
        state="ok",
        delivered=100,
        failures=2,
        sink=FakeSink(duplicates=3),
        queue=FakeQueue(
            depth=4,
            bytes=2048,
            oldest_ts=reactor.seconds() - 30,
            dropped={"overflow": 5, "max_age": 1},
            possible_duplicates=6,
        ),
    )
    daemon.sinks["north"] = FakeSinkRunner(state="retrying")

    status, headers, data = yield http(b"GET", served.url("/metrics"))
    assert status == 200
    assert headers.getRawHeaders(b"content-type") == [CONTENT_TYPE_LATEST.encode()]
    got = samples(data.decode())
    expected = {
        ("gatewayd_reactor_lag_seconds", labels()): 0.025,
        ("gatewayd_info", labels(gateway="edge-01", version="0.1.0")): 1,
        ("gatewayd_plugin_up", labels(plugin="cabinets", type="powerbank")): 1,
        ("gatewayd_plugin_up", labels(plugin="down", type="powerbank")): 0,
        ("gatewayd_plugin_frames_in_total", labels(plugin="cabinets")): 7,
        ("gatewayd_plugin_frames_out_total", labels(plugin="cabinets")): 5,
        ("gatewayd_plugin_frames_invalid_total", labels(plugin="cabinets")): 1,
        ("gatewayd_plugin_devices_online", labels(plugin="cabinets")): 1,
        (
            "gatewayd_plugin_commands_total",
            labels(plugin="cabinets", command="lend", outcome="ok"),
        ): 2,
        (
            "gatewayd_plugin_commands_total",
            labels(plugin="cabinets", command="lend", outcome="6A82"),
        ): 1,
        ("gatewayd_plugin_pending_acks", labels(plugin="cabinets")): 4,
        ("gatewayd_plugin_retries_total", labels(plugin="cabinets")): 9,
        ("gatewayd_sink_up", labels(sink="store")): 1,
        ("gatewayd_sink_up", labels(sink="north")): 0,
        ("gatewayd_sink_queued_events", labels(sink="store")): 4,
        ("gatewayd_sink_queued_bytes", labels(sink="store")): 2048,
        ("gatewayd_sink_delivered_total", labels(sink="store")): 100,
        ("gatewayd_sink_dropped_total", labels(sink="store", reason="overflow")): 5,
        ("gatewayd_sink_dropped_total", labels(sink="store", reason="max_age")): 1,
        ("gatewayd_sink_failures_total", labels(sink="store")): 2,
        ("gatewayd_sink_duplicates_total", labels(sink="store")): 3,
        ("gatewayd_sink_possible_duplicates_total", labels(sink="store")): 6,
        ("gatewayd_sink_oldest_age_seconds", labels(sink="north")): 0,
        ("gatewayd_events_routed_total", labels()): 10,
        ("gatewayd_events_unrouted_total", labels()): 2,
        ("gatewayd_events_dropped_total", labels()): 1,
    }
    for key, value in expected.items():
        assert got.get(key) == value, key
    age = got[("gatewayd_sink_oldest_age_seconds", labels(sink="store"))]
    assert 29.9 < age < 40
    # a devices() that raises and a gauge that raises cost only their own samples
    assert ("gatewayd_plugin_devices_online", labels(plugin="down")) not in got
    assert not any(name == "gatewayd_plugin_broken" for name, _ in got)
    text = data.decode()
    assert "# TYPE gatewayd_plugin_retries_total counter" in text  # a *_total gauge counts
    assert "# TYPE gatewayd_plugin_pending_acks gauge" in text


def test_metrics_without_daemon_activity_are_still_valid(tmp_path):
    clock = task.Clock()
    daemon = FakeDaemon(reactor=clock, gateway_id="edge-01")
    daemon.pipeline = None  # before the daemon started its pipeline
    site = build_site(daemon, ApiSection())
    text = site.resource.api.metrics.render().decode()
    got = samples(text)
    assert got[("gatewayd_events_routed_total", labels())] == 0
    assert got[("gatewayd_reactor_lag_seconds", labels())] == 0


# --- fine-grained: timeout, cancellation and disconnect with a Clock ----------------------------


def dummy_post(site: server.Site, path: str, body: bytes, token: str | None = None):
    """Render a POST through the site's resource tree; returns (request, render result)."""
    segments = path.lstrip("/").encode().split(b"/")
    request = DummyRequest(segments)
    request.method = b"POST"
    request.path = path.encode()
    request.uri = path.encode()
    request.content = io.BytesIO(body)
    if token is not None:
        request.requestHeaders.addRawHeader(b"authorization", f"Bearer {token}".encode())
    resource = getChildForRequest(site.resource, request)
    result = resource.render(request)
    if result is not server.NOT_DONE_YET:
        request.write(result)
        request.finish()
    return request


def answer(request: DummyRequest) -> tuple[int, dict]:
    return request.responseCode, json.loads(b"".join(request.written))


def test_command_timeout_cancels_the_command(tmp_path):
    clock = task.Clock()
    daemon = make_daemon(clock, tmp_path)
    site = build_site(daemon, ApiSection(command_timeout=60))
    request = dummy_post(site, "/api/v1/plugins/cabinets/commands/hang", b"{}")
    clock.advance(59.9)
    assert not request.finished and cabinet(daemon).cancelled == 0
    clock.advance(0.2)
    assert request.finished == 1 and cabinet(daemon).cancelled == 1
    status, body = answer(request)
    assert status == 504
    assert_error(body, "timeout", "no answer from cabinets.hang within 60 s")


def test_late_answer_within_timeout_is_delivered(tmp_path):
    clock = task.Clock()
    daemon = make_daemon(clock, tmp_path)
    site = build_site(daemon, ApiSection(command_timeout=60))
    request = dummy_post(site, "/api/v1/plugins/cabinets/commands/hang", b"")
    clock.advance(30)
    cabinet(daemon).pending[0].callback({"done": True})
    assert answer(request) == (200, {"ok": True, "result": {"done": True}})
    clock.advance(60)  # the timeout was cancelled: nothing more happens
    assert request.finished == 1 and cabinet(daemon).cancelled == 0


def test_client_disconnect_is_handled_quietly(tmp_path):
    clock = task.Clock()
    daemon = make_daemon(clock, tmp_path, token=TOKEN)
    site = build_site(daemon, ApiSection())
    failures = []

    def observe(event):
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        request = dummy_post(site, "/api/v1/plugins/cabinets/commands/hang", b"{}", TOKEN)
        request.processingFailed(ConnectionError("client went away"))
        cabinet(daemon).pending[0].callback({"late": 1})
    finally:
        globalLogPublisher.removeObserver(observe)
    assert request.written == [] and request.finished == 0
    assert cabinet(daemon).cancelled == 0  # the device operation is not abandoned
    assert command_counts(daemon) == {"hang:ok": 1}
    assert failures == []


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.closed: defer.Deferred = defer.Deferred()

    def connectionLost(self, reason):
        self.closed.callback(None)


@pytest_twisted.inlineCallbacks
def test_client_disconnect_over_real_tcp(serve):
    from twisted.internet import reactor

    served = serve()
    failures = []

    def observe(event):
        if "log_failure" in event:
            failures.append(event)

    port = int(served.base.rsplit(":", 1)[1])
    client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), _Collect())
    client.transport.write(
        b"POST /api/v1/plugins/cabinets/commands/hang HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    for _ in range(100):  # until the command is running
        if cabinet(served.daemon).pending:
            break
        yield task.deferLater(reactor, 0.01, lambda: None)
    globalLogPublisher.addObserver(observe)
    try:
        client.transport.loseConnection()
        yield client.closed
        yield task.deferLater(reactor, 0.05, lambda: None)
        cabinet(served.daemon).pending[0].callback({"late": 1})
        yield task.deferLater(reactor, 0.01, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert failures == []
    assert command_counts(served.daemon) == {"hang:ok": 1}


# --- bad HTTP input: an oversized or slow request head gets a status, then the connection closes -


def _exchange(base: str, data: bytes, pause: float = 0.0, more: bytes = b"") -> bytes:
    """Blocking: send ``data`` (then ``more`` after ``pause`` s), return all bytes until EOF."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(data)
            if more:
                time.sleep(pause)
                sock.sendall(more)
        except OSError:
            pass  # the server may stop reading once it has answered; read what it sent
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


def _status_and_error(answer: bytes) -> tuple[bytes, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nconnection: close" in head.lower()
    return head.split(b"\r\n", 1)[0], json.loads(body)


def _request_line(length: int) -> bytes:
    """``GET /health?aaa... HTTP/1.1`` exactly ``length`` bytes long."""
    bare = b"GET /health? HTTP/1.1"
    return b"GET /health?" + b"a" * (length - len(bare)) + b" HTTP/1.1"


def _head(lines: list[bytes]) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n"


GET_HEALTH = b"GET /health HTTP/1.1"
LINE_MAX = ApiChannel.max_request_line
HEAD_MAX = ApiChannel.totalHeadersSize
# 40 header lines of 500 bytes: each line is short, the head is not
SMALL_HEADERS = [b"X-Pad-%02d: " % n + b"p" * 490 for n in range(40)]


URI_TOO_LONG = (b"HTTP/1.1 414 URI Too Long", "uri_too_long")
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large", "headers_too_large")


@pytest.mark.parametrize(
    ("request_head", "expected", "fragment"),
    [
        (_head([_request_line(100_000), b"Host: x"]), URI_TOO_LONG, f"than {LINE_MAX} bytes"),
        (_head([_request_line(LINE_MAX + 1), b"Host: x"]), URI_TOO_LONG, f"than {LINE_MAX} bytes"),
        (
            _head([GET_HEALTH, b"Host: x", b"X-Big: " + b"a" * 200_000]),
            HEAD_TOO_LARGE,
            f"than {HEAD_MAX} bytes",
        ),
        (_head([GET_HEALTH, b"Host: x", *SMALL_HEADERS]), HEAD_TOO_LARGE, f"than {HEAD_MAX} bytes"),
        (
            _head([GET_HEALTH, *(b"X-%d: 1" % n for n in range(ApiChannel.maxHeaders + 1))]),
            HEAD_TOO_LARGE,
            f"more than {ApiChannel.maxHeaders} header fields",
        ),
    ],
    ids=["url-100k", "url-over-limit", "header-200k", "many-long-headers", "too-many-headers"],
)
@pytest_twisted.inlineCallbacks
def test_an_oversized_request_head_gets_its_status_then_a_close(
    serve, request_head, expected, fragment
):
    served = serve()
    answer = yield threads.deferToThread(_exchange, served.base, request_head)
    status, body = _status_and_error(answer)
    assert status == expected[0]
    assert_error(body, expected[1], fragment)


def _refused_then_keep_sending(base: str) -> tuple[bytes, float | None]:
    """Blocking: send an oversized head, read the answer to EOF, then keep sending; returns the
    answer and the seconds after it until the server reset the connection (None: it never did)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(GET_HEALTH + b"\r\nX-Big: " + b"a" * 20_000)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        answered = time.monotonic()
        try:
            while time.monotonic() - answered < 3:
                sock.sendall(b"a" * 1000)
                time.sleep(0.05)
        except OSError:
            return b"".join(chunks), time.monotonic() - answered
        return b"".join(chunks), None


@pytest_twisted.inlineCallbacks
def test_a_refused_client_may_go_on_sending_for_linger_seconds(serve, monkeypatch):
    # the answer is followed by a half-close: what the client still sends is read and dropped,
    # so no TCP reset destroys the answer; after linger_seconds the connection is aborted
    monkeypatch.setattr(ApiChannel, "linger_seconds", 0.5)
    served = serve()
    answer, reset_after = yield threads.deferToThread(_refused_then_keep_sending, served.base)
    assert _status_and_error(answer)[0] == HEAD_TOO_LARGE[0]
    assert reset_after is not None and 0.3 <= reset_after < 2.5


@pytest_twisted.inlineCallbacks
def test_a_request_head_at_the_limits_is_served(serve):
    served = serve()
    line = _head([_request_line(LINE_MAX), b"Host: x", b"Connection: close"])
    answer = yield threads.deferToThread(_exchange, served.base, line)
    assert answer.startswith(b"HTTP/1.1 200 ")
    lines = [GET_HEALTH, b"Host: x", b"Connection: close"]
    used = sum(map(len, lines))
    lines.append(b"X-Pad: " + b"p" * (HEAD_MAX - used - len(b"X-Pad: ")))
    answer = yield threads.deferToThread(_exchange, served.base, _head(lines))
    assert answer.startswith(b"HTTP/1.1 200 ")


class _Stalling(protocol.Protocol):
    """A client that writes ``start`` and then, if ``drip``, one byte every 0.1 s."""

    def __init__(self, start: bytes, drip: bool) -> None:
        self.start = start
        self.drip = drip
        self.received: list[bytes] = []
        self.closed: defer.Deferred = defer.Deferred()
        self.dripping: task.LoopingCall | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.start)
        if self.drip:
            self.dripping = task.LoopingCall(self.transport.write, b"X")
            self.dripping.start(0.1, now=False)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason) -> None:
        if self.dripping is not None and self.dripping.running:
            self.dripping.stop()
        self.closed.callback(None)


@pytest.mark.parametrize(
    ("start", "drip", "answer"),
    [
        (b"", False, b""),  # never sent a byte: closed without an answer
        (b"GET /health HTTP/1.1\r\nHost: x\r\n", False, b"HTTP/1.1 408 Request Timeout"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", True, b"HTTP/1.1 408 Request Timeout"),
    ],
    ids=["silent", "stalled", "one-byte-every-0.1s"],
)
@pytest_twisted.inlineCallbacks
def test_an_unfinished_request_head_is_closed_after_the_header_timeout(
    serve, monkeypatch, start, drip, answer
):
    from twisted.internet import reactor

    monkeypatch.setattr(ApiChannel, "header_timeout", 0.5)
    served = serve()
    port = int(served.base.rsplit(":", 1)[1])
    began = reactor.seconds()
    client = _Stalling(start, drip)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    try:
        yield client.closed.addTimeout(5, reactor)
    finally:
        if not client.closed.called:
            client.transport.abortConnection()
    elapsed = reactor.seconds() - began
    received = b"".join(client.received)
    assert received.split(b"\r\n", 1)[0] == answer
    if answer:
        assert_error(_status_and_error(received)[1], "request_timeout", "0.5 s")
    assert 0.4 <= elapsed < 2.5


@pytest_twisted.inlineCallbacks
def test_the_header_timeout_spares_a_slow_command_and_an_idle_keep_alive(serve, monkeypatch):
    monkeypatch.setattr(ApiChannel, "header_timeout", 0.3)
    served = serve(command_timeout="0.8s")
    status, _, body = yield post_json(served, "/api/v1/plugins/cabinets/commands/hang", {})
    assert status == 504  # the headers were complete: only api.command_timeout applies
    first, last = _head([GET_HEALTH, b"Host: x"]), _head([GET_HEALTH, b"Connection: close"])
    answer = yield threads.deferToThread(_exchange, served.base, first, 0.6, last)
    assert answer.count(b"HTTP/1.1 200 ") == 2  # 0.6 s idle between two requests: still open
