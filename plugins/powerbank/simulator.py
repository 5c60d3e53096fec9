"""Simulated power-bank cabinets: ``gatewayd simulate powerbank`` and ``gatewayd demo``.

Why: the plugin, its tests, the demo and the benchmark need cabinets that follow the protocol the
way real ones do, including their bad habits. Each ``SimulatedCabinet`` has 3 slots with a random
inventory and one TCP connection (Twisted client) to the plugin. It

* sends a heartbeat (CH) on connecting and every ``heartbeat`` seconds;
* answers CQ with AQ (its inventory);
* performs CC after ``eject_delay``: MC(BO), or MR(BF) with probability ``fail_rate`` (or when
  the bank is not in that slot); with ``lost_rate`` it ejects and never says so (the plugin must
  reconcile);
* now and then returns a bank into an empty slot: MQ, then on RQ(T) MC(RO) or, with
  ``return_fail_rate``, MR(RF);
* resends MC / MR / MQ every ``resend_interval`` until they are answered (AM / AR / RQ), like a
  real cabinet; with ``duplicate_rate`` it sends them twice at once;
* with ``reconnect_rate`` (per heartbeat) opens a new connection without closing the old one, as
  a GPRS modem does; a connection the server closes is reopened with jittered backoff.

For load tests: ``rate`` sends that many heartbeats per second per cabinet (in batches), and
``flood`` sends that many heartbeats as fast as TCP takes them once connected. Every frame
sent or received is counted by packet type in ``SimulatorStats``; ``summary()`` (printed when
``gatewayd simulate`` stops) reports those counts, so a load test can compare them with what the
daemon stored.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import resource
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gatewayd.protocols.powerbank import (
    Codec,
    CrcSettings,
    Heartbeat,
    LendRequest,
    LendResult,
    LendResultAck,
    Packet,
    PowerbankError,
    ReturnQuery,
    ReturnQueryAnswer,
    ReturnResult,
    ReturnResultAck,
    SlotState,
    SlotStatus,
    StatusQuery,
    StatusReport,
)
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from zope.interface import implementer

from gatewayd.plugin import Simulator
from gatewayd.schema import count_argument, host_port_argument, split_host_port

__all__ = ["PowerbankSimulator", "SimulatedCabinet", "SimulatorOptions"]

log = Logger(namespace="gatewayd.plugins.powerbank.simulator")

_STATES = {
    "FU": SlotState.FULL,
    "NF": SlotState.NOT_FULL,
    "EM": SlotState.NO_CHARGE,
    "ER": SlotState.FAULT,
}


@dataclass
class SimulatorOptions:
    """Behaviour of every simulated cabinet (see the module docstring)."""

    cabinets: int = 3
    heartbeat: float = 30.0
    first_imei: int = 860000000000001
    empty_rate: float = 0.2  # P(a slot starts empty)
    fail_rate: float = 0.1
    lost_rate: float = 0.0
    return_interval: float = 60.0  # mean seconds between returns per cabinet; 0: never
    return_fail_rate: float = 0.05
    duplicate_rate: float = 0.05
    reconnect_rate: float = 0.0
    resend_interval: float = 5.0
    eject_delay: float = 0.5
    answer_delay: float = 0.05
    rate: float = 0.0  # heartbeats per second per cabinet (load mode); 0: off
    flood: int = 0  # heartbeats sent at once after connecting (benchmark); 0: off
    connect_rate: float = 500.0  # new connections per second while starting
    seed: int | None = None
    crc: CrcSettings = field(default_factory=CrcSettings)


@dataclass
class SimulatorStats:
    """Counters of everything the cabinets did, for tests, the periodic log and ``summary()``.

    ``sent`` and ``received`` count frames by packet type (``heartbeat``, ``status_report``,
    ``lend_result``, ...: the ``type`` of ``packet_to_dict``); ``errors`` by what went wrong.
    """

    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    connects: int = 0
    reconnects: int = 0
    lends_ok: int = 0
    lends_failed: int = 0
    lends_lost: int = 0
    returns_started: int = 0
    returns_rejected: int = 0
    returns_ok: int = 0
    returns_failed: int = 0
    resends: int = 0
    duplicates: int = 0


@functools.cache
def packet_kind(packet_type: type[Packet]) -> str:
    """``LendResult`` -> ``lend_result``: how the summary names a packet type."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", packet_type.__name__).lower()


