"""Simulated hy/gw heating gateways: ``gatewayd simulate heating`` and ``gatewayd demo``.

Each simulated gateway is an MQTT client whose client id is its gw_id and whose last will is
the firmware's msg 70 on ``{prefix}/set/<gw_id>/`` (trailing slash, QoS 1), as the firmware
does (reference §1.1). It publishes like the firmware:

- msg 1 at connect (power-up) and every ``heartbeat`` seconds, with the unquoted
  ``"CSQ":99,99`` of the seed document;
- msg 20 for each of its meters every ``interval`` seconds (staggered), with frames built by
  the CJ/T 188 codec: 55H building valves (meter protocol 2034), 53H household valves (2008)
  and standard heat meters T=20H (protocol code 0188: invented here, the real list is unknown);
- answers msg 1, 2, 12, 18, 30 and 40 with the firmware's stat codes (2 ok, 1 failed, 401 for a
  msg 40 without ``transparent`` or with a bad port). Msg 18 is followed by msg 20 reports,
  msg 30 by a power loss (the broker publishes the will) and a reconnect with ``has_rst: 1``,
  msg 40 by the meter's reply: a 96H ack (55H), an A019 echo (53H) or the 901F reading.

Meter values drift a little between reports; a valve reports the opening last set.

Each gateway counts what it publishes by message (``msg_1``, ``msg_20``, ..., and ``msg_40_meter``
for a meter's reply), the commands it receives and its publish errors; ``summary()`` adds them up
for the line ``gatewayd simulate`` prints when it stops.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gatewayd.protocols import cjt188, hygw
from gatewayd.protocols.errors import Cjt188Error, HygwError
from twisted.internet import defer

from gatewayd.mqtt import CONNECTED, BrokerConfig, MqttClient, MqttError, NotConnected, Will
from gatewayd.plugin import Simulator
from gatewayd.schema import count_argument, host_port_argument, read_secret, split_host_port

__all__ = ["HeatingSimulator", "SimulatedGateway", "SimulatedMeter", "bcd_le"]

PROTOCOL_BUILDING_VALVE = "2034"
PROTOCOL_HOUSEHOLD_VALVE = "2008"
PROTOCOL_HEAT_METER = "0188"  # invented for the simulator (reference §8 question 5)
HEAT_METER = 0x20
MANUFACTURER = "001111"
FIRST_GW_ID = 2345678903  # the seed's 02345678903


def bcd_le(value: int, size: int) -> bytes:
    """``value`` as ``size`` BCD bytes, low byte first (CJ/T 188 order)."""
    digits = f"{value:0{size * 2}d}"
    if len(digits) > size * 2 or value < 0:
        raise ValueError(f"{value} does not fit {size} BCD bytes")
    return bytes.fromhex(digits)[::-1]


def bcd_clock(moment: datetime) -> bytes:
    """CJ/T 188 real time: BCD ss mm hh DD MM YY(lo) YY(hi)."""
    parts = (moment.second, moment.minute, moment.hour, moment.day, moment.month)
    year = moment.year
    return bytes.fromhex("".join(f"{p:02d}" for p in parts) + f"{year % 100:02d}{year // 100:02d}")


@dataclass
class SimulatedMeter:
    """One meter behind a simulated gateway; builds its 901F reading and answers commands."""

    number: str
    protocol: str
    port: int
    rng: random.Random = field(default_factory=random.Random)
    opening: float = 100.0
    heat_total: int = 4532312  # kWh (55H, vendor integer reading)
    volume: int = 345678  # x10 L (55H)

    @property
    def meter_type(self) -> int:
        return {
            PROTOCOL_BUILDING_VALVE: cjt188.METER_BUILDING_VALVE,
            PROTOCOL_HOUSEHOLD_VALVE: cjt188.METER_HOUSEHOLD_VALVE,
        }.get(self.protocol, HEAT_METER)

    @property
    def meter_id(self) -> str:
        return f"{self.number}{self.protocol}{self.port:02X}"

    @property
    def address(self) -> str:
        return self.number + MANUFACTURER

    def reading(self) -> bytes:
        """The meter's 901F reply (without preambles), as the gateway forwards it in msg 20."""
        self.heat_total += self.rng.randrange(0, 5)
        self.volume += self.rng.randrange(0, 20)
        kind = self.meter_type
        if kind == cjt188.METER_BUILDING_VALVE:
            data, ser = self._building_valve_data(), 0x00
        elif kind == cjt188.METER_HOUSEHOLD_VALVE:
            data, ser = self._household_valve_data(), 0x01
        else:
            data, ser = self._heat_meter_data(), 0x00
        return cjt188.build_frame(kind, self.address, 0x81, cjt188.DI_METERING_DATA, ser, data)

    def _temperatures(self) -> tuple[float, float]:
        supply = round(self.rng.uniform(45.0, 55.0), 2)
        return supply, round(supply - self.rng.uniform(5.0, 12.0), 2)

    def _building_valve_data(self) -> bytes:
        supply, ret = self._temperatures()
        tenths = round(self.opening * 10).to_bytes(2, "little")
        return b"".join(
            [
                bcd_le(self.heat_total % 10**8, 4) + b"\x05",
                bcd_le(self.rng.randrange(0, 5000), 4) + b"\x32",  # flow, L/h
                bcd_le(self.volume % 10**8, 4) + b"\x2a",  # x10 L
                bcd_le(round(supply * 100), 3),
                bcd_le(round(ret * 100), 3),
                bytes(4) + b"\x05",
                bytes(4) + b"\x2c",
                bytes(4),
                tenths,  # opening
                tenths,  # set-point
                bytes(2),
                bytes.fromhex("E803E803"),
                bytes(2),
                bytes.fromhex("EA00"),
                bytes.fromhex("8185CB0123F740"),
            ]
        )

    def _household_valve_data(self) -> bytes:
        supply, ret = self._temperatures()
        room = round(self.rng.uniform(18.0, 24.0) * 10)
        return b"".join(
            [
                bytes.fromhex("1073221201"),
                room.to_bytes(2, "little"),
                (220).to_bytes(2, "little"),  # set-point 22.0 °C
                b"\x55",
                bytes([round(self.opening)]),
                bytes.fromhex("0A28006F33000064"),
                round(supply * 10).to_bytes(2, "big"),
                round(ret * 10).to_bytes(2, "big"),
                bytes.fromhex("620105063005502000"),
                bytes([round(self.rng.uniform(3.3, 3.7) * 50)]),  # battery, raw x 2 / 100 V
                b"\x23",
                bcd_clock(datetime.now()),
                b"\x40",
            ]
        )

    def _heat_meter_data(self) -> bytes:
        supply, ret = self._temperatures()
        return b"".join(
            [
                bcd_le(self.heat_total // 2 % 10**6 * 100, 4) + b"\x05",  # settlement-day heat
                bcd_le(self.heat_total % 10**6 * 100, 4) + b"\x05",
                bcd_le(self.rng.randrange(0, 5000), 4) + b"\x17",  # kW, 2 decimals
                bcd_le(self.rng.randrange(0, 30000), 4) + b"\x35",  # m³/h, 4 decimals
                bcd_le(self.volume % 10**6 * 100, 4) + b"\x2c",
                bcd_le(round(supply * 100), 3),
                bcd_le(round(ret * 100), 3),
                bcd_le(self.heat_total // 1000 % 10**6, 3),  # working hours
                bcd_clock(datetime.now()),
                bytes(2),  # ST: valve open, battery fine
            ]
        )

    def answer(self, request: cjt188.Frame) -> bytes | None:
        """The reply to a transparent frame addressed to this meter; None if it stays silent."""
        if request.address != self.address or request.meter_type != self.meter_type:
            return None
        kind = self.meter_type
        if (
            kind == cjt188.METER_BUILDING_VALVE
            and request.control == 0x16
            and request.di == cjt188.DI_BUILDING_VALVE_OPENING
            and len(request.data) == 2
        ):
            self.opening = int.from_bytes(request.data, "little") / 10
            return cjt188.build_frame(
                kind, self.address, 0x96, cjt188.DI_BUILDING_VALVE_OPENING, request.ser or 0
            )
        if (
            kind == cjt188.METER_HOUSEHOLD_VALVE
            and request.control == 0x04
            and request.di == cjt188.DI_HOUSEHOLD_VALVE_OPENING
            and len(request.data) == 1
        ):
            self.opening = float(request.data[0])
            return cjt188.build_frame(
                kind,
                self.address,
                0x84,
                cjt188.DI_HOUSEHOLD_VALVE_OPENING,
                request.ser or 0,
                request.data,
            )
        if request.control == 0x01 and request.di == cjt188.DI_METERING_DATA:
            return self.reading()
        return None


def make_meters(gateway_index: int, count: int, seed: int | None = None) -> list[SimulatedMeter]:
    """``count`` meters cycling 55H building valve, 53H household valve, heat meter."""
    meters = []
    for m in range(count):
        protocol, port = (
            (PROTOCOL_BUILDING_VALVE, 0),
            (PROTOCOL_HOUSEHOLD_VALVE, 0),
            (PROTOCOL_HEAT_METER, 1),
        )[m % 3]
        number = f"{27100000 + gateway_index * 1000 + m:08d}"
        rng = random.Random(None if seed is None else seed * 100003 + gateway_index * 1009 + m)
        meters.append(SimulatedMeter(number, protocol, port, rng=rng))
    return meters


class SimulatedGateway:
    """One gateway: its MQTT client, its meters, its periods and its timers."""

    def __init__(self, sim: HeatingSimulator, gw_id: str, meters: list[SimulatedMeter]) -> None:
        self.sim = sim
        self.gw_id = gw_id
        self.meters = meters
        self.reactor = sim.reactor
        self.prefix = sim.prefix
        self.silent = False
        self.has_reset = 0
        self.periods: dict[str, Any] = {
            "main_interval": 10,
            "copy_interval": 60,
            "heating_start": "20XX-09-01",
            "heating_end": "20XX-05-01",
        }
        #: Messages published by kind (``msg_<msg_id>``; ``msg_40_meter``: a meter's reply).
        self.sent: Counter[str] = Counter()
        #: Commands it could not read, messages it could not publish while disconnected.
        self.errors: Counter[str] = Counter()
        self.received: list[hygw.Message] = []
        self._timers: list[Any] = []
        broker = sim.broker.model_copy(update={"client_id": gw_id, "probe_interval": 0.0})
        self.link = MqttClient(
            self.reactor,
            broker,
            client_id=gw_id,
            on_message=self._on_command,
            subscriptions=[(f"{self.prefix}/get/{gw_id}/#", 2)],
            will=Will(hygw.will_topic(gw_id, self.prefix), hygw.build_last_will(gw_id), qos=1),
            name=f"sim-{gw_id}",
        )
        self.link.add_state_listener(self._link_state)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.link.start()
        for meter in self.meters:
            if self.sim.interval > 0:
                self._later(self.sim.rng.uniform(0, self.sim.interval), self._report_loop, meter)
        if self.sim.heartbeat > 0:
            self._later(self.sim.heartbeat, self._heartbeat_loop)

    def stop(self) -> defer.Deferred:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        return self.link.stop()

    def power_loss(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes our last will."""
        self.link.drop("simulated power loss")

    def _link_state(self, state: str) -> None:
        if state == CONNECTED:
            self._publish("msg_1", self._status_report())  # power-up report
            self.has_reset = 0

    def _later(self, delay: float, function: Any, *args: Any) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self.reactor.callLater(delay, function, *args))

    # --- publishing --------------------------------------------------------------------------

    @property
    def published(self) -> int:
        """Messages published so far."""
        return sum(self.sent.values())

    def _publish(self, kind: str, payload: bytes) -> bool:
        if self.silent:
            return False
        try:
            self.link.publish(hygw.topic("set", self.gw_id, self.prefix), payload, qos=0)
        except NotConnected:
            self.errors["not_connected"] += 1
            return False
        except MqttError:  # counted in the link's stats.publish_failures
            return False
        self.sent[kind] += 1
        return True

    def _status_report(self, stat: int = hygw.STAT_OK) -> bytes:
        main = sum(1 for m in self.meters if m.meter_type == cjt188.METER_BUILDING_VALVE)
        return hygw.build_status_report(
            self.gw_id,
            stat=stat,
            csq="99,99",
            csq_quoted=False,
            rssi=-self.sim.rng.randrange(60, 100),
            sinr=self.sim.rng.randrange(0, 20),
            has_rst=self.has_reset,
            main_meter_total=main,
            copy_meter_total=len(self.meters) - main,
        )

    def report(self, meter: SimulatedMeter) -> bool:
        """Publish one msg 20 for ``meter`` now."""
        return self._publish(
            "msg_20", hygw.build_meter_report(self.gw_id, meter.meter_id, meter.reading())
        )

    def _report_loop(self, meter: SimulatedMeter) -> None:
        self.report(meter)
        self._later(self.sim.interval, self._report_loop, meter)

    def _heartbeat_loop(self) -> None:
        self._publish("msg_1", self._status_report())
        self._later(self.sim.heartbeat, self._heartbeat_loop)

    # --- commands ----------------------------------------------------------------------------

    def _on_command(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.silent:
            return
        try:
            message = hygw.decode_message(payload, topic=topic, prefix=self.prefix)
        except HygwError:
            self.errors["unreadable_command"] += 1
            return  # the firmware's strstr parser ignores what it cannot read
        if message.gw_id not in (self.gw_id, hygw.BROADCAST_GW_ID):
            return
        self.received.append(message)
        if message.msg_id in self.sim.unanswered:
            return
        self._later(self.sim.answer_delay, self._answer, message)

    def _answer(self, message: hygw.Message) -> None:
        msg_id = message.msg_id
        stat = self.sim.stat_overrides.get(msg_id)
        if msg_id == 1:
            self._publish("msg_1", self._status_report(stat or hygw.STAT_OK))
        elif msg_id == 2:
            self._publish(
                "msg_2",
                hygw.build_periods_report(self.gw_id, stat=stat or hygw.STAT_OK, **self.periods),
            )
        elif msg_id == 12:
            self._set_periods(message, stat)
        elif msg_id == 18:
            self._read_now(message, stat)
        elif msg_id == 30:
            self._publish("msg_30", hygw.build_stat_reply(30, self.gw_id, stat or hygw.STAT_OK))
            if (stat or hygw.STAT_OK) == hygw.STAT_OK:
                self.has_reset = 1
                self._later(0.1, self.power_loss)
        elif msg_id == 40:
            self._transparent(message, stat)

    def _set_periods(self, message: hygw.Message, stat: int | None) -> None:
        fields = message.fields
        ok = all(isinstance(fields.get(k), int) for k in ("main_interval", "copy_interval"))
        ok = ok and all(isinstance(fields.get(k), str) for k in ("heating_start", "heating_end"))
        if ok and stat is None:
            for key in ("main_interval", "copy_interval", "heating_start", "heating_end"):
                self.periods[key] = fields[key]
        code = stat or (hygw.STAT_OK if ok else hygw.STAT_FAILED)
        self._publish("msg_12", hygw.build_stat_reply(12, self.gw_id, code))

    def _read_now(self, message: hygw.Message, stat: int | None) -> None:
        code = stat or hygw.STAT_OK
        self._publish("msg_18", hygw.build_stat_reply(18, self.gw_id, code))
        if code != hygw.STAT_OK:
            return
        fields = message.fields
        main, copy = fields.get("main_immediately") == 1, fields.get("copy_immediately") == 1
        everything = fields.get("up_immediately") == 1
        delay = 0.05
        for meter in self.meters:
            is_main = meter.meter_type == cjt188.METER_BUILDING_VALVE
            if everything or (main and is_main) or (copy and not is_main):
                self._later(delay, self.report, meter)
                delay += 0.02

    def _transparent(self, message: hygw.Message, stat: int | None) -> None:
        fields = message.fields
        port = fields.get("transparent_port")
        text = fields.get("transparent")
        if not isinstance(text, str) or not isinstance(port, int) or not 0 <= port <= 5:
            self._publish("msg_40", hygw.build_stat_reply(40, self.gw_id, 401))
            return
        code = stat or hygw.STAT_OK
        self._publish("msg_40", hygw.build_stat_reply(40, self.gw_id, code))
        if code != hygw.STAT_OK:
            return
        try:
            request = cjt188.parse_hex(text)
        except Cjt188Error:
            return  # garbage on the bus: no meter answers
        for meter in self.meters:
            if meter.port != port:
                continue
            reply = meter.answer(request)
            if reply is not None:
                payload = hygw.build_transparent_reply(self.gw_id, [reply], port=port)
                self._later(self.sim.bus_delay, self._publish, "msg_40_meter", payload)
                return


class HeatingSimulator(Simulator):
    """hy/gw heating gateways with 55H/53H valves and heat meters, on an MQTT broker."""

    family = "heating"
    sent_noun, received_noun = "messages", "commands"

    def __init__(
        self,
        reactor: Any,
        broker: BrokerConfig,
        *,
        gateways: int = 1,
        meters: int = 3,
        interval: float = 10.0,
        heartbeat: float = 60.0,
        prefix: str = hygw.DEFAULT_PREFIX,
        answer_delay: float = 0.05,
        bus_delay: float = 0.1,
        first_gw_id: int = FIRST_GW_ID,
        seed: int | None = None,
        start_broker: bool = False,
    ) -> None:
        self.reactor = reactor
        self.broker = broker
        self.prefix = prefix
        self.interval = interval
        self.heartbeat = heartbeat
        self.answer_delay = answer_delay
        self.bus_delay = bus_delay
        self.rng = random.Random(seed)
        self.start_broker = start_broker
        self.mosquitto: Any = None
        #: Tests: msg_id -> stat the gateways answer instead of the usual one.
        self.stat_overrides: dict[int, int] = {}
        #: Tests: msg_ids the gateways ignore (no answer at all).
        self.unanswered: set[int] = set()
        self.gateways: dict[str, SimulatedGateway] = {}
        for g in range(gateways):
            gw_id = f"{first_gw_id + g:011d}"
            self.gateways[gw_id] = SimulatedGateway(self, gw_id, make_meters(g, meters, seed))

    # --- command line and demo ---------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        parser.add_argument(
            "--broker",
            default="127.0.0.1:1883",
            type=host_port_argument,
            metavar="HOST:PORT",
            help="MQTT broker",
        )
        parser.add_argument("--gateways", type=count_argument, default=1, help="number of gateways")
        parser.add_argument("--meters", type=count_argument, default=3, help="meters per gateway")
        parser.add_argument(
            "--interval", type=float, default=10.0, help="seconds between two reports of a meter"
        )
        parser.add_argument(
            "--heartbeat", type=float, default=60.0, help="seconds between status reports"
        )
        parser.add_argument("--prefix", default=hygw.DEFAULT_PREFIX, help="topic prefix")
        parser.add_argument("--username", default=None)
        parser.add_argument("--password-file", default=None)
        parser.add_argument("--seed", type=int, default=None, help="repeatable values")

    @classmethod
    def from_args(cls, args: Any, reactor: Any) -> HeatingSimulator:
        host, port = split_host_port(args.broker)
        broker: dict[str, Any] = {"host": host, "port": port, "reconnect_initial": 0.5}
        if args.username:
            broker["username"] = args.username
        if args.password_file:
            broker["password"] = read_secret(args.password_file)
        return cls(
            reactor,
            BrokerConfig.model_validate(broker),
            gateways=args.gateways,
            meters=args.meters,
            interval=args.interval,
            heartbeat=args.heartbeat,
            prefix=args.prefix,
            seed=args.seed,
        )

    @classmethod
    def for_demo(cls, plugin_config: Any, reactor: Any) -> HeatingSimulator:
        """Two gateways with one meter of each type, against the plugin's broker; when that
        broker is on loopback and nothing listens there, a mosquitto is started for it."""
        broker = plugin_config.broker.model_copy(
            update={"client_id": None, "reconnect_initial": 0.5, "reconnect_max": 5.0}
        )
        return cls(
            reactor,
            broker,
            gateways=2,
            meters=3,
            interval=5.0,
            heartbeat=30.0,
            prefix=plugin_config.topic_prefix,
            start_broker=True,
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.start_broker and self._loopback() and not self._listening():
            from gatewayd.testing import Mosquitto

            self.mosquitto = Mosquitto(port=self.broker.port).start()
        for gateway in self.gateways.values():
            gateway.start()

    def summary(self) -> dict[str, Any]:
        """Messages published by kind, commands received by ``msg_<msg_id>``, errors (the
        gateways' own and their MQTT links' failed connects), connects and disconnects."""
        sent: Counter[str] = Counter()
        received: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        connects = disconnects = 0
        for gateway in self.gateways.values():
            sent.update(gateway.sent)
            received.update(f"msg_{message.msg_id}" for message in gateway.received)
            errors.update(gateway.errors)
            errors["connect_failed"] += gateway.link.stats.connect_failures
            errors["publish_failed"] += gateway.link.stats.publish_failures
            connects += gateway.link.stats.connects
            disconnects += gateway.link.stats.disconnects
        return {
            "sent": dict(sent),
            "received": dict(received),
            "errors": {kind: n for kind, n in errors.items() if n},
            "gateways": len(self.gateways),
            "meters": sum(len(gateway.meters) for gateway in self.gateways.values()),
            "connects": connects,
            "disconnects": disconnects,
        }

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for gateway in self.gateways.values():
            yield gateway.stop()
        if self.mosquitto is not None:
            self.mosquitto.stop()
            self.mosquitto = None

    def _loopback(self) -> bool:
        host = self.broker.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _listening(self) -> bool:
        try:
            socket.create_connection((self.broker.host, self.broker.port), timeout=0.5).close()
        except OSError:
            return False
        return True
