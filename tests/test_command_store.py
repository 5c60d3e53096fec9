"""The request id store (``gatewayd.commands.idempotency``): once per id, durably.

The store's writer thread reports through the real reactor (pytest-twisted); time comes from a
``Clock`` set to a realistic wall time, so expiry is driven by the test. The crash test kills a
child process with SIGKILL while its command is running, then opens the file again.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock

from gatewayd.commands.dispatch import Refusal, error_body
from gatewayd.commands.idempotency import IdempotencyStore, check_request_id, fingerprint

NOW = 1_800_000_000.0
OK = (200, {"ok": True, "result": {"slot": 2}})
PRINT = fingerprint("cabinets", "lend", {"slot": 2})


def clock_at(seconds: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


class Runs:
    """A command that counts its executions; answers ``answer`` (or waits when None)."""

    def __init__(self, answer=OK) -> None:
        self.count = 0
        self.answer = answer
        self.pending: list[defer.Deferred] = []

    def __call__(self) -> defer.Deferred:
        self.count += 1
        if self.answer is None:
            d: defer.Deferred = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.succeed(self.answer)


@defer.inlineCallbacks
def opened(path: Path, clock: Clock | None = None, **options):
    store = IdempotencyStore(path, reactor, clock=clock or clock_at(), **options)
    yield store.open()
    return store


def rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT id, status FROM requests ORDER BY id").fetchall()


@pytest_twisted.inlineCallbacks
def test_an_answer_survives_reopening_and_is_not_executed_again(tmp_path):
    path = tmp_path / "commands.db"
    store = yield opened(path)
    runs = Runs()
    attempt = store.once("req-1", PRINT, runs)
    assert not attempt.repeat
    yield attempt.recorded
    assert (yield attempt.answer) == OK
    yield store.close()
    assert rows(path) == [("req-1", 200)]

    again = yield opened(path)
    repeat = again.once("req-1", PRINT, runs)
    assert repeat.repeat and (yield repeat.answer) == OK
    assert runs.count == 1 and again.repeats == 1
    yield again.close()


@pytest_twisted.inlineCallbacks
def test_the_file_is_private_and_in_wal_mode(tmp_path):
    path = tmp_path / "state" / "commands.db"
    old = os.umask(0o022)
    try:
        store = yield opened(path)
    finally:
        os.umask(old)
    yield store.once("req-1", PRINT, Runs()).answer
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    yield store.close()


@pytest_twisted.inlineCallbacks
def test_the_id_is_recorded_before_the_command_runs(tmp_path):
    path = tmp_path / "commands.db"
    store = yield opened(path)
    seen_on_disk = []

    def run() -> defer.Deferred:
        seen_on_disk.append(rows(path))  # another connection: what a crash would leave
        return defer.succeed(OK)

    yield store.once("req-1", PRINT, run).answer
    assert seen_on_disk == [[("req-1", None)]]
    yield store.close()


CHILD = textwrap.dedent(
    """
    import sys
    from twisted.internet import defer, reactor, threads
    from gatewayd.commands.idempotency import IdempotencyStore

    store = IdempotencyStore(sys.argv[1], reactor)

    def started(_):
        attempt = store.once("req-crash", sys.argv[2], lambda: defer.Deferred())  # never ends
        attempt.recorded.addCallback(lambda _: print("recorded", flush=True))

    store.open().addCallback(started)
    reactor.run()
    """
)


@pytest_twisted.inlineCallbacks
def test_a_request_started_before_kill_9_is_answered_outcome_unknown_not_run(tmp_path):
    path = tmp_path / "commands.db"

    def crash() -> None:  # blocking: in a thread
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), PRINT], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout.readline().strip() == "recorded"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)

    yield threads.deferToThread(crash)
    assert rows(path) == [("req-crash", None)]
    yield answered_after_restart(path)


@defer.inlineCallbacks
def answered_after_restart(path: Path):
    store = yield opened(path, clock=reactor)  # the wall time, as the child's
    runs = Runs()
    attempt = store.once("req-crash", PRINT, runs)
    status, body = yield attempt.answer
    assert attempt.repeat and runs.count == 0
    assert status == 500 and body["error"]["code"] == "outcome_unknown"
    assert "not executed again" in body["error"]["message"]
    assert store.unknown_outcomes == 1
    yield store.close()


@pytest_twisted.inlineCallbacks
def test_a_repeat_while_running_gets_the_same_answer_when_it_comes(tmp_path):
    store = yield opened(tmp_path / "commands.db")
    runs = Runs(answer=None)
    first = store.once("req-1", PRINT, runs)
    yield first.recorded
    second = store.once("req-1", PRINT, runs)
    assert second.repeat and not second.answer.called
    runs.pending[0].callback(OK)
    assert (yield first.answer) == OK and (yield second.answer) == OK
    assert runs.count == 1
    yield store.close()


@pytest_twisted.inlineCallbacks
def test_an_id_reused_for_other_arguments_is_422(tmp_path):
    store = yield opened(tmp_path / "commands.db")
    runs = Runs()
    yield store.once("req-1", PRINT, runs).answer
    other = fingerprint("cabinets", "lend", {"slot": 3})
    status, body = yield store.once("req-1", other, runs).answer
    assert status == 422 and body["error"]["code"] == "id_reused"
    assert runs.count == 1
    yield store.close()


@pytest_twisted.inlineCallbacks
def test_records_expire_after_their_window_and_are_deleted(tmp_path):
    path = tmp_path / "commands.db"
    clock = clock_at()
    store = yield opened(path, clock=clock)
    runs = Runs()
    yield store.once("req-1", PRINT, runs, window=30).answer
    yield store.once("req-2", PRINT, runs).answer  # the store's window: 600 s
    clock.advance(29)
    assert store.once("req-1", PRINT, runs).repeat and runs.count == 2
    clock.advance(2)  # req-1 is 31 s old: forgotten, a new request
    assert store.get("req-1") is None
    attempt = store.once("req-1", PRINT, runs)
    assert not attempt.repeat
    yield attempt.answer
    assert runs.count == 3
    clock.advance(600)  # everything expired; the next request purges memory and file
    yield store.once("req-3", PRINT, runs).answer
    yield store.close()
    assert rows(path) == [("req-3", 200)]
    assert set(store.records) == {"req-3"}


@pytest_twisted.inlineCallbacks
def test_expired_records_are_not_loaded(tmp_path):
    path = tmp_path / "commands.db"
    store = yield opened(path, clock=clock_at(NOW))
    yield store.once("req-1", PRINT, Runs(), window=30).answer
    yield store.close()
    later = yield opened(path, clock=clock_at(NOW + 31))
    assert later.records == {} and rows(path) == []
    yield later.close()


@pytest_twisted.inlineCallbacks
def test_a_refusal_is_not_remembered(tmp_path):
    path = tmp_path / "commands.db"
    store = yield opened(path)
    runs = Runs()
    refusal = (503, error_body("unavailable", "plugin 'cabinets' is starting"))
    attempt = store.once("req-1", PRINT, runs, check=lambda: refusal)
    assert (yield attempt.answer) == refusal and runs.count == 0
    assert store.get("req-1") is None

    def refused_late() -> defer.Deferred:  # the plugin stopped after the check
        return defer.fail(Refusal(503, "unavailable", "plugin 'cabinets' is stopped"))

    status, _ = yield store.once("req-1", PRINT, refused_late).answer
    assert status == 503 and store.get("req-1") is None
    attempt = store.once("req-1", PRINT, runs)  # the same id, once the plugin runs
    assert not attempt.repeat and (yield attempt.answer) == OK
    yield store.close()
    assert rows(path) == [("req-1", 200)]


@pytest_twisted.inlineCallbacks
def test_a_store_that_cannot_open_refuses_ids_with_503(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    store = yield opened(tmp_path / "file" / "commands.db")
    assert store.error is not None
    runs = Runs()
    attempt = store.once("req-1", PRINT, runs)
    status, body = yield attempt.answer
    assert status == 503 and body["error"]["code"] == "unavailable" and runs.count == 0
    yield store.close()


@pytest_twisted.inlineCallbacks
def test_a_failed_record_is_not_executed_and_recorded_fails(tmp_path):
    store = yield opened(tmp_path / "commands.db")

    def broken(sql, parameters):
        raise sqlite3.OperationalError("database or disk is full")

    store._write_blocking = broken
    runs = Runs()
    attempt = store.once("req-1", PRINT, runs)
    failures = []
    attempt.recorded.addErrback(failures.append)
    status, body = yield attempt.answer
    assert status == 503 and "could not be recorded" in body["error"]["message"]
    assert runs.count == 0 and failures and store.get("req-1") is None
    yield store.close()


@pytest_twisted.inlineCallbacks
def test_more_ids_than_max_entries_are_refused_429(tmp_path):
    store = yield opened(tmp_path / "commands.db", max_entries=2)
    runs = Runs()
    for request_id in ("a", "b"):
        yield store.once(request_id, PRINT, runs).answer
    status, body = yield store.once("c", PRINT, runs).answer
    assert status == 429 and body["error"]["code"] == "too_many_requests" and runs.count == 2
    yield store.close()


def test_request_ids_are_short_printable_strings():
    assert check_request_id("req-1") == "req-1"
    for bad in ("", "x" * 201, "a\nb", 42, None):
        try:
            check_request_id(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
