"""Which boxes of the fleet are alive, and which of them owns a device: rendezvous hashing.

Why: heating gateways publish to a broker every box subscribes to, so without a rule each box
would handle every gateway (N events per reading). Every box computes the same owner for a
gateway from the same set of live boxes, without talking to the others: the box whose
``blake2b(box + gateway)`` is highest (rendezvous, or highest-random-weight, hashing). When a box
leaves only its gateways move, spread over the others; when it comes back it takes back the
same ones.

The set of live boxes comes from the fleet's retained statuses (``gatewayd/{box}/status``, an
object whose ``status`` is ``online`` while the box runs; the last will says ``offline``), read
by the box's mqtt sink, which calls ``link_up``, ``status`` and ``link_down``. The box counts
itself live. Until the sink has been connected for ``settle`` seconds (time for the broker to
hand over every retained status) and while it is disconnected (the others will then see this
box's last will and take its devices), ``owns`` answers False for everything: a box that cannot
see the fleet owns nothing, so no device is handled twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from gatewayd.fleet.presence import parse_box_status

__all__ = ["Membership", "rendezvous_owner"]

log = Logger(namespace="gatewayd.fleet")


def _weight(box: str, key: str) -> bytes:
    return hashlib.blake2b(f"{box}\x00{key}".encode(), digest_size=8).digest()


def rendezvous_owner(key: str, boxes: set[str] | frozenset[str]) -> str | None:
    """The box among ``boxes`` that owns ``key`` (None when there is none)."""
    if not boxes:
        return None
    return max(boxes, key=lambda box: (_weight(box, key), box))


class Membership:
    """The live boxes as this box sees them, and the owner of each key (a device id)."""

    #: Seconds after the status subscription is made before this box owns anything.
    settle = 2.0

    def __init__(self, me: str, reactor: Any, settle: float | None = None) -> None:
        self.me = me
        self.reactor = reactor
        if settle is not None:
            self.settle = settle
        self.others: set[str] = set()  # other boxes whose status says online
        self.ready = False
        self.changes = 0
        self._listeners: list[Callable[[], None]] = []
        self._settling: Any = None
        self._live = frozenset({me})
        self._owners: dict[str, str | None] = {}  # cache, cleared on every change

    # --- what the mqtt sink reports ------------------------------------------------------------

    def link_up(self) -> None:
        """The sink is connected and subscribed: own devices ``settle`` seconds from now."""
        self._cancel_settling()
        self._settling = self.reactor.callLater(self.settle, self._settled)

    def link_down(self) -> None:
        """The sink lost the broker: own nothing (the fleet sees this box's last will)."""
        self._cancel_settling()
        if self.ready:
            self.ready = False
            log.warn("fleet: the link to the fleet broker is down; this box owns no device now")
            self._changed()

    def status(self, gateway: str, payload: bytes) -> None:
        """A retained status message of box ``gateway`` (empty: cleared)."""
        if gateway == self.me:
            return
        box = parse_box_status(gateway, payload) if payload else None
        online = box is not None and box.online
        if online == (gateway in self.others):
            return
        if online:
            self.others.add(gateway)
        else:
            self.others.discard(gateway)
        if self.ready:
            log.info(
                "fleet: box {box} is {state}; {count} boxes live",
                box=gateway,
                state="online" if online else "offline",
                count=len(self.others) + 1,
            )
        self._live = frozenset(self.others | {self.me})
        self._changed()

    # --- what the plugins ask ------------------------------------------------------------------

    @property
    def live(self) -> frozenset[str]:
        return self._live

    def owner(self, key: str) -> str | None:
        """The box that owns ``key`` in this box's view (whether or not it is ready)."""
        owner = self._owners.get(key, "")
        if owner == "":
            owner = self._owners[key] = rendezvous_owner(key, self._live)
        return owner

    def owns(self, key: str) -> bool:
        """True when this box handles ``key`` now."""
        return self.ready and self.owner(key) == self.me

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after every change of the live set or of readiness."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # --- inside --------------------------------------------------------------------------------

    def _settled(self) -> None:
        self._settling = None
        self.ready = True
        log.info(
            "fleet: {count} boxes live ({boxes}); this box owns its share now",
            count=len(self._live),
            boxes=", ".join(sorted(self._live)),
        )
        self._changed()

    def _cancel_settling(self) -> None:
        if self._settling is not None and self._settling.active():
            self._settling.cancel()
        self._settling = None

    def _changed(self) -> None:
        self._owners.clear()
        self.changes += 1
        for listener in tuple(self._listeners):
            try:
                listener()
            except Exception:
                log.failure("fleet: a membership listener failed")
