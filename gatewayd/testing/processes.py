"""Driving processes a test started (a daemon, NATS, PostgreSQL): stop one (signal it, wait,
kill it if it hangs), and wait from the test's own thread for what they do."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

__all__ = ["poll_until", "signal_and_wait"]


def poll_until(
    predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition", step: float = 0.05
) -> Any:
    """Call ``predicate`` every ``step`` seconds until it returns something true, and return
    that; AssertionError naming ``what`` after ``timeout``. Blocking: for tests that watch a
    child process from outside (inside the reactor use ``gatewayd.testing.wait_until``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def signal_and_wait(process: subprocess.Popen | None, signum: int, timeout: float) -> None:
    """Send ``signum`` to ``process`` unless it has ended, and wait for it; after ``timeout``
    seconds it is killed (a server that ignores its stop signal must not hang the tests)."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
