"""Durable per-sink queues: one SQLite file (WAL) per sink, written by one thread with group commit.

Why: an event handed to a sink's queue must survive ``kill -9`` and a sink outage, yet the reactor
must never wait on disk. So ``put()`` only appends to an in-memory list and wakes the store's
writer thread; the thread commits everything put while its previous commit ran in one transaction
per queue file (group commit), then fires the ``put`` Deferreds on the reactor thread.

Queue file ``<directory>/<sink>.db``::

    queue(seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, size INTEGER, payload TEXT)
    meta(key TEXT PRIMARY KEY, value)          -- 'handed': highest seq ever handed to the sink
    keys(key TEXT PRIMARY KEY, expires REAL)   -- idempotency keys of keyed entries

``read_batch`` returns the oldest entries (or those after a given ``seq``, to read ahead) and
commits the highest ``seq`` handed out *before* the batch reaches the reactor; ``ack`` deletes up
to a ``seq`` (it can also travel with a read, in the same transaction). Entries that were handed
out but not acknowledged when the process died are counted as ``possible_duplicates`` when the
file is opened again (the sink may already have written them).

Bounds: ``max_bytes`` (sum of the payloads' UTF-8 sizes) and ``max_age`` (seconds since the entry
was committed). ``overflow: drop_oldest`` deletes the oldest entries to make room;
``drop_newest`` refuses new entries while the queue is full (their Deferred fires with a
``Refused``). ``max_age`` expiry applies under both policies. Entries handed to the sink and not
yet acknowledged (at most two batches: the one being written and the one read ahead) are never
dropped: the delivery loop is still working on them. Every drop is counted in
``DurableQueue.dropped`` and logged at most once per 10 s per queue.

Durability (``sync``): WAL with ``synchronous=full`` fsyncs the log at every commit, so a fired
``put`` survives a power loss; ``normal`` survives a process crash (``kill -9``) but the last
commits may be lost on a power loss or kernel crash. Either way the file stays consistent.

A full disk, the bound on disk (WAL included) and idempotency keys: see ``gatewayd.queue.file``
and the README's queue section. Files shrink back after a drained backlog: the writer thread gives
free pages back in bounded ``incremental_vacuum`` steps (``gatewayd.queue.compact``). The
package: ``errors`` (what callers see), ``file`` (the writer thread's SQL on one file),
``compact`` (giving free pages back), ``durable`` (``DurableQueue``, the reactor-thread API),
``store`` (``QueueStore``, the writer thread).
"""

from gatewayd.queue.durable import DurableQueue
from gatewayd.queue.errors import DROP_REASONS, QueueClosed, QueueError, Refused
from gatewayd.queue.file import MAX_KEYS
from gatewayd.queue.store import QueueStore, stranded_queues

__all__ = [
    "DROP_REASONS",
    "MAX_KEYS",
    "DurableQueue",
    "QueueClosed",
    "QueueError",
    "QueueStore",
    "Refused",
    "stranded_queues",
]
