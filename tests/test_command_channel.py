"""The MQTT command channel (``gatewayd.commands.mqtt``) with a fake dispatcher and publish.

Every answer the channel publishes is captured with its topic; the dispatcher counts what it
executes, so "not executed" is asserted, not assumed. The request id store is the real one (a
SQLite file in ``tmp_path``); its writer thread reports through the real reactor, and expiry is
driven by a ``Clock`` at a realistic wall time.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_twisted
from pydantic import ValidationError
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from gatewayd.commands import CommandChannel, CommandsConfig, IdempotencyStore, Refusal, Target
from gatewayd.commands.dispatch import error_body
from gatewayd.plugin import Command
from gatewayd.testing import wait_until

NOW = 1_800_000_000.0
GATEWAY = "edge-01"
LEND = f"gatewayd/{GATEWAY}/commands/cabinets/lend"
LEND_ANSWERS = f"gatewayd/{GATEWAY}/responses/cabinets/lend"


class FakeDispatcher:
    """Knows plugin ``cabinets`` (commands lend, query) and ``heating`` (reboot); ``hold``
    keeps answers back until the test fires them."""

    def __init__(self, clock: Clock) -> None:
        self.reactor = clock
        self.runs: list[tuple[str, str, dict, str, str | None]] = []
        self.counted: list[tuple[str, str]] = []
        self.hold = False
        self.pending: list[defer.Deferred] = []
        self.running = True

    def find(self, plugin: str, command: str) -> Target:
        known = {"cabinets": {"lend", "query"}, "heating": {"reboot"}}
        if command not in known.get(plugin, set()):
            raise Refusal(404, "not_found", f"no command {plugin}.{command}")
        return Target(plugin, None, Command(command, None, lambda: None))

    def count(self, target: Target, outcome: str) -> None:
        self.counted.append((target.name, outcome))

    def run(self, target: Target, arguments: dict, *, source: str, request_id=None):
        if not self.running:
            return defer.fail(Refusal(503, "unavailable", "plugin 'cabinets' is stopped"))
        self.runs.append((target.plugin, target.name, arguments, source, request_id))
        answer = (200, {"ok": True, "result": {"executed": len(self.runs), **arguments}})
        if self.hold:
            d: defer.Deferred = defer.Deferred()
            self.pending.append(d)
            return d.addCallback(lambda _: answer)
        return defer.succeed(answer)


class Published(list):
    """The fake ``publish``: records ``(topic, decoded payload, qos, retain)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_with: Exception | None = None

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool) -> defer.Deferred:
        if self.fail_with is not None:
            raise self.fail_with
        self.append((topic, json.loads(payload), qos, retain))
        return defer.succeed(None)

    def to(self, topic: str) -> list[dict]:
        return [payload for t, payload, _, _ in self if t == topic]


@pytest.fixture
def channel(tmp_path):
    """``yield make(allow=[...], **config)`` → (channel, dispatcher, published, clock)."""
    made: list[IdempotencyStore] = []

    @defer.inlineCallbacks
    def make(allow=("cabinets.*", "heating.reboot"), **config: Any):
        clock = Clock()
        clock.advance(NOW)
        store = IdempotencyStore(tmp_path / f"commands{len(made)}.db", reactor, clock=clock)
        yield store.open()
        made.append(store)
        dispatcher = FakeDispatcher(clock)
        published = Published()
        settings = CommandsConfig(allow=list(allow), **config)
        built = CommandChannel(dispatcher, store, GATEWAY, settings, published, clock=clock)
        return built, dispatcher, published, clock

    yield make
    for store in made:
        pytest_twisted.blockon(store.close())


def payload(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


# --- config -------------------------------------------------------------------------------------


def test_config_defaults_allow_nothing():
    config = CommandsConfig()
    assert config.allow == [] and config.dedupe_window == 600 and config.max_payload == 1 << 20
    assert config.prefix == "gatewayd/{gateway}" and config.qos == 1
    assert CommandsConfig(dedupe_window="10m", max_payload="2MiB").max_payload == 2 << 20


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"allow": ["cabinets"]}, "not a plugin.command pattern"),
        ({"allow": ["cabinets.lend/x"]}, "not a plugin.command pattern"),
        ({"prefix": "gatewayd/+/x"}, "must not contain"),
        ({"prefix": "gatewayd/{gateway}/"}, "trailing"),
        ({"prefix": "{site}/{gateway}"}, "placeholders"),
        ({"dedupe_window": 0}, "dedupe_window"),
        ({"max_payload": 10}, "max_payload"),
        ({"allows": []}, "allows"),
    ],
)
def test_bad_config_is_refused_naming_the_key(settings, fragment):
    with pytest.raises(ValidationError, match=fragment):
        CommandsConfig(**settings)


