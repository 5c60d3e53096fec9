"""The status page: ``/`` for a browser (HTML), its files under ``/ui/``.

Placeholder: the page is written next; until then ``/`` answers the JSON index to every client.
"""

from __future__ import annotations

from twisted.web import server
from twisted.web.resource import NoResource, Resource


def wants_html(request: server.Request) -> bool:
    """True when the client asks for HTML first (a browser), not JSON (curl, scripts)."""
    return False


def render_index(request: server.Request) -> bytes:
    """The page itself."""
    raise NotImplementedError


def static_files() -> Resource:
    """The resource that serves the page's files (``/ui/...``)."""
    return NoResource()
