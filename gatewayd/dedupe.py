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

__all__ = ["KeyMemory"]


class KeyMemory:
    """Keys with their expiry time (POSIX seconds), at most ``limit``; reactor thread only."""

    def __init__(self, clock: Callable[[], float], limit: int = 200_000) -> None:
        self._clock = clock
        self._limit = limit
        self._expires: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._expires)

    def seen(self, key: str) -> bool:
        """True if an event with ``key`` is durable in some queue and the key has not expired."""
        expires = self._expires.get(key)
        return expires is not None and expires > self._clock()

    def add_many(self, keys: Iterable[tuple[str, float]]) -> None:
        """Note keys committed by a queue (``(key, expires)``)."""
        expires = self._expires
        for key, until in keys:
            if until > expires.get(key, 0.0):
                expires.pop(key, None)  # re-insert: the dict stays in order of noting
                expires[key] = until
        if len(expires) > self._limit:
            self._trim()

    def forget(self, key: str) -> None:
        expires = self._expires
        expires.pop(key, None)

    def _trim(self) -> None:
        now = self._clock()
        self._expires = {k: t for k, t in self._expires.items() if t > now}
        excess = len(self._expires) - self._limit
        if excess > 0:
            for key in list(self._expires)[:excess]:  # the earliest noted go first
                del self._expires[key]
