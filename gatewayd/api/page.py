"""The status page: ``/`` for a browser (HTML), its files under ``/ui/``.

The page is plain HTML, CSS and JavaScript from ``gatewayd/api/static/``: no build step and
nothing from the internet. The files hold no data and are served without the token; the page
fetches everything it shows from ``/api/v1/...`` with the token (a Bearer header, never a cookie).
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources

from twisted.web import server
from twisted.web.resource import Resource

from gatewayd.api.common import HttpError, respond_error

#: Scripts, styles, images and fetches from this origin only; nothing inline, no frames, no forms
#: posted anywhere (the page sends with fetch()), no plugins.
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'"
)

#: Headers on every answer of the page and its files.
SECURITY_HEADERS = {
    b"content-security-policy": CONTENT_SECURITY_POLICY,
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
}

#: Content type by file extension; a file of another kind is not served.
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".txt": b"text/plain; charset=utf-8",
}

#: A file name the static resource may serve: one path segment, no leading dot.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")

_MEDIA_RANGE = re.compile(r"\s*([^\s;,]+)\s*((?:;[^,]*)?)")


def _accept_ranges(header: str) -> list[tuple[str, str, float]]:
    """(type, subtype, q) of each media range of an Accept header; malformed ones are skipped."""
    ranges = []
    for part in header.split(","):
        match = _MEDIA_RANGE.match(part)
        if match is None or "/" not in match.group(1):
            continue
        kind, _, sub = match.group(1).lower().partition("/")
        q = 1.0
        for param in match.group(2).split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        ranges.append((kind, sub, q))
    return ranges


def _quality(ranges: list[tuple[str, str, float]], media_type: str) -> float:
    """The q the Accept ranges give ``media_type``: the most specific matching range wins."""
    kind, _, sub = media_type.partition("/")
    best, specificity = 0.0, -1
    for r_kind, r_sub, q in ranges:
        if (r_kind, r_sub) == (kind, sub):
            rank = 2
        elif (r_kind, r_sub) == (kind, "*"):
            rank = 1
        elif (r_kind, r_sub) == ("*", "*"):
            rank = 0
        else:
            continue
        if rank > specificity:
            best, specificity = q, rank
    return best


def wants_html(request: server.Request) -> bool:
    """True when the client asks for HTML first (a browser), not JSON (curl, scripts).

    Browsers name ``text/html`` and rank ``*/*`` lower; curl sends ``*/*`` alone and scripts
    send nothing or ``application/json``: those keep getting the JSON index. A tie is JSON.
    """
    header = request.getHeader(b"accept")
    if not header:
        return False
    ranges = _accept_ranges(header.decode("latin-1"))
    if not any((kind, sub) == ("text", "html") for kind, sub, _ in ranges):
        return False  # */* alone or text/* alone is not a browser asking for a page
    return _quality(ranges, "text/html") > _quality(ranges, "application/json")


def _static_dir() -> resources.abc.Traversable:
    return resources.files("gatewayd.api").joinpath("static")


def render_index(request: server.Request) -> bytes:
    """The page itself (``static/index.html``), with the security headers and ``no-store``."""
    body = _static_dir().joinpath("index.html").read_bytes()
    request.setResponseCode(200)
    request.setHeader(b"content-type", CONTENT_TYPES[".html"])
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"vary", b"accept")
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    return body


class StaticFiles(Resource):
    """``/ui/NAME``: the files of ``static/`` read once at start, by exact name only.

    No directory listing, no subdirectories, no dot files, nothing outside the folder: the
    names are those found at start, so ``..``, encoded slashes and symlink games never reach the
    file system. GET and HEAD only. Browsers revalidate (``no-cache`` with an ETag), so a new
    version of the package is seen on the next load.
    """

    isLeaf = True

    def __init__(self, files: dict[str, tuple[bytes, bytes]]) -> None:
        super().__init__()
        #: name -> (content type, body)
        self.files = files
        self.etags = {name: _etag(body) for name, (_, body) in files.items()}

    @classmethod
    def from_package(cls) -> StaticFiles:
        """The files of ``gatewayd/api/static/`` with a known content type."""
        files = {}
        for entry in _static_dir().iterdir():
            suffix = "." + entry.name.rpartition(".")[2] if "." in entry.name else ""
            if entry.is_file() and _SAFE_NAME.match(entry.name) and suffix in CONTENT_TYPES:
                files[entry.name] = (CONTENT_TYPES[suffix], entry.read_bytes())
        return cls(files)

    def render(self, request: server.Request) -> bytes:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if request.method not in (b"GET", b"HEAD"):
            error = HttpError(
                405,
                "method_not_allowed",
                f"{request.method.decode('ascii', 'replace')} is not allowed on "
                f"{request.path.decode('utf-8', 'replace')} (allowed: GET, HEAD)",
                {b"allow": b"GET, HEAD"},
            )
            return respond_error(request, error)
        segments = request.postpath
        name = segments[0].decode("utf-8", "replace") if len(segments) == 1 else ""
        if name not in self.files:
            path = request.path.decode("utf-8", "replace")
            return respond_error(request, HttpError(404, "not_found", f"no such file: {path}"))
        content_type, body = self.files[name]
        etag = self.etags[name]
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"etag", etag)
        if etag in (request.getHeader(b"if-none-match") or b"").replace(b" ", b"").split(b","):
            request.setResponseCode(304)
            return b""
        return body


def _etag(body: bytes) -> bytes:
    return b'"' + hashlib.sha256(body).hexdigest()[:16].encode("ascii") + b'"'


def static_files() -> Resource:
    """The resource that serves the page's files (``/ui/...``)."""
    return StaticFiles.from_package()
