"""Event ids and timestamps: valid ULIDs in creation order, ISO 8601 UTC with microseconds."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from ulid import ULID

from gatewayd import events
from gatewayd.events import Event, new_id, utc_now_iso


def test_ids_are_ulids_of_now_that_python_ulid_reads_back() -> None:
    before = time.time()
    ident = new_id()
    parsed = ULID.from_str(ident)
    assert str(parsed) == ident and len(ident) == 26
    assert before - 0.002 <= parsed.timestamp <= time.time() + 0.002


def test_ids_sort_in_creation_order_within_one_millisecond() -> None:
    ids = [new_id() for _ in range(20000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    same_ms = [i for i in ids if i[:10] == ids[0][:10]]
    randomness = [int(ULID.from_str(i)) & (2**80 - 1) for i in same_ms]
    assert randomness == list(range(randomness[0], randomness[0] + len(same_ms)))


def test_ids_stay_ordered_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = events._UlidClock()
    now = [1_700_000_000_000_000_000]
    monkeypatch.setattr(events.time, "time_ns", lambda: now[0])
    first = clock()
    now[0] -= 5_000_000_000  # NTP steps the clock 5 s back
    second = clock()
    assert second > first and second[:10] == first[:10]


def test_ids_are_unique_across_threads() -> None:
    found: list[list[str]] = [[] for _ in range(4)]

    def make(into: list[str]) -> None:
        into.extend(new_id() for _ in range(5000))

    threads = [threading.Thread(target=make, args=(out,)) for out in found]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for out in found for i in out]
    assert len(set(every)) == len(every)
    assert all(out == sorted(out) for out in found)


def test_timestamps_are_utc_iso_with_microseconds() -> None:
    stamp = utc_now_iso()
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo == UTC and stamp.endswith("+00:00") and len(stamp) == 32
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 1


def test_timestamps_follow_the_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = events._UtcClock()
    now = [1_700_000_000_999_999_000]
    monkeypatch.setattr(events.time, "time_ns", lambda: now[0])
    assert clock() == "2023-11-14T22:13:20.999999+00:00"
    now[0] += 1000
    assert clock() == "2023-11-14T22:13:21.000000+00:00"


def test_an_event_gets_both() -> None:
    event = Event(type="x")
    assert ULID.from_str(event.id) and datetime.fromisoformat(event.ts)
