"""``fleet: true``: a heating plugin's share of the gateways of a fleet on one broker.

Every box's heating plugin subscribes to every gateway's topic; each gateway is handled by the
one live box that ``gatewayd.fleet.membership`` names its owner (rendezvous hashing over the
boxes whose status says online). A message of another box's gateway is counted and dropped
before it is decoded. When the live boxes change, the gateways another box owns now go offline
here (``device.offline``, reason ``moved_elsewhere``, ``box``), and those this box owns now and
heard within ``offline_after`` come online here (``device.online``, reason ``taken_over``): the
mqtt sink moves their presence, and ``poll_after`` asks the silent ones for their status.
"""

from __future__ import annotations

from typing import Any

from gatewayd.protocols import hygw
from gatewayd.protocols.errors import HygwError

from gatewayd.plugin import NotFound

__all__ = ["FleetShare"]


class FleetShare:
    """The gateways this box handles; ``plugin`` is the HeatingPlugin, ``membership`` the
    daemon's ``Membership``."""

    def __init__(self, plugin: Any, membership: Any) -> None:
        self.plugin = plugin
        self.membership = membership
        #: gw_id → reactor seconds of its last message, owned or not (what a takeover announces),
        #: oldest first; at most ``max_gateways``.
        self.heard: dict[str, float] = {}
        self.skipped = 0  # messages of gateways another box handles
        self._unsubscribe = membership.subscribe(plugin.context.guard(self.changed))

    def close(self) -> None:
        self._unsubscribe()

    def owns(self, gw_id: str) -> bool:
        return self.membership.owns(gw_id)

    def keeps(self, topic: str) -> bool:
        """Whether this box handles a message on ``topic`` (the topic alone decides: cheap)."""
        try:
            direction, gw_id = hygw.topic_gw_id(topic, self.plugin.prefix)
        except HygwError:
            return True  # not a gateway's topic: the usual frame.invalid
        if direction != "set":
            return True
        heard = self.heard
        if heard.pop(gw_id, None) is None and len(heard) >= self.plugin.config.max_gateways:
            heard.pop(next(iter(heard)))  # the one unheard longest gives way
        heard[gw_id] = self.plugin.reactor.seconds()
        if self.membership.owns(gw_id):
            return True
        self.skipped += 1
        return False

    def refusal(self, gw_id: str) -> NotFound | None:
        """The 404 of a command for a gateway another box handles; None when it is ours."""
        if self.membership.owns(gw_id):
            return None
        owner = self.membership.owner(gw_id) if self.membership.ready else None
        where = f"box {owner}" if owner else "no box yet (this box's fleet view is not ready)"
        return NotFound(f"gateway {gw_id} is handled by {where}")

    def owned_count(self) -> int:
        """Gateways heard within ``offline_after`` that this box handles."""
        now, window = self.plugin.reactor.seconds(), self.plugin.config.offline_after
        return sum(1 for g, t in self.heard.items() if now - t <= window and self.owns(g))

    def changed(self) -> None:
        """The live boxes (or this box's view of them) changed: hand over and take over."""
        plugin, membership = self.plugin, self.membership
        for gateway in plugin.registry.gateways.values():
            if gateway.online and not membership.owns(gateway.gw_id):
                gateway.online = False
                owner = membership.owner(gateway.gw_id) if membership.ready else None
                data = (
                    {"reason": "moved_elsewhere", "box": owner}
                    if owner
                    else {"reason": "fleet_unavailable"}
                )
                plugin.context.record("device.offline", gateway.gw_id, data)
        now, window, taken = plugin.reactor.seconds(), plugin.config.offline_after, []
        for gw_id, heard in self.heard.items():
            if now - heard > window or not membership.owns(gw_id):
                continue
            gateway, came_online = plugin.registry.heard(gw_id)
            if gateway is not None and came_online is not None:
                gateway.last_seen = heard  # poll_after counts from its last message
                plugin.context.record("device.online", gw_id, {"reason": "taken_over"})
                taken.append(gw_id)
        if taken:
            plugin.log.info(
                "fleet: this box took over {count} gateways ({first}...)",
                count=len(taken),
                first=", ".join(sorted(taken)[:10]),
            )
