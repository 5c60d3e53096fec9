"""``gatewayd status``, ``tail`` and ``reload``: exit statuses and output against real sockets.

The commands block, so each runs in a thread (``deferToThread``) while the real reactor serves
the real API (over a fake daemon view) or, for reload, a small stand-in for the endpoint.
"""

from __future__ import annotations

import argparse
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.web import resource, server

from gatewayd import opscli
from gatewayd.api import listen_api
from gatewayd.cli import build_parser
from gatewayd.config_model import ApiSection
from gatewayd.events import Event
from gatewayd.testing import free_port, wait_until
from tests.test_api import TOKEN
from tests.test_event_stream import Watchers
from tests.test_status_api import status_daemon

GOOD_CONFIG = """\
gateway: {id: edge-01, state_dir: state}
api: {listen: "127.0.0.1:%d", token_file: token}
plugins: {}
sinks: {}
routes: []
"""


def parse(*argv: str) -> argparse.Namespace:
    return build_parser({}).parse_args(list(argv))


@defer.inlineCallbacks
def run(main: Any, *argv: str):
    """(exit status, stdout, stderr) of one command, run in a thread."""
    out, err = io.StringIO(), io.StringIO()
    code = yield threads.deferToThread(main, parse(*argv), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def api(tmp_path):
    """``start(token=None)`` → (daemon, watchers, ApiState, "127.0.0.1:port")."""
    from twisted.internet import reactor

    ports = []

    def start(token: str | None = None) -> tuple[Any, Watchers, Any, str]:
        daemon = status_daemon(reactor, tmp_path, token)
        watchers = Watchers()
        daemon.watch_events = watchers.watch
        port = listen_api(daemon, ApiSection(listen="127.0.0.1:0"), reactor)
        ports.append(port)
        return daemon, watchers, port.factory.api, f"127.0.0.1:{port.getHost().port}"

    yield start
    for port in ports:
        port.factory.api.close_streams()
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def no_default_config(monkeypatch):
    """The box's /etc/gatewayd/gatewayd.yaml is never read by these tests."""
    monkeypatch.setattr(opscli, "_default_config", lambda: "/nonexistent/gatewayd.yaml")


# --- gatewayd status ----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_status_prints_one_screen_and_exits_0_when_ok(api, no_default_config):
    daemon, _, _, address = api()
    code, out, err = yield run(opscli.status_main, "status", "--api", address)
    assert (code, err) == (0, "")
    assert out.startswith("● gatewayd edge-01: ok\n")
    assert "Config: /etc/gatewayd/gatewayd.yaml" in out
    assert "cabinets (powerbank): running, 1 devices online, 0 restarts" in out
    assert "store (sqlite): ok, 3 queued" in out


@pytest_twisted.inlineCallbacks
def test_status_exits_1_when_degraded_and_shows_errors(api, no_default_config):
    daemon, _, _, address = api()
    daemon.plugins["cabinets"].state = "failed"
    daemon.plugins["cabinets"].error = "runtime error: boom"
    daemon.sinks["store"].last_error = "connection refused"
    reload = {"ok": False, "at": "2026-12-05T03:00:00+00:00", "errors": ["f.yaml:3: x: bad"]}
    daemon.config_status = lambda: {"path": "f.yaml", "loaded_at": "t", "last_reload": reload}
    code, out, _ = yield run(opscli.status_main, "status", "--api", address)
    assert code == 1
    assert out.startswith("× gatewayd edge-01: degraded")
    assert "last error: runtime error: boom" in out and "last error: connection refused" in out
    assert "Reload: FAILED at 2026-12-05T03:00:00+00:00" in out and "f.yaml:3: x: bad" in out


@pytest_twisted.inlineCallbacks
def test_status_json_prints_the_body(api, no_default_config, tmp_path):
    _, _, _, address = api(token=TOKEN)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    argv = ("status", "--api", address, "--token-file", str(token), "--json")
    code, out, _ = yield run(opscli.status_main, *argv)
    assert code == 0
    body = json.loads(out)
    assert body["status"] == "ok" and set(body["plugins"]) == {"cabinets"}


@pytest_twisted.inlineCallbacks
def test_status_without_the_token_exits_1_with_the_message(api, no_default_config):
    _, _, _, address = api(token=TOKEN)
    code, out, err = yield run(opscli.status_main, "status", "--api", address)
    assert code == 1 and out == ""
    assert "error 401 unauthorized" in err and "--token-file" in err


@pytest_twisted.inlineCallbacks
def test_status_and_tail_exit_3_when_nothing_listens(no_default_config):
    address = f"127.0.0.1:{free_port()}"
    for main, name in ((opscli.status_main, "status"), (opscli.tail_main, "tail")):
        code, _, err = yield run(main, name, "--api", address)
        assert code == 3
        assert f"cannot reach the control API at http://{address}" in err


def test_status_usage_error_exits_2(no_default_config):
    err = io.StringIO()
    args = parse("status", "--api", "nohostport")
    assert opscli.status_main(args, io.StringIO(), err) == 2
    assert "--api" in err.getvalue()


# --- gatewayd tail ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_tail_prints_matching_events_until_the_daemon_ends_the_stream(api, no_default_config):
    daemon, watchers, state, address = api()
    running = run(opscli.tail_main, "tail", "--api", address, "--plugin", "cab*")
    yield wait_until(lambda: len(state.streams) == 1, timeout=5)
    shown = Event(type="lend.succeeded", device="8601", data={"slot": 2}, plugin="cabinets")
    watchers.emit(shown)
    watchers.emit(Event(type="x", device="1", plugin="heating"))
    watchers.emit(Event(type="device.offline", plugin="cabinets"))
    state.close_streams()  # its last words come after the events in the same stream
    code, out, err = yield running
    assert code == 1
    assert "the daemon ended the stream: gatewayd is stopping" in err
    lines = out.splitlines()
    assert lines == [opscli.format_event(json.loads(shown.to_json())), lines[1]]
    assert lines[1].split()[1:] == ["cabinets", "device.offline", "-", "{}"]
    moment = datetime.fromisoformat(shown.ts).astimezone()
    assert lines[0] == (
        f"{moment:%H:%M:%S}.{moment.microsecond // 1000:03d} cabinets lend.succeeded 8601 "
        '{"slot":2}'
    )


@pytest_twisted.inlineCallbacks
def test_tail_json_prints_envelopes(api, no_default_config):
    _, watchers, state, address = api()
    running = run(opscli.tail_main, "tail", "--api", address, "--json", "--type", "lend.*")
    yield wait_until(lambda: len(state.streams) == 1, timeout=5)
    sent = Event(type="lend.failed", device="8601", data={"reason": "empty"}, plugin="cabinets")
    watchers.emit(sent)
    watchers.emit(Event(type="device.online", plugin="cabinets"))
    state.close_streams()
    code, out, _ = yield running
    assert code == 1
    assert [json.loads(line) for line in out.splitlines()] == [json.loads(sent.to_json())]


@pytest_twisted.inlineCallbacks
def test_tail_api_errors_exit_1(api, no_default_config):
    _, _, _, address = api(token=TOKEN)
    code, _, err = yield run(opscli.tail_main, "tail", "--api", address)
    assert code == 1 and "error 401 unauthorized" in err


def test_tail_ctrl_c_exits_0_quietly(monkeypatch, no_default_config):
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(opscli, "open_api", interrupted)
    out, err = io.StringIO(), io.StringIO()
    assert opscli.tail_main(parse("tail", "--api", "127.0.0.1:1"), out, err) == 0
    assert out.getvalue() == err.getvalue() == ""


# --- gatewayd reload ----------------------------------------------------------------------------


class ReloadStandIn(resource.Resource):
    """``POST /api/v1/reload`` answering what the test says, remembering the requests."""

    isLeaf = True

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__()
        self.status, self.body = status, body
        self.requests: list[tuple[bytes, bytes, bytes | None]] = []  # path, body, authorization

    def render_POST(self, request: server.Request) -> bytes:
        self.requests.append(
            (request.path, request.content.read(), request.getHeader(b"authorization"))
        )
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.body).encode()


