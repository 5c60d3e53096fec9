"""Where every device and box stands, from the boxes' retained MQTT topics; pure, no I/O.

The mqtt sink of each box publishes, retained:

- ``gatewayd/{gateway}/status``: ``online`` / ``offline`` (its last will), later perhaps a JSON
  status object; a payload that parses as a JSON object is taken as the status, else the word.
- ``gatewayd/{gateway}/devices/{plugin}/{device}``:
  ``{"online": bool, "since": ts, "gateway": id}``.

Topic levels are percent-escaped by the box (``gatewayd.sinks.mqtt_config.escape_level``: ``/``
→ ``%2F``, a missing value → ``-``, ``-`` itself → ``%2D``) and decoded here with plain
percent-decoding. ``PresenceMap.update`` takes one message and ``locate`` answers "which box
holds this device": the newest ``since`` among the boxes that claim it online, ignoring boxes
whose own status says offline (their retained presence is stale once they died). This module
imports neither paho nor Twisted, so a backend can feed it from any MQTT client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

__all__ = [
    "PREFIX",
    "BoxStatus",
    "Presence",
    "PresenceMap",
    "parse_box_status",
    "parse_since",
    "unescape_level",
]

#: The first topic level of everything a box publishes.
PREFIX = "gatewayd"
#: How a box writes a missing value (an event without a device) as a topic level.
MISSING = "-"


def unescape_level(level: str) -> str | None:
    """A topic level as the box's value (None for ``-``, "none"): plain percent-decoding."""
    if level == MISSING:
        return None
    return unquote(level, errors="surrogatepass")


def parse_since(text: Any) -> datetime | None:
    """``since`` as an aware datetime (no zone: UTC), so claims compare; None when unreadable."""
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Presence:
    """One box's retained claim about one device: online or not, since when."""

    plugin: str
    device: str
    gateway: str
    online: bool
    since: str  # as the box wrote it
    since_at: datetime | None  # parsed; None sorts before every time

    def newer_than(self, other: Presence) -> bool:
        """True if this claim is more recent than ``other`` (unreadable times are oldest)."""
        return _order(self) > _order(other)

    def to_dict(self) -> dict[str, Any]:
        """The claim as JSON values (the CLI's ``--json``)."""
        return {
            "plugin": self.plugin,
            "device": self.device,
            "gateway": self.gateway,
            "online": self.online,
            "since": self.since,
        }


def _order(claim: Presence) -> tuple[datetime, str]:
    """Sort key of a claim: its time, then the gateway id so that ties are decided the same way."""
    return (claim.since_at or datetime.min.replace(tzinfo=UTC), claim.gateway)


@dataclass(frozen=True)
class BoxStatus:
    """The retained status of one box: the plain word, or a JSON object once boxes send one."""

    gateway: str
    status: str | dict[str, Any]

    @property
    def online(self) -> bool:
        """The word ``online``; for a JSON status its ``online`` (bool) or ``status`` key, else
        true (only a live box publishes an object; its last will is the word ``offline``)."""
        if isinstance(self.status, str):
            return self.status == "online"
        flag = self.status.get("online")
        if isinstance(flag, bool):
            return flag
        word = self.status.get("status")
        return word == "online" if isinstance(word, str) else True

    @property
    def word(self) -> str:
        """``online`` / ``offline`` / the box's own word: one short token for a table."""
        if isinstance(self.status, str):
            return self.status or "?"
        return "online" if self.online else "offline"

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON values (the CLI's ``--json``)."""
        return {"gateway": self.gateway, "online": self.online, "status": self.status}


def parse_box_status(gateway: str, payload: bytes) -> BoxStatus | None:
    """A box's retained status message: a JSON object, or else the plain word; None when the
    payload is not UTF-8. (An empty payload, a cleared status, is the caller's to handle.)"""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    status: str | dict[str, Any] = text.strip()
    if text.lstrip().startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            status = parsed
    return BoxStatus(gateway, status)


class PresenceMap:
    """Devices and boxes as their retained topics say; feed it every message of ``topics``."""

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.claims: dict[tuple[str, str, str], Presence] = {}  # (gateway, plugin, device)
        self.statuses: dict[str, BoxStatus] = {}
        self.ignored = 0  # messages on our topics that could not be read

    @property
    def topics(self) -> list[str]:
        """The topic filters to subscribe to."""
        return [f"{self.prefix}/+/status", f"{self.prefix}/+/devices/+/+"]

    def update(self, topic: str, payload: bytes) -> Presence | BoxStatus | str | None:
        """Take one message: the new claim or status, the gateway id whose status was cleared,
        or None (not ours, unreadable, or a cleared claim). An empty (cleared retained) payload
        forgets what the topic said."""
        levels = topic.split("/")
        if len(levels) < 3 or levels[0] != self.prefix:
            return None
        gateway = unescape_level(levels[1])
        if gateway is None:
            return None
        if len(levels) == 3 and levels[2] == "status":
            return self._status(gateway, payload)
        if len(levels) == 5 and levels[2] == "devices":
            plugin, device = unescape_level(levels[3]), unescape_level(levels[4])
            if plugin is None or device is None:
                self.ignored += 1
                return None
            return self._claim(gateway, plugin, device, payload)
        return None

    def _status(self, gateway: str, payload: bytes) -> BoxStatus | str | None:
        if not payload:
            self.statuses.pop(gateway, None)
            return gateway
        box = parse_box_status(gateway, payload)
        if box is None:
            self.ignored += 1
            return None
        self.statuses[gateway] = box
        return box

    def _claim(self, gateway: str, plugin: str, device: str, payload: bytes) -> Presence | None:
        key = (gateway, plugin, device)
        if not payload:
            self.claims.pop(key, None)
            return None
        try:
            body = json.loads(payload)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("online"), bool):
            self.ignored += 1
            return None
        since = body.get("since")
        since_text = since if isinstance(since, str) else ""
        claim = Presence(plugin, device, gateway, body["online"], since_text, parse_since(since))
        self.claims[key] = claim
        return claim

    def box_alive(self, gateway: str) -> bool:
        """False only if the box's status says offline; a box not heard from yet counts alive."""
        box = self.statuses.get(gateway)
        return box is None or box.online

    def locate(self, plugin: str, device: str) -> Presence | None:
        """The box holding ``device``: the newest online claim of a live box; None if none."""
        best: Presence | None = None
        for claim in self.claims.values():
            if claim.plugin != plugin or claim.device != device or not claim.online:
                continue
            if not self.box_alive(claim.gateway):
                continue
            if best is None or claim.newer_than(best):
                best = claim
        return best

    def devices(self, online_only: bool = False) -> list[Presence]:
        """Every claim (offline ones too unless ``online_only``), by plugin, device, gateway."""
        claims = [c for c in self.claims.values() if c.online or not online_only]
        return sorted(claims, key=lambda c: (c.plugin, c.device, c.gateway))

    def boxes(self) -> list[BoxStatus]:
        """Every box that has a status or a claim (status ``?`` when only claims were seen)."""
        gateways = set(self.statuses) | {gateway for gateway, _, _ in self.claims}
        return [self.statuses.get(g) or BoxStatus(g, "") for g in sorted(gateways)]

    def online_count(self, gateway: str) -> int:
        """How many devices ``gateway`` claims online (whether or not a newer claim elsewhere)."""
        return sum(1 for c in self.claims.values() if c.gateway == gateway and c.online)
