"""Process entry points: run the daemon (or the demo, or a simulator) on the global reactor.

SIGTERM and SIGINT stop the reactor; a before-shutdown trigger stops the daemon within
``gateway.shutdown_timeout`` (queues flushed), so the process exits 0 well inside systemd's
``TimeoutStopSec``. A plugin that fails to start with ``startup_error_behavior: error`` exits 1.
SIGHUP reloads the config file (``Daemon.reload_file``); one that arrives while the daemon is
still starting is applied once it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from gatewayd.config_model import Config
from gatewayd.demo_backend import demo_backend
from gatewayd.files import PRIVATE_UMASK
from gatewayd.logsetup import start_logging
from gatewayd.plugin import Simulator

log = Logger(namespace="gatewayd.runner")


def run_daemon(
    config: Config,
    *,
    demo: bool = False,
    duration: float | None = None,
    config_overrides: Callable[[Config], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``duration``); returns the process exit status.

    The process umask becomes 0077 first: the queues, sink files and plugin state hold IMEIs,
    meter data and ESAM records, and not every file is created by gatewayd's own code (SQLite
    creates its databases 0644 less the umask). The unit sets ``UMask=0077`` too; this holds
    for ``gatewayd run`` from a shell and for the demo as well.
    """
    os.umask(PRIVATE_UMASK)
    start_logging(config.gateway.log_level, config.gateway.log_format)
    exit_status = [0]

    async def main(reactor: Any) -> None:
        from gatewayd.service import Daemon

        try:
            daemon = Daemon(config, reactor, config_overrides=config_overrides)
        except (OSError, ValueError) as exc:  # the token file went away since the config check
            log.critical("gatewayd cannot start: {error}", error=exc)
            exit_status[0] = 2
            return
        simulators: list[Any] = []
        demo_started: list[float] = []
        hangups = _Hangups(daemon, reactor)
        signal.signal(signal.SIGHUP, hangups.received)

        async def shutdown() -> None:
            # What the demo's devices did while the daemon ran (its stop closes their links).
            summaries = [
                summary_text(summary_record(sim, time.monotonic() - demo_started[0]), sim)
                for sim in simulators
                if isinstance(sim, Simulator)
            ]
            # The daemon first: its plugins then see their devices still there while stopping.
            stopping = daemon.stop()
            timeout = config.gateway.shutdown_timeout
            stopping.addTimeout(timeout, reactor)
            try:
                await stopping
            except defer.TimeoutError:
                log.error("shutdown took longer than {t} s; exiting anyway", t=timeout)
            for sim in simulators:
                await defer.maybeDeferred(sim.stop)
            for line in summaries:
                log.info("demo: {summary}", summary=line)

        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: defer.ensureDeferred(shutdown())
        )
        try:
            await daemon.start()
        except Exception as exc:
            log.critical("gatewayd failed to start: {error}", error=exc)
            exit_status[0] = 1
            return
        hangups.daemon_ready()
        if demo:
            simulators.extend(await start_demo_simulators(daemon, reactor))
            demo_started.append(time.monotonic())
        if duration is not None:
            reactor.callLater(duration, reactor.stop)
        await defer.Deferred()  # run until the reactor stops

    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as exc:
        return exit_status[0] or (exc.code if isinstance(exc.code, int) else 1)
    return exit_status[0]


class _Hangups:
    """SIGHUP → reload, on the reactor thread; one received before the daemon ran waits."""

    def __init__(self, daemon: Any, reactor: Any) -> None:
        self.daemon = daemon
        self.reactor = reactor
        self.ready = False
        self.waiting = False

    def received(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reload)

    def daemon_ready(self) -> None:
        self.ready = True
        if self.waiting:
            self._reload()

    def _reload(self) -> None:
        if not self.ready:
            log.info("SIGHUP: the config is reloaded once the daemon runs")
            self.waiting = True
            return
        self.waiting = False
        log.info("SIGHUP: reloading {path}", path=str(self.daemon.config.path))
        self.daemon.reload_file().addErrback(lambda f: log.failure("reload failed", f))


