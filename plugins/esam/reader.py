"""The serial-reader backend (``backend: reader``): link, card slot APDU layer, the 20 functions.

Why: the master-station card sits in a card reader on a serial port. Three layers, each testable
alone:

- :class:`ReaderLink` owns the port: opens it through Twisted's ``SerialPort``, frames bytes with
  the configured framer, sends one request at a time and matches the reply by sequence number,
  times out silence and garbage, and when the device vanishes (Twisted reports a clean close on
  unplug; reopening raises) fails the pending request and reopens with capped, jittered backoff.
- :class:`CardSlot` is the card in one slot: power on (ATR), power off, and APDU exchange with the
  T=0 rules (``61xx`` → GET RESPONSE, ``6Cxx`` → re-send with Le = xx) and command chaining.
- :class:`ReaderBackend` runs the library functions on the card with our APDU set
  (:mod:`gatewayd.protocols.esam_apdu`) and turns reader and card answers into the library's
  codes: link down 202, no card 301, not a master-station card 302, refusals by status word.

Nothing here logs APDU data or results; log lines carry lengths, status words and states.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import serial
from gatewayd.protocols.errors import ReaderFramingError
from gatewayd.protocols.esam import (
    CARD_RESET_FAILED,
    DEVICE_CLOSE_FAILED,
    DEVICE_OPEN_FAILED,
    ENCRYPTION_FAILED,
    NOT_MASTER_CARD,
    EsamError,
)
from gatewayd.protocols.esam_apdu import (
    SELECT_MASTER_CARD,
    SW_OK,
    command_apdus,
    decode_outputs,
    error_for_sw,
    get_response,
    split_response,
    with_le,
)
from gatewayd.protocols.reader_framing import (
    Framer,
    ReaderCommand,
    ReaderFrame,
    ReaderStatus,
    Rejected,
    request,
)
from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.serialport import SerialPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backend import Result

SW_NOT_SELECTED = 0x6985  # conditions of use not satisfied: the application is not selected

log = Logger(namespace="gatewayd.plugins.esam.reader")

PARITIES = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}


#: A port that stayed open this long reopens after a loss from the first backoff step; one
#: that closes sooner (a loose cable) goes on backing off, so it cannot flood the log.
STABLE_AFTER = 10.0


class LinkDown(Exception):
    """The reader's port is not open (unplugged, not yet reopened, or stopped)."""


class ReaderTimeout(Exception):
    """The reader sent no valid reply in time (silence, garbage, or a reply to something else)."""


# --- the serial port ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SerialSettings:
    """How to open the reader's port (pyserial's names and values)."""

    port: str
    baudrate: int = 115200
    parity: str = "none"
    bytesize: int = 8
    stopbits: float = 1
    exclusive: bool = True


def serial_opener(settings: SerialSettings, reactor: Any) -> Callable[[Protocol], Any]:
    """A function that opens the port for a protocol (raises SerialException/OSError if absent)."""

    class ReaderSerialPort(SerialPort):
        # pyserial's exclusive=True takes a flock, so two daemons cannot share one reader.
        _serialFactory = functools.partial(serial.Serial, exclusive=settings.exclusive)

    def open_port(protocol: Protocol) -> Any:
        return ReaderSerialPort(
            protocol,
            settings.port,
            reactor,
            baudrate=settings.baudrate,
            bytesize=settings.bytesize,
            parity=PARITIES[settings.parity],
            stopbits=settings.stopbits,
        )

    return open_port


