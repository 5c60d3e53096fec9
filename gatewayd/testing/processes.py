"""Stopping a server a test started (NATS, PostgreSQL): signal it, wait, kill if it hangs."""

from __future__ import annotations

import subprocess

__all__ = ["signal_and_wait"]


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