async def start_demo_simulators(daemon: Any, reactor: Any) -> list[Any]:
    """Start the simulator of every running plugin instance that has one."""
    started = []
    for name, host in daemon.plugins.items():
        simulator_class = host.plugin_class.simulator
        if simulator_class is None or host.state != "running":
            continue
        try:
            simulator = simulator_class.for_demo(host.config, reactor)
            await defer.maybeDeferred(simulator.start)
        except Exception as exc:
            log.error("demo: simulator for {plugin} failed: {error!r}", plugin=name, error=exc)
            continue
        log.info(
            "demo: {family} simulator started for plugin {plugin}",
            family=simulator_class.family,
            plugin=name,
        )
        started.append(simulator)
    backend = demo_backend(daemon, reactor)
    if backend is not None:
        backend.start()
        started.append(backend)
    api = daemon.config.api
    if api.enabled:
        print(
            f"gatewayd demo: control API on http://{api.listen}  (try: curl "
            f"http://{api.listen}/api/v1/devices); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
    return started


def run_simulator(simulator_class: Any, args: Any, duration: float | None = None) -> int:
    """``gatewayd simulate FAMILY``: one simulator alone until Ctrl-C, SIGTERM (or ``duration``).

    When it stops it prints its summary (``Simulator.summary``) on stdout: one line of text, or
    with ``--json`` one JSON object on one line. Why: a load test compares what was sent with
    what the daemon stored. In JSON mode whatever else would reach stdout (the ESAM reader's pty
    path) goes to stderr, so stdout is that one line alone; logs go to stderr in any mode.
    """
    as_json = bool(getattr(args, "json", False))
    out = sys.stdout
    start_logging("info")

    async def main(reactor: Any) -> None:
        try:
            simulator = simulator_class.from_args(args, reactor)
        except (ValueError, OSError) as exc:  # a bad option value, a file that cannot be read
            print(f"gatewayd simulate: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        started: list[float] = []

        async def stop() -> None:
            try:
                await defer.maybeDeferred(simulator.stop)
            except Exception:
                log.failure("simulator stop failed")
            if not started:  # a simulator that never ran has nothing to say
                return
            try:
                record = summary_record(simulator, time.monotonic() - started[0])
                line = json.dumps(record) if as_json else summary_text(record, simulator)
            except Exception:  # a summary() that raised, or a value JSON cannot hold
                log.failure("simulator summary failed")
                return
            print(line, file=out, flush=True)

        reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(stop()))
        try:
            await defer.maybeDeferred(simulator.start)
        except (ValueError, OSError) as exc:  # a link it cannot make, a port it cannot open
            print(f"gatewayd simulate: cannot start: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        started.append(time.monotonic())
        if duration is not None:
            reactor.callLater(duration, reactor.stop)
        await defer.Deferred()

    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with quiet:
            task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


_SUMMARY_COUNTS = ("sent", "received", "errors")


def summary_record(simulator: Any, seconds: float) -> dict[str, Any]:
    """``{"family", "seconds", "sent", "received", "errors", ...}``: the simulator's summary
    with its family and running time in front (the ``--json`` line)."""
    summary = dict(simulator.summary())
    record: dict[str, Any] = {"family": simulator.family, "seconds": round(seconds, 3)}
    for key in _SUMMARY_COUNTS:
        record[key] = dict(summary.pop(key, None) or {})
    record.update(summary)
    return record


def summary_text(record: dict[str, Any], simulator: Any) -> str:
    """The record as one line: ``powerbank simulator: 1,234 frames sent (heartbeat 1,000, ...),
    1,100 frames received (...), 0 errors, connects 3, 12.0 s``."""
    nouns = (f"{simulator.sent_noun} sent", f"{simulator.received_noun} received", "errors")
    parts = [_counts(record[key], noun) for key, noun in zip(_SUMMARY_COUNTS, nouns, strict=True)]
    skip = {"family", "seconds", *_SUMMARY_COUNTS}
    parts += [f"{key} {_value(value)}" for key, value in record.items() if key not in skip]
    return f"{record['family']} simulator: {', '.join(parts)}, {record['seconds']:.1f} s"


def _counts(counts: dict[str, int], noun: str) -> str:
    text = f"{sum(counts.values()):,} {noun}"
    kinds = sorted(((n, kind) for kind, n in counts.items() if n), key=lambda p: (-p[0], p[1]))
    if kinds:
        text += " (" + ", ".join(f"{kind} {n:,}" for n, kind in kinds) + ")"
    return text


def _value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | dict):
        return str(value)
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_value(v)}" for k, v in value.items()) + ")"
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"