@pytest_twisted.inlineCallbacks
def test_allow_patterns_match_plugin_and_command_apart(channel):
    chan, *_ = yield channel(allow=["cabinets.query", "heating.*", "esam?.identity_*"])
    assert chan.allows("cabinets", "query") and not chan.allows("cabinets", "lend")
    assert chan.allows("heating", "reboot") and chan.allows("heating", "set_valve")
    assert chan.allows("esam2", "identity_authentication") and not chan.allows("esam", "x")
    everything, *_ = yield channel(allow=["*.*"])
    assert everything.allows("any", "thing")
    nothing, *_ = yield channel(allow=[])
    assert not nothing.allows("cabinets", "query")


@pytest_twisted.inlineCallbacks
def test_subscription_and_topics(channel):
    chan, *_ = yield channel(prefix="site-3/{gateway}")
    assert chan.subscription == "site-3/edge-01/commands/+/+"
    assert chan.response_topic("cabinets", "lend") == "site-3/edge-01/responses/cabinets/lend"


# --- requests -----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_a_command_runs_and_is_answered_on_the_default_topic(channel):
    chan, dispatcher, published, _ = yield channel()
    args = {"imei": "860000000000001", "slot": 2}
    yield chan.handle(LEND, payload(id="req-1", args=args), 1, False)
    yield wait_until(lambda: published)
    assert dispatcher.runs == [("cabinets", "lend", args, "mqtt", "req-1")]
    (answer,) = published.to(LEND_ANSWERS)
    assert answer == {"id": "req-1", "status": 200, "ok": True, "result": {"executed": 1, **args}}
    assert published[0][2:] == (1, False)  # QoS 1, not retained
    assert chan.stats.executed == 1 and chan.stats.answers == 1


@pytest_twisted.inlineCallbacks
def test_the_answer_goes_to_reply_to(channel):
    chan, _, published, _ = yield channel(qos=0)
    yield chan.handle(LEND, payload(id="req-1", reply_to="backend/replies/edge-01"), 1, False)
    yield wait_until(lambda: published)
    assert [(t, p["id"], p["status"], q) for t, p, q, _ in published] == [
        ("backend/replies/edge-01", "req-1", 200, 0)
    ]


@pytest_twisted.inlineCallbacks
def test_a_repeated_id_is_answered_from_the_record_and_not_executed_again(channel):
    chan, dispatcher, published, _ = yield channel()
    message = payload(id="req-1", args={"slot": 2}, reply_to="backend/replies")
    yield chan.handle(LEND, message, 1, False)
    yield wait_until(lambda: len(published) == 1)
    yield chan.handle(LEND, message, 1, False)  # the backend retries: same id, same request
    yield wait_until(lambda: len(published) == 2)
    assert len(dispatcher.runs) == 1
    first, second = published.to("backend/replies")
    assert first == second and first["status"] == 200
    assert chan.stats.repeats == 1 and chan.stats.executed == 1


@pytest_twisted.inlineCallbacks
def test_a_repeat_while_the_command_runs_waits_for_its_answer(channel):
    chan, dispatcher, published, _ = yield channel()
    dispatcher.hold = True
    yield chan.handle(LEND, payload(id="req-1"), 1, False)
    yield chan.handle(LEND, payload(id="req-1"), 1, False)
    assert published == [] and len(dispatcher.runs) == 1
    dispatcher.pending[0].callback(None)
    yield wait_until(lambda: len(published) == 2)
    assert [p["status"] for p in published.to(LEND_ANSWERS)] == [200, 200]


