"""Hosting one plugin instance: construct, start, retry or fail as configured, stop.

The host is the boundary between a plugin and the daemon: whatever a plugin raises at start,
in a guarded callback or at stop is caught here, logged, and turned into a state that
``/health`` shows. Only ``startup_error_behavior: error`` lets a plugin stop the daemon.
"""

from __future__ import annotations

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

log = Logger(namespace="gatewayd.host")

STARTING, RUNNING, RETRYING, FAILED, STOPPED = (
    "starting",
    "running",
    "retrying",
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
        self._retry_call: Any = None
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
        self.state, self.error = RUNNING, None
        log.info("plugin {plugin} ({type}) started", plugin=self.name, type=self.type_name)

    def _start_failed(self, failure: Failure) -> None:
        self.error = f"start failed: {failure.getErrorMessage() or failure.type.__name__}"
        log.failure("plugin {plugin} failed to start", failure, plugin=self.name)
        self._stop_quietly()
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
        self.state = FAILED
        self.error = f"runtime error: {exc!r}"

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
        plugin = self.plugin
        self.state = STOPPED
        if plugin is None:
            return defer.succeed(None)
        d = defer.maybeDeferred(plugin.stop)
        d.addErrback(lambda f: log.failure("plugin {plugin} failed to stop", f, plugin=self.name))
        return d
