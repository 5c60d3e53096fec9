"""The router: matching, processors, fan-out, counters, the emit Deferred (no disk, no thread)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.python.failure import Failure

from gatewayd.config_model import RouteConfig
from gatewayd.events import Event
from gatewayd.pipeline import Pipeline, encode_event
from gatewayd.queue import QueueError, Refused


class RecordingQueue:
    """Stands in for a DurableQueue: records puts; the test decides when they are durable."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.puts: list[tuple[str, Any]] = []

    def put_waiting(self, payload: str, waiter: Any, key: Any = None) -> None:
        self.puts.append((payload, waiter))

    def commit(self) -> None:
        puts, self.puts = self.puts, []
        for _, waiter in puts:
            waiter.callback(None)

    def refuse(self) -> None:
        puts, self.puts = self.puts, []
        for _, waiter in puts:
            waiter.callback(Refused((self.name,)))

    def fail(self, exc: Exception) -> None:
        puts, self.puts = self.puts, []
        for _, waiter in puts:
            waiter.errback(Failure(exc))

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for payload, _ in self.puts]


def event(**fields: Any) -> Event:
    base = {
        "type": "lend.succeeded",
        "device": "860000000000001",
        "data": {"slot": 2, "bank": "0000000012", "battery": 80},
        "raw": "a1b2",
        "gateway": "edge-01",
        "plugin": "cabinets",
        "protocol": "powerbank",
    }
    base.update(fields)
    return Event(**base)


def make(routes: list[dict[str, Any]], *names: str) -> tuple[Pipeline, dict[str, RecordingQueue]]:
    queues = {name: RecordingQueue(name) for name in names}
    return Pipeline([RouteConfig(**r) for r in routes], queues), queues


@pytest.mark.parametrize(
    ("match", "fields", "routed"),
    [
        ({"type": "lend.*"}, {}, True),
        ({"type": "lend.*"}, {"type": "return.succeeded"}, False),
        ({"protocol": "powerbank"}, {}, True),
        ({"protocol": "power"}, {}, False),
        ({"plugin": "cab*"}, {}, True),
        ({"plugin": "cab*"}, {"plugin": "heating"}, False),
        ({"device": "8600000000000[0-9]1"}, {}, True),
        ({"device": "86*"}, {"device": "9999"}, False),
        ({"device": "86*"}, {"device": None}, False),
        ({"device": "*"}, {"device": None}, True),
        ({"type": "lend.?ucceeded", "protocol": "powerbank"}, {}, True),
        ({"type": "lend.*", "protocol": "heating"}, {}, False),  # every given key must match
        ({}, {"type": "anything"}, True),  # no keys: matches everything
        ({"type": "LEND.*"}, {}, False),  # case-sensitive
    ],
)
def test_match_keys_are_globs_and_all_given_keys_must_match(match, fields, routed) -> None:
    pipeline, queues = make([{"match": match, "sinks": ["store"]}], "store")
    d = pipeline.emit(event(**fields))
    assert len(queues["store"].puts) == (1 if routed else 0)
    assert (pipeline.routed, pipeline.unrouted) == ((1, 0) if routed else (0, 1))
    if not routed:
        assert d.called and d.result is None  # unrouted fires at once


def test_payload_is_the_event_json() -> None:
    pipeline, queues = make([{"sinks": ["store"]}], "store")
    e = event(data={"text": "Grüße", "n": 1.5, "nested": {"a": [1, None]}})
    pipeline.emit(e)
    payload = queues["store"].puts[0][0]
    assert payload == e.to_json()
    assert Event.from_json(payload) == e


@given(
    data=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner),
            max_leaves=6,
        ),
        max_size=5,
    ),
    raw=st.none() | st.text(),
    device=st.none() | st.text(),
)
def test_encode_event_equals_to_json(data, raw, device) -> None:
    e = event(data=data, raw=raw, device=device)
    assert encode_event(e) == e.to_json()


def test_processors_keep_data_drop_data_drop_raw() -> None:
    pipeline, queues = make(
        [
            {"match": {"type": "lend.*"}, "processors": [{"keep_data": ["slot"]}], "sinks": ["a"]},
            {"processors": [{"drop_data": ["bank"]}, {"drop_raw": True}], "sinks": ["b"]},
            {"sinks": ["c"]},
        ],
        "a",
        "b",
        "c",
    )
    e = event()
    pipeline.emit(e)
    [a] = queues["a"].events()
    [b] = queues["b"].events()
    [c] = queues["c"].events()
    assert a["data"] == {"slot": 2} and a["raw"] == "a1b2"
    assert b["data"] == {"slot": 2, "battery": 80} and b["raw"] is None
    assert c == e.to_dict()
    assert e.data == {"slot": 2, "bank": "0000000012", "battery": 80}  # the event is not changed
    assert a["id"] == b["id"] == c["id"] == e.id


