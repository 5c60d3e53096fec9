"""The ``mqtt`` sink: config and topic escaping, then against real mosquitto brokers: what a
persistent QoS 1 consumer receives, status and presence topics, honest acknowledgement (a write
fires only after every PUBACK, fails when the link breaks), and a steady stream through the real
pipeline, queue and delivery loop with the broker link cut for a few seconds."""

from __future__ import annotations

import contextlib
import json
import socket
import textwrap
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.logger import Logger

from gatewayd.config import ConfigError, check_config_main, load_config
from gatewayd.config_model import RouteConfig
from gatewayd.delivery import SinkRunner
from gatewayd.events import Event
from gatewayd.mqtt import BrokerConfig, MqttClient, NotConnected
from gatewayd.pipeline import Pipeline
from gatewayd.queue import QueueStore
from gatewayd.sinks.base import SinkContext
from gatewayd.sinks.mqtt import MqttSink, default_client_id
from gatewayd.sinks.mqtt_config import (
    DEFAULT_TOPIC,
    MqttSinkConfig,
    TopicTemplate,
    escape_level,
    unescape_level,
)
from gatewayd.testing import sleep, wait_until

from .heating.brokers import ConfiguredMosquitto, mqtt_packets

FAST = {"reconnect_initial": 0.05, "reconnect_max": 0.3, "connect_timeout": 2}
EVENTS = "gatewayd/edge/events/"


# --- config ---------------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = MqttSinkConfig()
    assert (config.type, config.topic, config.qos, config.retain) == (
        "mqtt",
        DEFAULT_TOPIC,
        1,
        False,
    )
    assert (config.payload, config.max_inflight) == ("event", 100)
    assert config.broker.clean_session is False and config.broker.client_id is None
    assert (config.broker.host, config.broker.port, config.broker.keepalive) == (
        "127.0.0.1",
        1883,
        60,
    )
    assert config.config_warnings() == []
    assert default_client_id("edge 01", "north") == "gatewayd-edge-01-north"


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gatewayd.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def test_check_config_names_the_key_and_line_of_a_bad_template(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
        sinks:
          north:
            type: mqtt
            topic: "gw/{gateway}/{devcie}/{type}"
            qos: 2
            payload: lines
          south:
            type: mqtt
            topic: "gw/+/{type}"
            max_inflight: 20000
        routes:
          - sinks: [north, south]
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.errors == [
        f"{path}:4: sinks.north.topic: unknown placeholder {{devcie}} (known: {{gateway}} "
        "{plugin} {protocol} {device} {type}); did you mean {device}?",
        f"{path}:5: sinks.north.qos: expected a value <= 1, got 2",
        f"{path}:6: sinks.north.payload: expected one of 'event', 'batch', got 'lines'",
        f"{path}:9: sinks.south.topic: a topic to publish to cannot hold + # or NUL",
        f"{path}:10: sinks.south.max_inflight: must be at most broker.max_queued_messages (10000)",
    ]
    assert check_config_main(path) == 2  # `gatewayd check-config` prints the same lines


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("a/{device:>4}", "placeholder {device} takes no format or conversion"),
        ("a/{device!r}", "placeholder {device} takes no format or conversion"),
        ("a/{}", "unknown placeholder {}"),
        ("a/{", "Single '{' encountered in format string (write {{ and }} for literal braces)"),
        ("$SYS/{type}", "topics starting with $ belong to the broker"),
        ("", "the topic must not be empty"),
    ],
)
def test_bad_templates(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        TopicTemplate(template)
    assert str(caught.value).startswith(message)


def test_qos_0_is_a_check_config_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_yaml(
        tmp_path,
        """
        sinks:
          north: {type: mqtt, qos: 0, broker: {host: broker.example, port: 8883}}
        routes:
          - sinks: [north]
        """,
    )
    assert check_config_main(path) == 0
    _, err = capsys.readouterr()
    assert err == (
        f"warning: {path}:2: sinks.north.qos: QoS 0 can lose events: a batch counts as "
        "delivered once written to the socket, and what the broker never got is gone (use qos: 1)\n"
    )


# --- topic escaping -------------------------------------------------------------------------------


@given(st.one_of(st.none(), st.text()))
def test_escaping_round_trips_and_yields_one_valid_level(value: str | None) -> None:
    level = escape_level(value)
    assert unescape_level(level) == (value or None)  # "" is missing too
    assert not any(c in level for c in "+#/\x00")
    level.encode("utf-8")  # strict: no lone surrogates left
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in level)


