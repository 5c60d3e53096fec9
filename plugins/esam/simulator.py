"""The reader simulator: a card reader with a master-station card, on a pseudo-terminal.

Why: the plugin's serial path (framing, reconnect, 61xx/6Cxx, error codes) must be exercised
without the DKQ-05 and its card. ``gatewayd simulate esam --pty`` opens a raw pseudo-terminal,
prints the path the plugin should open (and points ``--link`` at it), and answers gatewayd reader
framing v1 as a reader whose main slot holds a master-station card computed by the soft backend.

Modes, switchable at run time (:meth:`EsamReaderSimulator.set_mode`, or SIGUSR1 to cycle):

- ``normal``      the master-station card answers every function
- ``no-card``     the slot is empty (the plugin answers 301)
- ``wrong-card``  another card: it has an ATR but no master-station application (302)
- ``garbage``     random bytes instead of replies (the plugin times out: 504)
- ``silence``     no replies at all (504)

:meth:`EsamReaderSimulator.unplug` closes the pseudo-terminal (what the plugin sees when a USB
reader is pulled out) and :meth:`EsamReaderSimulator.replug` creates a new one behind the link.

The reader counts the requests it receives and the answers it sends by command, the status of
each answer, and the bytes its framer rejects; ``summary()`` reports them when ``gatewayd
simulate`` stops.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import tempfile
import tty
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from gatewayd.protocols.errors import ReaderFramingError
from gatewayd.protocols.esam import EsamError, output_sizes
from gatewayd.protocols.esam_apdu import (
    CHAINING_BIT,
    CLA,
    FUNCTION_FOR_INS,
    INS_GET_RESPONSE,
    INS_SELECT,
    MASTER_CARD_AID,
    SW_OK,
    decode_arguments,
    encode_outputs,
    sw_for_error,
)
from gatewayd.protocols.reader_framing import (
    DEFAULT_FRAMING,
    ReaderCommand,
    ReaderFrame,
    ReaderStatus,
    Rejected,
    available_framings,
    framer_for,
)
from twisted.internet import abstract, fdesc, main
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.plugin import Simulator

from .keys import default_key_file, load_key_file
from .soft import SoftBackend

log = Logger(namespace="gatewayd.plugins.esam.simulator")

MODES = ("normal", "no-card", "wrong-card", "garbage", "silence")

MASTER_CARD_ATR = bytes.fromhex("3B680000") + b"GWDMSC" + bytes.fromhex("0001")
"""ATR of the simulated master-station card: TS 3B, T0 68 (TB1, TC1, 8 historical bytes)."""

OTHER_CARD_ATR = bytes.fromhex("3B680000") + b"OTHERCRD"


def _sw(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _command_name(command: int) -> str:
    """``power_on`` for 0x10; ``cmd_7f`` for a command byte we do not know."""
    try:
        return ReaderCommand(command).name.lower()
    except ValueError:
        return f"cmd_{command:02x}"


def _status_name(status: int | None) -> str:
    try:
        return ReaderStatus(status).name.lower() if status is not None else "none"
    except ValueError:
        return f"status_{status:02x}"


# --- the cards ------------------------------------------------------------------------------------


class _ShortApdu:
    """A parsed short command APDU: header, data, Le (None when absent; 256 for 00)."""

    def __init__(self, apdu: bytes) -> None:
        if len(apdu) < 4:
            raise ReaderFramingError("apdu", "APDU shorter than its header")
        self.cla, self.ins, self.p1, self.p2 = apdu[:4]
        body = apdu[4:]
        self.data = b""
        self.le: int | None = None
        if len(body) == 1:
            self.le = body[0] or 256
        elif len(body) > 1:
            lc = body[0]
            if lc == 0 or len(body) not in (1 + lc, 2 + lc):
                raise ReaderFramingError("apdu", "Lc does not match the data")
            self.data = body[1 : 1 + lc]
            if len(body) == 2 + lc:
                self.le = body[-1] or 256


class OtherCard:
    """A card that is not a master-station card: it has an ATR and refuses our application."""

    atr = OTHER_CARD_ATR

    def power_on(self) -> bytes:
        return self.atr

    def power_off(self) -> None:
        """Nothing to forget."""

    def process(self, apdu: bytes) -> bytes:
        """6A82 to SELECT (application not found), 6D00 to anything else."""
        return _sw(0x6A82) if apdu[1:2] == bytes([INS_SELECT]) else _sw(0x6D00)


class MasterCard:
    """The simulated master-station card: our APDU set, computed by a :class:`SoftBackend`.

    Behaves as a T=0 card: a command with data and output answers ``61xx`` and waits for GET
    RESPONSE; a command without data whose Le is not the output size answers ``6Cxx``.
    """

    atr = MASTER_CARD_ATR

    def __init__(self, backend: SoftBackend) -> None:
        self.backend = backend
        self.selected = False
        self._chain = b""
        self._chain_ins: int | None = None
        self._response = b""

    def power_on(self) -> bytes:
        self.power_off()
        return self.atr

    def power_off(self) -> None:
        self.selected = False
        self._chain, self._chain_ins, self._response = b"", None, b""
        if self.backend.is_open:
            self.backend.close_device()

    def process(self, apdu: bytes) -> bytes:
        """The response APDU (data ‖ SW1 SW2) to one command APDU."""
        try:
            command = _ShortApdu(apdu)
        except ReaderFramingError:
            return _sw(0x6700)
        if command.cla == 0x00 and command.ins == INS_GET_RESPONSE:
            return self._get_response(command.le or 256)
        self._response = b""
        if command.cla == 0x00 and command.ins == INS_SELECT:
            return self._select(command)
        if command.cla & ~CHAINING_BIT != CLA:
            return _sw(0x6E00)
        function = FUNCTION_FOR_INS.get(command.ins)
        if function is None:
            return _sw(0x6D00)
        if not self.selected:
            return _sw(0x6985)
        if command.cla & CHAINING_BIT:
            if self._chain_ins not in (None, command.ins):
                self._chain = b""
            self._chain += command.data
            self._chain_ins = command.ins
            return _sw(SW_OK)
        data = (self._chain if self._chain_ins == command.ins else b"") + command.data
        self._chain, self._chain_ins = b"", None
        return self._run(function, data, command)

    def _select(self, command: _ShortApdu) -> bytes:
        if command.p1 != 0x04 or command.data != MASTER_CARD_AID:
            return _sw(0x6A82)
        self.backend.open_device()
        self.selected = True
        return _sw(SW_OK)

    def _run(self, function: str, data: bytes, command: _ShortApdu) -> bytes:
        try:
            args = decode_arguments(function, data)
        except ReaderFramingError:
            return _sw(0x6700)
        try:
            if not data and command.le is not None:
                expected = sum(size or 0 for size in output_sizes(function, {}).values())
                if command.le != expected:
                    return _sw(0x6C00 | (expected & 0xFF))
            result = self.backend.call(function, args)
        except EsamError as error:
            return _sw(sw_for_error(error))
        output = encode_outputs(function, result)
        if not output:
            return _sw(SW_OK)
        if not data:  # case 2: Le was right, answer at once
            return output + _sw(SW_OK)
        self._response = output  # case 4 under T=0: the data waits for GET RESPONSE
        return _sw(0x6100 | (min(len(output), 256) & 0xFF))

    def _get_response(self, length: int) -> bytes:
        if not self._response:
            return _sw(0x6985)
        available = min(len(self._response), 256)
        if length != available:
            return _sw(0x6C00 | (available & 0xFF))
        chunk, self._response = self._response[:length], self._response[length:]
        if self._response:
            return chunk + _sw(0x6100 | (min(len(self._response), 256) & 0xFF))
        return chunk + _sw(SW_OK)


class SimulatedReader:
    """The reader: answers request frames of our command set for the card in its slot.

    ``handle(frame)`` returns the bytes to send back (a reply frame, garbage, or nothing), by mode.
    """

    slots = 1

    def __init__(self, master: MasterCard, mode: str = "normal", framing: str = DEFAULT_FRAMING):
        self.master = master
        self.other = OtherCard()
        self.framer = framer_for(framing)
        self.powered = False
        #: Requests by command; answers by command (``garbage`` in that mode) and by status;
        #: errors: bytes the framer rejected (``rejected_<reason>``), replies sent to us.
        self.received: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.unanswered = 0
        self.mode = "normal"
        self.set_mode(mode)

    def set_mode(self, mode: str) -> None:
        """Switch mode; changing the card in the slot powers it off (as pulling it out would)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
        if self._card_kind(mode) != self._card_kind(self.mode):
            self.master.power_off()
            self.powered = False
        self.mode = mode

    @staticmethod
    def _card_kind(mode: str) -> str:
        return {"no-card": "none", "wrong-card": "other"}.get(mode, "master")

    @property
    def card(self) -> MasterCard | OtherCard | None:
        kind = self._card_kind(self.mode)
        return None if kind == "none" else self.master if kind == "master" else self.other

    @property
    def requests(self) -> int:
        """Request frames received so far."""
        return sum(self.received.values())

    def handle(self, frame: ReaderFrame) -> bytes:
        """The bytes answering one request frame."""
        if frame.is_reply:
            self.errors["unexpected_reply"] += 1
            return b""
        command = _command_name(frame.command)
        self.received[command] += 1
        if self.mode == "silence":
            self.unanswered += 1
            return b""
        if self.mode == "garbage":
            self.sent["garbage"] += 1
            return random.randbytes(random.randint(8, 40))
        reply = self._reply(frame)
        self.sent[command] += 1
        self.statuses[_status_name(reply.status)] += 1
        return self.framer.encode(reply)

    def reject(self, rejected: Rejected) -> None:
        """Count bytes the framer dropped (a request garbled on the line)."""
        self.errors[f"rejected_{rejected.reason}"] += 1

    def _reply(self, frame: ReaderFrame) -> ReaderFrame:
        if frame.slot is None or frame.slot >= self.slots:
            return frame.reply(ReaderStatus.BAD_PARAMETER)
        card = self.card
        command = frame.command
        if command == ReaderCommand.STATUS:
            return frame.reply(ReaderStatus.OK, bytes([card is not None, self.powered]))
        if command not in (ReaderCommand.POWER_ON, ReaderCommand.POWER_OFF, ReaderCommand.APDU):
            return frame.reply(ReaderStatus.BAD_COMMAND)
        if card is None:
            self.powered = False
            return frame.reply(ReaderStatus.NO_CARD)
        if command == ReaderCommand.POWER_ON:
            self.powered = True
            return frame.reply(ReaderStatus.OK, card.power_on())
        if command == ReaderCommand.POWER_OFF:
            self.powered = False
            card.power_off()
            return frame.reply(ReaderStatus.OK)
        if not self.powered:
            return frame.reply(ReaderStatus.NOT_POWERED)
        if not frame.data:
            return frame.reply(ReaderStatus.BAD_PARAMETER)
        return frame.reply(ReaderStatus.OK, card.process(frame.data))


