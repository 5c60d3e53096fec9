"""Plugin state without I/O: the gateway/meter registry and command correlation.

Both run on the reactor thread and take their clock from the reactor (``reactor.seconds()``
and ``callLater``), so unit tests drive them with ``twisted.internet.task.Clock``.

Correlation: the gateway answers a command with the same ``msg_id`` and nothing else to tell
replies apart, so at most one command per (gw_id, msg_id) can be in flight; a second one is
refused with 409. A command waits for the gateway's ``stat`` (or its data reply); a transparent
command (msg 40) then waits for the meter's own reply in a second phase with its own timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from gatewayd.plugin import Busy, DeviceTimeout

# --- registry -----------------------------------------------------------------------------------

FIRST_SEEN, RETURNED = "first_seen", "returned"
MAX_METERS_PER_GATEWAY = 512  # the firmware handles 20 main + 240 copy meters


@dataclass
class Meter:
    """A meter seen in a gateway's reports."""

    meter_id: str
    gw_id: str
    number: str
    protocol: str
    port: int
    meter_type: int | None = None  # T of its last frame, else from the protocol code
    address: str | None = None  # 14 hex, wire order, from its last frame
    last_seen: float = 0.0  # POSIX time


@dataclass
class Gateway:
    """One hy/gw gateway: online state, last status and periods, its meters."""

    gw_id: str
    online: bool = False
    last_seen: float = 0.0  # reactor seconds
    last_seen_wall: float | None = None  # POSIX time, for /api/v1/devices
    online_since_wall: float | None = None  # POSIX time it last came online here
    polled_at: float | None = None  # reactor seconds of our last unsolicited status request
    status: dict[str, Any] = field(default_factory=dict)
    periods: dict[str, Any] = field(default_factory=dict)
    meters: dict[str, Meter] = field(default_factory=dict)


class GatewayRegistry:
    """Known gateways and their meters; decides online/offline transitions."""

    def __init__(self, clock: Any, max_gateways: int = 10000) -> None:
        self.clock = clock
        self.max_gateways = max_gateways
        self.gateways: dict[str, Gateway] = {}
        self.untracked = 0  # messages from gateways beyond max_gateways, all of them online
        self.forgotten = 0  # offline gateways dropped to make room for new ones

    def get(self, gw_id: str) -> Gateway | None:
        return self.gateways.get(gw_id)

    def heard(self, gw_id: str) -> tuple[Gateway | None, str | None]:
        """A message came from ``gw_id``: (gateway, ``first_seen``/``returned``/None).

        The second value says whether it just came online. None for the gateway when the
        registry is full and ``gw_id`` is new.
        """
        gateway = self.gateways.get(gw_id)
        came_online: str | None = None
        if gateway is None:
            if not self._make_room():
                self.untracked += 1
                return None, None
            gateway = self.gateways[gw_id] = Gateway(gw_id)
            came_online = FIRST_SEEN
        elif not gateway.online:
            came_online = RETURNED
        gateway.online = True
        gateway.last_seen = self.clock.seconds()
        gateway.last_seen_wall = time.time()
        if came_online is not None:
            gateway.online_since_wall = gateway.last_seen_wall
        return gateway, came_online

    def moved_elsewhere(self, gw_id: str, since: float) -> Gateway | None:
        """Another box announced ``gw_id`` online at ``since`` (POSIX): if it came online here
        earlier, it is offline here now; returns it then, else None."""
        gateway = self.gateways.get(gw_id)
        if gateway is None or not gateway.online or gateway.online_since_wall is None:
            return None
        if gateway.online_since_wall >= since:
            return None  # ours is the newer: the other box will let go
        gateway.online = False
        return gateway

    def went_offline(self, gw_id: str) -> bool:
        """Mark ``gw_id`` offline (its last will); True if that is a change worth an event."""
        gateway = self.gateways.get(gw_id)
        if gateway is None:
            if not self._make_room():
                return False
            self.gateways[gw_id] = Gateway(gw_id, online=False)
            return True
        if not gateway.online:
            return False
        gateway.online = False
        return True

    def _make_room(self) -> bool:
        """Room for one more gateway: when full, the one offline longest is forgotten (a
        decommissioned gateway must not lock out a new one); False if all are online."""
        if len(self.gateways) < self.max_gateways:
            return True
        offline = [g for g in self.gateways.values() if not g.online]
        if not offline:
            return False
        oldest = min(offline, key=lambda g: g.last_seen)
        del self.gateways[oldest.gw_id]
        self.forgotten += 1
        return True

    def silent(self, offline_after: float, since: float) -> list[Gateway]:
        """Online gateways silent for ``offline_after``, counting from ``since`` at the earliest.

        ``since`` is when our broker link came up: silence while we were disconnected is ours.
        """
        now = self.clock.seconds()
        return [
            g
            for g in self.gateways.values()
            if g.online and now - max(g.last_seen, since) >= offline_after
        ]

    def to_poll(self, poll_after: float, since: float) -> list[Gateway]:
        """Online gateways silent for ``poll_after`` that were not asked since they last spoke."""
        now = self.clock.seconds()
        return [
            g
            for g in self.gateways.values()
            if g.online
            and now - max(g.last_seen, since) >= poll_after
            and (g.polled_at is None or g.polled_at < g.last_seen)
        ]

    def meter(
        self, gateway: Gateway, meter_id: str, number: str, protocol: str, port: int
    ) -> Meter | None:
        """The meter ``meter_id`` of ``gateway``, created on first sight (None past the cap)."""
        meter = gateway.meters.get(meter_id)
        if meter is None:
            if len(gateway.meters) >= MAX_METERS_PER_GATEWAY:
                return None
            meter = gateway.meters[meter_id] = Meter(
                meter_id, gateway.gw_id, number, protocol, port
            )
        meter.last_seen = time.time()
        return meter

    def find_meter(self, meter_id: str) -> Meter | None:
        """A meter by id, whichever gateway reported it."""
        for gateway in self.gateways.values():
            meter = gateway.meters.get(meter_id)
            if meter is not None:
                return meter
        return None

    def counts(self) -> tuple[int, int, int]:
        """(gateways known, gateways online, meters known)."""
        online = sum(1 for g in self.gateways.values() if g.online)
        meters = sum(len(g.meters) for g in self.gateways.values())
        return len(self.gateways), online, meters


