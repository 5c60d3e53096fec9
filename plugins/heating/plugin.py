"""The heating plugin (``type: heating``): hy/gw heating gateways and their CJ/T 188 meters.

The gateways are MQTT clients of a broker we also connect to (``gatewayd.mqtt.MqttClient``).
They publish on ``{prefix}/set/<gw_id>``; we publish commands on ``{prefix}/get/<gw_id>``.
Each message is decoded by the codecs (``gatewayd.protocols.hygw`` for the JSON envelope,
``gatewayd.protocols.cjt188`` for the meter frames inside it) and becomes events:

=========  ===============================================================================
msg_id     events
=========  ===============================================================================
any        ``device.online`` when a gateway is heard for the first time or again after
           being offline
1          ``gateway.status``
2          ``gateway.periods``
20         one ``meter.reading`` per frame in ``meter_data``; a bad frame: ``frame.invalid``
70         (the gateway's last will) ``device.offline``
other      logged once per msg_id and counted (``unknown_messages``)
=========  ===============================================================================

A gateway silent for ``offline_after`` while our broker link is up also goes offline; one
silent for ``poll_after`` is first asked for its status (msg 1). A payload that does not decode
is ``frame.invalid`` with the reason; an exception while handling one message is logged and
becomes ``frame.invalid`` (``internal_error``): neither stops the MQTT loop or other gateways.

With ``subscribe_qos: 1`` a QoS 1 message (the gateways publish their last will with QoS 1,
their reports with QoS 0) is acknowledged to the broker only after its events are durable.

A report (msg 20) that can come again (delivered with QoS 1, or retained) gives each of its
events an idempotency key: the gateway of the topic, a hash of the payload bytes and the event's
index in the message (``message_identity``). The queues store each key's event once within
``dedupe_window``, across restarts too, so the broker's redelivery of a report stored before a
crash is acknowledged again but yields no second ``meter.reading`` (see the README).
"""

from __future__ import annotations

import re
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from gatewayd.protocols import cjt188, hygw
from gatewayd.protocols.errors import Cjt188Error, HygwError
from twisted.internet import defer, task

from gatewayd.mqtt import CONNECTED, MqttClient, MqttError
from gatewayd.plugin import (
    Device,
    DeviceRefused,
    Plugin,
)

from .commands import BrokerUnavailable, HeatingCommands
from .config import (
    HeatingConfig,
)
from .fleet import FleetShare
from .messages import (
    KEYED_MSG_IDS,
    MAX_PAYLOAD,
    MAX_RAW,
    MSG_LAST_WILL,
    MSG_METER_REPORT,
    MSG_PERIODS,
    MSG_READ_NOW,
    MSG_REBOOT,
    MSG_SET_PERIODS,
    MSG_STATUS,
    MSG_TRANSPARENT,
    decode_hygw_for_cli,
    iso,
    message_identity,
    periods_data,
    status_data,
)
from .state import STAT, Correlator, Gateway, GatewayRegistry, PendingCommand

__all__ = ["BrokerUnavailable", "HeatingPlugin", "message_identity", "periods_data", "status_data"]


def default_client_id(instance: str, box: str | None = None) -> str:
    """``gatewayd-<host>-<instance>``: unique per box and plugin instance, never a gw_id. In a
    fleet (``box``: the gateway.id) ``gatewayd-<box>-<instance>``: boxes may share a host name
    (containers), and two clients with one id on one broker throw each other off."""
    raw = f"gatewayd-{box or socket.gethostname()}-{instance}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)[:64]