def test_escaping_examples() -> None:
    assert escape_level("a+b#c/d%e\x00f") == "a%2Bb%23c%2Fd%25e%00f"
    assert escape_level(None) == escape_level("") == "-" and escape_level("-") == "%2D"
    assert escape_level("Zähler 7.$x") == "Zähler 7.$x"  # kept as is
    assert escape_level("\x01\x7f\u0085\ufffe") == "%01%7F%C2%85%EF%BF%BE"
    template = TopicTemplate("x/{gateway}/{plugin}/{protocol}/{device}/{type}")
    event = Event(type="a/b", device=None, plugin="p+", protocol="q#", gateway="")
    assert template.render(event, "edge") == "x/edge/p%2B/q%23/-/a%2Fb"


# --- brokers, consumers, proxies ------------------------------------------------------------------


class LinkProxy:
    """A TCP proxy between the sink and the broker that can hold the broker's PUBACKs, cut
    every connection, and refuse new ones (accepted and closed at once). ``publishes`` lists
    ``(connection number, topic)`` of the PUBLISH packets the client sent."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.hold_pubacks = False
        self.refuse = False
        self.publishes: list[tuple[int, str]] = []
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> LinkProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def cut(self) -> None:
        """Break every connection (both ends see the TCP link die)."""
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._server.close()
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self.connections += 1
                number = self.connections
                self._open += [client, upstream]
            for source, target, way in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(
                    target=self._pump, args=(source, target, number, way), daemon=True
                ).start()

    def _pump(self, source: socket.socket, target: socket.socket, number: int, way: str) -> None:
        buffer = bytearray()
        try:
            while data := source.recv(65536):
                buffer += data
                for packet in mqtt_packets(buffer):
                    kind = packet[0] >> 4
                    if kind == 4 and way == "down" and self.hold_pubacks:
                        continue
                    if kind == 3 and way == "up":
                        with self._lock:
                            self.publishes.append((number, _topic_of(packet)))
                    target.sendall(packet)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _topic_of(packet: bytes) -> str:
    body = packet[1:]
    while body[0] & 0x80:
        body = body[1:]
    body = body[1:]
    length = int.from_bytes(body[:2], "big")
    return body[2 : 2 + length].decode("utf-8", "replace")


class Consumer:
    """A backend's subscriber: persistent session, QoS 1; keeps (topic, payload, retain)."""

    def __init__(self, port: int, topics: tuple[str, ...] = ("gatewayd/#",), **options: Any):
        config = BrokerConfig.model_validate(
            {"port": port, "clean_session": False, "probe_interval": 0, **FAST, **options}
        )
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client = MqttClient(
            reactor,
            config,
            client_id=f"consumer-{id(self)}",
            on_message=lambda topic, payload, qos, retain: self.messages.append(
                (topic, payload, retain)
            ),
            subscriptions=[(topic, 1) for topic in topics],
        )

    async def start(self) -> Consumer:
        self.client.start()
        await self.client.when_subscribed().addTimeout(5, reactor)
        return self

    def on(self, topic: str) -> list[bytes]:
        return [payload for t, payload, _ in self.messages if t == topic]

    def events(self) -> list[dict[str, Any]]:
        """Every event received on an events topic, arrays unpacked."""
        out: list[dict[str, Any]] = []
        for topic, payload, _ in self.messages:
            if topic.startswith(EVENTS):
                body = json.loads(payload)
                out += body if isinstance(body, list) else [body]
        return out

    def ids(self) -> Counter[str]:
        return Counter(event["id"] for event in self.events())


