"""``GET /api/v1/events/stream``: events as they are routed, as Server-Sent Events.

Placeholder: written next.
"""

from __future__ import annotations

from gatewayd.api.base import JsonResource


class EventsResource(JsonResource):
    """``/api/v1/events``: parent of ``stream``."""
