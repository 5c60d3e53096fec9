"""The daemon: wires config, queues, sinks, pipeline, plugins and the control API on one reactor.

Start order: command request store → queues → sinks → pipeline → plugins → control API →
``READY=1``. Stop order is the reverse: stop accepting (API, plugins), then flush the queues'
pending writes, then stop sinks, then close the command request store. Everything a plugin
emitted before it stopped is durable before the process exits.

Commands: one ``CommandDispatcher`` (``daemon.commands``) serves the control API and, through
``SinkContext.commands``, a sink that takes commands (the MQTT command channel); request ids
(MQTT ``id``, HTTP ``Idempotency-Key``) are remembered in ``<state_dir>/commands.db``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from gatewayd.commands import CommandDispatcher, IdempotencyStore
from gatewayd.config import fleet_sink
from gatewayd.config_model import Config
from gatewayd.delivery import SinkRunner
from gatewayd.events import Event
from gatewayd.files import private_dir, read_private_text, tighten
from gatewayd.fleet.membership import Membership
from gatewayd.health import box_status
from gatewayd.history import History
from gatewayd.host import PluginHost
from gatewayd.logsetup import set_log_level
from gatewayd.pipeline import Pipeline
from gatewayd.queue import QueueStore, stranded_queues
from gatewayd.reload import ReloadPlan, keep_running_values, plan_reload, reload_record
from gatewayd.sdnotify import Notifier
from gatewayd.sinks.base import SinkContext

log = Logger(namespace="gatewayd.daemon")


def iso_seconds(timestamp: float) -> str:
    """POSIX seconds as ISO 8601 UTC to the second."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


_COMPANION = re.compile(r"(-wal|-shm|-journal|\.\d+)?")


def _is_companion(name: str, file_name: str) -> bool:
    """``name`` is ``file_name`` or a file made beside it: SQLite's ``-wal``, ``-shm`` and
    ``-journal``, or a rotated ``.N``."""
    return name.startswith(file_name) and _COMPANION.fullmatch(name[len(file_name) :]) is not None


class ReactorLagMeter:
    """Measures how late the reactor runs a timer: a blocked reactor shows up as lag."""

    interval = 0.5

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.lag = 0.0
        self._expected = 0.0
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def start(self) -> None:
        self._expected = self.reactor.seconds() + self.interval
        self._loop.start(self.interval, now=False)

    def _tick(self) -> None:
        now = self.reactor.seconds()
        self.lag = max(0.0, now - self._expected)
        self._expected = now + self.interval

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


