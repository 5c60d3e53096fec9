"""Hosting one plugin instance: construct, start, retry or fail as configured, supervise, stop.

The host is the boundary between a plugin and the daemon: whatever a plugin raises at start,
in a guarded callback or at stop is caught here, logged, and turned into a state that
``/health`` shows. Only ``startup_error_behavior: error`` lets a plugin stop the daemon, and only
at the daemon's start.

Supervision: a plugin that fails at runtime (``context.fail``, an exception in a
``context.guard``-ed callback) is stopped and, with ``restart: on-failure`` (the default),
started again after a jittered backoff (1 s growing to 60 s), as a fresh instance with the same
context (its counters go on). More than ``restart_limit`` restarts within ``restart_window`` is a
crash loop: the plugin is left ``failed`` with its last error until the config is reloaded or
the daemon restarted. A start that fails during a restart counts as one more failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.events import Event
from gatewayd.files import private_dir
from gatewayd.plugin import Plugin, PluginContext
from gatewayd.schema import PluginConfig

wall_time = time.time

log = Logger(namespace="gatewayd.host")

STARTING, RUNNING, RETRYING, RESTARTING, FAILED, STOPPED = (
    "starting",
    "running",
    "retrying",
    "restarting",
    "failed",
    "stopped",
)


class PluginStartError(Exception):
    """A plugin with ``startup_error_behavior: error`` failed to start."""


class PluginHost:
    """Owns one plugin instance and its state: starting, then running, retrying or failed."""

    #: Retry delays for ``startup_error_behavior: retry``: 1 s growing ×1.5 to 60 s, plus 0..1 s
    #: of jitter (Twisted's own policy, as ClientService uses).
    retry_policy = staticmethod(backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=1.5))

    def __init__(
        self,
        name: str,
        plugin_class: type[Plugin],
        config: PluginConfig,
        *,
        gateway_id: str,
        reactor: Any,
        state_dir: Path,
        emit: Callable[[Event], defer.Deferred],
        keys: Any = None,
    ) -> None:
        self.name = name
        self.type_name = config.type
        self.plugin_class = plugin_class
        self.config = config
        self.reactor = reactor
        self.state = STARTING
        self.error: str | None = None
        self.plugin: Plugin | None = None
        self.attempts = 0
        #: Times the supervisor restarted the plugin after a runtime failure (``restart``).
        self.restarts = 0
        #: POSIX time of the last error (start or runtime), None before the first.
        self.error_at: float | None = None
        self._retry_call: Any = None
        self._restart_times: list[float] = []  # reactor seconds of the restarts in the window
        self._restarting = False  # the start in progress is a supervisor's restart
        self._stopped = False
        self.context = PluginContext(
            name=name,
            protocol=plugin_class.protocol,
            gateway_id=gateway_id,
            reactor=reactor,
            state_dir=state_dir,
            sink=emit,
            on_failure=self._failed_at_runtime,
            keys=keys,
        )

    @property
    def behavior(self) -> str:
        return self.config.startup_error_behavior

    def start(self) -> defer.Deferred:
        """Fires once the plugin runs, failed or is retrying; errbacks only for ``error``."""
        self._stopped = False
        self.attempts += 1
        self.state = STARTING
        d = defer.maybeDeferred(self._construct_and_start)
        d.addCallbacks(self._started, self._start_failed)
        return d

    def _construct_and_start(self) -> Any:
        private_dir(self.context.state_dir)  # 0700: plugins keep device data there
        self.plugin = self.plugin_class(self.name, self.config, self.context)
        return self.plugin.start()

    def _started(self, _: Any) -> None:
        if self._stopped:  # stop() came while start() was still running
            self._stop_quietly()
            return
        self.state, self.error = RUNNING, None
        restart = " again" if self._restarting else ""
        self._restarting = False
        log.info(
            "plugin {plugin} ({type}) started{restart}",
            plugin=self.name,
            type=self.type_name,
            restart=restart,
        )

    def _start_failed(self, failure: Failure) -> None:
        self.error = f"start failed: {failure.getErrorMessage() or failure.type.__name__}"
        self.error_at = wall_time()
        log.failure("plugin {plugin} failed to start", failure, plugin=self.name)
        self._stop_quietly()
        if self._stopped:
            return
        if self._restarting:  # a supervisor's restart that did not start: one more failure
            self._restarting = False
            self.state = FAILED
            self._supervise()
            return
        if self.behavior == "error":
            self.state = FAILED
            raise PluginStartError(f"plugin {self.name}: {self.error}")
        if self.behavior == "ignore":
            self.state = FAILED
            return
        self.state = RETRYING
        delay = self.retry_policy(self.attempts - 1)
        log.warn("plugin {plugin}: retrying start in {delay:.1f} s", plugin=self.name, delay=delay)
        self._retry_call = self.reactor.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        self.start().addErrback(lambda f: None)  # _start_failed already logged it

    def _failed_at_runtime(self, exc: BaseException) -> None:
        self.error = f"runtime error: {exc!r}"
        self.error_at = wall_time()
        if self.state != RUNNING:  # failing while starting, stopping or already failed
            return
        self.state = FAILED
        self._supervise()

    def _supervise(self) -> None:
        """After a runtime failure: stop the instance and schedule its restart, unless
        ``restart: never`` or a crash loop (more than ``restart_limit`` in the window)."""
        self._stop_quietly()
        if self.config.restart == "never":
            log.error(
                "plugin {plugin} failed ({error}); restart: never leaves it failed",
                plugin=self.name,
                error=self.error,
            )
            return
        now = self.reactor.seconds()
        window = self.config.restart_window
        self._restart_times = [t for t in self._restart_times if now - t < window]
        if len(self._restart_times) >= self.config.restart_limit:
            self.error = (
                f"crash loop: {len(self._restart_times)} restarts within {window:g} s "
                f"(restart_limit {self.config.restart_limit}); last error: {self.error}"
            )
            log.critical("plugin {plugin} left failed: {error}", plugin=self.name, error=self.error)
            return
        delay = self.retry_policy(len(self._restart_times))
        self._restart_times.append(now + delay)
        self.state = RESTARTING
        log.warn(
            "plugin {plugin} failed ({error}); restarting in {delay:.1f} s",
            plugin=self.name,
            error=self.error,
            delay=delay,
        )
        self._retry_call = self.reactor.callLater(delay, self._restart)

    def _restart(self) -> None:
        self._retry_call = None
        self.restarts += 1
        self._restarting = True
        self.start().addErrback(lambda f: None)  # _start_failed already handled it

    def reconfigure(self, config: PluginConfig) -> None:
        """Take a config that differs from the running one only in supervision keys."""
        self.config = config

    def _stop_quietly(self) -> None:
        if self.plugin is None:
            return
        plugin, self.plugin = self.plugin, None
        d = defer.maybeDeferred(plugin.stop)
        d.addErrback(lambda f: log.failure("stop after failed start", f, plugin=self.name))

    def stop(self) -> defer.Deferred:
        """Stop the plugin; never fails (an error in ``stop()`` is logged)."""
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        self._stopped = True
        plugin = self.plugin
        self.state = STOPPED
        if plugin is None:
            return defer.succeed(None)
        d = defer.maybeDeferred(plugin.stop)
        d.addErrback(lambda f: log.failure("plugin {plugin} failed to stop", f, plugin=self.name))
        return d
