"""ThingsBoard's gateway MQTT API on the ``mqtt`` sink (``format: thingsboard``).

The box is one ThingsBoard device of the "gateway" kind (MQTT username = its access token) that
stands for every device its plugins see:

- ``device.online`` → ``v1/gateway/connect`` ``{"device": NAME, "type": TYPE}``, published
  before the batch's telemetry; ``device.offline`` → ``v1/gateway/disconnect`` ``{"device":
  NAME}``, after it (only when it is the device's last presence event of the batch).
- Every other event → ``v1/gateway/telemetry`` ``{NAME: [{"ts": ms, "values": {...}}, ...]}``,
  one message per batch (split only above ``max_message``), events grouped by device name in
  their order. Each event is its own entry, never merged with another of the same millisecond.
  ``values`` is the event's data flattened (nested keys joined with ``.``; lists as JSON text;
  nulls and non-finite numbers left out) plus ``event`` = the event type (a data key ``event``
  becomes ``data.event``). An event without a device is the gateway's own telemetry, on
  ``v1/devices/me/telemetry``.
- Server-side RPC on ``v1/gateway/rpc`` ``{"device": NAME, "data": {"id": N, "method":
  COMMAND, "params": {...}}}`` runs the plugin command ``COMMAND`` for that device, when
  ``thingsboard.allow`` lists it, and is answered on ``v1/gateway/rpc`` ``{"device": NAME,
  "id": N, "data": RESULT}`` or ``{..., "data": {"error": MESSAGE, "code": CODE, "status":
  HTTP STATUS}}``.

Which plugin a NAME belongs to is learned from the events published (the ``device_name``
template may hide it): an RPC for a name not seen since the daemon started is answered with an
error. The device argument of the command (``imei`` for powerbank, ``gw_id`` for heating,
``device`` for example, none for esam; ``device_argument`` overrides) is filled from the name's
device.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.commands.dispatch import error_body
from gatewayd.commands.mqtt import allowed, check_patterns
from gatewayd.events import Event, encode_json
from gatewayd.jsonin import JsonInputError, loads_external
from gatewayd.logsetup import LogThrottle
from gatewayd.schema import ByteSize, ConfigModel, Secret
from gatewayd.sinks.templates import fill, parse_placeholders

__all__ = [
    "CONNECT_TOPIC",
    "DISCONNECT_TOPIC",
    "RPC_TOPIC",
    "TELEMETRY_TOPIC",
    "NameTemplate",
    "RpcStats",
    "ThingsBoardConfig",
    "ThingsBoardGateway",
    "flatten",
    "gatewayd_only",
    "thingsboard_section",
    "ts_millis",
]

CONNECT_TOPIC = "v1/gateway/connect"
DISCONNECT_TOPIC = "v1/gateway/disconnect"
TELEMETRY_TOPIC = "v1/gateway/telemetry"
RPC_TOPIC = "v1/gateway/rpc"
#: The gateway device's own telemetry (events without a device).
OWN_TELEMETRY_TOPIC = "v1/devices/me/telemetry"

#: The placeholders of ``device_name`` and ``device_type`` (those of the topic template).
#: The command argument that names the device, by protocol (None: the commands take none).
DEVICE_ARGUMENTS: dict[str, str | None] = {
    "powerbank": "imei",
    "heating": "gw_id",
    "example": "device",
    "esam": None,
}
#: Device names remembered for RPC at most (the least recently published are forgotten).
MAX_NAMES = 100_000
#: RPC payloads larger than this are refused unread.
MAX_RPC_PAYLOAD = 1024 * 1024

#: One message to publish: (topic, payload, qos, retain), as ``gatewayd.sinks.mqtt`` sends it.
Message = tuple[str, bytes, int, bool]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_LONG = 2**63


# --- config --------------------------------------------------------------------------------------


class NameTemplate:
    """A ``device_name``/``device_type`` template over the topic placeholders, rendered as is."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.parts: list[tuple[str, str | None]] = []
        if not template:
            raise ValueError("must not be empty")
        self.parts = parse_placeholders(template)

    def render(self, event: Any, gateway: str = "") -> str:
        """The text for ``event``; ``gateway`` stands in for an event without one."""
        return fill(self.parts, event, gateway, lambda value: value or "")