@pytest.fixture
def reload_server(tmp_path):
    """``start(status, body)`` → (stand-in, path of a good config pointing at it)."""
    from twisted.internet import reactor

    ports = []

    def start(status: int, body: dict[str, Any]) -> tuple[ReloadStandIn, Path]:
        stand_in = ReloadStandIn(status, body)
        port = reactor.listenTCP(0, server.Site(stand_in), interface="127.0.0.1")
        ports.append(port)
        config = tmp_path / "gatewayd.yaml"
        config.write_text(GOOD_CONFIG % port.getHost().port)
        (tmp_path / "token").write_text(TOKEN)
        (tmp_path / "token").chmod(0o600)
        return stand_in, config

    yield start
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


RELOADED = {
    "ok": True,
    "at": "2026-12-05T03:00:00+00:00",
    "errors": [],
    "applied": {
        "plugins": {"added": ["esam"], "changed": ["cabinets"], "removed": []},
        "sinks": {"added": [], "changed": [], "removed": ["old"]},
        "routes": True,
    },
    "needs_restart": ["api.listen"],
}


@pytest_twisted.inlineCallbacks
def test_reload_posts_with_the_token_and_prints_what_was_applied(reload_server):
    stand_in, config = reload_server(200, {"ok": True, "reload": RELOADED})
    code, out, err = yield run(opscli.reload_main, "reload", "-c", str(config))
    assert (code, err) == (0, "")
    assert stand_in.requests == [(b"/api/v1/reload", b"{}", f"Bearer {TOKEN}".encode())]
    assert out.splitlines() == [
        "reloaded at 2026-12-05T03:00:00+00:00",
        "  plugins added: esam",
        "  plugins changed: cabinets",
        "  sinks removed: old",
        "  routes: replaced",
        "  not applied until a restart: api.listen",
    ]


