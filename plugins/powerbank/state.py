"""Per-cabinet state and the lend / return / query flows of the power-bank protocol.

Why: the rules that make lending safe live here, apart from sockets and parsing, so they can be
driven by a ``twisted.internet.task.Clock`` and a fake connection in tests:

* cabinets are keyed by IMEI, not by connection: a new connection from the same IMEI replaces the
  old one and inherits every pending operation; replies go to whichever connection is current;
* a lend is never resent (each CC may eject a bank): after ``lend_timeout`` the cabinet is asked
  for its status (CQ) and the lend is reconciled from the AQ answer; a late MC(BO) is still
  acknowledged and reconciles a timed-out lend once;
* every MC / MR / MQ is answered, duplicates again, but its effects (events, state) apply once
  within ``duplicate_window``, also across a restart or a ``kill -9``: the event of a result
  frame carries an idempotency key (``result_key``) that the durable queues commit with it, and
  the lends that closed without a result (``lend.timeout``, ``lend.reconciled``) carry one too
  (``closed_key``), so a restarted daemon still knows them (``seen``);
* AM / AR acknowledge a result only once the event that records it is durable (``emit()``'s
  Deferred fired with None), so an acknowledged lend or return is never lost.

A connection is any object with ``address``, ``imei`` (set here when the connection is bound),
``send_packet(packet)`` and ``close(reason)``; ``plugins.powerbank.server`` provides the TCP one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gatewayd.protocols.powerbank import (
    Heartbeat,
    LendRequest,
    LendResult,
    Packet,
    ReturnQuery,
    ReturnResult,
    SlotState,
    SlotStatus,
    StatusQuery,
    StatusReport,
)
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.logsetup import LogThrottle
from gatewayd.plugin import Busy, CommandError, DeviceRefused, DeviceTimeout, NotFound

__all__ = [
    "Cabinet",
    "CabinetRegistry",
    "Connection",
    "EventStoreFailed",
    "FlowSettings",
    "PendingLend",
    "closed_key",
    "result_key",
    "slots_data",
]

log = Logger(namespace="gatewayd.plugins.powerbank.state")

#: emit(type, device, data, raw, *, key=None, window=...) -> Deferred firing with None once
#: the event is durable (``PluginContext.emit``): with a key, a repeat is not stored again.
Emit = Callable[..., defer.Deferred]

#: Answers (and closed lends) remembered per cabinet: expired ones go once there are PURGE_AT,
#: and beyond MAX_REMEMBERED the oldest go too, so neither grows with months of traffic.
PURGE_AT = 16
MAX_REMEMBERED = 64


def _make_room(table: dict[Any, Any], now: float, expires: Callable[[Any], float]) -> None:
    """Room for one more entry in a per-cabinet table (see PURGE_AT): a flood of distinct
    packets loses its oldest entries first."""
    if len(table) >= PURGE_AT:
        for key in [key for key, value in table.items() if expires(value) <= now]:
            del table[key]
        while len(table) >= MAX_REMEMBERED:
            del table[next(iter(table))]


class Connection(Protocol):
    """What the registry needs from a cabinet's connection (TCP in production, a fake in tests)."""

    address: str
    imei: str | None

    def send_packet(self, packet: Packet) -> None: ...

    def close(self, reason: str) -> None: ...


class EventStoreFailed(CommandError):
    """500: the event recording the cabinet's answer could not be made durable; not acknowledged."""

    status = 500
    code = "event_not_stored"


@dataclass(frozen=True, slots=True)
class FlowSettings:
    """Timing of the flows (seconds) and whether heartbeats become events."""

    lend_timeout: float = 20.0
    query_timeout: float = 10.0
    duplicate_window: float = 600.0
    emit_heartbeats: bool = False


def result_key(packet: LendResult | ReturnResult) -> str:
    """The idempotency key of a result frame: what stays the same when the cabinet resends it
    (not the raw text: spacing, separators and CRC case may differ), e.g.
    ``result:860000000000001:MC:RO:2:0000000012``."""
    return f"result:{packet.imei}:{packet.command}:{packet.code}:{packet.slot}:{packet.bank}"