async def retained(port: int, topic: str) -> list[tuple[bytes, bool]]:
    """What a new subscriber to ``topic`` gets at once (the retained message, if any)."""
    consumer = Consumer(port, (topic,), clean_session=True)
    await consumer.start()
    await sleep(0.3)
    await consumer.client.stop()
    return [(payload, retain) for _, payload, retain in consumer.messages]


def make_sink(tmp_path: Path, port: int, **config: Any) -> MqttSink:
    broker = {"port": port, **FAST, **config.pop("broker", {})}
    model = MqttSinkConfig.model_validate({"broker": broker, **config})
    context = SinkContext("north", "edge", reactor, tmp_path, Logger(namespace="test.mqtt"))
    return MqttSink("north", model, context)


def events(count: int, **fields: Any) -> list[Event]:
    base = {"gateway": "edge", "plugin": "cabinets", "protocol": "powerbank", "type": "lend.ok"}
    base.update(fields)
    return [Event(device=f"86{n % 3}", data={"n": n}, **base) for n in range(count)]


@pytest.fixture
def proxy(mosquitto: Any) -> Any:
    link = LinkProxy(mosquitto.port).start()
    yield link
    link.stop()


# --- what a consumer receives ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_persistent_consumer_receives_every_event_on_its_topic(
    mosquitto: Any, tmp_path: Path
) -> None:
    consumer = await Consumer(mosquitto.port, ("gw/#",)).start()
    sink = make_sink(tmp_path, mosquitto.port, topic="gw/{gateway}/{protocol}/{device}/{type}")
    try:
        await sink.open()
        odd = Event(type="odd", device="a/b+c#\x00\x01\u0085", gateway="edge", plugin="x")
        batch = [*events(40), odd]
        assert await sink.write(batch) == 41
        await wait_until(lambda: sum(t.startswith("gw/") for t, _, _ in consumer.messages) == 41)
    finally:
        await sink.close()
        await consumer.client.stop()
    received = [(t, json.loads(p)) for t, p, _ in consumer.messages if t.startswith("gw/")]
    assert [event["id"] for _, event in received] == [event.id for event in batch]
    assert received[0] == ("gw/edge/powerbank/860/lend.ok", batch[0].to_dict())
    assert received[-1][0] == "gw/edge/-/a%2Fb%2Bc%23%00%01%C2%85/odd"  # no protocol: "-"


@pytest_twisted.ensureDeferred
async def test_batch_payload_is_one_json_array_per_topic(mosquitto: Any, tmp_path: Path) -> None:
    consumer = await Consumer(mosquitto.port).start()
    sink = make_sink(tmp_path, mosquitto.port, payload="batch")
    try:
        await sink.open()
        batch = events(30) + events(5, type="return.ok")
        assert await sink.write(batch) == 2  # two topics, two messages
        await wait_until(lambda: len(consumer.events()) == 35)
    finally:
        await sink.close()
        await consumer.client.stop()
    arrays = {t: json.loads(p) for t, p, _ in consumer.messages if t.startswith(EVENTS)}
    assert list(arrays) == [EVENTS + "cabinets/lend.ok", EVENTS + "cabinets/return.ok"]
    assert [e["id"] for e in arrays[EVENTS + "cabinets/lend.ok"]] == [e.id for e in batch[:30]]
    assert len(arrays[EVENTS + "cabinets/return.ok"]) == 5


