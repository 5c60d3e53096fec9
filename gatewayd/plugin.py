"""The plugin API: what a device family implements and what the core hands it.

Lifecycle of one plugin instance (``plugins.<name>`` in the config):

1. The config section is validated against ``Plugin.Config`` before anything starts; a bad key
   stops the daemon with ``file:line: plugins.<name>.<key>: message``.
2. ``Plugin(name, config, context)`` is constructed and calls ``init()``, where a plugin makes
   its state: no I/O here.
3. ``start()`` opens listeners, connections and ports; it may return a Deferred. If it fails the
   instance's ``startup_error_behavior`` decides: ``error`` stops the daemon, ``retry`` retries with
   backoff, ``ignore`` marks the plugin failed and the rest run on.
4. While running, the plugin calls ``context.emit(...)`` for every event and answers commands.
   Two guards keep a bug from vanishing or spreading:

   - ``with context.handling(device=..., raw=...):`` around the work for *one* frame, message
     or datagram. An exception costs that message only: it becomes a ``frame.invalid`` event with
     reason ``internal_error``, a traceback in the log (throttled), and the plugin runs on.
   - ``context.guard(callback)`` around callbacks that are not about one message (timers,
     connection made or lost, a Deferred chain of the plugin's own state). An exception there
     may leave the plugin's state broken, so it marks the plugin failed; the supervisor stops it
     and starts a fresh instance (``restart: on-failure``, the default).
5. ``stop()`` closes everything; it may return a Deferred. The daemon flushes the queues after.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ValidationError
from twisted.internet import defer
from twisted.logger import Logger

from gatewayd.command_result import CommandReport
from gatewayd.events import Event
from gatewayd.logsetup import LogThrottle
from gatewayd.schema import ConfigModel, PluginConfig

if TYPE_CHECKING:
    import argparse

__all__ = [
    "BadArguments",
    "Busy",
    "Command",
    "CommandError",
    "Device",
    "DeviceRefused",
    "DeviceTimeout",
    "Handled",
    "Invocation",
    "NotFound",
    "Plugin",
    "PluginConfig",
    "PluginContext",
    "PluginMetrics",
    "Simulator",
    "command",
]


# --- command errors: each maps to one HTTP status of the control API --------------------------


class CommandError(Exception):
    """A command that did not succeed; ``status`` is the HTTP status the control API answers."""

    status = 500
    code: str | int = "error"

    def __init__(self, message: str, code: str | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class BadArguments(CommandError):
    """400: an argument is missing, unknown or has a bad value; the message names it."""

    status = 400
    code = "bad_arguments"


class NotFound(CommandError):
    """404: unknown plugin, command or device, or the device is offline."""

    status = 404
    code = "not_found"


class Busy(CommandError):
    """409: the device already has an operation of this kind outstanding."""

    status = 409
    code = "busy"


class DeviceRefused(CommandError):
    """502: the device or card answered with a refusal; ``code`` is its own code."""

    status = 502
    code = "refused"


class DeviceTimeout(CommandError):
    """504: the device did not answer in time."""

    status = 504
    code = "timeout"


# --- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command a plugin accepts: its name, argument model and bound handler.

    ``device`` names the argument that holds the device id (the ``command.result`` event's
    device); ``context`` is the plugin's, through which every call is reported as
    ``command.result`` (``gatewayd.command_result``; None: not reported). ``private`` leaves
    the arguments and the result out of that event (cryptograms, one-time values).
    """

    name: str
    args: type[BaseModel] | None
    handler: Callable[..., Any]
    doc: str = ""
    device: str | None = None
    context: Any = field(default=None, compare=False, repr=False)
    private: bool = False

    def call(self, arguments: dict[str, Any]) -> defer.Deferred:
        """Validate ``arguments`` and run the handler; always returns a Deferred.

        The handler receives the validated model (or nothing when the command takes no
        arguments) and returns a JSON-able result, a Deferred of one, or raises CommandError.
        When its outcome is known the core emits ``command.result`` for it.
        """
        if self.context is None:
            return self._run(arguments)
        report = CommandReport(self.name, arguments, self.context, self.device, self.private)
        with self.context.reporting(report):  # the handler may annotate it synchronously
            result = self._run(arguments)
        return result.addBoth(report.finish)

    def _run(self, arguments: dict[str, Any]) -> defer.Deferred:
        try:
            if self.args is None:
                if arguments:
                    raise BadArguments(
                        f"{self.name} takes no arguments, got: {', '.join(sorted(arguments))}"
                    )
                return defer.maybeDeferred(self.handler)
            _refuse_booleans_for_numbers(self.args, arguments)
            try:
                parsed = self.args.model_validate(arguments)
            except ValidationError as exc:
                raise BadArguments(describe_validation_error(exc)) from None
            return defer.maybeDeferred(self.handler, parsed)
        except CommandError as exc:
            return defer.fail(exc)


