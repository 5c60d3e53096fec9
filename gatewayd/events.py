"""The normalized event envelope every plugin emits and every sink receives (DESIGN.md).

An event is created by a plugin through ``PluginContext.emit``; the core fills in ``id``, ``ts``,
``gateway``, ``plugin`` and ``protocol``. Its JSON form is the wire and storage format of the
pipeline: the queues store it, the sinks write it, consumers de-duplicate by ``id``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

#: Field order of the JSON form; sinks and consumers can rely on it.
FIELDS = ("id", "ts", "gateway", "plugin", "protocol", "device", "type", "data", "raw")


_OPTIONS = orjson.OPT_NON_STR_KEYS


def encode_json(obj: Any) -> str:
    """Compact JSON, keys in insertion order, non-ASCII kept as is: the one encoder of the
    pipeline (orjson: ~10x the standard library's speed on the hot path)."""
    try:
        return orjson.dumps(obj, default=str, option=_OPTIONS).decode()
    except TypeError:  # integers beyond 64 bits, or a self-containing value
        return _fallback(obj)


_fallback = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


class EventDecodeError(ValueError):
    """A stored or received text is not a valid event."""


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Every 10-bit value as its two Crockford base32 characters.
_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)


class _UlidClock:
    """Monotonic ULIDs: 48 bits of Unix milliseconds, 80 random bits incremented within a
    millisecond (the ULID spec's monotonic mode), so ids sort in the order events were made.

    Written here rather than taken from python-ulid because an id is made for every event:
    this costs ~3 us where ``str(ulid.ULID())`` costs ~10 (the tests check it against
    python-ulid's parser). The 10 characters of a millisecond are formatted once.
    """

    _RANDOM_BITS = 80

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._millis = 0
        self._random = 0
        self._prefix = ""

    def __call__(self) -> str:
        millis = time.time_ns() // 1_000_000
        with self._lock:
            if millis <= self._millis:  # same millisecond (or the clock stepped back)
                millis, random = self._millis, self._random + 1
                if random >> self._RANDOM_BITS:  # 2**80 ids in one millisecond: borrow the next
                    millis, random = millis + 1, int.from_bytes(os.urandom(10), "big") >> 1
            else:
                random = int.from_bytes(os.urandom(10), "big")
            if millis != self._millis:
                p = _PAIRS
                self._prefix = (
                    p[millis >> 40] + p[millis >> 30 & 1023] + p[millis >> 20 & 1023]
                    + p[millis >> 10 & 1023] + p[millis & 1023]
                )  # fmt: skip
            self._millis, self._random = millis, random
            prefix = self._prefix
        p = _PAIRS
        return (
            prefix + p[random >> 70] + p[random >> 60 & 1023] + p[random >> 50 & 1023]
            + p[random >> 40 & 1023] + p[random >> 30 & 1023] + p[random >> 20 & 1023]
            + p[random >> 10 & 1023] + p[random & 1023]
        )  # fmt: skip


new_id = _UlidClock()
"""A ULID: 26 characters, unique, and sortable by creation time (monotonic within a ms)."""


class _UtcClock:
    """ISO 8601 UTC with microseconds, as the envelope requires; the date and time up to the
    second are formatted once per second (``datetime.isoformat`` costs ~4 us an event)."""

    def __init__(self) -> None:
        self._cached = (-1, "")  # (second, its text): one attribute, so threads never mix them

    def __call__(self) -> str:
        second, micros = divmod(time.time_ns() // 1000, 1_000_000)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._cached = (second, prefix)
        return f"{prefix}.{micros:06d}+00:00"


utc_now_iso = _UtcClock()


@dataclass(slots=True)
class Event:
    """One normalized event; ``data`` is plain JSON-able values, ``raw`` the frame as received."""

    type: str
    device: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    raw: str | None = None
    id: str = field(default_factory=new_id)
    ts: str = field(default_factory=utc_now_iso)
    gateway: str = ""
    plugin: str = ""
    protocol: str = ""
    #: ``(idempotency key, seconds[, stamp])``: the queues store this event once while they keep
    #: the key (``PluginContext.emit(key=...)``). Not part of the envelope.
    key: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}

    def to_json(self) -> str:
        """Compact JSON, keys in envelope order, non-ASCII kept as is."""
        return encode_json(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> Event:
        if not isinstance(obj, dict):
            raise EventDecodeError(f"an event is a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("id", "ts", "type") if not isinstance(obj.get(k), str)]
        if missing:
            raise EventDecodeError(f"event lacks string field(s): {', '.join(missing)}")
        unknown = set(obj) - set(FIELDS)
        if unknown:
            raise EventDecodeError(f"event has unknown field(s): {', '.join(sorted(unknown))}")
        data = obj.get("data") or {}
        if not isinstance(data, dict):
            raise EventDecodeError("event field 'data' must be an object")
        return cls(
            type=obj["type"],
            device=obj.get("device"),
            data=data,
            raw=obj.get("raw"),
            id=obj["id"],
            ts=obj["ts"],
            gateway=obj.get("gateway") or "",
            plugin=obj.get("plugin") or "",
            protocol=obj.get("protocol") or "",
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EventDecodeError(f"not JSON: {exc}") from None
        return cls.from_dict(obj)