@pytest_twisted.inlineCallbacks
def test_reload_of_nothing_says_so(reload_server):
    nothing = {"ok": True, "at": "t", "errors": [], "applied": {}, "needs_restart": []}
    _, config = reload_server(200, {"ok": True, "reload": nothing})
    code, out, _ = yield run(opscli.reload_main, "reload", "-c", str(config))
    assert code == 0 and out == "reloaded at t: nothing changed\n"


@pytest_twisted.inlineCallbacks
def test_reload_refused_by_the_daemon_prints_its_errors_and_exits_1(reload_server):
    refused = dict(RELOADED, ok=False, errors=["gatewayd.yaml:4: plugins.x.type: unknown"])
    error = {"code": "invalid_config", "message": "the config has errors"}
    _, config = reload_server(422, {"ok": False, "error": error, "reload": refused})
    code, out, err = yield run(opscli.reload_main, "reload", "-c", str(config))
    assert code == 1 and out == ""
    assert "gatewayd.yaml:4: plugins.x.type: unknown" in err


@pytest_twisted.inlineCallbacks
def test_reload_of_a_bad_file_exits_2_without_asking_the_daemon(reload_server):
    stand_in, config = reload_server(200, {"ok": True, "reload": RELOADED})
    config.write_text(config.read_text() + "bogus: 1\n")
    code, out, err = yield run(opscli.reload_main, "reload", "-c", str(config))
    assert code == 2 and out == ""
    assert "bogus" in err and "the daemon was not asked" in err
    assert stand_in.requests == []


@pytest_twisted.inlineCallbacks
def test_reload_exits_3_when_nothing_listens(tmp_path):
    config = tmp_path / "gatewayd.yaml"
    config.write_text(GOOD_CONFIG.replace(", token_file: token", "") % free_port())
    code, _, err = yield run(opscli.reload_main, "reload", "-c", str(config))
    assert code == 3 and "cannot reach the control API" in err