# --- correlation --------------------------------------------------------------------------------

STAT, REPLY = "stat", "reply"


@dataclass(eq=False)
class PendingCommand:
    """One command waiting for its gateway's answer; ``deferred`` fires with the reply Message.

    ``phase`` is ``stat`` (waiting for the gateway) or ``reply`` (msg 40: stat 2 came, now
    waiting for the meter's reply). ``stat`` keeps the stat reply's StatResult dict.
    """

    gw_id: str
    msg_id: int
    command: str
    deferred: defer.Deferred
    wait_reply: bool = False
    phase: str = STAT
    stat: dict[str, Any] | None = None
    context: dict[str, Any] = field(default_factory=dict)
    timer: Any = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.gw_id, self.msg_id)


class Correlator:
    """Commands in flight, one per (gw_id, msg_id), each with its own deadline."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.pending: dict[tuple[str, int], PendingCommand] = {}

    def begin(
        self,
        gw_id: str,
        msg_id: int,
        command: str,
        timeout: float,
        *,
        wait_reply: bool = False,
    ) -> PendingCommand:
        """Register a command; raises Busy (409) if one for (gw_id, msg_id) is in flight."""
        key = (gw_id, msg_id)
        current = self.pending.get(key)
        if current is not None:
            raise Busy(
                f"gateway {gw_id} already has msg {msg_id} ({current.command}) in flight; "
                "wait for its answer"
            )
        pending = PendingCommand(
            gw_id, msg_id, command, defer.Deferred(self._cancelled), wait_reply=wait_reply
        )
        self.pending[key] = pending
        self._arm(pending, timeout, self._stat_timeout)
        return pending

    def get(self, gw_id: str, msg_id: int) -> PendingCommand | None:
        return self.pending.get((gw_id, msg_id))

    def await_reply(self, pending: PendingCommand, stat: dict[str, Any], timeout: float) -> None:
        """The gateway said stat 2 to a transparent command: now wait for the meter's reply."""
        pending.phase = REPLY
        pending.stat = stat
        self._arm(pending, timeout, self._reply_timeout)

    def resolve(self, pending: PendingCommand, result: Any) -> None:
        """The answer came: fire the command's Deferred with ``result``."""
        if self._forget(pending):
            pending.deferred.callback(result)

    def reject(self, pending: PendingCommand, error: Exception) -> None:
        """The command failed (refusal, bad reply): fire its Deferred's errback."""
        if self._forget(pending):
            pending.deferred.errback(error)

    def discard(self, pending: PendingCommand) -> None:
        """Forget a command that was never sent (its Deferred is not fired)."""
        self._forget(pending)

    def fail_all(self, error_for: Callable[[PendingCommand], Exception]) -> None:
        """Fail every command in flight (plugin stopping)."""
        for pending in list(self.pending.values()):
            self.reject(pending, error_for(pending))

    # --- internals ---------------------------------------------------------------------------

    def _arm(self, pending: PendingCommand, timeout: float, expire: Callable[..., None]) -> None:
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = self.clock.callLater(timeout, expire, pending, timeout)

    def _forget(self, pending: PendingCommand) -> bool:
        if self.pending.get(pending.key) is not pending:
            return False
        del self.pending[pending.key]
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
        return True

    def _stat_timeout(self, pending: PendingCommand, timeout: float) -> None:
        self.reject(
            pending,
            DeviceTimeout(
                f"gateway {pending.gw_id} did not answer msg {pending.msg_id} "
                f"({pending.command}) within {timeout:g} s"
            ),
        )

    def _reply_timeout(self, pending: PendingCommand, timeout: float) -> None:
        self.reject(
            pending,
            DeviceTimeout(
                f"gateway {pending.gw_id} accepted {pending.command} (stat 2) but the meter's "
                f"reply did not come within {timeout:g} s"
            ),
        )

    def _cancelled(self, d: defer.Deferred) -> None:
        """The caller gave up (the control API's own timeout): free the slot."""
        for pending in list(self.pending.values()):
            if pending.deferred is d:
                self._forget(pending)
