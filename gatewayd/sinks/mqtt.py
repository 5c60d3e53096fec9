"""The ``mqtt`` sink: events published to an MQTT broker, the northbound link of DESIGN.md.

Acknowledgement is honest: ``write(batch)`` fires only once the broker acknowledged (PUBACK)
every message of the batch, with at most ``max_inflight`` unacknowledged at a time. A link lost
mid-batch fails the write; the core retries the whole batch after reconnecting, so a consumer
may see an event again (with the same ``id``; delivery is at-least-once, consumers de-duplicate
by ``id``). With ``qos: 0`` a batch counts as delivered once paho wrote it to the socket. A
write the core gives up on (``write_timeout``) with messages still unacknowledged drops the
connection: MQTT 3.1.1 sends a message again only on a new one.

Besides the events the sink keeps two retained kinds of topics up to date:

- ``gatewayd/{gateway}/status``: ``online`` on every connect, ``offline`` on a clean stop, and
  ``offline`` as the broker-published last will when the connection dies.
- ``gatewayd/{gateway}/devices/{plugin}/{device}``: ``{"online": bool, "since": ts, "gateway":
  id}`` for every ``device.online``/``device.offline`` event routed here (part of its batch).

Topic values are escaped as ``gatewayd.sinks.mqtt_config`` describes. The connection is a
``gatewayd.mqtt.MqttClient`` (reactor-driven paho, reconnecting by itself). The MQTT command
channel will plug in through ``_extra_subscriptions`` and ``_on_message``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import orjson
import paho.mqtt.client as paho
from twisted.internet import defer, task
from twisted.python.failure import Failure

from gatewayd.commands.mqtt import CommandChannel
from gatewayd.events import Event, encode_json
from gatewayd.mqtt import CONNECTED, MqttClient, MqttError, NotConnected, Will
from gatewayd.sinks.base import Sink, SinkContext
from gatewayd.sinks.mqtt_config import MqttSinkConfig, TopicTemplate, escape_level
from gatewayd.sinks.thingsboard import ThingsBoardGateway

__all__ = ["MqttSink", "MqttSinkConfig"]

PRESENCE_TYPES = {"device.online": True, "device.offline": False}

#: One message to publish: (topic, payload, qos, retain).
Message = tuple[str, bytes, int, bool]


class SinkGauges(dict[str, tuple[str, Callable[[], float]]]):
    """Gauges by name, the shape of ``PluginMetrics.gauges``: /metrics shows each as
    ``gatewayd_sink_<name>{sink=...}``."""

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Keep a gauge read at scrape time (what ``MqttClient.register_metrics`` calls)."""
        self[name] = (help_text, read)