class HeatingPlugin(HeatingCommands, Plugin):
    """Plugin type ``heating``: hy/gw gateways over MQTT, CJ/T 188 meters behind them."""

    protocol = "heating"
    Config = HeatingConfig
    decoders = {"cjt188": cjt188.decode_for_cli, "hygw": decode_hygw_for_cli}
    #: Builds the broker link; tests put a fake here.
    link_factory: Callable[..., Any] = MqttClient

    config: HeatingConfig

    def init(self) -> None:
        config = self.config
        self.prefix = config.topic_prefix
        self.registry = GatewayRegistry(self.reactor, config.max_gateways)
        self.correlator = Correlator(self.reactor)
        self.link: Any = None
        self.link_up_since: float | None = None
        self.unknown_msg_ids: Counter[int] = Counter()
        self.unsolicited = 0
        #: Seconds the queues keep a report's keys (``dedupe_window``); 0: no keys.
        self.dedupe_window = config.dedupe_window or 0.0
        self._housekeeping: task.LoopingCall | None = None
        self.fleet: FleetShare | None = None  # fleet: true, once started
        self._handlers: dict[int, Callable[..., None]] = {
            MSG_STATUS: self._on_status,
            MSG_PERIODS: self._on_periods,
            MSG_SET_PERIODS: self._on_stat_reply,
            MSG_READ_NOW: self._on_stat_reply,
            MSG_METER_REPORT: self._on_meter_report,
            MSG_REBOOT: self._on_stat_reply,
            MSG_TRANSPARENT: self._on_transparent,
        }

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        config = self.config
        if config.fleet:
            if self.context.fleet is None:
                raise ValueError(
                    "fleet: true needs an mqtt sink that reads the fleet's box statuses "
                    "(a reload cannot add the first fleet plugin: restart the daemon)"
                )
            self.fleet = FleetShare(self, self.context.fleet)
        self.client_id = config.broker.client_id or default_client_id(
            self.name, self.context.gateway_id if config.fleet else None
        )
        self.link = self.link_factory(
            self.reactor,
            config.broker,
            client_id=self.client_id,
            on_message=self.on_mqtt_message,
            subscriptions=[(hygw.subscribe_topic(self.prefix), config.subscribe_qos)],
            manual_ack=config.subscribe_qos > 0,
            name=self.name,
            log=self.log,
        )
        self.link.add_state_listener(self._link_state)
        self._register_gauges()
        self.link.start()
        self._housekeeping = task.LoopingCall(self.check_gateways)
        self._housekeeping.clock = self.reactor
        self._housekeeping.start(self._housekeeping_interval(), now=False)

    def stop(self) -> defer.Deferred:
        if self.fleet is not None:
            self.fleet.close()
        if self._housekeeping is not None and self._housekeeping.running:
            self._housekeeping.stop()
        self.correlator.fail_all(
            lambda p: BrokerUnavailable(f"the plugin stopped before {p.gw_id} answered")
        )
        if self.link is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self.link.stop)

    def _housekeeping_interval(self) -> float:
        shortest = min(self.config.offline_after, self.config.poll_after or float("inf"))
        return min(max(shortest / 10, 0.05), 30.0)

    def _link_state(self, state: str) -> None:
        self.link_up_since = self.reactor.seconds() if state == CONNECTED else None

    def _register_gauges(self) -> None:
        metrics = self.context.metrics
        self.link.register_metrics(metrics)
        registry = self.registry
        metrics.gauge("gateways_known", "Gateways heard from", lambda: registry.counts()[0])
        metrics.gauge("gateways_online", "Gateways online", lambda: registry.counts()[1])
        metrics.gauge("meters_known", "Meters seen in reports", lambda: registry.counts()[2])
        metrics.gauge(
            "gateways_untracked_total",
            "Messages from new gateways while max_gateways were known and online",
            lambda: registry.untracked,
        )
        metrics.gauge(
            "gateways_forgotten_total",
            "Offline gateways forgotten to make room for new ones (max_gateways)",
            lambda: registry.forgotten,
        )
        metrics.gauge(
            "commands_in_flight",
            "Commands waiting for a gateway",
            lambda: len(self.correlator.pending),
        )
        metrics.gauge(
            "fleet_skipped_total",
            "Messages of gateways another box of the fleet handles (fleet: true), not decoded",
            lambda: self.fleet.skipped if self.fleet is not None else 0,
        )
        metrics.gauge(
            "fleet_gateways_owned",
            "Gateways heard within offline_after that this box handles (fleet: true)",
            lambda: self.fleet.owned_count() if self.fleet is not None else 0,
        )
        metrics.gauge(
            "unknown_messages",
            "Messages with a msg_id the plugin does not handle",
            lambda: sum(self.unknown_msg_ids.values()),
        )
        metrics.gauge(
            "unsolicited_replies",
            "Replies that matched no command in flight (late, or another server's)",
            lambda: self.unsolicited,
        )

    # --- housekeeping: silence, polling ----------------------------------------------------

    def check_gateways(self) -> None:
        """Offline after ``offline_after`` of silence; a status request after ``poll_after``."""
        since = self.link_up_since
        if since is None or self.link is None or not self.link.connected:
            return  # while we are cut off from the broker, the silence is ours
        now = self.reactor.seconds()
        for gateway in self.registry.silent(self.config.offline_after, since):
            gateway.online = False
            self.context.record(
                "device.offline",
                gateway.gw_id,
                {
                    "reason": "silent",
                    "silent_for": round(now - max(gateway.last_seen, since), 3),
                    "last_seen": iso(gateway.last_seen_wall),
                },
            )
            self.log.info("gateway {gw_id} offline: silent", gw_id=gateway.gw_id)
        if self.config.poll_after is None:
            return
        for gateway in self.registry.to_poll(self.config.poll_after, since):
            if self.correlator.get(gateway.gw_id, MSG_STATUS) is not None:
                continue
            gateway.polled_at = now
            try:
                self._publish(gateway.gw_id, hygw.build_status_request(gateway.gw_id))
            except (MqttError, HygwError):
                return

    # --- inbound messages ------------------------------------------------------------------

    def on_mqtt_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> Any:
        """One MQTT message; returns a Deferred that fires when its events are durable."""
        if self.fleet is not None and not self.fleet.keeps(topic):
            return None  # another box's gateway: counted, not decoded
        self.context.frame_in()
        with self.context.handling(None, lambda: _text(payload)[:MAX_RAW], topic=topic) as handled:
            return self._dispatch(topic, payload, bool(qos or retain))
        return handled.deferred  # the frame.invalid (internal_error) the bug became

    def _dispatch(self, topic: str, payload: bytes, repeatable: bool) -> Any:
        """``repeatable``: the broker may deliver this message again (QoS 1, or retained)."""
        if len(payload) > MAX_PAYLOAD:
            return self._emit_invalid(
                self._topic_gw_id(topic),
                "length",
                f"payload of {len(payload)} bytes (more than {MAX_PAYLOAD})",
                _text(payload),
                topic=topic,
            )
        try:
            message = hygw.decode_message(payload, topic=topic, prefix=self.prefix)
        except HygwError as exc:
            return self._emit_invalid(
                self._topic_gw_id(topic), exc.reason, exc.message, _text(payload), topic=topic
            )
        if message.direction != "set":
            return None  # our own commands (a wider subscription than ours would see them)
        if message.msg_id == MSG_LAST_WILL:
            return self._on_last_will(message)
        emits: list[defer.Deferred] = []
        gateway, came_online = self.registry.heard(message.gw_id)
        if gateway is None and self.registry.untracked == 1:
            self.log.warn(
                "max_gateways ({limit}) gateways are known and online: gateway {gw_id} and any "
                "further new ones are not tracked (no device.online, no offline detection, "
                "commands 404); counted in gateways_untracked_total",
                limit=self.registry.max_gateways,
                gw_id=message.gw_id,
            )
        if came_online is not None:
            emits.append(
                self.context.emit(
                    "device.online",
                    message.gw_id,
                    {"reason": came_online, "msg_id": message.msg_id},
                )
            )
            self.log.info(
                "gateway {gw_id} online ({reason})", gw_id=message.gw_id, reason=came_online
            )
        handler = self._handlers.get(message.msg_id)
        if handler is None:
            self._unknown(message)
        else:
            identity = None
            if repeatable and message.msg_id in KEYED_MSG_IDS and self.dedupe_window:
                identity = message_identity(hygw.topic_gw_id(topic, self.prefix)[1], payload)
            handler(message, gateway, emits, identity)
        if not emits:
            return None
        if len(emits) == 1:
            return emits[0]
        return defer.DeferredList(emits, consumeErrors=True).addCallback(_first_error)

    def _topic_gw_id(self, topic: str) -> str | None:
        try:
            return hygw.topic_gw_id(topic, self.prefix)[1]
        except HygwError:
            return None

    def _emit_invalid(
        self,
        device: str | None,
        reason: str,
        message: str,
        raw: str | None,
        *,
        key: str | None = None,
        **extra: Any,
    ) -> defer.Deferred:
        data = {"reason": reason, "message": message, **extra}
        if raw is not None and len(raw) > MAX_RAW:
            data["raw_truncated"] = len(raw)
            raw = raw[:MAX_RAW]
        return self.context.emit(
            "frame.invalid", device, data, raw=raw, key=key, window=self.dedupe_window
        )

    def _unknown(self, message: hygw.Message) -> None:
        self.unknown_msg_ids[message.msg_id] += 1
        emit = self.log.warn if self.unknown_msg_ids[message.msg_id] == 1 else self.log.debug
        emit(
            "gateway {gw_id} sent msg_id {msg_id} ({kind}), which the plugin does not handle "
            "(counted in unknown_messages)",
            gw_id=message.gw_id,
            msg_id=message.msg_id,
            kind=message.kind,
        )

    def _on_status(
        self, message: hygw.Message, gateway: Gateway | None, emits: list, identity: Any = None
    ) -> None:
        data = status_data(message)
        if gateway is not None:
            gateway.status = data
        emits.append(self.context.emit("gateway.status", message.gw_id, data, raw=message.raw))
        self._answer(message)

    def _on_periods(
        self, message: hygw.Message, gateway: Gateway | None, emits: list, identity: Any = None
    ) -> None:
        data = periods_data(message)
        if gateway is not None:
            gateway.periods = data
        emits.append(self.context.emit("gateway.periods", message.gw_id, data, raw=message.raw))
        self._answer(message)

    def _on_stat_reply(
        self, message: hygw.Message, gateway: Gateway | None, emits: list, identity: Any = None
    ) -> None:
        self._answer(message)

    def _answer(self, message: hygw.Message) -> None:
        """Complete the command in flight for (gw_id, msg_id), if any, from its reply."""
        pending = self.correlator.get(message.gw_id, message.msg_id)
        if pending is None:
            if message.msg_id not in (MSG_STATUS, MSG_PERIODS):  # those also come unasked
                self.unsolicited += 1
                self.log.debug(
                    "unsolicited msg {msg_id} reply from {gw_id}",
                    msg_id=message.msg_id,
                    gw_id=message.gw_id,
                )
            return
        stat = message.stat
        if stat is not None and not stat.ok:
            self.correlator.reject(pending, self._refusal(pending, stat))
        else:
            self.correlator.resolve(pending, message)

    @staticmethod
    def _refusal(pending: PendingCommand, stat: hygw.StatResult) -> DeviceRefused:
        return DeviceRefused(
            f"gateway {pending.gw_id} answered {pending.command} (msg {pending.msg_id}) with "
            f"stat {stat.code} ({stat.name})",
            code=stat.code,
        )

    def _on_meter_report(
        self,
        message: hygw.Message,
        gateway: Gateway | None,
        emits: list,
        identity: str | None = None,
    ) -> None:
        """One event per entry of ``meter_data``; with ``identity`` (a message that can come
        again), event ``n`` has the key ``<identity>:<n>``, the same in every delivery."""
        gw_id = message.gw_id
        meter = message.values.get("meter_id")
        if meter is None:
            raw_id = message.fields.get("meter_id")
            emits.append(
                self._emit_invalid(
                    gw_id,
                    "meter_id",
                    f"meter_id must be 14 hex digits, got {raw_id!r}",
                    message.raw,
                    key=None if identity is None else f"{identity}:0",
                    msg_id=MSG_METER_REPORT,
                )
            )
            return
        meter_id = meter["meter_id"]
        frames = message.frames
        if not frames:
            emits.append(
                self._emit_invalid(
                    meter_id,
                    "no_frames",
                    "msg 20 without a hex frame in meter_data",
                    message.raw,
                    key=None if identity is None else f"{identity}:0",
                    gateway=gw_id,
                    meter_id=meter_id,
                )
            )
            return
        known = None
        if gateway is not None:
            known = self.registry.meter(
                gateway, meter_id, meter["number"], meter["protocol"], meter["port"]
            )
        bcd_decimals = self.config.bcd_decimals
        emit, window = self.context.emit, self.dedupe_window
        for n, hex_frame in enumerate(frames):
            key = None if identity is None else f"{identity}:{n}"
            try:
                frame = cjt188.parse_hex(hex_frame)
            except Cjt188Error as exc:
                emits.append(
                    self._emit_invalid(
                        meter_id,
                        exc.reason,
                        exc.message,
                        hex_frame,
                        key=key,
                        gateway=gw_id,
                        meter_id=meter_id,
                    )
                )
                continue
            payload = cjt188.decode_payload(frame, bcd_decimals)
            data = {
                "gateway": gw_id,
                "meter_id": meter_id,
                "number": meter["number"],
                "protocol": meter["protocol"],
                "port": meter["port"],
                "meter_type": f"{frame.meter_type:02X}",
                "address": frame.address,
                "control": f"{frame.control:02X}",
                "di": frame.di_hex,
                **payload,
            }
            if known is not None:
                known.meter_type = frame.meter_type
                known.address = frame.address
            emits.append(
                emit("meter.reading", meter_id, data, raw=hex_frame, key=key, window=window)
            )

    def _on_transparent(
        self, message: hygw.Message, gateway: Gateway | None, emits: list, identity: Any = None
    ) -> None:
        pending = self.correlator.get(message.gw_id, MSG_TRANSPARENT)
        if pending is None:
            self.unsolicited += 1
            self.log.debug(
                "msg 40 from {gw_id} matches no command in flight (late reply?)",
                gw_id=message.gw_id,
            )
            return
        stat = message.stat
        if "meter_data" in message.fields:
            self.correlator.resolve(pending, message)  # the meter answered (stat implied)
        elif stat is not None and not stat.ok:
            self.correlator.reject(pending, self._refusal(pending, stat))
        elif pending.wait_reply and pending.phase == STAT:
            self.correlator.await_reply(
                pending,
                stat.to_dict() if stat is not None else None,
                self.config.transparent_timeout,
            )
        else:
            self.correlator.resolve(pending, message)

    def _on_last_will(self, message: hygw.Message) -> Any:
        if not self.registry.went_offline(message.gw_id):
            return None
        self.log.info("gateway {gw_id} offline: last will", gw_id=message.gw_id)
        return self.context.emit(
            "device.offline", message.gw_id, {"reason": "last_will"}, raw=message.raw
        )

    # --- devices ---------------------------------------------------------------------------

    def device_elsewhere(self, device: str, gateway: str, since: float) -> None:
        """A heating gateway another box now hears (it moved to another broker's client):
        offline here, said once, so that presence follows it."""
        moved = self.registry.moved_elsewhere(device, since)
        if moved is None:
            return
        self.context.record("device.offline", device, {"reason": "moved_elsewhere", "box": gateway})
        self.log.info("gateway {gw_id} is heard by box {box} now", gw_id=device, box=gateway)

    def devices_online(self) -> int:
        """Online gateways and their meters, counted without listing every meter."""
        return sum(1 + len(g.meters) for g in self.registry.gateways.values() if g.online)

    def devices(self) -> Iterator[Device]:
        """Gateways (``kind: gateway``), each followed by the meters seen behind it
        (``kind: meter``); built as the API consumes them, so a page stops at its own end."""
        for gateway in sorted(self.registry.gateways.values(), key=lambda g: g.gw_id):
            yield Device(
                id=gateway.gw_id,
                online=gateway.online,
                last_seen=gateway.last_seen_wall,
                details={
                    "kind": "gateway",
                    "meters": len(gateway.meters),
                    "version": gateway.status.get("version"),
                    "rssi": gateway.status.get("rssi"),
                },
            )
            for meter in sorted(gateway.meters.values(), key=lambda m: m.meter_id):
                yield Device(
                    id=meter.meter_id,
                    online=gateway.online,
                    last_seen=meter.last_seen,
                    details={
                        "kind": "meter",
                        "gateway": gateway.gw_id,
                        "meter_type": None
                        if meter.meter_type is None
                        else f"{meter.meter_type:02X}",
                        "address": meter.address,
                        "port": meter.port,
                    },
                )


def _first_error(results: list[tuple[bool, Any]]) -> BaseException | None:
    """Of several emits: the first error as a value, else None. The MQTT link logs a value
    that is an error before it acknowledges a QoS 1 message; for QoS 0 nobody holds the
    Deferred, so it must not fail (the queue has logged the error already)."""
    for ok, value in results:
        if not ok:
            return value.value
    return None


def _text(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")
