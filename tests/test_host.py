"""Plugin lifecycle: startup_error_behavior error/retry/ignore, runtime failures and their
supervision (restart with backoff, crash loop, restart: never), Clock-driven."""

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


def host(behavior, failures, **supervision):
    cls = type("FlakyN", (Flaky,), {"failures": failures, "starts": 0})
    clock = task.Clock()
    config = PluginConfig(type="flaky", startup_error_behavior=behavior, **supervision)
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


def test_runtime_failure_with_restart_never_stays_failed():
    h, clock, cls = host("error", 0, restart="never")
    h.start()
    boom = h.context.guard(lambda: 1 / 0)
    assert boom() is None
    assert h.state == "failed" and "ZeroDivisionError" in h.error
    clock.advance(600)
    assert cls.starts == 1 and h.state == "failed" and h.plugin is None  # stopped, not restarted


def test_runtime_failure_restarts_the_plugin_after_a_backoff():
    h, clock, cls = host("error", 0)
    h.start()
    first = h.plugin
    h.context.guard(lambda: {}["missing"])()
    assert h.state == "restarting" and "KeyError" in h.error and h.error_at is not None
    clock.advance(0.9)
    assert cls.starts == 1
    clock.advance(0.1)
    assert cls.starts == 2 and h.state == "running" and h.error is None
    assert h.restarts == 1 and h.plugin is not first  # a fresh instance
    h.context.guard(lambda: 1 / 0)()
    clock.advance(1.4)
    assert cls.starts == 2
    clock.advance(0.1)  # the second restart within the window waits 1.5 s
    assert cls.starts == 3 and h.restarts == 2


def test_more_restarts_than_the_limit_within_the_window_is_a_crash_loop():
    h, clock, cls = host("error", 0, restart_limit=3, restart_window=600)
    h.start()
    for _ in range(3):
        h.context.guard(lambda: 1 / 0)()
        clock.advance(60)
        assert h.state == "running"
    h.context.guard(lambda: 1 / 0)()
    assert h.state == "failed" and h.error.startswith("crash loop: 3 restarts within 600 s")
    assert "ZeroDivisionError" in h.error
    clock.advance(600)
    assert cls.starts == 4 and h.state == "failed"


def test_restarts_older_than_the_window_do_not_count():
    h, clock, cls = host("error", 0, restart_limit=1, restart_window=100)
    h.start()
    h.context.guard(lambda: 1 / 0)()
    clock.advance(200)
    h.context.guard(lambda: 1 / 0)()
    assert h.state == "restarting"
    clock.advance(5)
    assert h.state == "running" and h.restarts == 2


def test_a_restart_that_cannot_start_counts_as_another_failure():
    h, clock, cls = host("error", 0, restart_limit=2)
    h.start()
    cls.failures = 99  # from now on start() raises: startup_error_behavior error must not apply
    h.context.guard(lambda: 1 / 0)()
    clock.advance(1)
    assert cls.starts == 2 and h.state == "restarting" and "port busy" in h.error
    clock.advance(1.5)
    assert cls.starts == 3 and h.state == "failed" and h.error.startswith("crash loop")


def test_stop_cancels_a_pending_restart():
    h, clock, cls = host("error", 0)
    h.start()
    h.context.guard(lambda: 1 / 0)()
    h.stop()
    clock.advance(100)
    assert cls.starts == 1 and h.state == "stopped"


@pytest.mark.parametrize("behavior", ["error", "retry", "ignore"])
def test_a_good_plugin_runs_whatever_the_behavior(behavior):
    h, _, _ = host(behavior, 0)
    h.start()
    assert h.state == "running"
