"""One thread for blocking writes, run in order: the request id store's disk I/O.

The reactor thread never waits on disk (SQLite commits fsync); results come back to the reactor
as Deferreds. It is ``gatewayd.worker.Worker``, the blocking sinks' thread, under this name.
"""

from __future__ import annotations

from gatewayd.worker import Worker as Writer

__all__ = ["Writer"]
