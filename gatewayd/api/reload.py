"""``POST /api/v1/reload``: read the config file again and apply what changed.

Placeholder: written next.
"""

from __future__ import annotations

from gatewayd.api.base import JsonResource


class ReloadResource(JsonResource):
    """``POST /api/v1/reload``."""
