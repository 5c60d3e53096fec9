"""The idempotency keys the queues hold, in memory: which keyed events are already durable.

Why: a device re-sends what it was not acknowledged for, also across a crash of the daemon. A
plugin gives such an event a key (``PluginContext.emit(..., key=...)``); each queue commits the
key with the event and stores a keyed event only once while it keeps the key (see
``DurableQueue.put``). This map mirrors those keys for the reactor thread, loaded from every
queue file at start, so a plugin can ask ``seen(key)`` without touching the disk: the power-bank
plugin keeps its record of closed lends this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["KeyMemory"]


class KeyMemory:
    """Keys with their expiry time (POSIX seconds), at most ``limit``; reactor thread only."""

    def __init__(self, clock: Callable[[], float], limit: int = 200_000) -> None:
        self._clock = clock
        self._limit = limit
        self._expires: dict[str, float] = {}
        self._stamp = 0
        #: Stamp of each key's last forget: a commit of a put made before it must not bring the
        #: key back (the commit reaches the reactor after the forget was called).
        self._forgotten: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._expires)

    def seen(self, key: str) -> bool:
        """True if an event with ``key`` is durable in some queue and the key has not expired."""
        expires = self._expires.get(key)
        return expires is not None and expires > self._clock()

    def stamp(self) -> int:
        """A number that orders puts and forgets: a keyed put carries the one current at emit."""
        self._stamp += 1
        return self._stamp

    def add_many(self, keys: Iterable[tuple[Any, ...]]) -> None:
        """Note keys committed by a queue: ``(key, expires)`` or ``(key, expires, stamp)``."""
        expires = self._expires
        forgotten = self._forgotten
        for key, until, *stamp in keys:
            if stamp and stamp[0] is not None and forgotten.get(key, -1) > stamp[0]:
                continue  # put before a forget that has already been called
            if until > expires.get(key, 0.0):
                expires.pop(key, None)  # re-insert: the dict stays in order of noting
                expires[key] = until
        if len(expires) > self._limit:
            self._trim()

    def forget(self, key: str) -> None:
        self._expires.pop(key, None)
        if len(self._forgotten) >= self._limit:
            self._forgotten.clear()  # rare: only a put older than every stamp now could be wrong
        self._forgotten[key] = self.stamp()

    def _trim(self) -> None:
        now = self._clock()
        self._expires = {k: t for k, t in self._expires.items() if t > now}
        excess = len(self._expires) - self._limit
        if excess > 0:
            for key in list(self._expires)[:excess]:  # the earliest noted go first
                del self._expires[key]
