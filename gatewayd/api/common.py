"""Shared by every route family: the JSON error type and encoding, answers, query and body input."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger
from twisted.web import server

from gatewayd.commands.dispatch import encode_json, json_default
from gatewayd.jsonin import JsonInputError, loads_external

#: One log namespace for the whole control API, as before the split into modules.
log = Logger(namespace="gatewayd.api")

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"


class HttpError(Exception):
    """An error answer: HTTP status, a stable ``code`` and a message naming the problem."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[bytes, bytes] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _listing(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"


#: JSON for what handlers return besides plain values (shared with the command path).
_json_default = json_default


def respond(request: server.Request, status: int, payload: bytes) -> bytes:
    """Set status and JSON headers; returns the body for a render method to return or write."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return payload


def error_payload(code: str | int, message: str) -> bytes:
    return encode_json({"ok": False, "error": {"code": code, "message": message}})


def respond_error(request: server.Request, error: HttpError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return respond(request, error.status, error_payload(error.code, error.message))


def iso_utc(timestamp: float | None) -> str | None:
    """POSIX seconds as ISO 8601 UTC with microseconds, like event ``ts``."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")


def check_arguments(request: server.Request, accepted: tuple[str, ...]) -> None:
    """400 naming every query argument not in ``accepted`` (a typo must not widen a filter)."""
    unknown = sorted(
        name
        for name in (key.decode("utf-8", "replace") for key in request.args)
        if name not in accepted
    )
    if unknown:
        raise HttpError(
            400,
            "bad_request",
            f"unknown query argument(s) {', '.join(unknown)} (accepted: {', '.join(accepted)})",
        )


def query_text(request: server.Request, name: str) -> str | None:
    """The one value of query argument ``name`` (None when absent); 400 when given twice."""
    values = request.args.get(name.encode("ascii"), [])
    if len(values) > 1:
        raise HttpError(400, "bad_request", f"query argument {name!r} is given more than once")
    return values[0].decode("utf-8", "replace") if values else None


def query_int(request: server.Request, name: str, default: int, low: int, high: int | None) -> int:
    """Query argument ``name`` as a whole number from ``low`` (to ``high``); 400 naming it."""
    text = query_text(request, name)
    if text is None:
        return default
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"from {low}" if high is None else f"from {low} to {high}"
        raise HttpError(
            400,
            "bad_request",
            f"query argument {name!r} must be a whole number {bounds}, got {text!r}",
        )
    return value


def query_bool(request: server.Request, name: str) -> bool | None:
    """Query argument ``name`` as true/false (None when absent); 400 naming it otherwise."""
    text = query_text(request, name)
    if text is None:
        return None
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise HttpError(
        400, "bad_request", f"query argument {name!r} must be true or false, got {text!r}"
    )


def read_json_object(request: server.Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object (empty body = ``{}``); 413 / 400 naming the problem."""
    content = request.content
    body = content.read(max_bytes + 1) if content is not None else b""
    if getattr(request, "body_too_large", False) or len(body) > max_bytes:
        raise HttpError(413, "too_large", f"the body is larger than {max_bytes} bytes")
    if not body.strip():
        return {}
    try:  # UTF-8 without BOM, standard JSON, nesting bounded: never a RecursionError
        arguments = loads_external(body)
    except JsonInputError as exc:
        raise HttpError(400, "bad_request", f"body: {exc}") from None
    if not isinstance(arguments, dict):
        raise HttpError(
            400,
            "bad_request",
            f"the body must be a JSON object of arguments, got a JSON {_json_kind(arguments)}",
        )
    return arguments


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