class CabinetLink(protocol.Protocol):
    """One TCP connection of a simulated cabinet: splits lines, hands them to the cabinet."""

    def __init__(self, cabinet: SimulatedCabinet) -> None:
        self.cabinet = cabinet
        self.buffer = b""
        self.closed: defer.Deferred = defer.Deferred()  # fires once the connection is gone

    def connectionMade(self) -> None:
        self.cabinet.link_made(self)

    def dataReceived(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()[-1024:]
        for line in lines:
            if self.cabinet.link is self:
                self.cabinet.line_received(line)

    def connectionLost(self, reason: Any = None) -> None:
        self.cabinet.link_lost(self)
        self.closed.callback(None)

    def write(self, data: bytes) -> None:
        self.transport.write(data)


@implementer(IPullProducer)
class _Flood:
    """Writes ``count`` copies of ``frame`` as fast as the transport takes them (pull producer)."""

    chunk = 200

    def __init__(self, link: CabinetLink, frame: bytes, count: int, stats: SimulatorStats) -> None:
        self.link, self.frame, self.left, self.stats = link, frame, count, stats

    def start(self) -> None:
        self.link.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        n = min(self.chunk, self.left)
        self.left -= n
        self.stats.sent[packet_kind(Heartbeat)] += n
        self.link.transport.write(self.frame * n)
        if self.left <= 0:
            self.link.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.left = 0


class _ClientFactory(protocol.ClientFactory):
    noisy = False  # thousands of cabinets: no log line per connection attempt

    def __init__(self, cabinet: SimulatedCabinet) -> None:
        self.cabinet = cabinet

    def buildProtocol(self, addr: Any) -> CabinetLink:
        return CabinetLink(self.cabinet)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.cabinet.connect_failed(reason.getErrorMessage())


class SimulatedCabinet:
    """One cabinet: inventory, its current link, and the protocol behaviour."""

    def __init__(self, sim: PowerbankSimulator, imei: str, rng: random.Random) -> None:
        self.sim = sim
        self.imei = imei
        self.rng = rng
        self.options = sim.options
        self.codec = sim.codec
        self.reactor = sim.reactor
        #: slot -> (state code FU/NF/EM/ER, bank id) or None when empty
        self.slots: dict[int, tuple[str, str | None] | None] = {
            n: self._random_slot() for n in (1, 2, 3)
        }
        self.link: CabinetLink | None = None
        self.links: list[CabinetLink] = []
        #: unanswered MC / MR / MQ -> its resend timer
        self.awaiting: dict[Packet, Any] = {}
        self.returning: tuple[int, str] | None = None
        self.lent: list[str] = []
        self.failures = 0
        self.timers: list[Any] = []
        self.heartbeat_call: Any = None
        self.return_call: Any = None
        self.load_call: Any = None
        self.reconnect_call: Any = None
        self.stopped = False
        self.flooded = False
        self.ever_connected = False
        self.heartbeat_frame = self.codec.build(Heartbeat(imei))

    def _random_slot(self) -> tuple[str, str | None] | None:
        if self.rng.random() < self.options.empty_rate:
            return None
        roll = self.rng.random()
        if roll < 0.08:
            return ("ER", None)
        code = "EM" if roll < 0.18 else ("FU" if roll < 0.6 else "NF")
        return (code, self._new_bank())

    def _new_bank(self) -> str:
        return f"{self.rng.randrange(10**10):010d}"

    # --- links -------------------------------------------------------------------------------

    def connect(self) -> None:
        if self.stopped:
            return
        host, port = self.sim.address
        self.reactor.connectTCP(host, port, _ClientFactory(self), timeout=10)

    def connect_failed(self, error: str = "") -> None:
        errors = self.sim.stats.errors
        errors["connect_failed"] += 1
        if errors["connect_failed"] == 1:  # the first says why; the summary counts the rest
            log.warn(
                "powerbank simulator: cannot connect to {target}: {error}; retrying",
                target=self.sim.target,
                error=error,
            )
        self._reconnect_later()

    def link_made(self, link: CabinetLink) -> None:
        if self.stopped:
            link.transport.loseConnection()
            return
        self.sim.stats.connects += 1
        self.sim.stats.reconnects += self.ever_connected
        self.ever_connected = True
        self.failures = 0
        self.links.append(link)
        self.link = link  # a newer link replaces the older one, which is left open
        self.send(Heartbeat(self.imei))
        for packet in list(self.awaiting):
            self._write(packet)
        if self.options.flood > 0 and not self.flooded:
            self.flooded = True
            _Flood(link, self.heartbeat_frame, self.options.flood, self.sim.stats).start()
        if self.heartbeat_call is None:
            self._schedule_heartbeat(first=True)
        if self.return_call is None and self.options.return_interval > 0:
            self._schedule_return()
        if self.load_call is None and self.options.rate > 0:
            interval = max(0.05, 1.0 / self.options.rate)
            self.load_call = task.LoopingCall(self._load_tick, interval)
            self.load_call.clock = self.reactor
            self.load_call.start(interval, now=False).addErrback(lambda f: None)

    def link_lost(self, link: CabinetLink) -> None:
        if link in self.links:
            self.links.remove(link)
        if link is self.link:
            self.link = None
            if not self.stopped:
                self.sim.stats.errors["connection_lost"] += 1
            self._reconnect_later()

    def _reconnect_later(self) -> None:
        if self.stopped or self.reconnect_call is not None:
            return
        self.failures += 1
        delay = self.sim.backoff(self.failures - 1)

        def again() -> None:
            self.reconnect_call = None
            self.connect()

        self.reconnect_call = self.reactor.callLater(delay, again)

    def stop(self) -> list[defer.Deferred]:
        """Cancel every timer and close every link; returns the links' ``closed`` Deferreds."""
        self.stopped = True
        for call in (
            self.heartbeat_call,
            self.return_call,
            self.reconnect_call,
            *self.timers,
            *self.awaiting.values(),
        ):
            if call is not None and call.active():
                call.cancel()
        self.awaiting.clear()
        self.timers.clear()
        if self.load_call is not None and self.load_call.running:
            self.load_call.stop()
        closing = [link.closed for link in self.links]
        for link in list(self.links):
            link.transport.loseConnection()
        return closing

    # --- sending -----------------------------------------------------------------------------

    def send(self, packet: Packet) -> None:
        """Write one packet to the current link (dropped when there is none)."""
        if self.link is not None:
            self.sim.stats.sent[packet_kind(type(packet))] += 1
            self.link.write(self.codec.build(packet))

    def _write(self, packet: Packet) -> None:
        self.send(packet)
        if self.rng.random() < self.options.duplicate_rate:
            self.sim.stats.duplicates += 1
            self.send(packet)

    def send_until_answered(self, packet: Packet) -> None:
        """MC / MR / MQ: resend every ``resend_interval`` until the server answers."""
        self._write(packet)

        def resend() -> None:
            if packet in self.awaiting:
                self.sim.stats.resends += 1
                self.send(packet)
                self.awaiting[packet] = self.reactor.callLater(self.options.resend_interval, resend)

        self.awaiting[packet] = self.reactor.callLater(self.options.resend_interval, resend)

    def _answered(self, packet: Packet) -> bool:
        call = self.awaiting.pop(packet, None)
        if call is None:
            return False
        if call.active():
            call.cancel()
        return True

    def later(self, delay: float, function: Any, *args: Any) -> None:
        def run() -> None:
            self.timers.remove(call)
            if not self.stopped:
                function(*args)

        call = self.reactor.callLater(delay, run)
        self.timers.append(call)

    # --- periodic behaviour ------------------------------------------------------------------

    def _schedule_heartbeat(self, first: bool = False) -> None:
        interval = self.options.heartbeat
        delay = self.rng.uniform(0.5, 1.0) * interval if first else interval
        self.heartbeat_call = self.reactor.callLater(delay, self._heartbeat)

    def _heartbeat(self) -> None:
        self.send(Heartbeat(self.imei))
        if self.link is not None and self.rng.random() < self.options.reconnect_rate:
            self.connect()  # a second connection; the old one stays open until the server acts
        self._schedule_heartbeat()

    def _load_tick(self, interval: float) -> None:
        if self.link is None:
            return
        count = max(1, round(self.options.rate * interval))
        self.sim.stats.sent[packet_kind(Heartbeat)] += count
        self.link.write(self.heartbeat_frame * count)

    def _schedule_return(self) -> None:
        delay = self.rng.expovariate(1.0 / self.options.return_interval)
        self.return_call = self.reactor.callLater(delay, self._try_return)

    def _try_return(self) -> None:
        self._schedule_return()
        if self.returning is not None or self.link is None:
            return
        empty = [n for n, content in self.slots.items() if content is None]
        if not empty:
            return
        slot = self.rng.choice(empty)
        bank = self.lent.pop() if self.lent and self.rng.random() < 0.7 else self._new_bank()
        self.returning = (slot, bank)
        self.sim.stats.returns_started += 1
        self.send_until_answered(ReturnQuery(self.imei, slot, bank))

    # --- what the server says ----------------------------------------------------------------

    def line_received(self, line: bytes) -> None:
        stats = self.sim.stats
        try:
            packet = self.codec.parse(line)
        except PowerbankError:
            stats.errors["unreadable_line"] += 1
            return
        if packet.imei != self.imei:
            stats.errors["wrong_imei"] += 1
            return
        if packet.FROM_DEVICE:
            stats.errors["unexpected_packet"] += 1
            return
        stats.received[packet_kind(type(packet))] += 1
        if isinstance(packet, StatusQuery):
            self.later(self.options.answer_delay, self.send, self.status_report())
        elif isinstance(packet, LendRequest):
            self.later(self.options.eject_delay, self._eject, packet.slot, packet.bank)
        elif isinstance(packet, ReturnQueryAnswer):
            self._return_answered(packet)
        elif isinstance(packet, LendResultAck | ReturnResultAck):
            kind = LendResult if isinstance(packet, LendResultAck) else ReturnResult
            self._answered(kind(self.imei, packet.slot, packet.bank, packet.ok))

    def status_report(self) -> StatusReport:
        slots = []
        for number, content in self.slots.items():
            if content is not None:
                code, bank = content
                slots.append(SlotStatus(number, _STATES[code], bank))
        return StatusReport(self.imei, tuple(slots))

    def _eject(self, slot: int, bank: str) -> None:
        content = self.slots.get(slot)
        present = content is not None and content[1] == bank and content[0] != "ER"
        if present and self.rng.random() < self.options.lost_rate:
            self.slots[slot] = None  # ejected, but the MC is never sent
            self.lent.append(bank)
            self.sim.stats.lends_lost += 1
            return
        if present and self.rng.random() >= self.options.fail_rate:
            self.slots[slot] = None
            self.lent.append(bank)
            self.sim.stats.lends_ok += 1
            self.send_until_answered(LendResult(self.imei, slot, bank, True))
        else:
            self.sim.stats.lends_failed += 1
            self.send_until_answered(LendResult(self.imei, slot, bank, False))

    def _return_answered(self, answer: ReturnQueryAnswer) -> None:
        query = ReturnQuery(self.imei, answer.slot, answer.bank)
        if not self._answered(query):
            return  # an answer to a duplicate MQ
        if not answer.accepted:
            self.sim.stats.returns_rejected += 1
            self.returning = None
            return
        self.later(self.options.answer_delay, self._insert, answer.slot, answer.bank)

    def _insert(self, slot: int, bank: str) -> None:
        self.returning = None
        if self.slots.get(slot) is None and self.rng.random() >= self.options.return_fail_rate:
            self.slots[slot] = ("NF", bank)
            self.sim.stats.returns_ok += 1
            self.send_until_answered(ReturnResult(self.imei, slot, bank, True))
        else:
            self.sim.stats.returns_failed += 1
            self.send_until_answered(ReturnResult(self.imei, slot, bank, False))


class PowerbankSimulator(Simulator):
    """``gatewayd simulate powerbank --connect HOST:PORT --cabinets N --heartbeat SECONDS``."""

    family = "powerbank"
    sent_noun = received_noun = "frames"
    backoff = staticmethod(backoffPolicy(initialDelay=1.0, maxDelay=30.0, factor=2.0))

    def __init__(self, reactor: Any, target: str, options: SimulatorOptions | None = None) -> None:
        self.reactor = reactor
        self.target = target
        self.options = options or SimulatorOptions()
        self.codec = Codec(self.options.crc)
        host, port = split_host_port(target)
        self.address = ("127.0.0.1" if host in ("0.0.0.0", "", "::") else host, port)
        self.stats = SimulatorStats()
        rng = random.Random(self.options.seed)
        self.cabinets = [
            SimulatedCabinet(
                self, f"{self.options.first_imei + n:015d}", random.Random(rng.random())
            )
            for n in range(self.options.cabinets)
        ]
        self._starting: Any = None
        self._summary: task.LoopingCall | None = None

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        defaults = SimulatorOptions()
        add = parser.add_argument
        add(
            "--connect",
            default="127.0.0.1:9000",
            type=host_port_argument,
            metavar="HOST:PORT",
            help="the plugin's listen",
        )
        add("--cabinets", type=count_argument, default=defaults.cabinets, help="how many cabinets")
        add("--heartbeat", type=float, default=defaults.heartbeat, metavar="SECONDS")
        add(
            "--first-imei",
            type=int,
            default=defaults.first_imei,
            help="IMEI of the first cabinet; the others count up",
        )
        add("--fail-rate", type=float, default=defaults.fail_rate, help="P(a lend fails: MR,BF)")
        add(
            "--lost-rate",
            type=float,
            default=defaults.lost_rate,
            help="P(a lend ejects the bank but never reports it)",
        )
        add(
            "--return-interval",
            type=float,
            default=defaults.return_interval,
            metavar="SECONDS",
            help="mean time between returns per cabinet (0: never)",
        )
        add("--return-fail-rate", type=float, default=defaults.return_fail_rate)
        add(
            "--duplicate-rate",
            type=float,
            default=defaults.duplicate_rate,
            help="P(an MC/MR/MQ is sent twice)",
        )
        add(
            "--reconnect-rate",
            type=float,
            default=defaults.reconnect_rate,
            help="P(per heartbeat) of opening a new connection without closing the old one",
        )
        add(
            "--resend-interval",
            type=float,
            default=defaults.resend_interval,
            metavar="SECONDS",
            help="resend an unanswered MC/MR/MQ this often",
        )
        add("--eject-delay", type=float, default=defaults.eject_delay, metavar="SECONDS")
        add(
            "--rate",
            type=float,
            default=0.0,
            metavar="FRAMES_PER_S",
            help="load mode: heartbeats per second per cabinet",
        )
        add(
            "--flood",
            type=int,
            default=0,
            metavar="N",
            help="benchmark: N heartbeats per cabinet as fast as TCP takes them",
        )
        add(
            "--connect-rate",
            type=float,
            default=defaults.connect_rate,
            help="new connections per second while starting",
        )
        add("--empty-rate", type=float, default=defaults.empty_rate, help="P(a slot starts empty)")
        add("--seed", type=int, default=None)
        add("--crc-algorithm", default="modbus")
        add("--crc-span", default="imei_to_last_comma")
        add("--crc-byte-order", default="big")
        add("--crc-case", default="upper")

    @classmethod
    def from_args(cls, args: Any, reactor: Any) -> PowerbankSimulator:
        options = SimulatorOptions(
            cabinets=args.cabinets,
            heartbeat=args.heartbeat,
            first_imei=args.first_imei,
            empty_rate=args.empty_rate,
            fail_rate=args.fail_rate,
            lost_rate=args.lost_rate,
            return_interval=args.return_interval,
            return_fail_rate=args.return_fail_rate,
            duplicate_rate=args.duplicate_rate,
            reconnect_rate=args.reconnect_rate,
            resend_interval=args.resend_interval,
            eject_delay=args.eject_delay,
            rate=args.rate,
            flood=args.flood,
            connect_rate=args.connect_rate,
            seed=args.seed,
            crc=CrcSettings(args.crc_algorithm, args.crc_span, args.crc_byte_order, args.crc_case),
        )
        simulator = cls(reactor, args.connect, options)
        simulator.log_summary_every = 10.0
        return simulator

    @classmethod
    def for_demo(cls, plugin_config: Any, reactor: Any) -> PowerbankSimulator:
        crc = plugin_config.crc
        options = SimulatorOptions(
            cabinets=5,
            heartbeat=plugin_config.heartbeat_interval,
            empty_rate=0.6,
            return_interval=10.0,
            return_fail_rate=0.15,
            duplicate_rate=0.1,
            reconnect_rate=0.02,
            crc=CrcSettings(crc.algorithm, crc.span, crc.byte_order, crc.case),
        )
        return cls(reactor, plugin_config.listen, options)

    log_summary_every: float | None = None

    def start(self) -> defer.Deferred | None:
        _raise_open_file_limit(len(self.cabinets) + 256)
        batch = max(1, int(self.options.connect_rate / 20))  # connect in 20 batches a second

        def connect_batches() -> Any:
            for index, cabinet in enumerate(self.cabinets):
                cabinet.connect()
                if index % batch == batch - 1:
                    yield task.deferLater(self.reactor, 0.05, lambda: None)

        self._starting = task.cooperate(connect_batches())
        if self.log_summary_every:
            self._summary = task.LoopingCall(self._log_summary)
            self._summary.clock = self.reactor
            self._summary.start(self.log_summary_every, now=False)
        return None

    def connected(self) -> int:
        """How many cabinets have a link now."""
        return sum(1 for c in self.cabinets if c.link is not None)

    def _log_summary(self) -> None:
        log.info(
            "powerbank simulator: {connected}/{total} connected; {stats}",
            connected=self.connected(),
            total=len(self.cabinets),
            stats=self.stats,
        )

    def summary(self) -> dict[str, Any]:
        """Frames sent and received by packet type, errors, connects, lend and return outcomes."""
        stats = self.stats
        return {
            "sent": dict(stats.sent),
            "received": dict(stats.received),
            "errors": dict(stats.errors),
            "cabinets": len(self.cabinets),
            "connects": stats.connects,
            "reconnects": stats.reconnects,
            "resends": stats.resends,
            "duplicates": stats.duplicates,
            "lends": {"ok": stats.lends_ok, "failed": stats.lends_failed, "lost": stats.lends_lost},
            "returns": {
                "started": stats.returns_started,
                "rejected": stats.returns_rejected,
                "ok": stats.returns_ok,
                "failed": stats.returns_failed,
            },
        }

    #: Seconds ``stop()`` waits at most for the cabinets' connections to close.
    close_timeout = 5.0

    def stop(self) -> defer.Deferred:
        """Stop every cabinet. Fires once their connections closed, so every frame counted as
        sent was flushed to the socket before the summary is printed (or ``close_timeout``)."""
        if self._starting is not None:
            with contextlib.suppress(task.TaskDone):
                self._starting.stop()
        if self._summary is not None and self._summary.running:
            self._summary.stop()
        closing = [d for cabinet in self.cabinets for d in cabinet.stop()]
        return _at_most(defer.DeferredList(closing), self.reactor, self.close_timeout)


def _at_most(waited: defer.Deferred, reactor: Any, seconds: float) -> defer.Deferred:
    """Fires (with None, never failing) when ``waited`` does or after ``seconds``."""
    done: defer.Deferred = defer.Deferred()

    def fire(_: Any = None) -> None:
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)

    timer = reactor.callLater(seconds, fire)
    waited.addBoth(fire)
    return done


def _raise_open_file_limit(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted or soft == resource.RLIM_INFINITY:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