@pytest_twisted.inlineCallbacks
def test_an_id_reused_for_another_command_is_422(channel):
    chan, dispatcher, published, _ = yield channel()
    yield chan.handle(LEND, payload(id="req-1", args={"slot": 2}), 1, False)
    yield chan.handle(LEND, payload(id="req-1", args={"slot": 3}), 1, False)
    yield wait_until(lambda: len(published) == 2)
    assert [p["status"] for p in published.to(LEND_ANSWERS)] == [200, 422]
    assert published[1][1]["error"]["code"] == "id_reused" and len(dispatcher.runs) == 1


@pytest_twisted.inlineCallbacks
def test_a_command_outside_allow_is_403_and_not_executed(channel):
    chan, dispatcher, published, _ = yield channel(allow=["cabinets.query"])
    yield chan.handle(LEND, payload(id="req-1", reply_to="r/1"), 1, False)
    (answer,) = published.to("r/1")
    assert answer["status"] == 403 and answer["error"]["code"] == "forbidden"
    assert "cabinets.lend is not in commands.allow" in answer["error"]["message"]
    assert dispatcher.runs == [] and chan.stats.refused == 1


@pytest_twisted.inlineCallbacks
def test_nothing_is_allowed_by_default(channel):
    chan, dispatcher, published, _ = yield channel(allow=[])
    yield chan.handle("gatewayd/edge-01/commands/heating/reboot", payload(id="r"), 1, False)
    assert published[0][1]["status"] == 403 and dispatcher.runs == []


@pytest_twisted.inlineCallbacks
def test_an_expired_request_is_410_and_not_executed(channel):
    chan, dispatcher, published, clock = yield channel()
    yield chan.handle(LEND, payload(id="old", expires=iso(NOW - 1)), 1, False)
    yield chan.handle(LEND, payload(id="new", expires=iso(NOW + 30)), 1, False)
    yield chan.handle(LEND, payload(id="naive", expires="2027-01-15T08:00:00"), 1, False)
    yield wait_until(lambda: len(published) == 3)
    answers = {p["id"]: p for p in published.to(LEND_ANSWERS)}
    assert answers["old"]["status"] == 410 and answers["old"]["error"]["code"] == "expired"
    assert answers["naive"]["status"] == 410  # no zone: UTC; NOW is 2027-01-15T08:00:00Z
    assert answers["new"]["status"] == 200
    assert [r[4] for r in dispatcher.runs] == ["new"]
    assert ("lend", "expired") in dispatcher.counted
    # An expired refusal is not remembered, so it stays expired (time only moves on).
    yield chan.handle(LEND, payload(id="old", expires=iso(NOW - 1)), 1, False)
    assert published[-1][1]["status"] == 410


@pytest_twisted.inlineCallbacks
def test_an_unknown_command_is_404_and_not_remembered(channel):
    chan, dispatcher, published, _ = yield channel(allow=["*.*"])
    topic = "gatewayd/edge-01/commands/cabinets/fly"
    yield chan.handle(topic, payload(id="req-1"), 1, False)
    assert published[0][1]["status"] == 404 and chan.store.get("req-1") is None


@pytest_twisted.inlineCallbacks
def test_a_plugin_stopped_meanwhile_is_503_and_not_remembered(channel):
    chan, dispatcher, published, _ = yield channel()
    dispatcher.running = False
    yield chan.handle(LEND, payload(id="req-1"), 1, False)
    yield wait_until(lambda: published)
    assert published[0][1]["status"] == 503 and chan.store.get("req-1") is None