def _refuse_booleans_for_numbers(model: type[BaseModel], arguments: Any) -> None:
    """pydantic reads ``true`` as 1 for an int field; a command argument should say so instead
    (``slot: true`` is a client's bug, not slot 1)."""
    if not isinstance(arguments, dict):
        return
    for name, field_info in model.model_fields.items():
        value = arguments.get(name)
        if isinstance(value, bool) and _numeric(field_info.annotation):
            raise BadArguments(f"{name}: expected a number, got {str(value).lower()}")


def _numeric(annotation: Any) -> bool:
    """int or float, alone or in ``X | None``; not bool."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) else (annotation,)
    return (
        bool(options)
        and all(o in (int, float, type(None)) for o in options)
        and (int in options or float in options)
    )


def describe_validation_error(exc: ValidationError) -> str:
    """``slot: Input should be less than or equal to 3; bank: Field required``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown argument"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def command(
    name: str | None = None, args: type[BaseModel] | None = None, device: str | None = None
):
    """Mark a plugin method as a command: ``@command("lend", args=LendArgs, device="imei")``.

    ``args`` is a pydantic model (derive from ``ConfigModel`` to refuse unknown arguments);
    ``device`` names the argument holding the device id, the device of its ``command.result``.
    """

    def mark(method: Callable[..., Any]) -> Callable[..., Any]:
        marker = (name or method.__name__, args, device)
        method.__gatewayd_command__ = marker  # type: ignore[attr-defined]
        return method

    return mark


@dataclass(frozen=True)
class Invocation:
    """Who asked for the command that is running: what a plugin writes into ``command.result``.

    ``source`` is the channel (``"http"`` for the control API, ``"mqtt"`` for the MQTT command
    topic; None when the command was called directly, as in a unit test) and ``request_id`` the
    caller's id for this request (the MQTT payload's ``id`` or the HTTP ``Idempotency-Key``;
    None when it gave none). The command dispatcher sets it on the plugin's context while the
    command's handler runs (``PluginContext.invocation``), so a handler reads it synchronously.
    """

    source: str | None = None
    request_id: str | None = None

    def as_data(self) -> dict[str, Any]:
        """``{"source": ..., "request_id": ...}``, to merge into an event's data."""
        return {"source": self.source, "request_id": self.request_id}


#: The invocation outside any dispatched command (a direct call).
DIRECT = Invocation()


# --- devices and metrics -----------------------------------------------------------------------