@pytest_twisted.ensureDeferred
async def test_qos_0_writes_are_acknowledged_once_written(mosquitto: Any, tmp_path: Path) -> None:
    consumer = await Consumer(mosquitto.port).start()
    sink = make_sink(tmp_path, mosquitto.port, qos=0, retain=True)
    try:
        await sink.open()
        batch = events(20)
        assert await sink.write(batch) == 20
        await wait_until(lambda: len(consumer.events()) == 20)
        ((payload, retain),) = await retained(mosquitto.port, EVENTS + "cabinets/lend.ok")
        assert json.loads(payload)["id"] == batch[-1].id and retain
    finally:
        await sink.close()
        await consumer.client.stop()


# --- status and presence --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_online_on_connect_offline_on_close_and_as_last_will(
    mosquitto: Any, proxy: LinkProxy, tmp_path: Path
) -> None:
    status = "gatewayd/edge/status"
    consumer = await Consumer(mosquitto.port, (status,)).start()
    sink = make_sink(tmp_path, proxy.port)
    try:
        await sink.open().addTimeout(5, reactor)
        await wait_until(lambda: consumer.on(status) == [b"online"])
        assert await retained(mosquitto.port, status) == [(b"online", True)]

        proxy.refuse = True
        proxy.cut()  # the sink's connection dies without DISCONNECT: the broker sends the will
        await wait_until(lambda: consumer.on(status) == [b"online", b"offline"])
        assert await retained(mosquitto.port, status) == [(b"offline", True)]
        with pytest.raises(NotConnected):
            await sink.write(events(1))

        proxy.refuse = False
        await wait_until(lambda: consumer.on(status)[-1:] == [b"online"], timeout=5)
        assert await retained(mosquitto.port, status) == [(b"online", True)]
    finally:
        await sink.close()
    await wait_until(lambda: consumer.on(status)[-1:] == [b"offline"])
    assert await retained(mosquitto.port, status) == [(b"offline", True)]
    await consumer.client.stop()


@pytest_twisted.ensureDeferred
async def test_presence_events_set_retained_device_topics(mosquitto: Any, tmp_path: Path) -> None:
    sink = make_sink(tmp_path, mosquitto.port)
    device = "gatewayd/edge/devices/cabinets/"
    online = Event(type="device.online", device="860/1", gateway="edge", plugin="cabinets")
    offline = Event(type="device.offline", device="861", gateway="edge", plugin="cabinets")
    later = Event(type="device.online", device="861", gateway="edge", plugin="cabinets")

    async def presence(topic: str) -> dict[str, Any]:
        ((payload, retain),) = await retained(mosquitto.port, topic)
        assert retain
        return json.loads(payload)

    try:
        await sink.open()
        # five events and two presence messages, all acknowledged before the write fires
        assert await sink.write([online, offline, *events(3)]) == 7
        assert await presence(device + "860%2F1") == {
            "online": True,
            "since": online.ts,
            "gateway": "edge",
        }
        assert await presence(device + "861") == {
            "online": False,
            "since": offline.ts,
            "gateway": "edge",
        }
        assert await sink.write([later]) == 2
        assert await presence(device + "861") == {
            "online": True,
            "since": later.ts,
            "gateway": "edge",
        }
    finally:
        await sink.close()


# --- honest acknowledgement -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_write_fires_only_after_every_puback_and_fails_when_the_link_breaks(
    mosquitto: Any, proxy: LinkProxy, tmp_path: Path
) -> None:
    consumer = await Consumer(mosquitto.port).start()
    sink = make_sink(tmp_path, proxy.port, max_inflight=10)
    batch = events(50)
    try:
        await sink.open().addTimeout(5, reactor)
        await wait_until(lambda: consumer.on("gatewayd/edge/status") == [b"online"])
        await sleep(0.1)  # its PUBACK too
        proxy.hold_pubacks = True
        written = sink.write(batch)
        await sleep(1.0)
        assert not written.called  # the broker has 10 of them, but we never heard so
        sent = [topic for n, topic in proxy.publishes if n == 1 and topic.startswith(EVENTS)]
        assert len(sent) == 10  # max_inflight: no more unacknowledged than that
        await wait_until(lambda: len(consumer.events()) == 10)

        proxy.hold_pubacks = False
        proxy.cut()
        with pytest.raises(NotConnected, match="lost mid-batch"):
            await written
        assert sink.client is not None
        await sink.client.when_connected().addTimeout(5, reactor)
        assert await sink.write(batch).addTimeout(10, reactor) == 50  # the core's retry
        await wait_until(lambda: set(consumer.ids()) == {event.id for event in batch})
    finally:
        await sink.close()
        await consumer.client.stop()
    repeats = consumer.ids()
    assert all(repeats[event.id] >= 1 for event in batch)
    assert sum(repeats.values()) > 50  # the first ten arrived again: same ids, de-duplicated


