"""Structured logging to stderr through twisted.logger, filtered at the configured level.

``text``: Twisted's own lines (time, namespace, message). ``json``: one JSON object per line,
for journald's or a log shipper's parsers: ``ts``, ``level``, ``namespace``, the rendered
``message``, the ``fields`` its format names, and ``traceback`` for a logged failure. Only fields
the message itself shows are written, so the JSON says no more than the text line would.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from string import Formatter
from typing import Any, TextIO

import orjson
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

_SCALARS = (str, int, float, bool, type(None))


class LogThrottle:
    """Whether a log line that can repeat with every event is due: the first time, then at
    most once per ``interval`` seconds of ``now()``, so a failure hit by every event (a full
    disk) costs a line every ``interval``, not one per event."""

    def __init__(self, now: Callable[[], float], interval: float = 10.0) -> None:
        self._now = now
        self.interval = interval
        self._last: float | None = None

    def due(self) -> bool:
        now = self._now()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True


def json_line(event: dict[str, Any]) -> str:
    """One log event as one line of JSON (see the module docstring)."""
    level = event.get("log_level")
    stamp = event.get("log_time")
    record: dict[str, Any] = {
        "ts": datetime.fromtimestamp(stamp, UTC).isoformat() if stamp is not None else None,
        "level": level.name if level is not None else None,
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    fields = {}
    try:
        names = [name for _, name, _, _ in Formatter().parse(event.get("log_format") or "")]
    except ValueError:  # a malformed format: formatEvent said so in the message
        names = []
    for name in names:
        base = (name or "").split(".")[0].split("[")[0]
        if base and base in event and not base.startswith("log_"):
            value = event[base]
            fields[base] = value if isinstance(value, _SCALARS) else str(value)
    if fields:
        record["fields"] = fields
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    try:
        return orjson.dumps(record, default=str).decode() + "\n"
    except TypeError:  # an integer beyond 64 bits: the standard library writes it
        return json.dumps(record, default=str, ensure_ascii=False) + "\n"


_UDP_CLOSED = re.compile(r"\(UDP Port \d+ Closed\)")
_PROTOCOL_STARTS = re.compile(r"(?:Starting|Stopping) protocol <.*>", re.S)
_STARTING_ON = re.compile(r"(\S+) starting on \d+")


def _datagram_protocol_names() -> set[str]:
    """Class names of every ``DatagramProtocol`` subclass imported so far (read per line, so
    a plugin imported later counts too; only for lines that look like a port opening)."""
    from twisted.internet.protocol import AbstractDatagramProtocol

    names, pending = set(), [AbstractDatagramProtocol]
    while pending:
        cls = pending.pop()
        names.add(cls.__name__)
        pending.extend(cls.__subclasses__())
    return names


def udp_noise(event: dict[str, Any]) -> PredicateResult:
    """A log filter: drops the info lines Twisted writes for every UDP port, whoever opens it
    (``X starting on N``, ``Starting protocol <...>``, ``Stopping protocol <...>``,
    ``(UDP Port N Closed)``), which say nothing an operator needs and repeat on every reload.

    ``Starting``/``Stopping protocol`` are written only for datagram protocols whose ``noisy``
    is true (gatewayd's own set it false); ``starting on`` and ``Closed`` always are. TCP ports'
    lines are kept. Twisted writes them through its legacy ``log.msg``: matched by text.
    """
    if event.get("log_namespace") != "log_legacy":
        return PredicateResult.maybe
    text = event.get("log_text")
    if not isinstance(text, str):
        return PredicateResult.maybe
    if _UDP_CLOSED.fullmatch(text) or _PROTOCOL_STARTS.fullmatch(text):
        return PredicateResult.no
    starting = _STARTING_ON.fullmatch(text)
    if starting and starting.group(1) in _datagram_protocol_names():
        return PredicateResult.no
    return PredicateResult.maybe


def start_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send log events at ``level`` and above to stderr as text lines or JSON lines.

    Standard output is left alone (the ``stdout`` sink and the demo write events there).
    """
    stream = stream or sys.stderr
    observer = FileLogObserver(stream, json_line) if fmt == "json" else textFileLogObserver(stream)
    global _predicate
    predicate = _predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [predicate, udp_noise])], redirectStandardIO=False
    )


#: The level filter of ``start_logging`` (None before it ran: in tests, as a library).
_predicate: LogLevelFilterPredicate | None = None


def set_log_level(level: str) -> None:
    """Change the level ``start_logging`` filters at (a config reload); no-op before it."""
    if _predicate is not None:
        _predicate.defaultLogLevel = LEVELS[level]
        _predicate.clearLogLevels()