class _LinkProtocol(Protocol):
    """Hands the port's events to its ReaderLink."""

    def __init__(self, link: ReaderLink) -> None:
        self.link = link

    def connectionMade(self) -> None:
        self.link.connection_made(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.link.data_received(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.link.connection_lost(reason)


# --- the link -------------------------------------------------------------------------------------


@dataclass
class _Pending:
    frame: ReaderFrame
    answer: defer.Deferred
    timer: Any


class ReaderLink:
    """The framed serial link to the reader: open/reopen, one request at a time, timeouts.

    ``open_port(protocol)`` opens the port (``serial_opener`` in production, a fake in tests).
    Callbacks: ``on_up()`` after the port opened, ``on_down(reason)`` after it closed,
    ``on_rejected(Rejected)`` for dropped bytes, ``on_frame(frame)`` for every frame received,
    ``on_sent(frame)`` for every request written. ``handling(frame)`` is a context manager
    around the handling of each frame received (the plugin's ``context.handling``).
    """

    handling: Callable[[Any], contextlib.AbstractContextManager[Any]] = staticmethod(
        lambda frame: contextlib.nullcontext()
    )

    def __init__(
        self,
        reactor: Any,
        open_port: Callable[[Protocol], Any],
        framer: Framer,
        *,
        response_timeout: float = 2.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        jitter: Callable[[], float] | None = None,
        description: str = "reader",
    ) -> None:
        self.reactor = reactor
        self.open_port = open_port
        self.framer = framer
        self.response_timeout = response_timeout
        if jitter is None:
            jitter_span = min(1.0, retry_initial)

            def jitter() -> float:
                return random.uniform(0, jitter_span)

        self.retry_policy = backoffPolicy(retry_initial, retry_max, factor=2.0, jitter=jitter)
        self.description = description
        self.on_up: Callable[[], None] = lambda: None
        self.on_down: Callable[[Any], None] = lambda reason: None
        self.on_rejected: Callable[[Rejected], None] = lambda rejected: None
        self.on_frame: Callable[[ReaderFrame], None] = lambda frame: None
        self.on_sent: Callable[[ReaderFrame], None] = lambda frame: None
        self.state = "stopped"  # stopped | down | up
        self.last_error: str | None = None
        self.attempts = 0
        self._attempts_before_up = 0
        self._up_since = 0.0
        self.bytes_in = self.bytes_out = 0
        self.frames_in = self.frames_out = 0
        self.stale_replies = 0
        self.connections = 0  # ports opened so far: a card opened before a reopen is unknown
        self._transport: Any = None
        self._retry: Any = None
        self._pending: _Pending | None = None
        self._seq = 0
        self._closed: defer.Deferred | None = None

    @property
    def is_up(self) -> bool:
        return self.state == "up"

    # --- open, close, reopen ----------------------------------------------------------------

    def start(self) -> None:
        """Open the port now, or keep retrying with backoff until it opens."""
        if self.state != "stopped":
            return
        self.state = "down"
        self._try_open()

    def stop(self) -> defer.Deferred:
        """Stop retrying and close the port; fires once it is closed."""
        self.state = "stopped"
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        transport, self._transport = self._transport, None
        self._fail_pending(LinkDown(f"{self.description}: stopped"))
        if transport is None:
            return defer.succeed(None)
        closed = self._closed = defer.Deferred()
        transport.loseConnection()
        return closed

    def _try_open(self) -> None:
        self._retry = None
        if self.state != "down":
            return
        try:
            self.open_port(_LinkProtocol(self))
        except (serial.SerialException, OSError, ValueError) as exc:
            self.last_error = str(exc)
            delay = self._schedule_retry()
            if self.attempts == 1 or self.attempts % 10 == 0:
                log.info(
                    "{link}: cannot open ({error}); retrying in {delay:.1f} s",
                    link=self.description,
                    error=self.last_error,
                    delay=delay,
                )

    def _schedule_retry(self) -> float:
        delay = self.retry_policy(self.attempts)
        self.attempts += 1
        self._retry = self.reactor.callLater(delay, self._try_open)
        return delay

    def connection_made(self, transport: Any) -> None:
        """The port opened (called by the port's protocol)."""
        if self.state == "stopped":
            transport.loseConnection()
            return
        self._transport = transport
        self.connections += 1
        self.state = "up"
        self._up_since = self.reactor.seconds()
        self._attempts_before_up, self.attempts = self.attempts, 0
        self.last_error = None
        self.framer.reset()
        log.info("{link}: port open", link=self.description)
        self.on_up()

    def connection_lost(self, reason: Any) -> None:
        """The port closed: unplugged (a clean ConnectionDone on POSIX), or stop()."""
        self._transport = None
        self.framer.reset()
        closed, self._closed = self._closed, None
        if self.state == "stopped":
            if closed is not None:
                closed.callback(None)
            return
        self.state = "down"
        self.last_error = "device closed"
        self._fail_pending(LinkDown(f"{self.description}: the device went away"))
        self.on_down(reason)
        if self.reactor.seconds() - self._up_since < STABLE_AFTER:  # a flapping cable
            self.attempts = self._attempts_before_up  # the backoff goes on where it was
        if self.state == "down" and self._retry is None:
            delay = self._schedule_retry()
            log.warn(
                "{link}: port closed (device gone); reopening in {delay:.1f} s",
                link=self.description,
                delay=delay,
            )

    # --- requests -------------------------------------------------------------------------------

    def request(self, command: ReaderCommand | int, slot: int, data: bytes = b"") -> defer.Deferred:
        """Send one request; fires with the reply frame, or fails LinkDown / ReaderTimeout."""
        if self.state != "up" or self._transport is None:
            return defer.fail(LinkDown(f"{self.description}: not connected"))
        if self._pending is not None:
            return defer.fail(RuntimeError("ReaderLink: one request at a time"))
        self._seq = (self._seq + 1) & 0xFF
        frame = request(self._seq, command, slot, data)
        wire = self.framer.encode(frame)
        answer: defer.Deferred = defer.Deferred()
        timer = self.reactor.callLater(self.response_timeout, self._timed_out)
        self._pending = _Pending(frame, answer, timer)
        self.bytes_out += len(wire)
        self.frames_out += 1
        self._transport.write(wire)
        self.on_sent(frame)
        return answer

    def data_received(self, data: bytes) -> None:
        """Bytes from the port (called by the port's protocol)."""
        self.bytes_in += len(data)
        for item in self.framer.feed(data):
            if isinstance(item, Rejected):
                self.on_rejected(item)
            else:
                with self.handling(item):  # a bug costs this frame, not the port
                    self.frames_in += 1
                    self.on_frame(item)
                    self._match(item)

    def _match(self, frame: ReaderFrame) -> None:
        pending = self._pending
        expected = pending and (pending.frame.seq, pending.frame.command | 0x80)
        if pending is None or (frame.seq, frame.command) != expected:
            self.stale_replies += 1
            log.debug("{link}: dropped a reply that matches no request", link=self.description)
            return
        self._pending = None
        if pending.timer.active():
            pending.timer.cancel()
        pending.answer.callback(frame)

    def _timed_out(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self.framer.reset()
        pending.answer.errback(
            ReaderTimeout(f"{self.description}: no valid reply within {self.response_timeout:g} s")
        )

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.timer.active():
            pending.timer.cancel()
        pending.answer.errback(error)


# --- the card slot --------------------------------------------------------------------------------


class CardSlot:
    """The card in one reader slot: power on/off and APDU exchange (61xx, 6Cxx, chaining).

    Reader refusals become library errors: no card or no ATR 301, card not powered 202, the link
    down 202. ``ReaderTimeout`` passes through.
    """

    max_rounds = 16  # 61xx/6Cxx rounds before the card is declared confused

    def __init__(self, link: ReaderLink, slot: int = 0) -> None:
        self.link = link
        self.slot = slot

    async def _request(self, command: ReaderCommand, data: bytes = b"") -> ReaderFrame:
        try:
            reply = await self.link.request(command, self.slot, data)
        except LinkDown as exc:
            raise EsamError(DEVICE_OPEN_FAILED, "link_down", str(exc)) from None
        status = reply.status
        if status == ReaderStatus.OK:
            return reply
        if status == ReaderStatus.NO_CARD:
            raise EsamError(CARD_RESET_FAILED, "no_card", f"no card in slot {self.slot}")
        if status == ReaderStatus.CARD_MUTE:
            raise EsamError(CARD_RESET_FAILED, "card_mute", "the card gave no ATR")
        if status == ReaderStatus.NOT_POWERED:
            raise EsamError(DEVICE_OPEN_FAILED, "not_powered", "the card is not powered on")
        raise EsamError(
            DEVICE_OPEN_FAILED,
            "reader_refused",
            f"the reader refused {command.name} (status {status})",
        )

    async def power_on(self) -> bytes:
        """Power the card on; returns its ATR (301 when there is no card or no ATR)."""
        reply = await self._request(ReaderCommand.POWER_ON)
        if not reply.data:
            raise EsamError(CARD_RESET_FAILED, "card_mute", "the card gave an empty ATR")
        return reply.data

    async def power_off(self) -> None:
        """Power the card off."""
        await self._request(ReaderCommand.POWER_OFF)

    async def exchange(self, apdu: bytes) -> tuple[bytes, int]:
        """One command/response pair: ``(data, SW)``."""
        reply = await self._request(ReaderCommand.APDU, apdu)
        try:
            return split_response(reply.data)
        except ReaderFramingError as exc:
            raise EsamError(ENCRYPTION_FAILED, "card_answer", str(exc)) from None

    async def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        """Send ``apdu`` and collect the whole answer through 61xx / 6Cxx rounds."""
        data, sw = await self.exchange(apdu)
        collected = b""
        for _ in range(self.max_rounds):
            sw1, sw2 = sw >> 8, sw & 0xFF
            if sw1 == 0x6C:  # wrong Le: send the same command again with Le = SW2
                apdu = with_le(apdu, sw2)
            elif sw1 == 0x61:  # SW2 more bytes wait: GET RESPONSE
                collected += data
                apdu = get_response(sw2 or 256)
            else:
                return collected + data, sw
            data, sw = await self.exchange(apdu)
        raise EsamError(
            ENCRYPTION_FAILED, "card_protocol", f"no final status after {self.max_rounds} rounds"
        )

    async def transmit_chain(self, apdus: list[bytes]) -> tuple[bytes, int]:
        """Send chained parts (each must answer 9000), then the last APDU with ``transmit``."""
        for part in apdus[:-1]:
            data, sw = await self.exchange(part)
            if sw != SW_OK:
                return data, sw
        return await self.transmit(apdus[-1])


# --- the backend ----------------------------------------------------------------------------------


class ReaderBackend:
    """The library functions through the card in the reader; every call returns a Deferred.

    ``card_state``: ``unknown`` (not opened since the link came up), ``ready`` (powered and the
    master-station application selected), ``absent`` (no card: 301), ``mute`` (no ATR: 301),
    ``wrong`` (not a master-station card: 302), ``closed`` (close_device: 202 until open_device).
    Callers must run one call at a time (the plugin's queue does).
    """

    def __init__(self, link: ReaderLink, slot: int = 0) -> None:
        self.link = link
        self.card = CardSlot(link, slot)
        self.card_state = "unknown"
        self.atr: bytes | None = None
        self.wanted_open = True
        self.on_state: Callable[[], None] = lambda: None
        self._opened_on = -1  # link.connections when the card was opened

    @property
    def online(self) -> bool:
        """The link is up and the master-station card is ready."""
        return (
            self.link.is_up
            and self.card_state == "ready"
            and self._opened_on == self.link.connections
        )

    def _set_state(self, state: str, atr: bytes | None = None, notify: bool = True) -> None:
        changed = (state, atr) != (self.card_state, self.atr)
        self.card_state, self.atr = state, atr
        if changed and notify:
            self.on_state()

    def link_lost(self) -> None:
        """Forget the card: a reopened port starts with an unknown card."""
        self._set_state("unknown")

    def call(self, function: str, args: Mapping[str, Any]) -> defer.Deferred:
        """Run ``function`` with validated ``args``; fires with its result or fails EsamError."""
        return defer.ensureDeferred(self._call(function, args))

    async def _call(self, function: str, args: Mapping[str, Any]) -> Result:
        if function == "open_device":
            self.wanted_open = True
            await self.open()
            return {}
        if function == "close_device":
            return await self.close()
        if not self.wanted_open:
            raise EsamError(DEVICE_OPEN_FAILED, "closed", "the device is closed (open_device)")
        if not self.link.is_up:
            self._set_state("unknown")
            raise EsamError(DEVICE_OPEN_FAILED, "link_down", self._down_message())
        if self._opened_on != self.link.connections:
            self._set_state("unknown")  # the port was reopened since: the card needs opening
        apdus = command_apdus(function, args)
        for attempt in range(2):
            # A card that lost power or its selection (swapped, reset) is opened again once.
            if self.card_state != "ready":
                await self.open()
            try:
                data, sw = await self.card.transmit_chain(apdus)
            except EsamError as error:
                if attempt == 0 and error.reason == "not_powered":
                    self._set_state("unknown", notify=False)  # reopened at once, no flapping
                    continue
                self._after_error(error)
                raise
            if sw == SW_NOT_SELECTED and attempt == 0:
                self._set_state("unknown", notify=False)
                continue
            if sw != SW_OK:
                error = error_for_sw(sw, function)
                self._after_error(error)
                raise error
            return decode_outputs(function, args, data)
        raise EsamError(DEVICE_OPEN_FAILED, "not_selected", "the card lost its selection")

    def _down_message(self) -> str:
        reason = f" ({self.link.last_error})" if self.link.last_error else ""
        return f"the reader is not connected{reason}"

    def _after_error(self, error: EsamError) -> None:
        if error.reason in ("no_card",):
            self._set_state("absent")
        elif error.reason in ("card_mute",):
            self._set_state("mute")
        elif error.code == DEVICE_OPEN_FAILED:
            self._set_state("unknown")  # not powered / not selected: open again next time

    async def open(self) -> None:
        """Power the card on and select the master-station application (202/301/302)."""
        if not self.link.is_up:
            raise EsamError(DEVICE_OPEN_FAILED, "link_down", self._down_message())
        try:
            atr = await self.card.power_on()
        except EsamError as error:
            self._after_error(error)
            raise
        data, sw = await self.card.exchange(SELECT_MASTER_CARD)
        if sw != SW_OK:
            self._set_state("wrong", atr)
            raise EsamError(
                NOT_MASTER_CARD,
                "not_master_card",
                f"card select failed (SW {sw:04X}): not a master-station card",
            )
        self._opened_on = self.link.connections
        self._set_state("ready", atr)

    async def close(self) -> Result:
        """Power the card off; calls fail with 202 until open_device (203 if it cannot, or if
        it was not open: as the soft backend answers)."""
        if not self.wanted_open:
            raise EsamError(DEVICE_CLOSE_FAILED, "not_open", "the device is not open")
        self.wanted_open = False
        if not self.link.is_up:
            self._set_state("closed")
            raise EsamError(DEVICE_CLOSE_FAILED, "link_down", self._down_message())
        try:
            if self.card_state not in ("absent", "mute"):
                await self.card.power_off()
        except EsamError as error:
            if error.reason not in ("no_card", "card_mute"):
                raise EsamError(DEVICE_CLOSE_FAILED, error.reason, error.message) from None
        finally:
            self._set_state("closed")
        return {}