def closed_key(imei: str, slot: int, bank: str, outcome: str) -> str:
    """The idempotency key of the event that closed a lend without its result: ``timeout``
    (``lend.timeout``) or ``reconciled`` (``lend.reconciled``), e.g.
    ``closed:860000000000001:2:0000000012:timeout``."""
    return f"closed:{imei}:{slot}:{bank}:{outcome}"


def slots_data(slots: tuple[SlotStatus, ...]) -> list[dict[str, Any]]:
    """The ``slots`` list of a ``slots.status`` event: ``[{"slot", "state", "bank"}]``."""
    return [{"slot": s.slot, "state": str(s.state), "bank": s.bank} for s in slots]


class _Reply:
    """The answer already given to one MC / MR / MQ, for answering its duplicates."""

    __slots__ = ("answer", "expires", "durable", "owed")

    def __init__(self, answer: Packet, expires: float) -> None:
        self.answer = answer
        self.expires = expires
        self.durable = False  # True once the event it confirms is durable (then answer at once)
        self.owed = 0  # duplicates received before that: answered when it becomes durable


class PendingLend:
    """A lend in progress: CC sent, waiting for MC/MR (``waiting``) or AQ (``reconciling``)."""

    __slots__ = ("slot", "bank", "result", "timer", "phase", "started")

    def __init__(self, slot: int, bank: str, started: float) -> None:
        self.slot = slot
        self.bank = bank
        self.result: defer.Deferred = defer.Deferred()
        self.timer: Any = None
        self.phase = "waiting"
        self.started = started

    def describe(self) -> dict[str, Any]:
        return {"slot": self.slot, "bank": self.bank, "phase": self.phase, "since": self.started}


class Cabinet:
    """Everything known about one cabinet (IMEI), online or not."""

    __slots__ = (
        "imei",
        "connection",
        "address",
        "last_seen",
        "online_since",
        "connected_at",
        "inventory",
        "faulted",
        "lend",
        "closed_lends",
        "replies",
        "queries",
        "moved_to",
    )

    def __init__(self, imei: str) -> None:
        self.imei = imei
        self.connection: Connection | None = None
        self.address: str | None = None
        self.last_seen: float | None = None
        self.online_since: float | None = None
        #: When the current connection was bound (a takeover by a newer connection renews it).
        self.connected_at: float | None = None
        #: slot -> {"slot", "state", "bank"}: last AQ, updated by lends and returns since.
        self.inventory: dict[int, dict[str, Any]] = {}
        self.faulted: set[int] = set()
        self.lend: PendingLend | None = None
        #: (slot, bank) -> (outcome, expires) of lends that ended without an MC/MR.
        self.closed_lends: dict[tuple[int, str], tuple[str, float]] = {}
        self.replies: dict[Packet, _Reply] = {}
        self.queries: list[tuple[defer.Deferred, Any]] = []
        self.moved_to: str | None = None  # the box that announced it, when we let it go

    @property
    def online(self) -> bool:
        return self.connection is not None


