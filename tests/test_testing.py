"""The helpers ``gatewayd.testing`` offers plugin authors: waiting on the reactor."""

from __future__ import annotations

import time

import pytest
import pytest_twisted

from gatewayd.testing import sleep, wait_until


@pytest_twisted.ensureDeferred
async def test_sleep_lets_the_reactor_run_for_that_long():
    started = time.monotonic()
    await sleep(0.05)
    assert time.monotonic() - started >= 0.05


@pytest_twisted.ensureDeferred
async def test_wait_until_fires_once_the_condition_holds():
    calls = []

    def third_time() -> bool:
        calls.append(None)
        return len(calls) == 3

    await wait_until(third_time, step=0.001)
    assert len(calls) == 3


@pytest_twisted.ensureDeferred
async def test_wait_until_fails_with_the_timeout_named():
    started = time.monotonic()
    with pytest.raises(AssertionError, match="within 0.1 s"):
        await wait_until(lambda: False, timeout=0.1)
    assert 0.1 <= time.monotonic() - started < 2
