"""The control API on the shared command path: ``Idempotency-Key`` and who asked.

The rest of the command path over HTTP (validation, every error status, timeouts, metrics) is
``tests/test_api.py``, unchanged since the path moved to ``gatewayd.commands.dispatch``. Here:
a key makes a POST run once, its repeat is answered from the request id store (the same store,
and the same ids, as the MQTT command channel), and the plugin sees ``source``/``request_id``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from gatewayd.api import listen_api
from gatewayd.commands import (
    CommandChannel,
    CommandDispatcher,
    CommandsConfig,
    IdempotencyStore,
)
from gatewayd.config_model import ApiSection
from gatewayd.plugin import command
from gatewayd.testing import wait_until
from tests.test_api import (
    Cabinet,
    LendArgs,
    Served,
    cabinet_host,
    command_counts,
    http,
    make_daemon,
)

LEND = "/api/v1/plugins/cabinets/commands/lend"


class CountingCabinet(Cabinet):
    """Counts lends and remembers who asked for each."""

    lends: list[dict[str, Any]]

    @command("lend", args=LendArgs)
    def lend(self, args: LendArgs) -> dict[str, Any]:
        """Lend a power bank from a slot."""
        if not hasattr(self, "lends"):
            self.lends = []
        self.lends.append(self.context.invocation.as_data())
        return {"slot": args.slot, "lend": len(self.lends)}


@pytest.fixture
def served(tmp_path):
    """A control API whose daemon has a dispatcher with a request id store (and the store)."""
    daemon = make_daemon(reactor, tmp_path)
    daemon.plugins["cabinets"] = cabinet_host("cabinets", reactor, tmp_path, kind=CountingCabinet)
    store = IdempotencyStore(tmp_path / "commands.db", reactor)
    pytest_twisted.blockon(store.open())
    daemon.commands = CommandDispatcher(daemon, command_timeout=5, store=store)
    port = listen_api(daemon, ApiSection(listen="127.0.0.1:0"), reactor)
    yield Served(daemon, f"http://127.0.0.1:{port.getHost().port}")
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))
    pytest_twisted.blockon(store.close())


@defer.inlineCallbacks
def post(served: Served, path: str, arguments: Any, key: str | None = None):
    headers = {b"content-type": b"application/json"}
    if key is not None:
        headers[b"idempotency-key"] = key.encode()
    status, response_headers, data = yield http(
        b"POST", served.url(path), json.dumps(arguments).encode(), headers
    )
    replayed = response_headers.getRawHeaders(b"idempotent-replayed")
    return status, json.loads(data), replayed


def lends(served: Served) -> list[dict[str, Any]]:
    return getattr(served.daemon.plugins["cabinets"].plugin, "lends", [])


@pytest_twisted.inlineCallbacks
def test_an_idempotency_key_runs_a_command_once_and_repeats_its_answer(served):
    first = yield post(served, LEND, {"slot": 2}, key="lend-7")
    again = yield post(served, LEND, {"slot": 2}, key="lend-7")
    assert first == (200, {"ok": True, "result": {"slot": 2, "lend": 1}}, None)
    assert again == (200, first[1], [b"true"])
    assert lends(served) == [{"source": "http", "request_id": "lend-7"}]
    assert command_counts(served.daemon) == {"lend:ok": 1}
    # Without a key every POST runs: the old behaviour.
    plain = yield post(served, LEND, {"slot": 2})
    assert plain[1]["result"]["lend"] == 2 and lends(served)[1] == {
        "source": "http",
        "request_id": None,
    }


@pytest_twisted.inlineCallbacks
def test_a_key_reused_with_other_arguments_is_422(served):
    yield post(served, LEND, {"slot": 2}, key="lend-7")
    status, body, _ = yield post(served, LEND, {"slot": 3}, key="lend-7")
    assert status == 422 and body["error"]["code"] == "id_reused"
    assert len(lends(served)) == 1


@pytest_twisted.inlineCallbacks
def test_an_error_answer_is_remembered_too(served):
    status, body, _ = yield post(served, LEND, {"slot": 9}, key="bad-slot")
    assert status == 400 and body["error"]["code"] == "bad_arguments"
    again = yield post(served, LEND, {"slot": 9}, key="bad-slot")
    assert again == (400, body, [b"true"])


@pytest.mark.parametrize("key", ["", "x" * 201])
@pytest_twisted.inlineCallbacks
def test_an_unusable_key_is_400_naming_the_header(served, key):
    status, body, _ = yield post(served, LEND, {"slot": 2}, key=key)
    assert status == 400 and "Idempotency-Key" in body["error"]["message"]
    assert lends(served) == []


@pytest_twisted.inlineCallbacks
def test_a_key_and_an_mqtt_id_are_the_same_request(served):
    published: list = []
    channel = CommandChannel(
        served.daemon.commands,
        served.daemon.commands.store,
        "edge-01",
        CommandsConfig(allow=["cabinets.lend"]),
        lambda topic, payload, qos, retain: published.append(json.loads(payload)),
    )
    yield post(served, LEND, {"slot": 2}, key="req-1")
    message = json.dumps({"id": "req-1", "args": {"slot": 2}}).encode()
    yield channel.handle("gatewayd/edge-01/commands/cabinets/lend", message, 1, False)
    yield wait_until(lambda: published)
    assert published == [
        {"id": "req-1", "status": 200, "ok": True, "result": {"slot": 2, "lend": 1}}
    ]
    assert len(lends(served)) == 1
    # And the other way round: an MQTT request first, then its id over HTTP.
    message = json.dumps({"id": "req-2", "args": {"slot": 3}}).encode()
    yield channel.handle("gatewayd/edge-01/commands/cabinets/lend", message, 1, False)
    yield wait_until(lambda: len(published) == 2)
    assert lends(served)[1] == {"source": "mqtt", "request_id": "req-2"}
    status, body, replayed = yield post(served, LEND, {"slot": 3}, key="req-2")
    assert (status, body["result"], replayed) == (200, {"slot": 3, "lend": 2}, [b"true"])


@pytest_twisted.inlineCallbacks
def test_a_stored_answer_is_given_while_the_plugin_is_down(served):
    yield post(served, LEND, {"slot": 2}, key="lend-7")
    served.daemon.plugins["cabinets"].state = "stopped"
    again = yield post(served, LEND, {"slot": 2}, key="lend-7")
    assert again[0] == 200 and again[2] == [b"true"]
    status, body, _ = yield post(served, LEND, {"slot": 2}, key="lend-8")
    assert status == 503 and body["error"]["code"] == "unavailable"
    served.daemon.plugins["cabinets"].state = "running"
    status, _, replayed = yield post(served, LEND, {"slot": 2}, key="lend-8")
    assert status == 200 and replayed is None  # the 503 was not remembered


@pytest_twisted.inlineCallbacks
def test_a_key_without_a_store_is_503(tmp_path):
    daemon = make_daemon(reactor, tmp_path)  # the API builds its own dispatcher: no store
    port = listen_api(daemon, ApiSection(listen="127.0.0.1:0"), reactor)
    try:
        served = Served(daemon, f"http://127.0.0.1:{port.getHost().port}")
        status, body, _ = yield post(served, LEND, {"slot": 2}, key="lend-7")
        assert status == 503 and "no idempotency store" in body["error"]["message"]
        assert command_counts(daemon) == {}
    finally:
        yield port.stopListening()
