"""The status page without a browser: content negotiation at ``/``, the page's headers, and the
static files under ``/ui/`` (only those files, right types, no listing, no way out of the folder).

A real listening site (pytest-twisted, real reactor); requests go through ``http.client`` in a
thread so that raw paths (``..``, encoded slashes) reach the server exactly as written.
"""

from __future__ import annotations

import http.client as http_client
import json
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.web.test.requesthelper import DummyRequest

from gatewayd.api import listen_api, page
from gatewayd.config_model import ApiSection
from gatewayd.testing import DaemonView

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
FIREFOX_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"


@pytest.fixture
def base() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of the control API over an empty daemon view with a token."""
    from twisted.internet import reactor

    daemon = DaemonView(reactor, api_token="page-token")
    port = listen_api(daemon, ApiSection(listen="127.0.0.1:0"), reactor)
    yield f"127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def _fetch(address: str, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any, bytes]:
    connection = http_client.HTTPConnection(address, timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def fetch(
    address: str, path: str, method: str = "GET", **headers: str
) -> defer.Deferred[tuple[int, Any, bytes]]:
    """(status, headers, body) of one request; keyword headers use ``_`` for ``-``."""
    named = {name.replace("_", "-"): value for name, value in headers.items()}
    return threads.deferToThread(_fetch, address, method, path, named)


def accept(header: str | None) -> bool:
    request = DummyRequest([b""])
    if header is not None:
        request.requestHeaders.addRawHeader(b"accept", header.encode())
    return page.wants_html(request)


# --- negotiation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, html",
    [
        (BROWSER_ACCEPT, True),
        (FIREFOX_ACCEPT, True),
        ("text/html", True),
        ("application/json;q=0.5, text/html", True),
        (None, False),  # scripts that send nothing
        ("*/*", False),  # curl
        ("application/json", False),
        ("text/html, application/json", False),  # a tie is JSON
        ("text/html;q=0.5, application/json", False),
        ("text/html;q=0, */*", False),
        ("text/*, */*;q=0.1", False),  # text/html not named: not a browser
        ("text/html;q=oops, */*", False),  # a malformed q counts as 0
        ("garbage, ,;;", False),
    ],
)
def test_wants_html_only_when_html_outranks_json(header: str | None, html: bool) -> None:
    assert accept(header) is html


@pytest_twisted.inlineCallbacks
def test_browser_gets_the_page_with_strict_headers(base):
    status, headers, body = yield fetch(base, "/", accept=BROWSER_ACCEPT)
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    policy = headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert b"<!DOCTYPE html>" in body and b'src="/ui/app.js"' in body
    # the page holds no data and is served without the token; everything it shows needs one


@pytest_twisted.inlineCallbacks
def test_curl_and_scripts_keep_the_json_index(base):
    for headers in ({"accept": "*/*"}, {}, {"accept": "application/json"}):
        status, response_headers, body = yield fetch(base, "/", **headers)
        assert status == 200
        assert response_headers["content-type"] == "application/json; charset=utf-8"
        assert "GET /health" in json.loads(body)["endpoints"]


def test_the_page_has_no_inline_script_or_style() -> None:
    """The Content-Security-Policy would block them: the page must work without."""
    html = resources.files("gatewayd.api").joinpath("static", "index.html").read_text()
    assert "<script>" not in html and "<style" not in html and " style=" not in html
    assert " on" + "click=" not in html and "javascript:" not in html
    for name in ("app.js", "style.css"):
        assert f'"/ui/{name}"' in html
    assert "http://" not in html and "https://" not in html  # nothing from the internet


# --- static files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content_type, fragment",
    [
        ("app.js", "text/javascript; charset=utf-8", b'"use strict";'),
        ("style.css", "text/css; charset=utf-8", b":root"),
        ("index.html", "text/html; charset=utf-8", b"<!DOCTYPE html>"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_static_files_are_served_open_with_their_type(base, name, content_type, fragment):
    status, headers, body = yield fetch(base, f"/ui/{name}")  # no token: the files hold no data
    assert status == 200
    assert headers["content-type"] == content_type
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-cache"
    assert fragment in body
    etag = headers["etag"]
    status, _, body = yield fetch(base, f"/ui/{name}", if_none_match=etag)
    assert (status, body) == (304, b"")
    status, headers, body = yield fetch(base, f"/ui/{name}", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["content-type"] == content_type


@pytest.mark.parametrize(
    "path",
    [
        "/ui/",  # no directory listing
        "/ui",
        "/ui/nothing.js",
        "/ui/../api/v1/plugins",
        "/ui/..%2fsite.py",
        "/ui/%2e%2e/site.py",
        "/ui/..%2f..%2f__init__.py",
        "/ui/app.js/",
        "/ui/app.js/x",
        "/ui/static/app.js",
        "/ui/.app.js",
        "/ui/page.py",
        "/ui/%2fetc%2fpasswd",
        "/ui/..",
        "/ui/app.js%00",
    ],
)
@pytest_twisted.inlineCallbacks
def test_only_the_static_files_are_reachable(base, path):
    status, headers, body = yield fetch(base, path)
    assert status == 404, body
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(body)["error"]["code"] == "not_found"


@pytest_twisted.inlineCallbacks
def test_static_files_take_get_and_head_only(base):
    status, headers, body = yield fetch(base, "/ui/app.js", method="POST")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert json.loads(body)["error"]["code"] == "method_not_allowed"


@pytest_twisted.inlineCallbacks
def test_data_still_needs_the_token(base):
    status, _, body = yield fetch(base, "/api/v1/plugins", accept=BROWSER_ACCEPT)
    assert status == 401
    assert json.loads(body)["error"]["code"] == "unauthorized"
    status, _, _ = yield fetch(base, "/api/v1/plugins", authorization="Bearer page-token")
    assert status == 200


def test_static_files_are_exactly_the_folder() -> None:
    folder = resources.files("gatewayd.api").joinpath("static")
    served = page.StaticFiles.from_package().files
    assert set(served) == {e.name for e in folder.iterdir() if e.is_file()}
    assert {"index.html", "app.js", "style.css"} <= set(served)