class CabinetRegistry:
    """The cabinets of one plugin instance and their flows (see the module docstring).

    ``emit(type, imei, data, raw, key=..., window=...)`` records events and returns their
    durability Deferred; ``record`` (default: ``emit``) records those nothing waits for
    (``PluginContext.record``). ``seen(key)`` tells whether an event with that key is durable
    (this run or one before) and ``forget(key)`` lets a new operation reuse a key
    (``PluginContext.seen`` / ``forget``; by default nothing is seen). ``is_allowed(imei)`` and
    ``accepts_bank(bank)`` are the ``allow_imei`` and ``banks`` policies.
    """

    def __init__(
        self,
        clock: Any,
        emit: Emit,
        settings: FlowSettings | None = None,
        *,
        is_allowed: Callable[[str], bool] = lambda imei: True,
        accepts_bank: Callable[[str], bool] = lambda bank: True,
        record: Callable[..., Any] | None = None,
        seen: Callable[[str], bool] = lambda key: False,
        forget: Callable[[str], None] = lambda key: None,
    ) -> None:
        self.clock = clock
        self.emit = emit
        self.record = record or emit
        self.seen = seen
        self.forget = forget
        self.settings = settings or FlowSettings()
        self.is_allowed = is_allowed
        self.accepts_bank = accepts_bank
        self.cabinets: dict[str, Cabinet] = {}
        self.not_stored = 0  # answers withheld because their event could not be stored
        self._not_stored_log = LogThrottle(clock.seconds)  # the cabinets resend: every 10 s
        self.online_count = 0
        self.duplicates = 0
        self.replies_dropped = 0  # answers due while the cabinet had no connection

    # --- connections ------------------------------------------------------------------------

    def packet_received(self, conn: Connection, packet: Packet, raw: str | None = None) -> None:
        """Handle one valid packet from a cabinet (the codec has checked it)."""
        cabinet = self._bind(conn, packet.imei, raw)
        if cabinet is None:
            return
        cabinet.last_seen = self.clock.seconds()
        if isinstance(packet, Heartbeat):
            if self.settings.emit_heartbeats:
                self.record("heartbeat", cabinet.imei, {}, raw)
        elif isinstance(packet, LendResult):
            self._lend_result(cabinet, packet, raw)
        elif isinstance(packet, ReturnQuery):
            self._return_query(cabinet, packet, raw)
        elif isinstance(packet, ReturnResult):
            self._return_result(cabinet, packet, raw)
        elif isinstance(packet, StatusReport):
            self._status_report(cabinet, packet, raw)
        else:  # a server -> device command sent by a device
            self.record(
                "frame.invalid",
                cabinet.imei,
                {
                    "reason": "unexpected_command",
                    "message": f"{packet.command} is sent by the server, not by a cabinet",
                    "address": conn.address,
                },
                raw,
            )

    def _bind(self, conn: Connection, imei: str, raw: str | None) -> Cabinet | None:
        """The cabinet a frame on ``conn`` belongs to; binds the connection on its first frame."""
        if conn.imei is None:
            if not self.is_allowed(imei):
                self.record(
                    "frame.invalid",
                    imei,
                    {
                        "reason": "unknown_device",
                        "message": f"IMEI {imei} is not in allow_imei",
                        "address": conn.address,
                    },
                    raw,
                )
                conn.close("unknown_device")
                return None
            conn.imei = imei
            cabinet = self.cabinets.get(imei)
            if cabinet is None:
                cabinet = self.cabinets[imei] = Cabinet(imei)
            old = cabinet.connection
            cabinet.connection = conn
            cabinet.address = conn.address
            cabinet.connected_at = self.clock.seconds()
            if old is None:
                self.online_count += 1
                cabinet.online_since = self.clock.seconds()
            else:  # the same cabinet on a new connection: GPRS modems leave the old one half-open
                old.close("replaced")
            self.record(
                "device.online", imei, {"address": conn.address, "replaced": old is not None}, raw
            )
            return cabinet
        if conn.imei != imei:
            self.record(
                "frame.invalid",
                conn.imei,
                {
                    "reason": "imei_mismatch",
                    "message": f"frame from IMEI {imei} on the connection of {conn.imei}",
                    "address": conn.address,
                },
                raw,
            )
            return None
        cabinet = self.cabinets[imei]
        if cabinet.connection is not conn:
            return None  # a replaced connection that still delivers data: the new one rules
        return cabinet

    def moved_elsewhere(self, imei: str, gateway: str, since: float) -> bool:
        """Another box announced this cabinet online at ``since``: close our connection if it is
        older (a half-open one the balancer moved away from); True if one was closed. Pending
        operations fail as for any lost connection; ``device.offline`` says ``moved``."""
        cabinet = self.cabinets.get(imei)
        if cabinet is None or cabinet.connection is None or cabinet.connected_at is None:
            return False
        if cabinet.connected_at >= since:
            return False  # ours is the newer connection: the other box will let go
        cabinet.moved_to = gateway  # device.offline says where: reason moved_elsewhere, box
        cabinet.connection.close("moved_elsewhere")
        return True

    def connection_lost(self, conn: Connection, reason: str) -> None:
        """A connection closed: the cabinet goes offline unless a newer connection replaced it."""
        if conn.imei is None:
            return
        cabinet = self.cabinets.get(conn.imei)
        if cabinet is None or cabinet.connection is not conn:
            return
        cabinet.connection = None
        cabinet.online_since = None
        self.online_count -= 1
        data = {"reason": reason, "address": conn.address}
        if reason == "moved_elsewhere" and cabinet.moved_to is not None:
            data["box"], cabinet.moved_to = cabinet.moved_to, None
        self.record("device.offline", cabinet.imei, data, None)

    def stop(self) -> None:
        """Cancel every timer and fail every command still waiting (the plugin is stopping)."""
        for cabinet in self.cabinets.values():
            lend = cabinet.lend
            if lend is not None:
                cabinet.lend = None
                self._cancel(lend.timer)
                _settle(lend.result, Failure(DeviceTimeout("the plugin stopped during the lend")))
            for waiter, timer in cabinet.queries:
                self._cancel(timer)
                _settle(waiter, Failure(DeviceTimeout("the plugin stopped during the query")))
            cabinet.queries = []

    # --- sending ----------------------------------------------------------------------------

    def _send(self, cabinet: Cabinet, packet: Packet) -> bool:
        """Send to the cabinet's current connection; False (and counted) when it has none."""
        conn = cabinet.connection
        if conn is None:
            self.replies_dropped += 1
            return False
        conn.send_packet(packet)
        return True

    def _cancel(self, call: Any) -> None:
        if call is not None and call.active():
            call.cancel()

    # --- duplicates -------------------------------------------------------------------------

    def _duplicate(self, cabinet: Cabinet, packet: Packet) -> bool:
        """Answer ``packet`` again if it is a duplicate within the window; True if it was."""
        reply = cabinet.replies.get(packet)
        if reply is None:
            return False
        if reply.expires <= self.clock.seconds():
            del cabinet.replies[packet]
            return False
        self.duplicates += 1
        if reply.durable:
            self._send(cabinet, reply.answer)
        else:
            reply.owed += 1
        return True

    def _remember(
        self, cabinet: Cabinet, packet: Packet, answer: Packet, durable: defer.Deferred | None
    ) -> defer.Deferred:
        """Record the answer to ``packet``; it (and owed duplicates) goes out once ``durable``.

        Returns a Deferred firing with True once answered, False if the event could not be
        stored (then nothing is answered and the cabinet's resend is processed afresh).
        """
        now = self.clock.seconds()
        replies = cabinet.replies
        _make_room(replies, now, lambda reply: reply.expires)
        reply = replies[packet] = _Reply(answer, now + self.settings.duplicate_window)
        if durable is None:
            reply.durable = True
            self._send(cabinet, answer)
            return defer.succeed(True)

        def stored(result: Any) -> bool:
            if result is not None:  # e.g. refused by a full drop_newest queue: not durable
                return not_stored(Failure(RuntimeError(f"event refused by the queues: {result}")))
            reply.durable = True
            for _ in range(1 + reply.owed):
                self._send(cabinet, answer)
            reply.owed = 0
            return True

        def not_stored(failure: Failure) -> bool:
            self.not_stored += 1
            if self._not_stored_log.due():
                log.error(
                    "cabinet {imei}: event not stored, {answer} not sent ({count} so far, "
                    "the cabinet will resend): {error}",
                    imei=cabinet.imei,
                    answer=answer.command,
                    count=self.not_stored,
                    error=failure.getErrorMessage(),
                )
            if replies.get(packet) is reply:
                del replies[packet]
            return False

        return durable.addCallbacks(stored, not_stored)

    def _keyed(self, key: str) -> dict[str, Any]:
        """``emit`` / ``record`` arguments that store an event once per ``duplicate_window``
        (none when the window is 0: no duplicate detection then)."""
        window = self.settings.duplicate_window
        return {"key": key, "window": window} if window > 0 else {}

    def _already_durable(
        self, cabinet: Cabinet, packet: LendResult | ReturnResult, key: str
    ) -> bool:
        """A result resent after a restart whose event is durable already: answered at once,
        True. (A repeat not known here yet is still stored once: its emit carries the key.)"""
        if self.settings.duplicate_window <= 0 or not self.seen(key):
            return False
        self.duplicates += 1
        self._remember(cabinet, packet, packet.ack(), None)
        return True

    def _forget(self, cabinet: Cabinet, kind: type[Packet], bank: str) -> None:
        """Drop remembered answers of ``kind`` for ``bank``: a new operation on it begins."""
        for key in [k for k in cabinet.replies if type(k) is kind and k.bank == bank]:  # type: ignore[attr-defined]
            del cabinet.replies[key]

    # --- query ------------------------------------------------------------------------------

    def online_cabinet(self, imei: str) -> Cabinet:
        """The cabinet if it is connected; NotFound (404) otherwise."""
        cabinet = self.cabinets.get(imei)
        if cabinet is None:
            raise NotFound(f"cabinet {imei} is unknown (it has not connected)")
        if cabinet.connection is None:
            raise NotFound(f"cabinet {imei} is offline")
        return cabinet

    def query(self, imei: str) -> defer.Deferred:
        """Command ``query``: CQ, and the AQ answer as ``{"slots": [...]}``; 404, 504."""
        cabinet = self.online_cabinet(imei)
        answered = self._request_status(cabinet)
        answered.addCallback(lambda report: {"slots": slots_data(report.slots)})
        return answered

    def _request_status(self, cabinet: Cabinet) -> defer.Deferred:
        """Send CQ; fires with the next StatusReport, or DeviceTimeout after query_timeout."""
        waiter: defer.Deferred = defer.Deferred()
        timeout = self.settings.query_timeout

        def expire() -> None:
            cabinet.queries = [q for q in cabinet.queries if q[0] is not waiter]
            message = f"cabinet {cabinet.imei} did not answer CQ within {timeout:g} s"
            _settle(waiter, Failure(DeviceTimeout(message)))

        cabinet.queries.append((waiter, self.clock.callLater(timeout, expire)))
        self._send(cabinet, StatusQuery(cabinet.imei))
        return waiter

    def _status_report(self, cabinet: Cabinet, report: StatusReport, raw: str | None) -> None:
        """AQ: inventory, ``slots.status``, ``alarm.slot_fault`` for newly faulted slots."""
        slots = slots_data(report.slots)
        cabinet.inventory = {entry["slot"]: entry for entry in slots}
        self.record("slots.status", cabinet.imei, {"slots": slots}, raw)
        faulted = {s.slot for s in report.slots if s.state is SlotState.FAULT}
        for status in report.slots:
            if status.slot in faulted and status.slot not in cabinet.faulted:
                self.record(
                    "alarm.slot_fault",
                    cabinet.imei,
                    {"slot": status.slot, "bank": status.bank},
                    raw,
                )
        cabinet.faulted = faulted
        waiters, cabinet.queries = cabinet.queries, []
        for waiter, timer in waiters:
            self._cancel(timer)
            _settle(waiter, report)

    # --- lend -------------------------------------------------------------------------------

    def lend(self, imei: str, slot: int, bank: str) -> defer.Deferred:
        """Command ``lend``: CC, then MC(BO) 200 / MR(BF) 502 / reconciled 200 / timeout 504."""
        cabinet = self.online_cabinet(imei)
        if cabinet.lend is not None:
            pending = cabinet.lend
            raise Busy(
                f"cabinet {imei} is already lending bank {pending.bank} from slot {pending.slot}"
            )
        self._forget(cabinet, LendResult, bank)
        cabinet.closed_lends.pop((slot, bank), None)
        for ok in (True, False):  # the results and closings of an earlier lend of it
            self.forget(result_key(LendResult(imei, slot, bank, ok)))
        for outcome in ("timeout", "reconciled"):
            self.forget(closed_key(imei, slot, bank, outcome))
        lend = cabinet.lend = PendingLend(slot, bank, self.clock.seconds())
        self._send(cabinet, LendRequest(imei, slot, bank))
        lend.timer = self.clock.callLater(
            self.settings.lend_timeout, self._lend_timed_out, cabinet, lend
        )
        return lend.result

    def _lend_timed_out(self, cabinet: Cabinet, lend: PendingLend) -> None:
        """No MC/MR in time: never resend CC; ask for the status and reconcile from it."""
        lend.timer = None
        if cabinet.lend is not lend:
            return
        lend.phase = "reconciling"
        if cabinet.connection is None:
            self._lend_unresolved(cabinet, lend, None, "offline")
            return
        status = self._request_status(cabinet)
        status.addCallbacks(
            lambda report: self._reconcile(cabinet, lend, report),
            lambda failure: self._lend_unresolved(cabinet, lend, None, "no_status"),
        )

    def _reconcile(self, cabinet: Cabinet, lend: PendingLend, report: StatusReport) -> None:
        """AQ after a lend timeout: bank gone from the slot → reconciled, else lend.timeout."""
        if cabinet.lend is not lend:
            return  # a late MC/MR settled it meanwhile
        in_slot = report.status(lend.slot).bank == lend.bank
        if in_slot:
            self._lend_unresolved(cabinet, lend, True, "bank_in_slot")
            return
        cabinet.lend = None
        self._close_lend(cabinet, lend, "reconciled")
        data = {"slot": lend.slot, "bank": lend.bank, "via": "status"}
        durable = self.emit(
            "lend.reconciled",
            cabinet.imei,
            data,
            None,
            **self._keyed(closed_key(cabinet.imei, lend.slot, lend.bank, "reconciled")),
        )
        result = {"outcome": "reconciled", "slot": lend.slot, "bank": lend.bank, "via": "status"}
        not_stored = Failure(EventStoreFailed("the lend.reconciled event could not be stored"))
        durable.addCallbacks(
            lambda stored: _settle(lend.result, result if stored is None else not_stored),
            lambda failure: _settle(lend.result, not_stored),
        )

    def _lend_unresolved(
        self, cabinet: Cabinet, lend: PendingLend, in_slot: bool | None, why: str
    ) -> None:
        """The lend ended without a result: ``lend.timeout``; a late MC can still reconcile it."""
        if cabinet.lend is not lend:
            return
        cabinet.lend = None
        self._close_lend(cabinet, lend, "timeout")
        waited = self.clock.seconds() - lend.started
        data = {"slot": lend.slot, "bank": lend.bank, "bank_in_slot": in_slot, "why": why}
        key = closed_key(cabinet.imei, lend.slot, lend.bank, "timeout")
        self.record("lend.timeout", cabinet.imei, data, None, **self._keyed(key))
        explain = {
            "bank_in_slot": "and its status still shows the bank in the slot",
            "no_status": "nor to the status query after it",
            "offline": "and is offline",
        }[why]
        message = (
            f"cabinet {cabinet.imei} did not answer the lend of bank {lend.bank} from slot "
            f"{lend.slot} within {waited:g} s {explain}"
        )
        _settle(lend.result, Failure(DeviceTimeout(message)))

    def _close_lend(self, cabinet: Cabinet, lend: PendingLend, outcome: str) -> None:
        self._note_closed(cabinet, (lend.slot, lend.bank), outcome)
        self._cancel(lend.timer)
        lend.timer = None

    def _note_closed(self, cabinet: Cabinet, key: tuple[int, str], outcome: str) -> None:
        now = self.clock.seconds()
        closed = cabinet.closed_lends  # a late result comes within the window or not at all
        _make_room(closed, now, lambda entry: entry[1])
        closed[key] = (outcome, now + self.settings.duplicate_window)

    def _lend_result(self, cabinet: Cabinet, packet: LendResult, raw: str | None) -> None:
        """MC(BO) / MR(BF): settle the pending lend or reconcile a closed one; then AM / AR."""
        if self._duplicate(cabinet, packet):
            return
        key = (packet.slot, packet.bank)
        lend = cabinet.lend
        event_key = result_key(packet)
        if lend is not None and (lend.slot, lend.bank) != key:
            lend = None  # not the result of the lend in progress
        if lend is None and self._already_durable(cabinet, packet, event_key):
            return  # resent after a restart (a lend in progress forgot the key: never then)
        data: dict[str, Any] = {"slot": packet.slot, "bank": packet.bank}
        result: dict[str, Any] | None = None
        if lend is not None:
            cabinet.lend = None
            self._cancel(lend.timer)
            if not packet.ok:
                event_type = "lend.failed"
                data["requested"] = True
            elif lend.phase == "waiting":
                event_type, result = "lend.succeeded", {"outcome": "succeeded", **data}
                data["requested"] = True
            else:  # the MC arrived while we were asking for the status
                event_type = "lend.reconciled"
                data["via"] = "late_result"
                result = {"outcome": "reconciled", **data}
                self._close_lend(cabinet, lend, "reconciled")
                event_key = closed_key(cabinet.imei, packet.slot, packet.bank, "reconciled")
        else:
            closed = self._closed_lend(cabinet, key)
            if closed == "timeout":  # the result of a lend that timed out: reconcile it once
                if packet.ok:
                    event_type, data["via"] = "lend.reconciled", "late_result"
                    event_key = closed_key(cabinet.imei, packet.slot, packet.bank, "reconciled")
                else:
                    event_type, data["late"] = "lend.failed", True
                self._note_closed(cabinet, key, "reconciled")
            elif closed == "reconciled":
                event_type = None  # already recorded: acknowledge only
            else:  # not asked by this daemon run (e.g. before a restart): record it anyway
                event_type = "lend.succeeded" if packet.ok else "lend.failed"
                data["requested"] = False
        if packet.ok:
            cabinet.inventory[packet.slot] = {"slot": packet.slot, "state": "empty", "bank": None}
        durable = None
        if event_type is not None:
            durable = self.emit(event_type, cabinet.imei, data, raw, **self._keyed(event_key))
        answered = self._remember(cabinet, packet, packet.ack(), durable)
        if lend is not None:
            answered.addCallback(lambda ok: self._settle_lend(lend, packet, result, ok))

    def _settle_lend(
        self, lend: PendingLend, packet: LendResult, result: dict | None, stored: bool
    ) -> None:
        if not stored:
            message = f"the result of lending {packet.bank} could not be stored; not acknowledged"
            _settle(lend.result, Failure(EventStoreFailed(message)))
        elif result is not None:
            _settle(lend.result, result)
        else:
            message = f"the cabinet could not lend bank {packet.bank} from slot {packet.slot}"
            _settle(lend.result, Failure(DeviceRefused(message, code="lend_failed")))

    def _closed_lend(self, cabinet: Cabinet, key: tuple[int, str]) -> str | None:
        """How the lend of ``key`` (slot, bank) closed without its result within the window:
        ``timeout``, ``reconciled`` or None. This run's record first, else the durable keys of
        the closing events (a lend that closed before a restart); reconciled wins."""
        closed = cabinet.closed_lends.get(key)
        if closed is not None:
            if closed[1] > self.clock.seconds():
                return closed[0]
            del cabinet.closed_lends[key]
        if self.settings.duplicate_window <= 0:
            return None
        for outcome in ("reconciled", "timeout"):
            if self.seen(closed_key(cabinet.imei, *key, outcome)):
                return outcome
        return None

    # --- return -----------------------------------------------------------------------------

    def _return_query(self, cabinet: Cabinet, packet: ReturnQuery, raw: str | None) -> None:
        """MQ: RQ(T) if the bank is ours, else RQ(F) and ``return.rejected``."""
        accepted = self.accepts_bank(packet.bank)
        cached = cabinet.replies.get(packet)
        # A duplicate only if we would answer the same: a bank added to the list since is let in.
        if (cached is None or cached.answer.accepted == accepted) and self._duplicate(
            cabinet, packet
        ):
            return
        self._forget(cabinet, ReturnResult, packet.bank)  # a new return of this bank begins
        for ok in (True, False):
            self.forget(result_key(ReturnResult(cabinet.imei, packet.slot, packet.bank, ok)))
        if not accepted:
            data = {"slot": packet.slot, "bank": packet.bank}
            self.record("return.rejected", cabinet.imei, data, raw)
        self._remember(cabinet, packet, packet.answer(accepted), None)

    def _return_result(self, cabinet: Cabinet, packet: ReturnResult, raw: str | None) -> None:
        """MC(RO) / MR(RF): ``return.succeeded`` / ``return.failed``; AM / AR once durable."""
        if self._duplicate(cabinet, packet):
            return
        key = result_key(packet)
        if self._already_durable(cabinet, packet, key):  # resent after a restart
            return
        self._forget(cabinet, ReturnQuery, packet.bank)  # this return is over
        data = {"slot": packet.slot, "bank": packet.bank}
        if packet.ok:
            cabinet.inventory[packet.slot] = {
                "slot": packet.slot,
                "state": "returned",
                "bank": packet.bank,
            }
        event_type = "return.succeeded" if packet.ok else "return.failed"
        durable = self.emit(event_type, cabinet.imei, data, raw, **self._keyed(key))
        self._remember(cabinet, packet, packet.ack(), durable)


def _settle(d: defer.Deferred, result: Any) -> None:
    """Fire ``d`` unless it already fired (a caller may have cancelled it)."""
    if d.called:
        return
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)
