"""Plugin type ``esam``: the master-station security functions of an ESAM card (or its simulation).

Why: a master station computes the security data prepaid meters need (identity authentication,
remote control, parameter and tariff updates, purse, key update...) with a master-station card in
a DKQ-05 reader. The plugin offers the 20 functions of the card's library as commands, one card
operation at a time, and records each call as an ``esam.operation`` event.

- ``backend: soft``: the software backend (:mod:`.soft`), keys from ``key_file`` (mode 0600).
- ``backend: reader``: a card reader on a serial ``port`` (:mod:`.reader`), reconnecting by itself.

Commands answer like the library: argument errors are 400 with the code 150N (1500: an argument
the function does not take), device and card refusals 502 with the library's code, a queue that
is full 409, no answer in time 504. Keys, derived keys, arguments and results never appear in
events or logs: an event carries the function, the flag, the meter number from ``div``, the code,
the outcome and the durations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gatewayd.protocols.esam import (
    FUNCTIONS,
    UNKNOWN_FUNCTION,
    EsamError,
    FunctionSpec,
    call_context,
    validate_arguments,
)
from gatewayd.protocols.reader_framing import (
    DEFAULT_FRAMING,
    Rejected,
    available_framings,
    decode_frame,
    describe_frame,
    framer_for,
)
from pydantic import Field, ValidationInfo, create_model, field_validator
from twisted.internet import defer
from twisted.python.failure import Failure

from gatewayd.plugin import (
    BadArguments,
    Busy,
    Command,
    CommandError,
    Device,
    DeviceRefused,
    DeviceTimeout,
    NotFound,
    Plugin,
    PluginConfig,
)
from gatewayd.schema import ConfigModel, Duration, PositiveDuration, at_least

from .backend import Operation, Result
from .keys import KeyFileError, load_key_file
from .reader import ReaderBackend, ReaderLink, ReaderTimeout, SerialSettings, serial_opener
from .simulator import EsamReaderSimulator
from .soft import SoftBackend

RAW_LIMIT = 64  # bytes of a rejected frame kept in frame.invalid events


class EsamConfig(PluginConfig):
    """``plugins.<name>`` of ``type: esam``."""

    backend: Literal["soft", "reader"] = "reader"
    reader_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    call_timeout: PositiveDuration = 10.0
    max_queue: int = Field(16, ge=1, le=256)
    # backend: soft
    key_file: Path | None = None
    # backend: reader
    port: str = "/dev/ttyUSB0"
    baudrate: int = Field(115200, ge=50, le=4_000_000)
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    bytesize: Literal[5, 6, 7, 8] = 8
    stopbits: Literal[1, 1.5, 2] = 1
    exclusive: bool = True
    framing: str = DEFAULT_FRAMING
    slot: int = Field(0, ge=0, le=15)
    response_timeout: PositiveDuration = 2.0
    reconnect_initial: PositiveDuration = 0.5
    reconnect_max: Duration = 30.0

    @field_validator("framing")
    @classmethod
    def _known_framing(cls, value: str) -> str:
        if value not in available_framings():
            raise ValueError(
                f"unknown framing {value!r} (available: {', '.join(available_framings())})"
            )
        return value

    # Field validators (not a model validator) so that check-config points at the key's line.
    @field_validator("key_file")
    @classmethod
    def _soft_needs_keys(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if info.data.get("backend") == "soft":
            if value is None:
                raise ValueError("required with backend: soft")
            try:
                load_key_file(value)  # mode, format: reported by check-config too
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
        return value

    _reconnect_max_at_least_initial = field_validator("reconnect_max")(
        at_least("reconnect_initial")
    )


# --- command argument models (for the API's listing; validation is the library's) ----------------


def _argument_model(spec: FunctionSpec) -> type[ConfigModel]:
    fields: dict[str, Any] = {}
    for arg in spec.arguments:
        text = f"{arg.seed_name}: {arg.description} ({arg.describe_size()})"
        default = arg.default if arg.default is not None else ...
        if arg.kind == "int":
            allowed = sorted(arg.values) if arg.values is not None else None
            if allowed:
                text += f"; one of {', '.join(str(v) for v in allowed)}"
            fields[arg.name] = (int, Field(default, description=text))
        else:
            fields[arg.name] = (
                str,
                Field(default, description=text + "; hex", pattern=r"^([0-9A-Fa-f]{2})*$"),
            )
    name = "".join(part.title() for part in spec.name.split("_")) + "Arguments"
    return create_model(name, __base__=ConfigModel, __doc__=spec.summary, **fields)


ARGUMENT_MODELS: dict[str, type[ConfigModel]] = {
    name: _argument_model(spec) for name, spec in FUNCTIONS.items()
}


@dataclass(frozen=True)
class EsamCommand(Command):
    """A library function as a command: the library's own validation gives codes 150N. Its
    ``command.result`` is private (no arguments, no result: they are cryptographic material);
    ``esam.operation`` describes the call."""

    private: bool = True

    def _run(self, arguments: dict[str, Any]) -> defer.Deferred:
        return defer.maybeDeferred(self.handler, arguments)


def command_error(error: EsamError) -> CommandError:
    """The control API's answer to a library error (400/404 for the caller's mistakes, else 502)."""
    if error.code == UNKNOWN_FUNCTION:
        return NotFound(error.message, code=error.code)
    if error.is_argument_error:
        return BadArguments(error.message, code=error.code)
    return DeviceRefused(f"{error.message} (ESAM error {error.code})", code=error.code)


# --- one card operation at a time ----------------------------------------------------------------


class QueueFull(Exception):
    """No room for another call: ``max_queue`` calls are waiting or running."""


class CallTimeout(Exception):
    """A call did not finish within ``call_timeout`` (waiting included)."""


class OperationQueue:
    """Runs one card operation at a time in arrival order; bounded; each call has a deadline.

    A call that times out while waiting leaves the queue; one that times out while running is
    answered at once but keeps the card until the operation ends (the reader's own timeout
    bounds that), so the next call never meets a half-finished exchange.
    """

    def __init__(self, reactor: Any, limit: int) -> None:
        self.reactor = reactor
        self.limit = limit
        self._lock = defer.DeferredLock()

    @property
    def length(self) -> int:
        """Calls waiting or running."""
        return len(self._lock.waiting) + int(self._lock.locked)

    def submit(self, work: Callable[[], Any], timeout: float) -> defer.Deferred:
        """Run ``work()`` (may return a Deferred) when the card is free; raise QueueFull."""
        if self.length >= self.limit:
            raise QueueFull(f"{self.length} calls are queued (max_queue {self.limit})")
        outcome: defer.Deferred = defer.Deferred()
        acquired = self._lock.acquire()

        def expire() -> None:
            if not acquired.called:
                acquired.cancel()
            if not outcome.called:
                outcome.errback(CallTimeout(f"no answer within {timeout:g} s (call_timeout)"))

        timer = self.reactor.callLater(timeout, expire) if timeout > 0 else None

        def finish(result: Any) -> None:
            self._release()
            if timer is not None and timer.active():
                timer.cancel()
            if outcome.called:
                return None  # answered already (timed out): the late outcome is dropped
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback(result)
            return None

        def run(_: Any) -> None:
            defer.maybeDeferred(work).addBoth(finish)

        acquired.addCallbacks(run, lambda failure: failure.trap(defer.CancelledError) and None)
        return outcome

    def _release(self) -> None:
        # With callers waiting, hand over on the next reactor turn: a chain of calls that fail
        # at once (reader unplugged) must not nest one stack frame set per queued call.
        if self._lock.waiting:
            self.reactor.callLater(0, self._lock.release)
        else:
            self._lock.release()


# --- the plugin ----------------------------------------------------------------------------------


def decode_reader_frame(text: str) -> dict[str, Any]:
    """``gatewayd decode esam-reader HEX``: one gatewayd reader framing v1 frame."""
    return describe_frame(decode_frame(bytes.fromhex(text.replace(" ", ""))))


class EsamPlugin(Plugin):
    """Plugin type ``esam``: the 20 master-station functions, through a card reader or soft."""

    protocol = "esam"
    Config = EsamConfig
    simulator = EsamReaderSimulator
    decoders = {"esam-reader": decode_reader_frame}

    config: EsamConfig

    def init(self) -> None:
        config, context = self.config, self.context
        self.device_id = config.reader_name or self.name
        self.queue = OperationQueue(context.reactor, config.max_queue)
        self.soft: SoftBackend | None = None
        self.reader: ReaderBackend | None = None
        self.link: ReaderLink | None = None
        self.online = False
        self.last_seen: float | None = None
        self._commands = {
            function: EsamCommand(
                function,
                ARGUMENT_MODELS[function],
                lambda arguments, function=function: self.submit(function, arguments),
                spec.summary,
                context=self.context,
            )
            for function, spec in FUNCTIONS.items()
        }

    @classmethod
    def register_cli(cls, subparsers: Any) -> None:
        """``gatewayd esam capture`` and ``gatewayd esam replay`` (see :mod:`.capture`)."""
        from .capture import add_cli

        add_cli(subparsers)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.context.metrics.gauge(
            "queue_length", "ESAM calls waiting for the card or running", lambda: self.queue.length
        )
        if self.config.backend == "soft":
            self.soft = SoftBackend(load_key_file(self.config.key_file))
            self.soft.open_device()
            self._refresh_online()
            return
        settings = SerialSettings(
            port=self.config.port,
            baudrate=self.config.baudrate,
            parity=self.config.parity,
            bytesize=self.config.bytesize,
            stopbits=self.config.stopbits,
            exclusive=self.config.exclusive,
        )
        self.start_reader(serial_opener(settings, self.reactor))

    def start_reader(self, open_port: Callable[[Any], Any]) -> None:
        """Start the reader backend over ``open_port`` (the serial port; a fake in tests)."""
        link = ReaderLink(
            self.reactor,
            open_port,
            framer_for(self.config.framing),
            response_timeout=self.config.response_timeout,
            retry_initial=self.config.reconnect_initial,
            retry_max=self.config.reconnect_max,
            description=f"esam {self.name} ({self.config.port})",
        )
        self.link = link
        self.reader = ReaderBackend(link, self.config.slot)
        link.on_up = self._link_up
        link.on_down = self._link_down
        link.on_rejected = self._rejected
        link.on_frame = self._frame_received
        link.handling = lambda frame: self.context.handling(self.device_id, command=frame.command)
        link.on_sent = self._frame_sent
        self.reader.on_state = self._refresh_online
        link.start()

    def stop(self) -> defer.Deferred | None:
        if self.link is not None:
            return self.link.stop()
        return None

    # --- reader events ----------------------------------------------------------------------

    def _link_up(self) -> None:
        """Open the card (power on + SELECT) through the queue, unless close_device asked not to."""
        if self.reader is None or not self.reader.wanted_open:
            return
        try:
            reader = self.reader
            pending = self.queue.submit(
                lambda: defer.ensureDeferred(reader.open()), self.config.call_timeout
            )
        except QueueFull:
            return  # the next call opens the card first
        pending.addErrback(self._open_failed)

    def _open_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, EsamError):
            self.log.warn(
                "esam {plugin}: opening the card failed: {code} {message}",
                plugin=self.name,
                code=error.code,
                message=error.message,
            )
        elif failure.check(ReaderTimeout, CallTimeout):
            self.log.warn("esam {plugin}: the reader did not answer", plugin=self.name)
        else:
            self.context.fail(error)

    def _link_down(self, reason: Any) -> None:
        if self.reader is not None:
            self.reader.link_lost()
        self._refresh_online()

    def _rejected(self, rejected: Rejected) -> None:
        self.context.record(
            "frame.invalid",
            self.device_id,
            {"reason": rejected.reason, "bytes": len(rejected.raw)},
            raw=rejected.raw[:RAW_LIMIT].hex().upper(),
        )

    def _frame_received(self, frame: Any) -> None:
        self.context.frame_in()
        self.last_seen = time.time()

    def _frame_sent(self, frame: Any) -> None:
        self.context.frame_out()

    def _refresh_online(self) -> None:
        if self.soft is not None:
            online = self.soft.is_open
        else:
            online = self.reader is not None and self.reader.online
        if online == self.online:
            return
        self.online = online
        if online:
            self.context.record("device.online", self.device_id, self._state_details())
        else:
            self.context.record(
                "device.offline", self.device_id, {"reason": self._offline_reason()}
            )

    def _offline_reason(self) -> str:
        if self.soft is not None or self.reader is None:
            return "closed"
        if self.link is not None and not self.link.is_up:
            return "unplugged"
        return {
            "absent": "no_card",
            "mute": "card_mute",
            "wrong": "wrong_card",
            "closed": "closed",
        }.get(self.reader.card_state, "card_reset")

    def _state_details(self) -> dict[str, Any]:
        if self.soft is not None:
            return {"backend": "soft", "card": "ready" if self.soft.is_open else "closed"}
        details: dict[str, Any] = {"backend": "reader", "port": self.config.port}
        if self.link is not None and self.reader is not None:
            details.update(
                link=self.link.state,
                card=self.reader.card_state,
                atr=self.reader.atr.hex().upper() if self.reader.atr else None,
            )
        return details

    def devices(self) -> list[Device]:
        details = self._state_details()
        details["queue_length"] = self.queue.length
        if self.soft is not None and self.config.key_file is not None:
            details["key_file"] = str(self.config.key_file)
        if self.link is not None:
            details.update(framing=self.config.framing, last_error=self.link.last_error)
        return [Device(self.device_id, self.online, self.last_seen, details)]

    # --- commands -------------------------------------------------------------------------

    def commands(self) -> dict[str, Command]:
        return dict(self._commands)

    def submit(self, function: str, arguments: Mapping[str, Any]) -> defer.Deferred:
        """Validate, queue and run one library function; records its ``esam.operation`` event."""
        self.context.annotate(device=self.device_id)  # the command.result's device: the reader
        context = call_context(function, arguments)
        try:
            args = validate_arguments(function, arguments)
        except EsamError as error:
            self._record(context, error.code, "bad_arguments", 0.0, 0.0)
            return defer.fail(command_error(error))
        submitted = time.perf_counter()
        timing = {"started": submitted}

        def work() -> defer.Deferred:
            timing["started"] = time.perf_counter()
            return self._execute(function, args)

        try:
            pending = self.queue.submit(work, self.config.call_timeout)
        except QueueFull as exc:
            self._record(context, None, "busy", 0.0, 0.0)
            return defer.fail(Busy(f"the card is busy: {exc}"))

        def durations() -> tuple[float, float]:
            now = time.perf_counter()
            started = timing["started"]
            return now - started, started - submitted

        def succeeded(result: Result) -> Result:
            self.last_seen = time.time()
            self._record(context, 0, "ok", *durations())
            return result

        def failed(failure: Failure) -> Failure:
            running, queued = durations()
            error = failure.value
            if isinstance(error, EsamError):
                outcome = "bad_arguments" if error.is_argument_error else "refused"
                self._record(context, error.code, outcome, running, queued)
                raise command_error(error)
            if isinstance(error, ReaderTimeout | CallTimeout):
                self._record(context, None, "timeout", running, queued)
                raise DeviceTimeout(str(error))
            self._record(context, None, "internal", running, queued)
            return failure

        return pending.addCallbacks(succeeded, failed)

    def _execute(self, function: str, args: Mapping[str, Any]) -> defer.Deferred:
        if self.soft is not None:
            result = defer.maybeDeferred(getattr(self.soft, function), **args)
            if function in ("open_device", "close_device"):
                result.addBoth(self._after_soft_device_call)
            return result
        if self.reader is None:
            raise EsamError(202, "not_started", "the plugin is not started")
        return self.reader.call(function, args)

    def _after_soft_device_call(self, result: Any) -> Any:
        self._refresh_online()
        return result

    def _record(
        self, context: dict[str, Any], code: int | None, outcome: str, running: float, queued: float
    ) -> None:
        operation = Operation(**context, code=code, duration=running)  # type: ignore[arg-type]
        data = operation.event_data()
        data["outcome"] = outcome
        data["queued_ms"] = round(queued * 1000, 3)
        self.context.record("esam.operation", self.device_id, data)
