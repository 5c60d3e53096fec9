"""``GET /api/v1/status`` and ``GET /api/v1/history`` over real TCP, against a fake daemon view."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

import gatewayd
from gatewayd.api import listen_api
from gatewayd.config_model import ApiSection
from gatewayd.history import History
from gatewayd.status import status_report
from tests.test_api import TOKEN, Cabinet, assert_error, cabinet_host, http, make_daemon

CONFIG_STATUS = {"path": "/etc/gatewayd/gatewayd.yaml", "loaded_at": "x", "last_reload": None}


class Broken(Cabinet):
    def devices_online(self) -> int:
        raise RuntimeError("counting failed")


def status_daemon(reactor: Any, tmp_path, token: str | None = None) -> Any:
    """The API's fake daemon plus what the status reads: start time, config status, history."""
    daemon = make_daemon(reactor, tmp_path, token)
    daemon.started_at = 1_700_000_000.0
    daemon.config_status = lambda: dict(CONFIG_STATUS)
    daemon.sinks["store"].config = SimpleNamespace(type="sqlite")
    daemon.sinks["store"].queue.depth = 3
    daemon.history = History(daemon, task.Clock(), interval=10.0, points=360)
    return daemon


@pytest.fixture
def served_status(tmp_path):
    """``start(token=None)`` → (daemon, base URL) of the real API over a status daemon."""
    from twisted.internet import reactor

    ports = []

    def start(token: str | None = None) -> tuple[Any, str]:
        daemon = status_daemon(reactor, tmp_path, token)
        port = listen_api(daemon, ApiSection(listen="127.0.0.1:0"), reactor)
        ports.append(port)
        return daemon, f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def sample_twice(daemon: Any) -> None:
    """Two history samples 10 s apart with 40 events, 20 frames in and 15 deliveries between."""
    clock = daemon.history.reactor
    daemon.history.sample()
    metrics = daemon.plugins["cabinets"].context.metrics
    metrics.events += 40
    metrics.frames_in += 20
    daemon.sinks["store"].delivered += 15
    clock.advance(10.0)
    daemon.history.sample()


def test_status_report_before_two_samples_has_null_rates(tmp_path):
    daemon = status_daemon(task.Clock(), tmp_path)
    report = status_report(daemon, 1_700_000_125.0)
    assert report["gateway"] == "edge-01" and report["version"] == gatewayd.__version__
    assert report["status"] == "ok"
    assert report["started_at"] == "2023-11-14T22:13:20+00:00"
    assert report["uptime_seconds"] == 125.0
    assert report["config"] == CONFIG_STATUS
    cab = report["plugins"]["cabinets"]
    assert cab["rates"] == dict.fromkeys(("events", "frames_in", "frames_out", "frames_invalid"))
    assert cab["totals"] == {"events": 0, "frames_in": 0, "frames_out": 0, "frames_invalid": 0}
    assert report["sinks"]["store"]["delivery_rate"] is None


def test_status_report_of_a_bare_daemon_view_is_nulls_not_errors(tmp_path):
    daemon = make_daemon(task.Clock(), tmp_path)
    daemon.plugins["cabinets"].plugin = None
    report = status_report(daemon, 100.0)
    assert report["started_at"] is None and report["uptime_seconds"] is None
    assert report["config"] is None
    cab = report["plugins"]["cabinets"]
    assert cab["devices_online"] is None and cab["restarts"] == 0
    assert report["sinks"]["store"]["type"] is None


@pytest_twisted.inlineCallbacks
def test_status_answers_plugins_and_sinks_with_rates_and_totals(tmp_path, served_status):
    from twisted.internet import reactor

    daemon, base = served_status()
    sample_twice(daemon)
    daemon.plugins["broken"] = cabinet_host("broken", reactor, tmp_path, kind=Broken)
    daemon.plugins["broken"].restarts = 2
    status, headers, data = yield http(b"GET", f"{base}/api/v1/status".encode())
    body = json.loads(data)
    assert status == 200
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]
    assert body["status"] == "ok"
    assert body["uptime_seconds"] >= time.time() - 1_700_000_000.0 - 5
    assert body["plugins"]["cabinets"] == {
        "type": "powerbank",
        "state": "running",
        "error": None,
        "restarts": 0,
        "devices_online": 1,
        "rates": {"events": 4.0, "frames_in": 2.0, "frames_out": 0.0, "frames_invalid": 0.0},
        "totals": {"events": 40, "frames_in": 20, "frames_out": 0, "frames_invalid": 0},
    }
    assert body["plugins"]["broken"]["devices_online"] is None
    assert body["plugins"]["broken"]["restarts"] == 2
    assert body["plugins"]["broken"]["rates"]["events"] is None  # not sampled yet
    store = body["sinks"]["store"]
    assert store["type"] == "sqlite" and store["state"] == "ok" and store["last_error"] is None
    assert store["queued"] == 3 and store["delivered"] == 15 and store["delivery_rate"] == 1.5
    assert store["queue"] == {"state": "ok", "error": None, "failing_seconds": None}
    assert "oldest_age_seconds" in store


@pytest_twisted.inlineCallbacks
def test_status_is_degraded_like_health_when_a_plugin_failed(served_status):
    daemon, base = served_status()
    daemon.plugins["cabinets"].state = "failed"
    daemon.plugins["cabinets"].error = "runtime error: boom"
    status, _, data = yield http(b"GET", f"{base}/api/v1/status".encode())
    _, _, health = yield http(b"GET", f"{base}/health".encode())
    body = json.loads(data)
    assert status == 200  # the status answers; /health is the one that says 503
    assert body["status"] == "degraded" == json.loads(health)["status"]
    assert body["plugins"]["cabinets"]["error"] == "runtime error: boom"


@pytest_twisted.inlineCallbacks
def test_history_answers_aligned_arrays(served_status):
    daemon, base = served_status()
    sample_twice(daemon)
    status, _, data = yield http(b"GET", f"{base}/api/v1/history".encode())
    body = json.loads(data)
    assert status == 200
    assert body["interval"] == 10.0 and body["points"] == 360
    assert body["t"] == [0.0, 10.0]
    assert body["plugins"]["cabinets"]["events"] == [None, 4.0]
    assert set(body["plugins"]["cabinets"]) == {
        "events",
        "frames_in",
        "frames_out",
        "frames_invalid",
    }
    assert body["sinks"]["store"] == {"queued": [3, 3], "delivered": [None, 1.5]}


@pytest_twisted.inlineCallbacks
def test_status_and_history_need_the_token_and_refuse_unknown_arguments(served_status):
    daemon, base = served_status(token=TOKEN)
    bearer = {b"authorization": f"Bearer {TOKEN}".encode()}
    for path in ("/api/v1/status", "/api/v1/history"):
        status, _, _ = yield http(b"GET", f"{base}{path}".encode())
        assert status == 401
        status, _, _ = yield http(b"GET", f"{base}{path}".encode(), headers=bearer)
        assert status == 200
        status, _, data = yield http(b"GET", f"{base}{path}?verbose=1".encode(), headers=bearer)
        assert status == 400
        assert_error(json.loads(data), "bad_request", "unknown query argument(s) verbose")


@pytest_twisted.inlineCallbacks
def test_history_of_a_daemon_view_without_one_is_empty(served_status):
    daemon, base = served_status()
    del daemon.history
    status, _, data = yield http(b"GET", f"{base}/api/v1/history".encode())
    assert status == 200
    assert json.loads(data) == {"interval": None, "points": 0, "t": [], "plugins": {}, "sinks": {}}