# --- malformed payloads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b'{"id": "req-9", "args": {"slot": 2', "not valid JSON"),
        (b'{"id": "req-9", "args": ' + b"[" * 100 + b"]" * 100 + b"}", "nested too deeply"),
        (b'{"id": "req-9", "args": [1, 2]}', "args: must be a JSON object"),
        (b'{"id": "req-9", "arguments": {}}', "unknown key 'arguments'"),
        (b'{"id": "req-9", "expires": "tomorrow"}', "expires: expected an ISO 8601"),
        (b'{"id": "req-9", "expires": 1800000000}', "expires: expected an ISO 8601"),
        (b'{"id": "req-9", "reply_to": "backend/+/x"}', "reply_to: must be a topic"),
        (b'{"id": "req-9", "x": NaN}', "NaN is not a JSON value"),
        (b'{"id": "req-9", "args": {"s": "\xff"}}', "not UTF-8"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_a_malformed_payload_with_an_id_is_answered_400(channel, raw, fragment):
    chan, dispatcher, published, _ = yield channel()
    yield chan.handle(LEND, raw, 1, False)
    (answer,) = published.to(LEND_ANSWERS)  # a bad reply_to is not used
    assert answer["id"] == "req-9" and answer["status"] == 400
    assert answer["error"]["code"] == "bad_request" and fragment in answer["error"]["message"]
    assert dispatcher.runs == [] and chan.stats.refused == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"not json at all",
        b'{"args": {}, "id": "req-9"',  # not JSON, and the id is not the first key
        b'["req-9"]',
        b'"req-9"',
        b"{}",
        b'{"id": ""}',
        b'{"id": null}',
        b'{"args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
@pytest_twisted.inlineCallbacks
def test_a_malformed_payload_without_a_usable_id_is_only_logged(channel, raw):
    chan, dispatcher, published, _ = yield channel()
    result = chan.handle(LEND, raw, 1, False)
    yield result
    assert published == [] and dispatcher.runs == [] and chan.stats.dropped == 1


@pytest_twisted.inlineCallbacks
def test_a_number_as_id_is_answered_400_with_that_id(channel):
    chan, _, published, _ = yield channel()
    yield chan.handle(LEND, b'{"id": 42}', 1, False)
    assert published[0][1]["id"] == 42 and published[0][1]["status"] == 400
    assert "id: must be a string" in published[0][1]["error"]["message"]


@pytest_twisted.inlineCallbacks
def test_a_payload_above_max_payload_is_400_too_large_when_its_id_comes_first(channel):
    chan, dispatcher, published, _ = yield channel()
    big = {"slot": 2, "pad": "x" * (1 << 20)}
    yield chan.handle(LEND, payload(id="req-big", args=big), 1, False)
    yield chan.handle(LEND, payload(args=big, id="req-late"), 1, False)
    assert [(p["id"], p["status"], p["error"]["code"]) for p in published.to(LEND_ANSWERS)] == [
        ("req-big", 400, "too_large")
    ]
    assert dispatcher.runs == [] and chan.stats.dropped == 1
    smaller, dispatcher2, published2, _ = yield channel(max_payload="4MiB")
    yield smaller.handle(LEND, payload(id="req-big", args=big), 1, False)
    yield wait_until(lambda: published2)
    assert published2[0][1]["status"] == 200 and len(dispatcher2.runs) == 1


@pytest_twisted.inlineCallbacks
def test_retained_and_foreign_messages_are_not_executed(channel):
    chan, dispatcher, published, _ = yield channel()
    assert (yield chan.handle(LEND, payload(id="stale"), 1, True)) is None  # retained
    assert chan.handle("gatewayd/edge-01/status", b"online", 0, False) is None
    assert chan.handle("gatewayd/edge-02/commands/cabinets/lend", payload(id="x"), 1, False) is None
    assert chan.handle("gatewayd/edge-01/commands/cabinets", payload(id="x"), 1, False) is None
    assert published == [] and dispatcher.runs == [] and chan.store.get("stale") is None


# --- transport failures ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_an_answer_that_cannot_be_published_is_published_again_for_a_repeat(channel):
    from gatewayd.mqtt import NotConnected

    chan, dispatcher, published, _ = yield channel()
    published.fail_with = NotConnected("not connected")
    yield chan.handle(LEND, payload(id="req-1"), 1, False)
    yield wait_until(lambda: chan.stats.publish_failures == 1)
    published.fail_with = None
    yield chan.handle(LEND, payload(id="req-1"), 1, False)
    yield wait_until(lambda: published)
    assert published[0][1]["status"] == 200 and len(dispatcher.runs) == 1


@pytest_twisted.inlineCallbacks
def test_a_request_that_cannot_be_recorded_is_not_acknowledged(channel):
    chan, dispatcher, published, _ = yield channel()

    def full(sql, parameters):
        raise OSError("database or disk is full")

    chan.store._write_blocking = full
    handled = chan.handle(LEND, payload(id="req-1"), 1, False)
    failures = []
    handled.addErrback(failures.append)
    yield wait_until(lambda: failures and published)
    assert dispatcher.runs == []
    assert published[0][1]["status"] == 503
    assert published[0][1] == {
        "id": "req-1",
        "status": 503,
        **error_body(
            "unavailable",
            "the request id could not be recorded (database or disk is full); not executed",
        ),
    }