class ThingsBoardConfig(ConfigModel):
    """``thingsboard:`` of an mqtt sink with ``format: thingsboard``."""

    #: The gateway device's access token, the MQTT username (password empty); best given as
    #: ``token_file: PATH``. Not needed when ``broker.username`` holds ThingsBoard's basic
    #: MQTT credentials instead.
    token: Secret | None = None
    #: A device's name in ThingsBoard; placeholders {gateway} {plugin} {protocol} {device} {type}.
    device_name: str = "{device}"
    #: The device type (profile) sent with ``v1/gateway/connect``; "" sends none.
    device_type: str = "{protocol}"
    #: ``plugin.command`` patterns (as ``commands.allow``) the platform may call by RPC; none
    #: by default: anything else is answered with a ``forbidden`` error.
    allow: list[str] = []
    #: The command argument a device's id goes into, by plugin or protocol name (null: none);
    #: over the defaults powerbank: imei, heating: gw_id, example: device, esam: none.
    device_argument: dict[str, str | None] = {}
    #: Telemetry larger than this is split into several messages (ThingsBoard refuses MQTT
    #: payloads above ``transport.mqtt.netty.max_payload_size``, 65536 by default); 0: never.
    max_message: ByteSize = Field(64000, ge=0)

    @field_validator("device_name", "device_type")
    @classmethod
    def _template(cls, value: str, info: ValidationInfo) -> str:
        if value == "" and info.field_name == "device_type":
            return value
        NameTemplate(value)
        return value

    @field_validator("allow")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        return check_patterns(value)

    @field_validator("max_message")
    @classmethod
    def _room(cls, value: int) -> int:
        if 0 < value < 1024:
            raise ValueError("must be 0 (no limit) or at least 1024 bytes")
        return value


def gatewayd_only(cls: Any, value: Any, info: ValidationInfo) -> Any:
    """A field validator: the key must keep its default with ``format: thingsboard``."""
    default = cls.model_fields[info.field_name].default
    if info.data.get("format") == "thingsboard" and value != default:
        if info.field_name == "commands":
            raise ValueError(
                "with format: thingsboard, commands arrive as ThingsBoard RPC on v1/gateway/rpc: "
                "list them in thingsboard.allow instead"
            )
        raise ValueError("does not apply with format: thingsboard (its topics are fixed)")
    return value


def thingsboard_section(
    cls: Any, value: ThingsBoardConfig | None, info: ValidationInfo
) -> ThingsBoardConfig | None:
    """A field validator of ``thingsboard``: present with ``format: thingsboard`` only, with a
    token or ``broker.username`` (not both)."""
    if "format" not in info.data:  # format itself is wrong, and reported
        return value
    if info.data["format"] != "thingsboard":
        if value is not None:
            raise ValueError("applies only with format: thingsboard")
        return value
    value = value or ThingsBoardConfig()
    broker = info.data.get("broker")
    username = getattr(broker, "username", None)
    if value.token is None and username is None:
        raise ValueError(
            "format: thingsboard needs the gateway device's access token: set "
            "thingsboard.token_file (or broker.username/password for basic MQTT credentials)"
        )
    if value.token is not None and username is not None:
        raise ValueError("the token is the MQTT username: give thingsboard.token or "
                         "broker.username, not both")  # fmt: skip
    return value


# --- the mapping ---------------------------------------------------------------------------------


def ts_millis(ts: str) -> int | None:
    """An event's ISO 8601 ``ts`` as milliseconds since the epoch (None if unreadable)."""
    try:
        moment = datetime.fromisoformat(ts)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MILLISECOND


def flatten(data: dict[str, Any], prefix: str = "", out: dict[str, Any] | None = None) -> dict:
    """Scalar values of ``data`` by dotted key: nested objects flattened (``a.b``), lists as JSON
    text, nulls and non-finite numbers left out, integers beyond 64 bits as text."""
    out = {} if out is None else out
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flatten(value, f"{name}.", out)
        elif value is None:
            continue
        elif isinstance(value, bool | str):
            out[name] = value
        elif isinstance(value, int):
            out[name] = value if -_LONG <= value < _LONG else str(value)
        elif isinstance(value, float):
            if math.isfinite(value):
                out[name] = value
        else:
            out[name] = encode_json(value)
    return out