def test_json_encoded_once_per_distinct_form() -> None:
    pipeline, queues = make(
        [
            {"sinks": ["a", "b"]},
            {"processors": [{"drop_raw": True}], "sinks": ["c"]},
            {"processors": [{"drop_raw": True}], "sinks": ["d"]},
        ],
        "a",
        "b",
        "c",
        "d",
    )
    pipeline.emit(event())
    payload = {name: q.puts[0][0] for name, q in queues.items()}
    assert payload["a"] is payload["b"]  # the same string object: encoded once
    assert payload["c"] is payload["d"]
    assert payload["a"] != payload["c"]


def test_fan_out_fires_when_durable_in_every_queue() -> None:
    pipeline, queues = make(
        [{"sinks": ["a"]}, {"match": {"type": "lend.*"}, "sinks": ["b"]}], "a", "b"
    )
    d = pipeline.emit(event())
    assert len(queues["a"].puts) == len(queues["b"].puts) == 1
    queues["a"].commit()
    assert not d.called
    queues["b"].commit()
    assert d.called and d.result is None
    assert pipeline.routed == 1


def test_sink_reached_by_an_earlier_route_is_not_sent_again() -> None:
    pipeline, queues = make(
        [
            {"match": {"type": "lend.*"}, "processors": [{"keep_data": ["slot"]}], "sinks": ["a"]},
            {"sinks": ["a", "b"]},
        ],
        "a",
        "b",
    )
    pipeline.emit(event())
    assert [e["data"] for e in queues["a"].events()] == [{"slot": 2}]  # the first route's form
    assert len(queues["b"].puts) == 1


def test_drop_route_discards_and_stops_routing() -> None:
    pipeline, queues = make(
        [
            {"match": {"type": "debug.*"}, "drop": True},
            {"sinks": ["a"]},
        ],
        "a",
    )
    d = pipeline.emit(event(type="debug.trace"))
    assert d.called and d.result is None
    assert queues["a"].puts == []
    assert (pipeline.routed, pipeline.unrouted, pipeline.dropped) == (0, 0, 1)
    pipeline.emit(event())
    assert len(queues["a"].puts) == 1
    assert (pipeline.routed, pipeline.unrouted, pipeline.dropped) == (1, 0, 1)


def test_drop_after_a_route_keeps_what_earlier_routes_sent() -> None:
    pipeline, queues = make(
        [{"sinks": ["a"]}, {"match": {"type": "lend.*"}, "drop": True}, {"sinks": ["b"]}],
        "a",
        "b",
    )
    pipeline.emit(event())
    assert len(queues["a"].puts) == 1 and queues["b"].puts == []
    assert (pipeline.routed, pipeline.dropped) == (1, 0)


def test_unrouted_counted_and_fires_at_once() -> None:
    pipeline, queues = make([{"match": {"protocol": "heating"}, "sinks": ["a"]}], "a")
    for _ in range(3):
        d = pipeline.emit(event())
        assert d.called
    assert pipeline.unrouted == 3 and pipeline.routed == 0


def test_refused_by_a_full_queue_is_reported() -> None:
    pipeline, queues = make([{"sinks": ["a", "b"]}], "a", "b")
    d = pipeline.emit(event())
    queues["a"].commit()
    queues["b"].refuse()
    assert d.result == Refused(("b",))


def test_queue_error_fails_the_emit_once() -> None:
    pipeline, queues = make([{"sinks": ["a", "b"]}], "a", "b")
    d = pipeline.emit(event())
    errors = []
    d.addErrback(errors.append)
    queues["a"].fail(QueueError("disk full"))
    queues["b"].commit()
    assert len(errors) == 1 and errors[0].check(QueueError)


def test_unencodable_event_fails_and_is_not_queued() -> None:
    pipeline, queues = make([{"sinks": ["a"]}], "a")
    data: dict[str, Any] = {}
    data["self"] = data
    d = pipeline.emit(event(data=data))
    errors = []
    d.addErrback(errors.append)
    assert errors and queues["a"].puts == []


def test_unknown_sink_in_a_route_is_refused() -> None:
    with pytest.raises(ValueError, match=r"routes\[1\]: unknown sink\(s\): nope"):
        make([{"sinks": ["a"]}, {"sinks": ["nope"]}], "a")


def test_route_decisions_are_per_device() -> None:
    pipeline, queues = make([{"match": {"device": "86*"}, "sinks": ["a"]}], "a")
    for device in ["8601", "9901", "8602", "9901", None, "8601"]:
        pipeline.emit(event(device=device))
    assert [e["device"] for e in queues["a"].events()] == ["8601", "8602", "8601"]
    assert pipeline.unrouted == 3