@dataclass
class Device:
    """One device as ``GET /api/v1/devices`` lists it."""

    id: str
    online: bool
    last_seen: float | None = None  # POSIX time
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PluginMetrics:
    """Counters every plugin keeps; ``/metrics`` reads them at scrape time (no locks needed).

    ``gauges`` holds extra per-plugin figures as callables (for example a queue length).
    """

    events: int = 0  # emitted by the plugin (every type)
    frames_in: int = 0
    frames_out: int = 0
    frames_invalid: int = 0
    internal_errors: int = 0  # messages whose handling raised (``PluginContext.handling``)
    commands: dict[str, int] = field(default_factory=dict)  # "name:outcome" → count
    gauges: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)

    def count_command(self, name: str, outcome: str) -> None:
        key = f"{name}:{outcome}"
        self.commands[key] = self.commands.get(key, 0) + 1

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Publish ``gatewayd_plugin_<name>{plugin=...}`` computed by ``read()`` at scrape time."""
        self.gauges[name] = (help_text, read)


# --- the context the core hands a plugin --------------------------------------------------------


#: Seconds an idempotency key is kept unless the plugin says otherwise (``emit(key=...)``).
DEFAULT_KEY_WINDOW = 600.0
#: Seconds between two log lines about events that could not be stored (one plugin).
NOT_STORED_LOG_INTERVAL = 10.0
#: Seconds between two tracebacks of messages whose handling raised (one plugin).
INTERNAL_ERROR_LOG_INTERVAL = 10.0
#: Longest exception text copied into a ``frame.invalid`` event's message.
INTERNAL_ERROR_MESSAGE_MAX = 200


class Handled:
    """What ``PluginContext.handling`` yields: after the block, ``failed`` says whether it
    raised, and ``deferred`` is the Deferred of the ``frame.invalid`` event it became (fires
    when that event is durable: acknowledge a device after it, as after any event).

    A caller that reads ``deferred`` gets a failure to store that event through it; otherwise
    the failure is counted and logged as for ``PluginContext.record``.
    """

    __slots__ = ("failed", "_deferred", "_taken")

    def __init__(self) -> None:
        self.failed = False
        self._deferred: defer.Deferred | None = None
        self._taken = False

    @property
    def deferred(self) -> defer.Deferred | None:
        self._taken = True
        return self._deferred

    def _emitted(self, deferred: defer.Deferred, not_stored: Callable[[Any], None]) -> None:
        def unless_taken(failure: Any) -> Any:
            if self._taken:
                return failure
            not_stored(failure)
            return None

        self._deferred = deferred
        deferred.addErrback(unless_taken)


class PluginContext:
    """What a plugin gets from the core: reactor, state dir, logger, emit and failure reporting."""

    def __init__(
        self,
        *,
        name: str,
        protocol: str,
        gateway_id: str,
        reactor: Any,
        state_dir: Path,
        sink: Callable[[Event], defer.Deferred],
        on_failure: Callable[[BaseException], None] | None = None,
        keys: Any = None,
    ) -> None:
        self.name = name
        self.protocol = protocol
        self.gateway_id = gateway_id
        self.reactor = reactor
        self.state_dir = state_dir
        self.log = Logger(namespace=f"gatewayd.plugin.{name}")
        self.metrics = PluginMetrics()
        self._sink = sink
        self._on_failure = on_failure
        self._keys = keys  # seen(key) / forget(key): the queue store, or a test's collector
        #: The command invocation running now (set by the dispatcher, see ``invoked``); a
        #: handler reads it synchronously, before it returns its Deferred.
        self.invocation: Invocation = DIRECT
        #: The fleet's membership (``gatewayd.fleet.membership.Membership``) when the daemon
        #: runs a plugin with ``fleet: true``; None otherwise.
        self.fleet: Any = None
        self._report: CommandReport | None = None  # the command being called (``reporting``)
        self.not_stored = 0  # events record() could not make durable
        self._not_stored_log = LogThrottle(reactor.seconds, NOT_STORED_LOG_INTERVAL)
        self._internal_error_log = LogThrottle(reactor.seconds, INTERNAL_ERROR_LOG_INTERVAL)
        self.metrics.gauge(
            "events_not_stored_total",
            "Events no device waited for that could not be stored (see the log)",
            lambda: self.not_stored,
        )

    def emit(
        self,
        type: str,
        device: str | None = None,
        data: dict[str, Any] | None = None,
        raw: str | None = None,
        *,
        key: str | None = None,
        window: float = DEFAULT_KEY_WINDOW,
    ) -> defer.Deferred:
        """Emit one event; the Deferred fires when it is durable in every queue it was routed to.

        Acknowledge a device only after it fired. It never fails for routing reasons: an event no
        route matches fires at once (and is counted as unrouted).

        ``key`` marks a frame a device re-sends until it is acknowledged (a result, a report):
        each queue commits the key with the event and, for ``window`` seconds, stores no second
        event with the same key, across restarts and ``kill -9`` too; the Deferred of such a
        repeat fires as for a stored event, so the device is answered again. Keys are per plugin
        instance. Leave heartbeats and other frames that legitimately repeat unkeyed.
        """
        event = Event(
            type=type,
            device=device,
            data=data if data is not None else {},
            raw=raw,
            gateway=self.gateway_id,
            plugin=self.name,
            protocol=self.protocol,
            key=self._key(key, window) if key is not None else None,
        )
        metrics = self.metrics
        metrics.events += 1
        if type == "frame.invalid":
            metrics.frames_invalid += 1
        return self._sink(event)

    def frame_in(self, count: int = 1) -> None:
        """Count frames received from devices (``gatewayd_plugin_frames_in_total``): call it
        once per frame, before decoding, so that invalid frames are counted too."""
        self.metrics.frames_in += count

    def frame_out(self, count: int = 1) -> None:
        """Count frames sent to devices (``gatewayd_plugin_frames_out_total``)."""
        self.metrics.frames_out += count

    def record(
        self,
        type: str,
        device: str | None = None,
        data: dict[str, Any] | None = None,
        raw: str | None = None,
        *,
        key: str | None = None,
        window: float = DEFAULT_KEY_WINDOW,
    ) -> None:
        """Emit an event nothing waits for (``device.online``, ``frame.invalid``...).

        A failure to store it (disk full) is counted and logged at most once per
        ``NOT_STORED_LOG_INTERVAL`` seconds, instead of one traceback per event. ``key`` and
        ``window`` as for ``emit``.
        """
        self.emit(type, device, data, raw, key=key, window=window).addErrback(self.note_not_stored)

    def _key(self, key: str, window: float) -> tuple[Any, ...]:
        """The event's key: scoped to this instance, stamped so a later forget wins."""
        stamp = getattr(self._keys, "stamp", None)
        scoped = f"{self.name}:{key}"
        return (scoped, window) if stamp is None else (scoped, window, stamp())

    def seen(self, key: str) -> bool:
        """True if an event emitted with ``key`` is durable (in this run or one before it,
        loaded from the queues at start) and its window has not passed."""
        return self._keys is not None and self._keys.seen(f"{self.name}:{key}")

    def forget(self, key: str) -> None:
        """A new operation reuses ``key``: let its next event be stored (durably ordered before
        any event emitted after this call)."""
        if self._keys is not None:
            self._keys.forget(f"{self.name}:{key}")

    def note_not_stored(self, failure: Any) -> None:
        """Errback for an event that could not be stored and that nobody acknowledges."""
        self.not_stored += 1
        if self._not_stored_log.due():
            self.log.error(
                "plugin {plugin}: an event could not be stored ({count} so far): {error}",
                plugin=self.name,
                count=self.not_stored,
                error=failure.getErrorMessage(),
            )

    @contextlib.contextmanager
    def reporting(self, report: CommandReport) -> Iterator[None]:
        """Make ``report`` the command being called while the block runs (``Command.call``),
        so that ``annotate`` reaches it; the previous one is restored after."""
        previous, self._report = self._report, report
        try:
            yield
        finally:
            self._report = previous

    def annotate(self, device: str | None = None, **details: Any) -> None:
        """Add to the ``command.result`` of the command whose handler is running now (call it
        synchronously in the handler): its ``device`` and keys of the plugin's own."""
        if self._report is not None:
            self._report.annotate(device, **details)

    @contextlib.contextmanager
    def invoked(self, invocation: Invocation) -> Iterator[None]:
        """Make ``invocation`` the current one while the block runs (the dispatcher calls a
        command's handler inside it); the previous one is restored after, whatever happens."""
        previous, self.invocation = self.invocation, invocation
        try:
            yield
        finally:
            self.invocation = previous

    @contextlib.contextmanager
    def handling(
        self,
        device: str | None = None,
        raw: str | Callable[[], str | None] | None = None,
        **data: Any,
    ) -> Iterator[Handled]:
        """Guard the handling of one frame, message or datagram: an exception in the block
        becomes a ``frame.invalid`` event (reason ``internal_error``, the exception's type and
        text as ``message``, plus ``data``) for ``device`` with ``raw``, a traceback in the log
        (the first, then at most one every 10 s, with the count), and the plugin runs on.
        ``raw`` may be a function, called only when the block raised (the hot path then pays
        nothing for rendering the frame as text).

        Why: a crafted or unforeseen frame that hits a bug must cost that frame only, not the
        connection, the other devices or the plugin. Use ``guard`` for what is not one message.
        """
        handled = Handled()
        try:
            yield handled
        except Exception as exc:
            handled.failed = True
            self.metrics.internal_errors += 1
            if self._internal_error_log.due():
                self.log.failure(
                    "plugin {plugin}: handling a message failed ({count} so far); the message "
                    "is kept as frame.invalid (internal_error) and the plugin runs on",
                    plugin=self.name,
                    count=self.metrics.internal_errors,
                )
            text = f"{type(exc).__name__}: {exc}"
            if len(text) > INTERNAL_ERROR_MESSAGE_MAX:
                text = text[: INTERNAL_ERROR_MESSAGE_MAX - 3] + "..."
            event = {"reason": "internal_error", "message": text, **data}
            if callable(raw):
                raw = raw()
            handled._emitted(self.emit("frame.invalid", device, event, raw), self.note_not_stored)

    def guard(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a callback that is not about one message (a timer, a connection event): an
        exception is logged and marks the plugin failed, and the supervisor restarts it
        (``restart``). For the handling of one frame use ``handling`` instead."""

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except Exception as exc:
                self.fail(exc)
                return None

        return guarded

    def fail(self, exc: BaseException) -> None:
        """Report an unexpected error: logged with its traceback, plugin shown failed in /health."""
        self.log.failure("unexpected error in plugin {plugin}", plugin=self.name)
        if self._on_failure is not None:
            self._on_failure(exc)


# --- the plugin base class ---------------------------------------------------------------------


class Plugin:
    """Base class of a device family. Subclass it and set ``protocol`` and ``Config``.

    Class attributes:
      ``protocol``   the family name written into every event (``powerbank``, ``heating``...).
      ``Config``     the pydantic model of this plugin's config section.
      ``simulator``  a ``Simulator`` subclass used by ``gatewayd demo`` and ``gatewayd simulate``.
      ``decoders``   ``{format: function(text) -> JSON-able}`` for ``gatewayd decode FORMAT DATA``.
    """

    protocol: ClassVar[str] = "generic"
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    simulator: ClassVar[type[Simulator] | None] = None
    decoders: ClassVar[dict[str, Callable[[str], Any]]] = {}

    def __init__(self, name: str, config: PluginConfig, context: PluginContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.log = context.log
        self.init()

    def init(self) -> None:
        """Create the plugin's state: called once, at construction, before ``start()``.

        No I/O here (open ports in ``start()``). Why: state made here exists whatever happens
        to ``start()``, so ``stop()``, ``devices()`` and commands never need ``getattr`` guards
        for a start that failed half-way; and a restart by the supervisor is a new instance, so
        nothing carries over from the failed one. Override it instead of ``__init__``.
        """

    @property
    def reactor(self) -> Any:
        return self.context.reactor

    def start(self) -> defer.Deferred | None:
        """Open transports; may return a Deferred. Raise or fail it to report a startup error."""
        return None

    def stop(self) -> defer.Deferred | None:
        """Close transports and cancel timers; may return a Deferred."""
        return None

    def devices(self) -> Iterable[Device]:
        """The devices this plugin knows, online or not, in a stable order (``/api/v1/devices``
        pages through it by position). A generator is cheaper: a page stops reading at its end."""
        return []

    def device_elsewhere(self, device: str, gateway: str, since: float) -> None:
        """Another box of the fleet announced ``device`` online at ``since`` (POSIX seconds).

        Why: a device that reconnects through a balancer may land on another box while this one
        still holds a half-open connection of it. Close such a connection if it is older than
        ``since`` (as a local takeover by a newer connection does). Default: nothing.
        """

    def devices_online(self) -> int:
        """How many of ``devices()`` are online (``/metrics`` reads it at every scrape).

        Override it when building ``devices()`` is costly (the heating plugin knows every meter).
        """
        return sum(1 for device in self.devices() if device.online)

    def commands(self) -> dict[str, Command]:
        """The commands this plugin accepts, found from its ``@command`` methods."""
        found: dict[str, Command] = {}
        for _, method in inspect.getmembers(self, inspect.ismethod):
            marker = getattr(method, "__gatewayd_command__", None)
            if marker:
                cmd_name, args, device = marker
                doc = (inspect.getdoc(method) or "").split("\n")[0]
                found[cmd_name] = Command(cmd_name, args, method, doc, device, self.context)
        return found

    @classmethod
    def register_cli(cls, subparsers: argparse._SubParsersAction) -> None:
        """Add family-specific subcommands to the ``gatewayd`` command line (optional)."""


class Simulator:
    """A simulator of one device family: ``gatewayd simulate FAMILY`` and ``gatewayd demo``.

    ``add_arguments`` declares its command-line options; ``from_args`` builds it from them;
    ``for_demo`` builds one pointed at a running plugin instance's config (loopback);
    ``summary`` says what it did, printed when ``gatewayd simulate`` stops.
    """

    family: ClassVar[str] = ""
    #: What the printed summary calls the things sent and received ("frames", "messages", ...).
    sent_noun: ClassVar[str] = "messages"
    received_noun: ClassVar[str] = "messages"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Declare command-line options for ``gatewayd simulate FAMILY``."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, reactor: Any) -> Simulator:
        raise NotImplementedError

    @classmethod
    def for_demo(cls, plugin_config: ConfigModel, reactor: Any) -> Simulator:
        raise NotImplementedError

    def start(self) -> defer.Deferred | None:
        return None

    def stop(self) -> defer.Deferred | None:
        return None

    def summary(self) -> dict[str, Any]:
        """What this simulator did so far: ``{"sent": {kind: n}, "received": {kind: n},
        "errors": {kind: n}, ...}``.

        ``sent`` counts what it sent by kind (frames, messages, or a device's answers),
        ``received`` what came back (answers, acks, commands, or a device's requests),
        ``errors`` what went wrong (failed connects, lines it could not read). Further keys
        (``connects``, ...) say more; every value is plain JSON (str, int, float, bool, lists,
        dicts). Why: ``gatewayd simulate`` prints it when it stops, so a load test can compare
        what was sent with what the daemon stored without trusting the daemon's own counters.
        Read it from the counters the simulator keeps as it works, not from a second tally.
        The default: nothing counted.
        """
        return {"sent": {}, "received": {}, "errors": {}}