@pytest_twisted.ensureDeferred
async def test_a_write_timed_out_without_pubacks_reconnects_so_the_retry_can_go_through(
    mosquitto: Any, proxy: LinkProxy, tmp_path: Path
) -> None:
    sink = make_sink(tmp_path, proxy.port, max_inflight=5)
    try:
        await sink.open().addTimeout(5, reactor)
        await sleep(0.1)  # the online message's PUBACK
        proxy.hold_pubacks = True
        with pytest.raises(defer.TimeoutError):
            await sink.write(events(20)).addTimeout(0.5, reactor)  # the core's write_timeout
        proxy.hold_pubacks = False
        await wait_until(lambda: proxy.connections == 2)  # paho's window held 5 stale messages
        assert sink.client is not None
        await sink.client.when_connected().addTimeout(5, reactor)
        assert await sink.write(events(20)).addTimeout(5, reactor) == 20
    finally:
        await sink.close()


@pytest_twisted.ensureDeferred
async def test_write_before_open_or_while_disconnected_fails_at_once(tmp_path: Path) -> None:
    sink = make_sink(tmp_path, 1)  # nothing listens on port 1
    with pytest.raises(NotConnected):
        await sink.write(events(1))
    opening = sink.open()
    with pytest.raises(NotConnected):
        await sink.write(events(1))
    opening.cancel()  # the core's write_timeout
    with pytest.raises(defer.CancelledError):
        await opening
    await sink.close()


# --- end to end: pipeline, durable queue, delivery loop -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_steady_stream_survives_a_cut_link_each_event_once_by_id(tmp_path: Path) -> None:
    """500 events/s for 10 s through Pipeline → QueueStore → SinkRunner → MqttSink; the link
    stops carrying PUBACKs, then the broker refuses the sink for 3 s. The consumer ends with every
    event (repeats are allowed and counted), and the runner counted each event delivered once."""
    broker = ConfiguredMosquitto(["allow_anonymous true", "max_queued_messages 0"]).start()
    proxy = LinkProxy(broker.port).start()
    consumer = await Consumer(broker.port).start()
    store = QueueStore(tmp_path / "queues", reactor)
    store.start()
    config = MqttSinkConfig.model_validate(
        {
            "broker": {"port": proxy.port, **FAST},
            "batch_size": 200,
            "write_timeout": 5,
            "retry_initial": 0.1,
            "retry_max": 0.5,
            "replay_rate": 5000,
        }
    )
    queue = store.queue("north", max_bytes=1 << 30, max_age=3600, overflow="drop_oldest")
    sink = MqttSink("north", config, SinkContext("north", "edge", reactor, tmp_path, Logger()))
    runner = SinkRunner(sink, queue, config, reactor)
    pipeline = Pipeline([RouteConfig(sinks=["north"])], {"north": queue}, {"north": runner})
    emitted: list[str] = []
    emits: list[defer.Deferred] = []

    def tick() -> None:
        for event in events(50, plugin="heating", protocol="heating", type="meter.reading"):
            emitted.append(event.id)
            emits.append(pipeline.emit(event))

    runner.start()
    stream = task.LoopingCall(tick)
    try:
        await queue.when_open()
        await wait_until(lambda: runner.state == "ok", timeout=5)
        done = stream.start(0.1)
        await sleep(3.0)
        proxy.hold_pubacks = True  # the link goes quiet first, so a batch is caught mid-way
        await sleep(0.5)
        proxy.refuse = True
        proxy.cut()
        proxy.hold_pubacks = False
        await wait_until(lambda: runner.state == "retrying", timeout=5)
        await sleep(3.0)
        proxy.refuse = False
        await sleep(4.0)
        stream.stop()
        await done
        await defer.gatherResults(emits)
        assert len(emitted) >= 4500
        await wait_until(lambda: runner.delivered == len(emitted), timeout=30)
        await wait_until(lambda: len(consumer.ids()) == len(emitted), timeout=10)
    finally:
        if stream.running:
            stream.stop()
        await runner.stop()
        await store.stop()
        await consumer.client.stop()
        proxy.stop()
        broker.stop()
    received = consumer.ids()
    assert set(received) == set(emitted)
    repeats = sum(received.values()) - len(received)
    print(f"{len(emitted)} events, {repeats} repeats, {runner.failures} failed attempts")
    assert repeats > 0  # what the broker had from the batch caught mid-way came again
    assert runner.delivered == len(emitted) and runner.failures >= 1