class Daemon:
    """One running gatewayd. ``start()`` and ``stop()`` return Deferreds."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        notifier: Notifier | None = None,
        config_overrides: Callable[[Config], None] | None = None,
    ) -> None:
        self.config = config
        #: Applied to every config the daemon loads on reload (the demo's own state_dir).
        self.config_overrides = config_overrides
        self._reload_lock = defer.DeferredLock()
        self.reactor = reactor
        self.gateway_id = config.gateway.id
        self.state_dir = self._resolve(config.gateway.state_dir)
        self.notifier = notifier or Notifier()
        self.api_token = self._read_token()
        self.queue_store = QueueStore(
            self.state_dir / "queues", reactor, sync=config.gateway.queue_sync
        )
        self.command_store = IdempotencyStore(
            self.state_dir / "commands.db", reactor, sync=config.gateway.queue_sync
        )
        #: The one command path of the control API and the MQTT command channel.
        self.commands = CommandDispatcher(
            self, command_timeout=config.api.command_timeout, store=self.command_store
        )
        self.sinks: dict[str, SinkRunner] = {}
        self.plugins: dict[str, PluginHost] = {}
        self.pipeline: Pipeline | None = None
        self.api_port: Any = None
        self._lag = ReactorLagMeter(reactor)
        self._watchdog: task.LoopingCall | None = None
        self._stopping: defer.Deferred | None = None
        #: Wall-clock time the daemon started and its config was (re)loaded, for the status.
        self.started_at = time.time()
        self.loaded_at = self.started_at
        #: The outcome of the last reload (None before the first): see ``config_status``.
        self.last_reload: dict[str, Any] | None = None
        #: Callbacks that see every event as it is routed (the event stream of the API).
        self._event_watchers: list[Callable[[Event], None]] = []
        #: Rates and queue depths of the last hour, sampled in memory (the status page charts).
        self.history = History(self, reactor)
        #: The live boxes of the fleet, when a plugin runs with ``fleet: true`` (read by the
        #: mqtt sink ``fleet_sink`` names); decided at start, a reload does not change it.
        self.fleet: Membership | None = None
        self._fleet_sink = fleet_sink(config.sinks)
        if self._fleet_sink is not None and any(
            getattr(section, "fleet", False) for section in config.plugins.values()
        ):
            self.fleet = Membership(self.gateway_id, reactor)

    def _warn_of_stranded_queues(self) -> None:
        directory = self.state_dir / "queues"
        for path, depth in stranded_queues(directory, set(self.config.sinks)):
            if depth == 0:
                log.info("queue file {path} belongs to no sink and is empty", path=str(path))
                continue
            held = "an unreadable number of" if depth is None else str(depth)
            log.warn(
                "queue file {path} belongs to no sink in the config and holds {held} events "
                "never delivered: name a sink {sink!r} again to deliver them, or delete the file",
                path=str(path),
                held=held,
                sink=path.stem,
            )

    def _prepare_state_dir(self) -> None:
        """Create ``state_dir`` and its ``queues`` directory private (0700), and take group and
        others' bits off what an older gatewayd (or a looser umask) left readable there: the
        files hold IMEIs, meter data and ESAM records."""
        try:
            private_dir(self.state_dir)
            private_dir(self.state_dir / "queues")
        except OSError as exc:
            raise OSError(f"gateway.state_dir {self.state_dir}: {exc.strerror}") from None
        changed, failed = tighten(self._own_paths(), follow=[self.state_dir])
        if changed:
            log.warn(
                "made {count} files and directories in {state_dir} private (0600 files, 0700 "
                "directories): group or others could read them",
                count=changed,
                state_dir=str(self.state_dir),
            )
        for problem in failed:
            log.warn("cannot make {problem} private", problem=problem)

    def _own_paths(self) -> list[Path]:
        """What gatewayd creates in ``state_dir``: the directory itself, the queues, every
        plugin's directory and the files of sinks whose path is inside ``state_dir`` (with
        SQLite's ``-wal``/``-shm``/``-journal`` and the jsonl sink's rotated ``.N`` files).
        Nothing else there is touched: ``state_dir`` may be shared with other files."""
        root = self.state_dir
        paths = [root]
        paths.extend(root / f"commands.db{suffix}" for suffix in ("", "-wal", "-shm", "-journal"))
        for directory in (root / "queues", root / "plugins"):
            for top, dirs, files in os.walk(directory):
                paths.append(Path(top))
                paths.extend(Path(top) / name for name in dirs + files)
        real_root = root.resolve()
        for sink_config in self.config.sinks.values():
            given = getattr(sink_config, "path", None)
            if not isinstance(given, str | Path):
                continue
            target = (root / given).resolve()  # an absolute path stays as it is
            if target == real_root or not target.is_relative_to(real_root):
                continue
            paths.extend(p for p in target.parents if p.is_relative_to(real_root))
            if target.parent.is_dir():
                paths.extend(
                    sibling
                    for sibling in target.parent.iterdir()
                    if _is_companion(sibling.name, target.name)
                )
        return list(dict.fromkeys(paths))

    # --- figures the API reads --------------------------------------------------------------

    @property
    def reactor_lag(self) -> float:
        return self._lag.lag

    # --- helpers ----------------------------------------------------------------------------

    def _resolve(self, path: Path) -> Path:
        """Relative paths in the config are relative to the config file's directory."""
        path = Path(path)
        return path if path.is_absolute() else (Path(self.config.path).parent / path).resolve()

    def _read_token(self, config: Config | None = None) -> str | None:
        token_file = (config or self.config).api.token_file
        if token_file is None:
            return None
        # Checked again here: the file may have been loosened since the config was checked.
        token = read_private_text(self._resolve(token_file)).strip()
        if not token:
            raise ValueError(f"api.token_file {token_file} is empty")
        return token

    def device_elsewhere(self, plugin: str, device: str, gateway: str, since: float) -> None:
        """Another box announced ``device`` of instance ``plugin`` online: tell the plugin."""
        host = self.plugins.get(plugin)
        if gateway == self.gateway_id or host is None or host.plugin is None:
            return
        try:
            host.plugin.device_elsewhere(device, gateway, since)
        except Exception as exc:
            host.context.fail(exc)

    def box_status(self, online: bool = True) -> dict[str, Any]:
        """The status the fleet sees (``gatewayd/{gateway}/status``): see gatewayd.health."""
        return box_status(self, self.reactor.seconds(), online)

    def config_status(self) -> dict[str, Any]:
        """The config as ``/health`` and the status show it: file, when loaded, last reload."""
        return {
            "path": str(self.config.path),
            "loaded_at": iso_seconds(self.loaded_at),
            "last_reload": self.last_reload,
        }

    def watch_events(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event routed from now on; returns the function
        that stops it. A callback must be cheap and must not raise (it runs in ``emit``)."""
        self._event_watchers.append(callback)

        def unwatch() -> None:
            if callback in self._event_watchers:
                self._event_watchers.remove(callback)

        return unwatch

    def emit(self, event: Event) -> defer.Deferred:
        """Route one event; fires when it is durable in every queue it went to."""
        assert self.pipeline is not None, "emit before start"
        if self._event_watchers:
            for watcher in tuple(self._event_watchers):
                try:
                    watcher(event)
                except Exception:
                    log.failure("an event watcher failed; it is removed")
                    self._event_watchers.remove(watcher)
        return self.pipeline.emit(event)

    # --- lifecycle --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self) -> Any:
        self._prepare_state_dir()
        self._warn_of_stranded_queues()
        self._lag.start()
        yield self.command_store.open()  # before any sink can take a command
        self.queue_store.start()
        for name in self.config.sinks:
            self.sinks[name] = self._make_sink(name, self.config)
        self.pipeline = self._make_pipeline(self.config)
        for runner in self.sinks.values():
            runner.start()

        for name in self.config.plugins:
            self.plugins[name] = self._make_host(name, self.config)
        # Plugins start concurrently; one with startup_error_behavior=error fails the daemon.
        results = yield defer.DeferredList(
            [host.start() for host in self.plugins.values()], consumeErrors=True
        )
        for ok, failure in results:
            if not ok:
                yield self.stop()
                failure.raiseException()

        if self.config.api.enabled:
            from gatewayd.api import listen_api

            self.api_port = listen_api(self, self.config.api, self.reactor)
        status = self._status_line()
        self.notifier.notify(READY="1", STATUS=status)
        self._start_watchdog()
        self.history.start()
        log.info("gatewayd {gateway} ready: {status}", gateway=self.gateway_id, status=status)

    def _make_sink(self, name: str, config: Config) -> SinkRunner:
        """The queue (opened, or the one already open) and the runner of sink ``name``."""
        sink_config = config.sinks[name]
        queue = self.queue_store.queue(
            name,
            max_bytes=sink_config.max_bytes,
            max_age=sink_config.max_age,
            overflow=sink_config.overflow,
        )
        # A reload may change these; max_bytes sizes the open file and waits for a restart.
        queue.max_age, queue.overflow = sink_config.max_age, sink_config.overflow
        context = SinkContext(
            name=name,
            gateway_id=self.gateway_id,
            reactor=self.reactor,
            state_dir=self.state_dir,
            log=Logger(namespace=f"gatewayd.sink.{name}"),
            commands=self.commands,
            status=self.box_status,
            presence=self.device_elsewhere,
            fleet=self.fleet if name == self._fleet_sink else None,
        )
        sink = config.sink_classes[name](name, sink_config, context)
        runner = SinkRunner(sink, queue, sink_config, self.reactor, log=context.log)
        context.retry_now = runner.retry_now
        return runner

    def _make_pipeline(self, config: Config) -> Pipeline:
        """A pipeline over ``config.routes`` and the queues of the current sinks; the counters
        of the one it replaces (a reload) go on."""
        queues = {name: runner.queue for name, runner in self.sinks.items()}
        pipeline = Pipeline(config.routes, queues, self.sinks)
        if self.pipeline is not None:
            old = self.pipeline
            pipeline.routed, pipeline.unrouted, pipeline.dropped = (
                old.routed,
                old.unrouted,
                old.dropped,
            )
        return pipeline

    def _make_host(self, name: str, config: Config) -> PluginHost:
        host = PluginHost(
            name,
            config.plugin_classes[name],
            config.plugins[name],
            gateway_id=self.gateway_id,
            reactor=self.reactor,
            state_dir=self.state_dir / "plugins" / name,
            emit=self.emit,
            keys=self.queue_store,
        )
        host.context.fleet = self.fleet
        return host

    # --- reload -----------------------------------------------------------------------------

    def reload_file(self) -> defer.Deferred:
        """Read the config file again and apply it (``reload``); a file that does not load or
        validate leaves the running config as it is. Fires with the reload record."""
        from gatewayd.config import ConfigError, load_config

        try:
            new = load_config(self.config.path)
            if self.config_overrides is not None:
                self.config_overrides(new)
        except ConfigError as exc:
            return defer.succeed(self._reload_refused(exc.errors))
        except OSError as exc:
            return defer.succeed(
                self._reload_refused([f"{self.config.path}: cannot read: {exc.strerror or exc}"])
            )
        for warning in getattr(new, "warnings", []):
            log.warn("reload: {warning}", warning=warning)
        return self.reload(new)

    def _reload_refused(self, errors: list[str]) -> dict[str, Any]:
        for error in errors:
            log.error("reload: {error}", error=error)
        log.error(
            "reload refused ({count} errors); the running config is unchanged", count=len(errors)
        )
        self.last_reload = reload_record(time.time(), errors=errors)
        return self.last_reload

    def reload(self, new: Config) -> defer.Deferred:
        """Apply ``new`` by name (``gatewayd.reload``); reloads run one after the other. Fires
        with the reload record (also kept as ``last_reload``)."""
        return self._reload_lock.run(lambda: defer.ensureDeferred(self._reload(new)))

    async def _reload(self, new: Config) -> dict[str, Any]:
        if self._stopping is not None:
            return self._reload_refused(["the daemon is stopping"])
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
        self.notifier.notify(RELOADING="1", MONOTONIC_USEC=str(usec), STATUS="reloading")
        try:
            token = self._read_token(new)
        except (OSError, ValueError) as exc:
            self.notifier.notify(READY="1", STATUS=self._status_line())
            return self._reload_refused([f"api.token_file: {exc}"])
        old = self.config
        plan = plan_reload(old, new)
        keep_running_values(old, new)
        for key in plan.needs_restart:
            log.warn("reload: {key} changed; it takes effect at the next restart", key=key)
        failed: dict[str, str] = {}
        await self._reload_sinks(plan, new)
        self.config = new
        self.api_token = token
        self._apply_settings(new)
        await self._reload_plugins(plan, new, failed)
        self.loaded_at = time.time()
        self.last_reload = reload_record(self.loaded_at, plan, failed=failed)
        self.notifier.notify(READY="1", STATUS=self._status_line())
        log.info(
            "reload applied: plugins {plugins}, sinks {sinks}, routes {routes}{restart}",
            plugins=_summary(plan.plugins.as_dict()),
            sinks=_summary(plan.sinks.as_dict()),
            routes="changed" if plan.routes else "unchanged",
            restart=f"; needs a restart: {', '.join(plan.needs_restart)}"
            if plan.needs_restart
            else "",
        )
        return self.last_reload

    async def _reload_sinks(self, plan: ReloadPlan, new: Config) -> None:
        """New sinks first, then the routes (between two events), then stop what went away.
        A changed sink keeps its queue, so events routed to it wait there while it restarts."""
        for name in plan.sinks.added:
            self.sinks[name] = self._make_sink(name, new)
        replaced = {name: self.sinks[name] for name in plan.sinks.changed}
        removed = {name: self.sinks.pop(name) for name in plan.sinks.removed}
        for name in plan.sinks.changed:
            self.sinks[name] = self._make_sink(name, new)
        self.pipeline = self._make_pipeline(new)  # atomic: the reactor runs one thing at a time
        await defer.DeferredList([r.stop() for r in [*replaced.values(), *removed.values()]])
        for name in [*plan.sinks.added, *plan.sinks.changed]:
            self.sinks[name].start()
        for name, runner in removed.items():
            depth = runner.queue.depth
            if depth:
                log.warn(
                    "reload: sink {sink} is removed; its queue {path} keeps {depth} events never "
                    "delivered: name a sink {sink!r} again to deliver them, or delete the file",
                    sink=name,
                    path=str(runner.queue.path),
                    depth=depth,
                )

    async def _reload_plugins(self, plan: ReloadPlan, new: Config, failed: dict[str, str]) -> None:
        """Stop removed and changed instances, then start changed and added ones; a start
        failure follows ``startup_error_behavior`` except that it never stops the daemon."""
        for name in plan.plugins.reconfigured:
            self.plugins[name].reconfigure(new.plugins[name])
        leaving = [self.plugins.pop(name) for name in plan.plugins.removed + plan.plugins.changed]
        await defer.DeferredList([host.stop() for host in leaving])
        starting = {}
        for name in plan.plugins.changed + plan.plugins.added:
            self.plugins[name] = starting[name] = self._make_host(name, new)
        results = await defer.DeferredList(
            [host.start() for host in starting.values()], consumeErrors=True
        )
        for (name, host), (ok, _) in zip(starting.items(), results, strict=True):
            if not ok or host.state == "failed":
                failed[name] = host.error or "start failed"

    def _api_state(self) -> Any:
        """The control API's ApiState (None without an API)."""
        site = getattr(self.api_port, "factory", None)
        return getattr(getattr(site, "resource", None), "api", None)

    def _apply_settings(self, config: Config) -> None:
        """The core settings a reload applies in place."""
        set_log_level(config.gateway.log_level)
        self.commands.command_timeout = config.api.command_timeout
        site = getattr(self.api_port, "factory", None)
        if site is not None:
            site.max_body_bytes = config.api.max_body_bytes
        state = self._api_state()
        if state is not None:
            state.config = config.api

    def _status_line(self) -> str:
        running = sum(1 for h in self.plugins.values() if h.state == "running")
        return f"{running}/{len(self.plugins)} plugins running, {len(self.sinks)} sinks"

    def _start_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        # Pinged from the reactor itself: a blocked reactor stops the pings and systemd restarts
        # the service; a broker or device outage does not block the reactor, so it does not.
        self._watchdog = task.LoopingCall(self.notifier.notify, WATCHDOG="1")
        self._watchdog.clock = self.reactor
        self._watchdog.start(interval, now=True)

    def stop(self) -> defer.Deferred:
        """Stop accepting, stop plugins, flush queues, stop sinks. Idempotent."""
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._stop())
        return self._stopping

    async def _drain(self, timeout: float) -> None:
        """Give healthy sinks up to ``timeout`` seconds to deliver what is queued.

        Nothing is lost either way (the queues are durable); draining just means a clean stop
        leaves no backlog for the next start.
        """
        deadline = self.reactor.seconds() + timeout
        while self.reactor.seconds() < deadline:
            busy = [r for r in self.sinks.values() if r.state == "ok" and r.queue.depth > 0]
            if not busy:
                return
            await task.deferLater(self.reactor, 0.05, lambda: None)
        log.warn("stopping with events still queued; they are delivered after the next start")

    async def _stop(self) -> None:
        self.notifier.notify(STOPPING="1", STATUS="stopping")
        log.info("gatewayd {gateway} stopping", gateway=self.gateway_id)
        if self.api_port is not None:
            await defer.maybeDeferred(self.api_port.stopListening)
            api = self._api_state()
            if api is not None:  # open event streams keep their connections otherwise
                api.close_streams()
        await defer.DeferredList([host.stop() for host in self.plugins.values()])
        await self._drain(self.config.gateway.shutdown_timeout / 2)
        # Sinks first (a delivery in flight is finished or abandoned, its batch stays queued),
        # then the store, which commits every put still pending before it closes.
        await defer.DeferredList([runner.stop() for runner in self.sinks.values()])
        await self.queue_store.stop()
        await self.command_store.close()  # after the sinks: answers of late commands recorded
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self.history.stop()
        self._lag.stop()
        log.info("gatewayd {gateway} stopped", gateway=self.gateway_id)


def _summary(changes: dict[str, list[str]]) -> str:
    """``+a ~b -c`` for added, changed (or reconfigured) and removed names; ``unchanged``."""
    parts = [f"+{n}" for n in changes["added"]]
    parts += [f"~{n}" for n in changes["changed"] + changes["reconfigured"]]
    parts += [f"-{n}" for n in changes["removed"]]
    return " ".join(parts) or "unchanged"