# --- the pseudo-terminal --------------------------------------------------------------------------


class PtyTransport(abstract.FileDescriptor):
    """A Twisted transport over a pty master fd (the device side of the simulated port)."""

    connected = 1

    def __init__(self, reactor: Any, fd: int, protocol: Protocol) -> None:
        super().__init__(reactor)
        self._fd = fd
        fdesc.setNonBlocking(fd)
        self.protocol = protocol
        protocol.makeConnection(self)
        self.startReading()

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self._fd, self.protocol.dataReceived)

    def writeSomeData(self, data: bytes) -> Any:
        return fdesc.writeToFD(self._fd, data)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self.protocol.connectionLost(reason)


class _ReaderDeviceProtocol(Protocol):
    """The simulated reader's end of the pty: frames in, replies out."""

    def __init__(self, reader: SimulatedReader, framing: str) -> None:
        self.reader = reader
        self.framer = framer_for(framing)

    def dataReceived(self, data: bytes) -> None:
        for item in self.framer.feed(data):
            if isinstance(item, ReaderFrame):
                answer = self.reader.handle(item)
                if answer:
                    self.transport.write(answer)
            else:
                self.reader.reject(item)


def open_raw_pty() -> tuple[int, int, str]:
    """``(master_fd, slave_fd, slave_path)`` of a new pseudo-terminal in raw mode."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


def point_link(link: Path, target: str) -> None:
    """Make ``link`` a symlink to ``target`` atomically; refuse to replace anything else."""
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a symlink; not replacing it")
    temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    temporary.symlink_to(target)
    os.replace(temporary, link)


def demo_key_copy() -> Path:
    """The bundled demo keys copied to a new private (0600) temporary file."""
    fd, name = tempfile.mkstemp(prefix="gatewayd-esam-keys-", suffix=".yaml")
    with os.fdopen(fd, "wb") as handle:
        handle.write(default_key_file().read_bytes())
    return Path(name)


# --- the simulator --------------------------------------------------------------------------------


class EsamReaderSimulator(Simulator):
    """``gatewayd simulate esam --pty [--link PATH] [--keys FILE] [--mode MODE]``: a card reader."""

    family: ClassVar[str] = "esam"
    sent_noun: ClassVar[str] = "answers"
    received_noun: ClassVar[str] = "requests"

    def __init__(
        self,
        reactor: Any,
        *,
        keys: Path | None = None,
        mode: str = "normal",
        link: Path | None = None,
        framing: str = DEFAULT_FRAMING,
        announce: bool = False,
        enabled: bool = True,
    ) -> None:
        self.reactor = reactor
        self.link = link
        self.framing = framing
        self.announce = announce
        self.enabled = enabled
        self._own_keys = keys is None and enabled
        self.key_path = (demo_key_copy() if self._own_keys else keys) if enabled else None
        self.reader: SimulatedReader | None = None
        if enabled:
            backend = SoftBackend(load_key_file(self.key_path))
            self.reader = SimulatedReader(MasterCard(backend), mode, framing)
        self.path: str | None = None
        self._transport: PtyTransport | None = None
        self._slave: int | None = None

    # --- Simulator API ---------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        parser.add_argument(
            "--pty",
            action="store_true",
            default=True,
            help="serve on a new pseudo-terminal (the only transport; the default)",
        )
        parser.add_argument("--link", type=Path, default=None, help="symlink to the pty's path")
        parser.add_argument("--keys", type=Path, default=None, help="key file (default: demo keys)")
        parser.add_argument(
            "--mode",
            choices=MODES,
            default="normal",
            help="how the reader behaves (default normal); SIGUSR1 switches to the next mode",
        )
        parser.add_argument(
            "--framing",
            choices=available_framings(),
            default=DEFAULT_FRAMING,
            help=f"the reader's wire framing (default {DEFAULT_FRAMING})",
        )

    @classmethod
    def from_args(cls, args: Any, reactor: Any) -> EsamReaderSimulator:
        simulator = cls(
            reactor,
            keys=args.keys,
            mode=args.mode,
            link=args.link,
            framing=args.framing,
            announce=True,
        )
        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(simulator.next_mode))
        return simulator

    @classmethod
    def for_demo(cls, plugin_config: Any, reactor: Any) -> EsamReaderSimulator:
        """A reader behind the plugin's ``port`` (a symlink to the pty); idle for ``soft``."""
        if getattr(plugin_config, "backend", "reader") != "reader":
            return cls(reactor, enabled=False)
        return cls(reactor, link=Path(plugin_config.port), framing=plugin_config.framing)

    def start(self) -> None:
        if self.enabled:
            self.replug()

    def stop(self) -> None:
        self.unplug()
        if self.link is not None and self.link.is_symlink():
            with contextlib.suppress(OSError):
                self.link.unlink()
        if self._own_keys and self.key_path is not None:
            with contextlib.suppress(OSError):
                self.key_path.unlink()

    def summary(self) -> dict[str, Any]:
        """Answers sent and requests received by command, errors (rejected bytes by reason),
        answers by status, requests left unanswered (``silence``) and the mode at the end."""
        reader = self.reader
        if reader is None:  # disabled: the demo's soft backend needs no reader
            return super().summary()
        return {
            "sent": dict(reader.sent),
            "received": dict(reader.received),
            "errors": dict(reader.errors),
            "statuses": dict(reader.statuses),
            "unanswered": reader.unanswered,
            "mode": reader.mode,
        }

    # --- switches ----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.reader.mode if self.reader else "normal"

    def set_mode(self, mode: str) -> None:
        """Switch to ``normal``, ``no-card``, ``wrong-card``, ``garbage`` or ``silence``."""
        if self.reader is not None:
            self.reader.set_mode(mode)
            log.info("esam simulator: mode {mode}", mode=mode)

    def next_mode(self) -> None:
        """Cycle through the modes (SIGUSR1)."""
        self.set_mode(MODES[(MODES.index(self.mode) + 1) % len(MODES)])
        if self.announce:
            print(f"mode: {self.mode}", file=sys.stderr, flush=True)

    def unplug(self) -> None:
        """Close the pseudo-terminal: the plugin's port sees the device vanish."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.stopReading()
            transport.stopWriting()
            transport.connectionLost(Failure(main.CONNECTION_DONE))
        if self._slave is not None:
            with contextlib.suppress(OSError):
                os.close(self._slave)
            self._slave = None

    def replug(self) -> str:
        """A new pseudo-terminal (behind ``link`` when set); returns its path."""
        if not self.enabled or self.reader is None:
            raise RuntimeError("this simulator is disabled")
        self.unplug()
        master, slave, path = open_raw_pty()
        self._slave = slave  # held open so the master never reads EIO between plugin opens
        self._transport = PtyTransport(
            self.reactor, master, _ReaderDeviceProtocol(self.reader, self.framing)
        )
        self.path = path
        if self.link is not None:
            point_link(self.link, path)
        if self.announce:
            print(path, flush=True)
        log.info("esam simulator: reader on {path}", path=self.link or path)
        return path
