"""The delivery loop of one sink: read a batch from its durable queue, write it, acknowledge it.

Why here and not in each sink: retries, backoff, timeouts and replay pacing are the same for every
destination, so a sink only implements ``open``/``write``/``close`` (``gatewayd.sinks.base``).

Loop: ``read_batch`` (writer thread) → ``sink.write(batch)`` bounded by ``write_timeout`` →
acknowledge → next batch. The next batch is read while the current one is written, and an
acknowledgement travels with the following read, so a busy sink costs one queue transaction per
batch. When the queue is empty the loop sleeps until the queue reports a commit (no polling).

A failed, raising or timed-out write (or open) is retried with capped, jittered exponential
backoff (``retry_initial`` .. ``retry_max``), always the same batch, so events stay in order.
A failure whose exception has a ``retry_after`` (seconds, as an HTTP ``Retry-After``) waits at
least that long: the destination said when it can take the batch.

Replay pacing: when a sink recovers from a failure, and at start when the queue file held entries
from the previous run, the entries queued up to that moment (the backlog) are delivered at no
more than ``replay_rate`` events/s (token bucket, bursts of up to one batch or one second's
worth, whichever is smaller). Events that arrive during the replay queue up behind the backlog
and, once it is through, go at full speed: pacing ends when the backlog does.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.events import Event, EventDecodeError
from gatewayd.queue import DurableQueue, QueueClosed
from gatewayd.schema import SinkConfig
from gatewayd.sinks.base import Sink

__all__ = ["EventBatch", "SinkRunner", "describe_failure"]


class EventBatch(Sequence[Event]):
    """One batch as a sink receives it: the events, decoded on first use, and ``payloads``.

    ``payloads`` are the events' JSON texts as queued, in the same order: a sink that sends or
    stores the text as it is (a file, an HTTP body, SQLite's JSON functions) never pays for
    decoding. Entries that do not decode are left out of the sequence and listed in
    ``invalid`` (they can only come from a damaged queue file).
    """

    __slots__ = ("payloads", "invalid", "_events")

    def __init__(self, payloads: list[str]) -> None:
        self.payloads = payloads
        self.invalid: list[str] = []
        self._events: list[Event] | None = None

    def _decoded(self) -> list[Event]:
        if self._events is None:
            events = []
            for payload in self.payloads:
                try:
                    events.append(Event.from_json(payload))
                except EventDecodeError as exc:
                    self.invalid.append(str(exc))
            self._events = events
        return self._events

    def __len__(self) -> int:
        return len(self._decoded())

    @overload
    def __getitem__(self, index: int) -> Event: ...
    @overload
    def __getitem__(self, index: slice) -> list[Event]: ...
    def __getitem__(self, index: int | slice) -> Event | list[Event]:
        return self._decoded()[index]

    def __iter__(self) -> Iterator[Event]:
        return iter(self._decoded())


def describe_failure(failure: Failure, timeout: float | None = None) -> str:
    """A one-line description of why a write failed, for logs and ``/health``."""
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return f"timed out after {timeout:g}s" if timeout is not None else "timed out"
    message = failure.getErrorMessage()
    name = failure.type.__name__ if failure.type else "Error"
    return f"{name}: {message}" if message else name


def _settled_within(d: defer.Deferred, seconds: float, reactor: Any) -> defer.Deferred:
    """A Deferred firing (None) when ``d`` has fired or ``seconds`` passed; ``d`` is untouched."""
    out: defer.Deferred = defer.Deferred()

    def give_up() -> None:
        if not out.called:
            out.callback(None)

    call = reactor.callLater(seconds, give_up)

    def settled(result: Any) -> Any:
        if call.active():
            call.cancel()
        give_up()
        return result

    d.addBoth(settled)
    return out


class _ReadAhead:
    """The next batch, read while the current one is written."""

    __slots__ = ("deferred", "limit", "rows", "done")

    def __init__(self, deferred: defer.Deferred, limit: int) -> None:
        self.deferred = deferred
        self.limit = limit
        self.rows: list[tuple[int, str]] | None = None
        self.done = False


class SinkRunner:
    """Feeds one sink from its durable queue; see the module docstring for the loop.

    Figures for ``/health`` and ``/metrics``: ``state`` ("starting", "ok", "retrying",
    "stopped"), ``last_error`` with ``last_error_at`` (POSIX time) and ``recovered_at`` (when it
    was ok again after its last failure; None while failing or before any failure),
    ``failing_since`` (None unless retrying), ``delivered`` (events the sink acknowledged),
    ``failures`` (failed or timed-out open/write attempts), ``invalid`` (queued entries that were
    not valid events and were skipped), ``replaying`` (pacing is on).

    ``retry_now()`` cuts a backoff wait short: a sink that learns its destination is back (the
    mqtt sink's link reconnected) calls it through ``SinkContext.retry_now``.

    ``backoff`` maps the attempt number (0, 1, ...) to a delay; the default is Twisted's
    ``backoffPolicy`` from ``retry_initial`` to ``retry_max`` with up to ``retry_initial`` of
    random jitter.
    """

    def __init__(
        self,
        sink: Sink,
        queue: DurableQueue,
        config: SinkConfig,
        reactor: Any,
        log: Logger | None = None,
        *,
        backoff: Callable[[int], float] | None = None,
    ) -> None:
        self.sink = sink
        self.queue = queue
        self.config = config
        self.reactor = reactor
        self.log = log or Logger(namespace=f"gatewayd.sink.{sink.name}")
        self.name = sink.name
        self.state = "starting"
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall clock, for /health and the status page
        self.recovered_at: float | None = None
        self.delivered = 0
        self.failures = 0
        self.invalid = 0
        self.replaying = False
        self._backoff = backoff or backoffPolicy(
            initialDelay=config.retry_initial,
            maxDelay=config.retry_max,
            jitter=lambda: random.random() * config.retry_initial,
        )
        self._attempt = 0
        self._failing_since: float | None = None
        self._running = False
        self._stopping = False
        self._busy = False  # an open, read or write is in flight
        self._woken = False  # the queue committed entries since the last read was issued
        self._timer: Any = None  # a scheduled retry or a pacing wait
        self._current: defer.Deferred | None = None
        self._last_ack: defer.Deferred | None = None
        self._batch: tuple[int, EventBatch] | None = None  # (last seq, events) being written
        self._next: _ReadAhead | None = None
        self._awaiting_next = False  # the batch is written, the read-ahead has not arrived
        self._ack_due: int | None = None  # written up to this seq, acknowledgement not sent
        self._tokens = 0.0
        self._tokens_at = 0.0
        self._replay_started = 0.0
        self._replayed = 0
        self._replay_until = 0
        self._stop_waiters: list[defer.Deferred] | None = None
        queue.subscribe(self.wake)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the sink (retried on failure), then deliver whatever the queue holds."""
        if self._running:
            return
        self._running = True
        self._busy = True
        self._current = self.queue.when_open()
        self._current.addCallbacks(self._open, self._queue_unusable)

    def stop(self) -> defer.Deferred:
        """Finish or abandon the write in flight (within ``write_timeout``), close the sink."""
        d: defer.Deferred = defer.Deferred()
        if self._stop_waiters is None:
            self._stop_waiters = [d]
            defer.ensureDeferred(self._stop()).addBoth(self._stopped)
        elif self.state == "stopped" and not self._stop_waiters:
            d.callback(None)
        else:
            self._stop_waiters.append(d)
        return d

    async def _stop(self) -> None:
        self._stopping = True
        self._cancel_timer()
        if not self._running:
            return
        timeout = self.config.write_timeout
        deadline = self.reactor.seconds() + timeout + 1.0
        while self.reactor.seconds() < deadline:
            if not self._busy:
                self._send_due_ack()
            pending = [
                d
                for d in (
                    self._current,
                    self._next.deferred if self._next is not None else None,
                    self._last_ack,
                )
                if d is not None and not d.called
            ]
            if not pending:
                break
            await _settled_within(pending[0], deadline - self.reactor.seconds(), self.reactor)
        closing = defer.maybeDeferred(self.sink.close)
        closing.addErrback(
            lambda f: self.log.warn(
                "sink {sink}: close failed: {error}", sink=self.name, error=describe_failure(f)
            )
        )
        await _settled_within(closing, timeout, self.reactor)

    def _stopped(self, result: Any) -> None:
        if isinstance(result, Failure):
            self.log.failure("sink {sink}: error while stopping", result, sink=self.name)
        self.state = "stopped"
        self._running = False
        self.queue.unsubscribe(self.wake)  # a reload may hand the queue to a new runner
        waiters, self._stop_waiters = self._stop_waiters or [], []
        for d in waiters:
            d.callback(None)

    def _queue_unusable(self, failure: Failure) -> None:
        self._busy = False
        self._current = None
        self.state = "stopped"
        self.last_error = describe_failure(failure)
        self.log.error(
            "sink {sink}: queue unusable: {error}", sink=self.name, error=self.last_error
        )

    # --- opening ------------------------------------------------------------------------------

    def _open(self, _: Any = None) -> None:
        self._timer = None
        if self._stopping:
            self._busy = False
            return
        self._busy = True
        d = defer.maybeDeferred(self.sink.open)
        d.addTimeout(self.config.write_timeout, self.reactor)
        self._current = d
        d.addCallbacks(self._opened, self._open_failed)

    def _opened(self, _: Any) -> None:
        self._busy = False
        self._current = None
        first_open = self.state == "starting"
        if self.state == "retrying":
            self._recovered()
        self.state = "ok"
        if self.config.replay_rate is not None:
            if first_open and self.queue.backlog_at_open:
                # Entries left by the previous run: replay those paced, not what came since.
                self._start_replay(full_bucket=True, until=self.queue.last_seq_at_open)
            elif not first_open and self.queue.depth:
                self._start_replay(full_bucket=True, until=self.queue.last_seq)
        self._pump()

    def _open_failed(self, failure: Failure) -> None:
        self._busy = False
        self._current = None
        self._failed(failure, "open")
        if not self._stopping:
            self._timer = self.reactor.callLater(self._next_delay(failure), self._open)

    # --- the loop -----------------------------------------------------------------------------
    #
    # Idle: a commit calls wake() → read a batch (carrying the acknowledgement still due, if any).
    # Busy: write batch k while batch k+1 is read ahead ("prefetch", not while pacing a replay);
    # when k is written, its acknowledgement travels with the read of k+2 (one queue commit per
    # batch), and k+1 is written. A write that fails is retried alone; k+1 waits in memory.

    def wake(self) -> None:
        """New entries were committed: start a read unless one is already under way."""
        self._woken = True
        if not self._busy and self._timer is None and self.state == "ok" and not self._stopping:
            self._pump()

    def _pump(self) -> None:
        if self._busy or self._timer is not None or self._stopping or self.state != "ok":
            return
        limit = self.config.batch_size
        if self.replaying:
            wait = self._token_wait()
            if wait > 0:
                self._timer = self.reactor.callLater(wait, self._timer_fired)
                return
            limit = max(1, min(limit, int(self._tokens)))
        self._busy = True
        self._woken = False
        d = self.queue.read_batch(limit, ack_upto=self._take_ack())
        self._current = d
        d.addCallbacks(self._got_batch, self._read_failed, callbackArgs=(limit, self.replaying))

    def _timer_fired(self) -> None:
        self._timer = None
        self._pump()
        if self._timer is None and not self._busy:
            self._send_due_ack()

    def _idle(self) -> None:
        """Nothing in flight: read again if there is news, and send any acknowledgement due."""
        self._busy = False
        if self._woken or self._ack_due is not None:
            self._pump()
        self._send_due_ack()

    def _got_batch(self, rows: list[tuple[int, str]], limit: int, paced: bool) -> None:
        self._current = None
        self._count_replayed(rows, limit if paced else None)
        if self._stopping or not rows:  # a read during shutdown stays for the next start
            self._idle()
            return
        self._batch = self._decode(rows)
        self._prefetch()
        self._write()

    def _prefetch(self) -> None:
        """Read the batch after the current one while the current one is written."""
        if self.replaying or self._stopping or self._batch is None:
            return
        limit = self.config.batch_size
        self._woken = False
        d = self.queue.read_batch(limit, after=self._batch[0], ack_upto=self._take_ack())
        ahead = _ReadAhead(d, limit)
        self._next = ahead
        d.addCallbacks(self._prefetched, self._prefetch_failed, (ahead,), None, (ahead,))

    def _prefetched(self, rows: list[tuple[int, str]], ahead: _ReadAhead) -> None:
        ahead.rows = rows
        ahead.done = True
        if self._awaiting_next:
            self._continue()

    def _prefetch_failed(self, failure: Failure, ahead: _ReadAhead) -> None:
        ahead.done = True  # rows None: the entries stay queued and are read again
        if not failure.check(QueueClosed):
            self.log.error(
                "sink {sink}: reading ahead failed: {error}",
                sink=self.name,
                error=describe_failure(failure),
            )
        if self._awaiting_next:
            self._continue()

    def _continue(self) -> None:
        """The current batch is written; go on with the batch read ahead."""
        ahead, self._next = self._next, None
        self._awaiting_next = False
        if ahead is None or not ahead.rows or self._stopping:
            self._idle()
            return
        self._count_replayed(ahead.rows, None)  # read ahead before any replay began
        self._batch = self._decode(ahead.rows)
        self._prefetch()
        self._write()

    @staticmethod
    def _decode(rows: list[tuple[int, str]]) -> tuple[int, EventBatch]:
        return rows[-1][0], EventBatch([payload for _, payload in rows])

    def _write(self) -> None:
        self._timer = None
        assert self._batch is not None
        if self._stopping:
            self._batch = None  # left queued for the next start
            if self._next is not None and not self._next.done:
                self._awaiting_next = True
            else:
                self._continue()
            return
        self._busy = True
        events = self._batch[1]
        d = defer.maybeDeferred(self.sink.write, events)
        d.addTimeout(self.config.write_timeout, self.reactor)
        self._current = d
        d.addCallbacks(self._written, self._write_failed)

    def _written(self, _: Any) -> None:
        assert self._batch is not None
        upto, events = self._batch
        self._batch = None
        self._current = None
        self.delivered += len(events.payloads) - len(events.invalid)
        if events.invalid:
            self.invalid += len(events.invalid)
            self.log.error(
                "sink {sink}: skipped {count} queue entries that are not events: {error}",
                sink=self.name,
                count=len(events.invalid),
                error=events.invalid[0],
            )
        self._ack_due = upto
        if self.state == "retrying":
            self._recovered()
            self.state = "ok"
            if self.config.replay_rate is not None:
                written = len(events.payloads)  # the retried batch is the backlog's first part
                self._start_replay(full_bucket=False, until=self.queue.last_seq, replayed=written)
        if self._next is not None and not self._next.done:
            self._awaiting_next = True
        else:
            self._continue()

    def _take_ack(self) -> int | None:
        upto, self._ack_due = self._ack_due, None
        return upto

    def _send_due_ack(self) -> None:
        upto = self._take_ack()
        if upto is not None:
            self._last_ack = self.queue.ack(upto)
            self._last_ack.addErrback(self._ack_failed)

    def _count_replayed(self, rows: list[tuple[int, str]], paced_limit: int | None) -> None:
        """Count a batch against the replay; end it at the backlog's last entry, or when a paced
        read found fewer entries than it asked for (the queue has nothing more). A short batch
        read before the replay began (the read-ahead of an outage) says nothing about the end."""
        if not self.replaying:
            return
        self._tokens -= len(rows)
        self._replayed += len(rows)
        short = paced_limit is not None and len(rows) < paced_limit
        if short or not rows or rows[-1][0] >= self._replay_until:
            self._end_replay()

    def _write_failed(self, failure: Failure) -> None:
        self._current = None
        self._failed(failure, "write")
        if self._stopping:
            self._busy = False
            return
        self._timer = self.reactor.callLater(self._next_delay(failure), self._write)

    def _read_failed(self, failure: Failure) -> None:
        # An acknowledgement that travelled with this read is lost: its batch is sent again.
        self._current = None
        self._busy = False
        if failure.check(QueueClosed):
            self.log.info("sink {sink}: queue closed, delivery ends", sink=self.name)
            return
        self.log.error(
            "sink {sink}: reading the queue failed: {error}",
            sink=self.name,
            error=describe_failure(failure),
        )
        if not self._stopping:
            self._timer = self.reactor.callLater(self._next_delay(), self._timer_fired)

    def _ack_failed(self, failure: Failure) -> None:
        # The batch stays queued and is delivered again (the sinks are idempotent per id).
        self.log.error(
            "sink {sink}: acknowledging a batch failed (it will be sent again): {error}",
            sink=self.name,
            error=describe_failure(failure),
        )

    # --- failures and recovery ------------------------------------------------------------------

    def _failed(self, failure: Failure, what: str) -> None:
        self.failures += 1
        self._attempt += 1
        self.last_error = describe_failure(failure, self.config.write_timeout)
        self.last_error_at = time.time()
        self.recovered_at = None
        if self.state != "retrying":
            self.state = "retrying"
            self._failing_since = self.reactor.seconds()
            self.log.warn(
                "sink {sink}: {what} failed ({error}); retrying with backoff, "
                "{depth} events wait in the queue",
                sink=self.name,
                what=what,
                error=self.last_error,
                depth=self.queue.depth,
            )
        else:
            self.log.debug(
                "sink {sink}: {what} attempt {attempt} failed ({error})",
                sink=self.name,
                what=what,
                attempt=self._attempt,
                error=self.last_error,
            )

    def _next_delay(self, failure: Failure | None = None) -> float:
        """The backoff for this attempt, or the failure's ``retry_after`` when that is longer."""
        delay = max(0.0, self._backoff(self._attempt - 1))
        retry_after = getattr(failure.value, "retry_after", None) if failure is not None else None
        if isinstance(retry_after, int | float) and delay < retry_after < float("inf"):  # no NaN
            delay = float(retry_after)
        return delay

    @property
    def failing_since(self) -> float | None:
        """Reactor seconds since when the sink has been failing (None unless retrying)."""
        return self._failing_since if self.state == "retrying" else None

    def retry_now(self) -> None:
        """Retry at once instead of at the end of the backoff wait (the destination is back)."""
        if self.state != "retrying" or self._stopping or self._timer is None:
            return
        retry = self._timer.func
        if self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.log.info("sink {sink}: retrying now: the destination is back", sink=self.name)
        retry()

    def _recovered(self) -> None:
        since = self._failing_since if self._failing_since is not None else self.reactor.seconds()
        self.recovered_at = time.time()
        self.log.info(
            "sink {sink}: ok again after {attempts} failed attempts in {seconds:.1f}s; "
            "{depth} events waited",
            sink=self.name,
            attempts=self._attempt,
            seconds=self.reactor.seconds() - since,
            depth=self.queue.depth,
        )
        self._attempt = 0
        self._failing_since = None

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._busy and self._current is None:
            self._busy = False  # a retry was pending: nothing is in flight any more

    # --- replay pacing (token bucket) -------------------------------------------------------------

    def _bucket_size(self) -> float:
        rate = self.config.replay_rate or 1.0
        return max(1.0, min(float(self.config.batch_size), rate))

    def _start_replay(self, *, full_bucket: bool, until: int, replayed: int = 0) -> None:
        """Pace reads until the entry ``until`` (the last one queued during the outage);
        ``replayed``: entries of the backlog already written (the batch that was retried)."""
        self.replaying = True
        self._tokens = self._bucket_size() if full_bucket else 0.0
        self._tokens_at = self.reactor.seconds()
        self._replay_started = self._tokens_at
        self._replayed = replayed
        self._replay_until = until
        self.log.info(
            "sink {sink}: replaying the backlog ({depth} events queued) at up to {rate:g} events/s",
            sink=self.name,
            depth=self.queue.depth,
            rate=self.config.replay_rate,
        )

    def _token_wait(self) -> float:
        """Seconds until a full bucket of tokens is available (0 when it is)."""
        rate = self.config.replay_rate or 1.0
        size = self._bucket_size()
        now = self.reactor.seconds()
        self._tokens = min(size, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        return 0.0 if self._tokens >= size else (size - self._tokens) / rate

    def _end_replay(self) -> None:
        self.replaying = False
        self.log.info(
            "sink {sink}: backlog drained ({count} events replayed in {seconds:.1f}s)",
            sink=self.name,
            count=self._replayed,
            seconds=self.reactor.seconds() - self._replay_started,
        )
