"""Structured logging to stderr through twisted.logger, filtered at the configured level."""

from __future__ import annotations

import sys
from typing import TextIO

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


def start_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send log events at ``level`` and above to stderr as text lines or JSON lines.

    Standard output is left alone (the ``stdout`` sink and the demo write events there).
    """
    stream = stream or sys.stderr
    observer = jsonFileLogObserver(stream) if fmt == "json" else textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [predicate])], redirectStandardIO=False
    )