@pytest_twisted.ensureDeferred
async def test_delivery_resumes_when_the_link_is_back_not_at_the_end_of_the_backoff(
    mosquitto: Any, tmp_path: Path
) -> None:
    """retry_initial 30 s: without retry_now the batch would wait half a minute after the
    broker came back; the sink's reconnect cuts the wait short."""
    store = QueueStore(tmp_path / "queues", reactor)
    store.start()
    config = MqttSinkConfig.model_validate(
        {"broker": {"port": mosquitto.port, **FAST}, "retry_initial": 30, "retry_max": 60}
    )
    context = SinkContext("north", "edge", reactor, tmp_path, Logger())
    queue = store.queue("north", max_bytes=1 << 24, max_age=3600, overflow="drop_oldest")
    runner = SinkRunner(MqttSink("north", config, context), queue, config, reactor)
    context.retry_now = runner.retry_now  # as the daemon wires it
    pipeline = Pipeline([RouteConfig(sinks=["north"])], {"north": queue}, {"north": runner})
    runner.start()
    try:
        await wait_until(lambda: runner.state == "ok", timeout=5)
        mosquitto.stop()
        await defer.gatherResults([pipeline.emit(e) for e in events(20)])
        await wait_until(lambda: runner.state == "retrying", timeout=10)
        mosquitto.start()
        back = reactor.seconds()
        await wait_until(lambda: runner.delivered == 20, timeout=10)
        assert reactor.seconds() - back < 5 and runner.state == "ok"
        assert runner.recovered_at is not None
    finally:
        await runner.stop()
        await store.stop()


def test_topic_escape_adds_characters_a_broker_refuses() -> None:
    from gatewayd.sinks.mqtt_config import escape_level, unescape_level

    assert escape_level("meter.reading", ". ") == "meter%2Ereading"
    assert escape_level("Zähler 7.1/a%", ". ") == "Zähler%207%2E1%2Fa%25"
    assert unescape_level(escape_level("Zähler 7.1/a%", ". ")) == "Zähler 7.1/a%"
    assert escape_level("meter.reading") == "meter.reading"  # nothing extra by default
    config = MqttSinkConfig(topic_escape=". ")
    assert config.topic_escape == ". "
    with pytest.raises(ValueError, match="cannot escape"):
        MqttSinkConfig(topic_escape="%")


def test_broker_fallbacks_are_host_port_pairs() -> None:
    config = MqttSinkConfig.model_validate({"broker": {"fallbacks": ["n2:1883", "[::1]:1884"]}})
    assert config.broker.fallbacks == ["n2:1883", "[::1]:1884"]
    with pytest.raises(ValueError, match="host:port"):
        MqttSinkConfig.model_validate({"broker": {"fallbacks": ["n2"]}})
