"""Plugin lifecycle: startup_error_behavior error/retry/ignore, runtime failures (Clock-driven)."""

import tempfile
from pathlib import Path

import pytest
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, task

from gatewayd.host import PluginHost, PluginStartError
from gatewayd.plugin import Plugin, PluginConfig


class Flaky(Plugin):
    """Fails to start the first ``failures`` times."""

    protocol = "flaky"
    failures = 0
    starts = 0

    def start(self):
        type(self).starts += 1
        if type(self).starts <= type(self).failures:
            raise ConnectionRefusedError("port busy")


def host(behavior, failures):
    cls = type("FlakyN", (Flaky,), {"failures": failures, "starts": 0})
    clock = task.Clock()
    config = PluginConfig(type="flaky", startup_error_behavior=behavior)
    h = PluginHost(
        "p",
        cls,
        config,
        gateway_id="gw",
        reactor=clock,
        state_dir=Path(tempfile.mkdtemp()),
        emit=lambda e: defer.succeed(None),
    )
    h.retry_policy = backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=1.5, jitter=lambda: 0)
    return h, clock, cls


def test_error_behavior_fails_the_start():
    h, _, _ = host("error", 1)
    failures = []
    h.start().addErrback(failures.append)
    assert failures and failures[0].check(PluginStartError)
    assert "port busy" in str(failures[0].value)
    assert h.state == "failed"


def test_ignore_behavior_marks_failed_and_carries_on():
    h, _, _ = host("ignore", 1)
    results = []
    h.start().addBoth(results.append)
    assert results == [None]
    assert (h.state, h.error) == ("failed", "start failed: port busy")


def test_retry_behavior_retries_with_backoff_until_it_starts():
    h, clock, cls = host("retry", 3)
    results = []
    h.start().addBoth(results.append)
    assert results == [None] and h.state == "retrying" and cls.starts == 1
    clock.advance(0.9)  # delays 1, 1.5, 2.25 s (jitter off in this test)
    assert cls.starts == 1
    clock.advance(0.1)
    assert cls.starts == 2 and h.state == "retrying"
    clock.advance(1.5)
    assert cls.starts == 3
    clock.advance(2.25)
    assert cls.starts == 4 and h.state == "running" and h.error is None


def test_stop_cancels_a_pending_retry():
    h, clock, cls = host("retry", 5)
    h.start()
    h.stop()
    clock.advance(100)
    assert cls.starts == 1 and h.state == "stopped"


def test_runtime_failure_in_a_guarded_callback_marks_failed():
    h, _, _ = host("error", 0)
    h.start()
    boom = h.context.guard(lambda: 1 / 0)
    assert boom() is None
    assert h.state == "failed" and "ZeroDivisionError" in h.error


@pytest.mark.parametrize("behavior", ["error", "retry", "ignore"])
def test_a_good_plugin_runs_whatever_the_behavior(behavior):
    h, _, _ = host(behavior, 0)
    h.start()
    assert h.state == "running"