def values_of(event: Event) -> dict[str, Any]:
    """The ``values`` of one event: ``event`` = its type, then its flattened data."""
    data = event.data or {}
    if "event" in data:
        data = {("data.event" if key == "event" else key): value for key, value in data.items()}
    return {"event": event.type, **flatten(data)}


@dataclass(frozen=True)
class Owner:
    """Whose device a ThingsBoard name is: the plugin instance, its protocol, the device id."""

    plugin: str
    protocol: str
    device: str


@dataclass
class RpcStats:
    """Counters of the RPC channel (shown in /metrics as ``gatewayd_sink_rpc_*``)."""

    received: int = 0  # requests on v1/gateway/rpc
    executed: int = 0  # handed to the dispatcher
    refused: int = 0  # answered with an error without running (malformed, unknown, forbidden)
    dropped: int = 0  # not answered: no device or id could be read, or retained
    answers: int = 0  # answers published
    publish_failures: int = 0


class ThingsBoardGateway:
    """The mqtt sink's ThingsBoard side: events → gateway API messages, RPC → commands.

    ``publish(topic, payload, qos, retain)`` sends an answer on the sink's connection;
    ``dispatcher`` is the daemon's ``CommandDispatcher`` (None: RPC answered with an error);
    ``qos`` is the sink's QoS; ``now`` the wall clock in seconds (events with an unreadable ts).
    """

    subscription = RPC_TOPIC

    def __init__(
        self,
        gateway_id: str,
        config: ThingsBoardConfig,
        *,
        qos: int = 1,
        publish: Callable[[str, bytes, int, bool], Any] | None = None,
        dispatcher: Any = None,
        log: Logger | None = None,
        now: Callable[[], float],
    ) -> None:
        self.gateway = gateway_id
        self.config = config
        self.qos = qos
        self.publish = publish
        self.dispatcher = dispatcher
        self.log = log or Logger(namespace="gatewayd.sinks.thingsboard")
        self.now = now
        self.device_name = NameTemplate(config.device_name)
        self.device_type = NameTemplate(config.device_type) if config.device_type else None
        self.names: OrderedDict[str, Owner] = OrderedDict()
        self.stats = RpcStats()
        self._drop_log = LogThrottle(now)
        self._clash_log = LogThrottle(now)

    @classmethod
    def for_sink(cls, sink: Any) -> ThingsBoardGateway:
        """The gateway API of an mqtt sink (``format: thingsboard``), its gauges registered."""
        gateway = cls(
            sink.gateway,
            sink.config.thingsboard,
            qos=sink.config.qos,
            publish=sink.publish,
            dispatcher=sink.context.commands,
            log=sink.log,
            now=sink.context.reactor.seconds,
        )
        gateway.register_metrics(sink.gauges)
        return gateway

    def broker(self, broker: Any) -> Any:
        """The sink's broker config with the access token as the username (no password) and
        no silent-broker probe (ThingsBoard refuses subscriptions outside its API)."""
        update: dict[str, Any] = {"probe_interval": 0}
        if self.config.token is not None:
            update.update(username=self.config.token.get_secret_value(), password=None)
        return broker.model_copy(update=update)

    def register_metrics(self, gauges: Any) -> None:
        """The RPC counters as the sink's gauges (``gatewayd_sink_rpc_<field>_total``)."""
        for field in ("received", "executed", "refused", "dropped", "answers"):
            gauges.gauge(
                f"rpc_{field}_total",
                f"ThingsBoard RPC: {field} (gatewayd.sinks.thingsboard.RpcStats)",
                lambda field=field: getattr(self.stats, field),
            )

    # --- events → messages -----------------------------------------------------------------

    def messages(self, events: Sequence[Event]) -> list[Message]:
        """A batch as gateway API messages: connects, telemetry, own telemetry, disconnects."""
        connects: dict[str, bytes] = {}
        last_presence: dict[str, bool] = {}
        telemetry: dict[str, list[dict[str, Any]]] = {}
        own: list[dict[str, Any]] = []
        for event in events:
            online = {"device.online": True, "device.offline": False}.get(event.type)
            if not event.device:
                if online is None:
                    own.append(self._entry(event))
                continue
            name = self.device_name.render(event, self.gateway)
            self._learn(name, event)
            if online is None:
                telemetry.setdefault(name, []).append(self._entry(event))
                continue
            last_presence[name] = online
            if online and name not in connects:
                body: dict[str, Any] = {"device": name}
                kind = self.device_type.render(event, self.gateway) if self.device_type else ""
                if kind:
                    body["type"] = kind
                connects[name] = encode_json(body).encode()
        qos = self.qos
        out: list[Message] = [(CONNECT_TOPIC, body, qos, False) for body in connects.values()]
        out += [(TELEMETRY_TOPIC, body, qos, False) for body in self._split(telemetry)]
        if own:
            out += [(OWN_TELEMETRY_TOPIC, body, qos, False) for body in self._split({"": own})]
        out += [
            (DISCONNECT_TOPIC, encode_json({"device": name}).encode(), qos, False)
            for name, online in last_presence.items()
            if not online
        ]
        return out

    def _entry(self, event: Event) -> dict[str, Any]:
        ts = ts_millis(event.ts)
        if ts is None:
            ts = int(self.now() * 1000)
        return {"ts": ts, "values": values_of(event)}

    def _split(self, groups: dict[str, list[dict[str, Any]]]) -> list[bytes]:
        """``{name: entries}`` as JSON payloads of at most ``max_message`` bytes each (one
        device's entries may spread over several); the group ``""`` is the gateway's own list."""
        limit = self.config.max_message
        if not limit:
            return [self._encode(groups)]
        payloads: list[bytes] = []
        current: dict[str, list[dict[str, Any]]] = {}
        size = 2  # {}
        for name, entries in groups.items():
            overhead = len(encode_json(name).encode()) + 4  # "name":[],
            for entry in entries:
                cost = len(encode_json(entry).encode()) + 1
                added = cost + (0 if name in current else overhead)
                if current and size + added > limit:
                    payloads.append(self._encode(current))
                    current, size = {}, 2
                    added = cost + overhead
                if size + added > limit:  # one entry alone is too large
                    self.log.error(
                        "sink telemetry of {name} at {ts} is {size} bytes, more than "
                        "thingsboard.max_message ({limit}): left out",
                        name=name or "the gateway",
                        ts=entry["ts"],
                        size=added,
                        limit=limit,
                    )
                    continue
                current.setdefault(name, []).append(entry)
                size += added
        if current:
            payloads.append(self._encode(current))
        return payloads

    @staticmethod
    def _encode(groups: dict[str, list[dict[str, Any]]]) -> bytes:
        if "" in groups:  # the gateway's own telemetry: a plain list
            return encode_json(groups[""]).encode()
        return encode_json(groups).encode()

    def _learn(self, name: str, event: Event) -> None:
        owner = Owner(event.plugin, event.protocol, event.device or "")
        known = self.names.get(name)
        if known is not None and known != owner and self._clash_log.due():
            self.log.warn(
                "ThingsBoard device name {name!r} now stands for {new} ({old} before): make "
                "thingsboard.device_name unique, e.g. with {{plugin}}",
                name=name,
                new=f"{owner.plugin}/{owner.device}",
                old=f"{known.plugin}/{known.device}",
            )
        self.names[name] = owner
        self.names.move_to_end(name)
        if len(self.names) > MAX_NAMES:
            self.names.popitem(last=False)

    # --- RPC -------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """One message on ``v1/gateway/rpc``: run the request, answer it (or drop it, logged)."""
        if topic != RPC_TOPIC:
            return
        if retain:
            self._drop("a retained RPC request (requests must not be retained)")
            return
        if len(payload) > MAX_RPC_PAYLOAD:
            self._drop(f"an RPC request of {len(payload)} bytes (at most {MAX_RPC_PAYLOAD})")
            return
        try:
            request = loads_external(payload)
        except JsonInputError as exc:
            self._drop(f"an RPC request that is not JSON ({exc})")
            return
        if not isinstance(request, dict):
            self._drop("an RPC request that is not a JSON object")
            return
        data = request.get("data")
        if "id" in request and not (isinstance(data, dict) and "method" in data):
            return  # an answer (ours: the broker sends our own publications back)
        self.stats.received += 1
        name = request.get("device")
        rpc_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name or not _usable_id(rpc_id):
            self._drop("an RPC request without a device name and a numeric data.id")
            return
        assert isinstance(data, dict)
        method, params = data.get("method"), data.get("params")
        if params is None:
            params = {}
        if not isinstance(method, str) or not method:
            return self._refuse(name, rpc_id, 400, "bad_request", "data.method: expected a name")
        if not isinstance(params, dict):
            message = "data.params: expected a JSON object of the command's arguments"
            return self._refuse(name, rpc_id, 400, "bad_request", message)
        owner = self.names.get(name)
        if owner is None:
            message = (
                f"unknown device {name!r}: this gateway has published nothing of it since it "
                "started (an RPC is taken for devices it has reported)"
            )
            return self._refuse(name, rpc_id, 404, "not_found", message)
        if not allowed(self.config.allow, owner.plugin, method):
            message = f"{owner.plugin}.{method} is not in thingsboard.allow"
            return self._refuse(name, rpc_id, 403, "forbidden", message)
        argument = self.device_argument(owner)
        if argument is not None:
            given = params.get(argument)
            if given is not None and given != owner.device:
                message = f"params.{argument}: {name!r} is device {owner.device!r}, not {given!r}"
                return self._refuse(name, rpc_id, 400, "bad_arguments", message)
            params = {**params, argument: owner.device}
        if self.dispatcher is None:
            return self._refuse(name, rpc_id, 503, "unavailable", "no command dispatcher")
        self.stats.executed += 1
        d = self.dispatcher.call(
            owner.plugin, method, params, source="thingsboard", request_id=f"tb-{name}-{rpc_id}"
        )
        d.addCallback(lambda outcome: self._answer(name, rpc_id, *outcome))
        d.addErrback(self._log_failure)
        return None

    def device_argument(self, owner: Owner) -> str | None:
        """The command argument that takes the device id (None: the commands take none)."""
        overrides = self.config.device_argument
        for key in (owner.plugin, owner.protocol):
            if key in overrides:
                return overrides[key]
        return DEVICE_ARGUMENTS.get(owner.protocol)

    def _refuse(self, name: str, rpc_id: Any, status: int, code: str, message: str) -> None:
        self.stats.refused += 1
        self.log.info(
            "ThingsBoard RPC {id} for {name!r} refused ({code}): {message}",
            id=rpc_id,
            name=name,
            code=code,
            message=message,
        )
        self._answer(name, rpc_id, status, error_body(code, message))

    def _answer(self, name: str, rpc_id: Any, status: int, body: dict[str, Any]) -> None:
        if 200 <= status < 300:
            data = body.get("result")
        else:
            error = body.get("error") or {}
            data = {"error": error.get("message"), "code": error.get("code"), "status": status}
        payload = encode_json({"device": name, "id": rpc_id, "data": data}).encode()
        if self.publish is None:
            return
        sent = defer.maybeDeferred(self.publish, RPC_TOPIC, payload, 1, False)
        sent.addCallbacks(self._sent, self._not_sent, errbackArgs=(name, rpc_id))

    def _sent(self, _: Any) -> None:
        self.stats.answers += 1

    def _not_sent(self, failure: Failure, name: str, rpc_id: Any) -> None:
        self.stats.publish_failures += 1
        self.log.warn(
            "the answer to ThingsBoard RPC {id} for {name!r} could not be published: {error}",
            id=rpc_id,
            name=name,
            error=failure.getErrorMessage(),
        )

    def _log_failure(self, failure: Failure) -> None:
        self.log.failure("ThingsBoard RPC failed unexpectedly", failure)

    def _drop(self, what: str) -> None:
        self.stats.dropped += 1
        if self._drop_log.due():
            self.log.warn(
                "ignored {what} on {topic} ({count} ignored so far)",
                what=what,
                topic=RPC_TOPIC,
                count=self.stats.dropped,
            )


def _usable_id(value: Any) -> bool:
    """ThingsBoard's request ids are integers (a string is taken too, to answer with it)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and 0 < len(value) <= 200)