class _SinkClient(MqttClient):
    """``MqttClient`` with paho's in-flight window set and QoS 0 acknowledged when written.

    ``MqttClient.publish`` fires at once for QoS 0; the sink wants "written to the socket", which
    paho reports through ``on_publish`` for QoS 0 too, so the message id is registered like a
    QoS 1 one. (Candidates for ``MqttClient`` itself: ``max_inflight`` and ``publish_written``.)
    """

    def __init__(self, *args: Any, max_inflight: int, **kwargs: Any) -> None:
        self.max_inflight = max_inflight
        super().__init__(*args, **kwargs)

    def _make_client(self) -> paho.Client:
        client = super()._make_client()
        # What max_inflight_messages_set() does; it refuses once connect_async() has run (as in
        # _make_client), although no connection exists before start() connects.
        client._max_inflight_messages = self.max_inflight
        return client

    def publish_written(self, topic: str, payload: bytes, retain: bool) -> defer.Deferred:
        """Publish at QoS 0; the Deferred fires once paho has written the bytes to the socket."""
        if self.state != CONNECTED or self._client is None:
            raise NotConnected(f"not connected to {self.address} (state {self.state})")
        info = self._client.publish(topic, payload, qos=0, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.stats.publish_failures += 1
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        self.stats.messages_out += 1
        if info.is_published():
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._pending.by_mid[info.mid] = d
        return d


class _Batch:
    """One ``write``: its messages sent ``window`` at a time; ``done`` fires after the last ack."""

    def __init__(self, client: _SinkClient, messages: list[Message], window: int) -> None:
        self.client = client
        self.messages = messages
        self.window = window
        self.sent = 0
        self.acked = 0
        self.finished = False
        self._pumping = False
        self.done: defer.Deferred = defer.Deferred(self._cancelled)

    def pump(self) -> None:
        """Publish until ``window`` messages are unacknowledged; fire ``done`` at the end."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self.finished and self.sent < len(self.messages):
                if self.sent - self.acked >= self.window:
                    return
                topic, payload, qos, retain = self.messages[self.sent]
                try:
                    if qos:
                        d = self.client.publish(topic, payload, qos=qos, retain=retain)
                    else:
                        d = self.client.publish_written(topic, payload, retain)
                except (MqttError, ValueError, UnicodeError) as exc:
                    self.fail(exc)
                    return
                self.sent += 1
                d.addCallbacks(self._acked, self._nacked)
        finally:
            self._pumping = False
        if not self.finished and self.acked == len(self.messages):
            self.finished = True
            self.done.callback(len(self.messages))

    def fail(self, error: Exception) -> None:
        """End the batch as failed (the core retries it); later acks are ignored."""
        if not self.finished:
            self.finished = True
            self.done.errback(Failure(error))

    def _acked(self, _: Any) -> None:
        if not self.finished:
            self.acked += 1
            self.pump()

    def _nacked(self, failure: Failure) -> None:
        self.fail(failure.value)  # the failure is consumed: the batch's errback reports it

    def _cancelled(self, _: defer.Deferred) -> None:
        """write_timeout: stop sending. MQTT 3.1.1 sends a message again only on a new
        connection, so one still waiting for its PUBACK costs this connection: without that,
        the stale messages would fill paho's in-flight window and every retry would wait
        behind them."""
        self.finished = True
        if self.acked < self.sent:
            self.client.drop("no PUBACK within write_timeout; reconnecting to send again")


class MqttSink(Sink):
    """Publishes events to an MQTT broker; a batch is acknowledged once the broker has it all."""

    Config = MqttSinkConfig
    config: MqttSinkConfig
    #: The command channel may set this: acknowledge inbound QoS 1 messages only once the
    #: Deferred ``_on_message`` returned has fired.
    manual_ack = False

    def __init__(self, name: str, config: MqttSinkConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        extra = config.topic_escape
        self.topic = TopicTemplate(config.topic, extra)
        self.gateway = context.gateway_id
        self.status_topic = f"gatewayd/{escape_level(self.gateway, extra)}/status"
        #: The broker link's gauges (``mqtt_connected``, ``mqtt_state``, ...), for /metrics.
        self.gauges = SinkGauges()
        self.client: _SinkClient | None = None
        self._batch: _Batch | None = None
        self.channel = self._command_channel()
        if self.channel is not None:
            self.manual_ack = True  # a command is acknowledged once recorded, not before
            stats = self.channel.stats
            for field in ("received", "executed", "repeats", "refused", "dropped", "answers"):
                self.gauges.gauge(
                    f"commands_{field}_total",
                    f"Command channel: {field} (gatewayd.commands.mqtt.ChannelStats)",
                    lambda field=field: getattr(stats, field),
                )
        #: ``format: thingsboard``: ThingsBoard's gateway API instead of the gatewayd topics.
        self.thingsboard = ThingsBoardGateway.for_sink(self) if config.thingsboard else None

    def _command_channel(self) -> CommandChannel | None:
        """The backend's command channel on this connection, when ``commands:`` is set."""
        dispatcher = self.context.commands
        if self.config.commands is None:
            return None
        if dispatcher is None:  # a sink built outside the daemon (a test, a tool)
            self.log.warn("sink {sink}: commands: set but no command dispatcher", sink=self.name)
            return None
        return CommandChannel(
            dispatcher,
            dispatcher.store,
            escape_level(self.gateway, self.config.topic_escape),
            self.config.commands,
            self.publish,
            self.log,
        )

    # --- lifecycle ------------------------------------------------------------------------------

    def open(self) -> defer.Deferred:
        """Start the client (once) and fire when it is connected; the core bounds the wait."""
        if self.client is None:
            client = self._make_client()
            client.start()  # raises only for a bad TLS setup: the next open tries again
            self.client = client
        return self.client.when_connected()

    def close(self) -> defer.Deferred | None:
        """Publish ``offline`` (retained; waited for at most connect_timeout), then disconnect."""
        client, self.client = self.client, None
        if client is None:
            return None
        waited: defer.Deferred = defer.Deferred()
        if client.connected:
            try:
                sent = client.publish(self.status_topic, self._status(False), qos=1, retain=True)
            except MqttError:
                sent = defer.succeed(None)
            sent.addBoth(lambda _: None if waited.called else waited.callback(None))
            timeout = client.config.connect_timeout
            waited.addTimeout(timeout, self.context.reactor, onTimeoutCancel=lambda *_: None)
        else:
            waited.callback(None)  # the broker has published our will already
        waited.addCallback(lambda _: client.stop())
        self._stop_status_updates()
        return waited

    def _make_client(self) -> _SinkClient:
        broker = self.config.broker
        if self.thingsboard is not None:
            broker = self.thingsboard.broker(broker)  # the token as username
        client = _SinkClient(
            self.context.reactor,
            broker,
            client_id=broker.client_id or default_client_id(self.gateway, self.name),
            on_message=self._on_message,
            subscriptions=self._extra_subscriptions(),
            will=Will(self.status_topic, self._status(False), qos=1, retain=True),
            manual_ack=self.manual_ack,
            name=f"sink {self.name}",
            log=self.log,
            max_inflight=self.config.max_inflight,
        )
        client.add_state_listener(lambda state: self._state_changed(client, state))
        client.register_metrics(self.gauges)
        return client

    def _state_changed(self, client: _SinkClient, state: str) -> None:
        """Connected: announce ``online`` (and again every ``status_interval``), retry a failed
        batch now, let the fleet membership settle. Any other state: the batch in flight has
        failed, and this box owns no fleet device while it cannot see the fleet."""
        fleet = self.context.fleet
        if state == CONNECTED:
            self._publish_status(client)
            self._start_status_updates(client)
            self.context.retry_now()  # a batch that failed with the link goes now
            if fleet is not None:
                fleet.link_up()
            return
        if fleet is not None:
            fleet.link_down()
        if self._batch is not None and self._batch.client is client:
            batch = self._batch
            batch.fail(
                NotConnected(
                    f"connection to {client.address} lost mid-batch "
                    f"({batch.acked} of {len(batch.messages)} messages acknowledged)"
                )
            )

    # --- the box's status ----------------------------------------------------------------------
    # Retained on gatewayd/{gateway}/status: from the daemon, a JSON object (gatewayd.health.
    # box_status: version, plugins and devices online, queues, when); outside it, the words
    # ``online`` / ``offline``. The last will is the offline form.

    def _status(self, online: bool) -> bytes:
        build = self.context.status
        if build is None:
            return b"online" if online else b"offline"
        return encode_json(build(online)).encode()

    def _publish_status(self, client: _SinkClient) -> None:
        if not client.connected:
            return
        try:
            d = client.publish(self.status_topic, self._status(True), qos=1, retain=True)
        except MqttError as exc:
            self.log.warn("sink {sink}: cannot publish status: {e}", sink=self.name, e=exc)
        else:
            d.addErrback(lambda _: None)  # stopped first; the will says offline

    def _start_status_updates(self, client: _SinkClient) -> None:
        self._stop_status_updates()
        if self.context.status is None:
            return  # the plain word does not change
        self._status_loop = task.LoopingCall(self._publish_status, client)
        self._status_loop.clock = self.context.reactor
        self._status_loop.start(self.config.status_interval, now=False)

    def _stop_status_updates(self) -> None:
        loop, self._status_loop = getattr(self, "_status_loop", None), None
        if loop is not None and loop.running:
            loop.stop()

    # --- the command channel -------------------------------------------------------------------
    # With ``commands:``, the sink's connection also carries the backend's commands: it
    # subscribes to the channel's topic filter (QoS 1), hands each message to the channel (with
    # ``manual_ack``: a request is acknowledged once recorded) and answers through ``publish``.

    def _extra_subscriptions(self) -> list[tuple[str, int]]:
        """Topic filters to subscribe to besides the probe, as (filter, qos)."""
        topics = [(self.channel.subscription, 1)] if self.channel is not None else []
        if self.config.watch_presence and self.context.presence is not None:
            topics.append((PRESENCE_FILTER, 1))
        if self.thingsboard is not None:
            topics.append((self.thingsboard.subscription, 1))
        if self.context.fleet is not None:
            topics.append((STATUS_FILTER, 1))
        return topics

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> Any:
        """A command (the Deferred returned delays its ack) or another box's presence."""
        if self.thingsboard is not None:
            return self.thingsboard.handle(topic, payload, qos, retain)
        if topic.startswith("gatewayd/") and "/devices/" in topic:
            self._presence_seen(topic, payload)
            return None
        if topic.startswith("gatewayd/") and topic.endswith("/status"):
            self._status_seen(topic, payload)
            return None
        if self.channel is None:
            return None
        return self.channel.handle(topic, payload, qos, retain)

    def _presence_seen(self, topic: str, payload: bytes) -> None:
        """``gatewayd/{gw}/devices/{plugin}/{device}`` of another box: tell the daemon."""
        notice = parse_presence(topic, payload)
        report = self.context.presence
        if notice is None or report is None or notice[2] == self.gateway:
            return
        report(*notice)

    def _status_seen(self, topic: str, payload: bytes) -> None:
        """``gatewayd/{gw}/status`` of a box (this one's too): tell the fleet membership."""
        levels = topic.split("/")
        fleet = self.context.fleet
        if fleet is None or len(levels) != 3:
            return
        fleet.status(unquote(levels[1]), payload)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        """One message on the sink's connection (command answers); raises NotConnected."""
        if self.client is None:
            raise NotConnected(f"sink {self.name} is not open")
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    # --- writing --------------------------------------------------------------------------------

    def write(self, events: Sequence[Event]) -> defer.Deferred:
        """Publish the batch; fires once every message is acknowledged (see the module doc)."""
        client = self.client
        if client is None or not client.connected:
            where = client.address if client is not None else "the broker (sink not open)"
            return defer.fail(NotConnected(f"not connected to {where}"))
        if self._batch is not None:
            self._batch.finished = True  # a write the core gave up on: nothing more of it
        batch = _Batch(client, self.messages(events), self.config.max_inflight)
        self._batch = batch
        batch.pump()
        return batch.done

    def messages(self, events: Sequence[Event]) -> list[Message]:
        """The batch as MQTT messages: events (one each, or arrays by topic), then presence."""
        if self.thingsboard is not None:
            return self.thingsboard.messages(events)
        config = self.config
        items = list(events)
        payloads = getattr(events, "payloads", None)  # the queued JSON texts, when given
        if payloads is None or len(payloads) != len(items):  # plain lists; damaged entries
            payloads = [event.to_json() for event in items]
        out: list[Message] = []
        presence: list[Message] = []
        groups: dict[str, list[str]] = {}
        for event, text in zip(items, payloads, strict=True):
            topic = self.topic.render(event, self.gateway)
            if config.payload == "event":
                out.append((topic, text.encode(), config.qos, config.retain))
            else:
                groups.setdefault(topic, []).append(text)
            online = PRESENCE_TYPES.get(event.type)
            if online is not None and event.device is not None:
                presence.append(self._presence(event, online))
        for topic, texts in groups.items():
            out.append((topic, f"[{','.join(texts)}]".encode(), config.qos, config.retain))
        return out + presence

    def _presence(self, event: Event, online: bool) -> Message:
        gateway = event.gateway or self.gateway
        extra = self.config.topic_escape
        topic = "/".join(
            ("gatewayd", escape_level(gateway, extra), "devices")
            + (escape_level(event.plugin, extra), escape_level(event.device, extra))
        )
        body = encode_json({"online": online, "since": event.ts, "gateway": gateway})
        return topic, body.encode(), self.config.qos, True


#: Every box's device presence (``watch_presence``).
PRESENCE_FILTER = "gatewayd/+/devices/+/+"
#: Every box's status (a plugin with ``fleet: true``: the live boxes).
STATUS_FILTER = "gatewayd/+/status"


def parse_presence(topic: str, payload: bytes) -> tuple[str, str, str, float] | None:
    """``(plugin, device, gateway, since)`` of a presence message that says online, else None
    (offline, malformed, or not a presence topic)."""
    levels = topic.split("/")
    if len(levels) != 5 or levels[0] != "gatewayd" or levels[2] != "devices":
        return None
    try:
        body = orjson.loads(payload)
        if not isinstance(body, dict) or body.get("online") is not True:
            return None
        since = datetime.fromisoformat(str(body["since"])).timestamp()
    except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
        return None
    gateway, plugin, device = (unquote(level) for level in (levels[1], levels[3], levels[4]))
    return plugin, device, gateway, since


def default_client_id(gateway: str, sink: str) -> str:
    """``gatewayd-<gateway id>-<sink>``: stable across restarts, so the session is kept."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"gatewayd-{gateway}-{sink}")[:64]
