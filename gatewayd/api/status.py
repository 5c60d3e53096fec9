"""``GET /api/v1/status`` and ``GET /api/v1/history``: the box at a glance, and its last hour.

Placeholder: written next.
"""

from __future__ import annotations

from gatewayd.api.base import JsonResource


class StatusResource(JsonResource):
    """``GET /api/v1/status``."""


class HistoryResource(JsonResource):
    """``GET /api/v1/history``."""
