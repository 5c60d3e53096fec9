"""One daemon thread that runs blocking calls in order; results come back on the reactor thread.

Why: a file sink, SQLite or a stalled disk must never block the reactor. Each user (a blocking
sink, the request-id store) gets its own thread, so calls stay in order without locks. The thread
is a daemon thread and ``stop`` does not join it: a call stuck on a stalled disk cannot hang the
daemon's shutdown.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["Worker"]


class Worker:
    """One daemon thread running calls in order; results come back on the reactor thread."""

    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def call(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``function(*args)`` on the thread; the Deferred fires with its result."""
        d: defer.Deferred = defer.Deferred()
        self._calls.put((function, args, d))
        return d

    def stop(self) -> None:
        """End the thread after the calls already queued."""
        self._calls.put(None)

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            function, args, d = item
            try:
                result = function(*args)
            except BaseException:
                self._reactor.callFromThread(d.errback, Failure())
            else:
                self._reactor.callFromThread(d.callback, result)
