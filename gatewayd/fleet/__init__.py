"""The backend's side of a fleet of boxes behind one MQTT broker (no Twisted, no web package).

- ``presence``: ``PresenceMap``, where every device and box stands from the boxes' retained
  status and presence topics; pure, so any MQTT client can feed it.
- ``client``: ``FleetClient``, a blocking client over paho with its own network thread: the map,
  and ``command(plugin, command, device, args)`` sent to the box that holds the device.
- ``cli``: ``gatewayd fleet devices|boxes|command``.
"""

from __future__ import annotations

from gatewayd.fleet.client import Answer, CommandTimeout, FleetClient, FleetError
from gatewayd.fleet.presence import BoxStatus, Presence, PresenceMap

__all__ = [
    "Answer",
    "BoxStatus",
    "CommandTimeout",
    "FleetClient",
    "FleetError",
    "Presence",
    "PresenceMap",
]
