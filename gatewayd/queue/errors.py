"""What the queue tells its callers: its errors, and ``Refused`` for a put a full queue refused."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DROP_REASONS", "QueueClosed", "QueueError", "Refused"]

#: Keys of ``DurableQueue.dropped``.
DROP_REASONS = ("overflow_oldest", "overflow_newest", "max_age")


class QueueError(Exception):
    """A queue operation that could not be carried out (file not openable, disk error...)."""


class QueueClosed(QueueError):
    """The queue's store is stopped (or stopping): nothing more can be put or read."""


@dataclass(frozen=True, slots=True)
class Refused:
    """Result of a put (or an emit) that a full ``drop_newest`` queue did not store."""

    queues: tuple[str, ...]
    reason: str = "overflow_newest"
