r"""Pure codec of the power-bank cabinet text protocol: ``{"IMEI,CMD[,DATA...],CRC16"}\r\n``.

Why: one place turns a cabinet's line into a typed packet and a packet into the exact bytes to send,
for the plugin, the simulator and ``gatewayd decode``. No I/O, no clock, no Twisted.

Layers, each replaceable on its own:

1. ``normalise_line``: the tolerance the seed document forces on us (whitespace around fields,
   ``\r\n`` or ``\n``, full-width punctuation, modem noise before ``{"``) -> one canonical
   ASCII frame. Separators (``,`` / ``.`` / `` .``) are left to the declaration.
2. ``FRAME``: the construct declaration of the canonical frame. Text fields are ``Token`` fields
   read through ``TextAdapter``s that validate and type them (``gatewayd.protocols.text``); the
   same declaration builds the frame, CRC included (a ``CrcText`` computes it from the bytes built
   before it).
3. ``Codec``: normalise, parse, check the CRC under ``CrcSettings`` (``strict`` / ``log`` /
   ``off``), or build.

Every malformed input raises ``PowerbankError`` with ``reason`` in ``ERROR_REASONS``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Final

from construct import (
    Const,
    Construct,
    ConstructError,
    Pass,
    Struct,
    Switch,
    Tell,
    Terminated,
    this,
)

from .crc import ALGORITHMS, BYTE_ORDERS, LETTER_CASES, crc16_function, crc16_text
from .errors import PowerbankError
from .text import CrcText, TextAdapter, Token

__all__ = [
    "ERROR_REASONS",
    "SLOTS",
    "SPANS",
    "CRC_MODES",
    "Codec",
    "CrcSettings",
    "DecodedFrame",
    "Heartbeat",
    "LendRequest",
    "LendResult",
    "LendResultAck",
    "Packet",
    "PowerbankError",
    "ReturnQuery",
    "ReturnQueryAnswer",
    "ReturnResult",
    "ReturnResultAck",
    "SlotState",
    "SlotStatus",
    "StatusQuery",
    "StatusReport",
    "crc_detect",
    "decode_for_cli",
    "normalise_line",
    "packet_to_dict",
]

ERROR_REASONS: Final = ("crc", "format", "imei", "slot", "command", "length")
"""Every ``PowerbankError.reason`` this codec raises."""

SLOTS: Final = (1, 2, 3)
"""Slot numbers of a cabinet ("STROEID", range 1 - 3)."""

MAX_LINE_LENGTH: Final = 512
"""Default longest accepted line (bytes or characters); a valid AQ frame is about 80."""

_IMEI = re.compile(r"[0-9]{15}")
_BANK = re.compile(r"[0-9A-Za-z]{1,32}")
_HEX4 = re.compile(r"[0-9A-Fa-f]{4}")


def _fail(reason: str, message: str) -> PowerbankError:
    """Return the codec's error; a helper so every raise site names its reason."""
    return PowerbankError(reason, message)


def _check_imei(imei: object) -> str:
    """Return ``imei`` if it is 15 ASCII digits (Luhn not checked: test modules fail it)."""
    if not isinstance(imei, str) or not _IMEI.fullmatch(imei):
        raise _fail("imei", f"IMEI must be 15 digits, got {imei!r}")
    return imei


def _check_slot(slot: object) -> int:
    """Return ``slot`` if it is an int in ``SLOTS``."""
    if type(slot) is not int or slot not in SLOTS:
        raise _fail("slot", f"slot must be 1..3, got {slot!r}")
    return slot


def _check_bank(bank: object) -> str:
    """Return ``bank`` (the power bank id, DEVID) if it is 1..32 ASCII letters or digits."""
    if not isinstance(bank, str) or not _BANK.fullmatch(bank):
        raise _fail("format", f"power bank id must be 1..32 letters or digits, got {bank!r}")
    return bank


# --------------------------------------------------------------------------------------------
# Typed packets
# --------------------------------------------------------------------------------------------


class SlotState(StrEnum):
    """State of one slot in a status report (AQ)."""

    FULL = "full"  # FU
    NOT_FULL = "not_full"  # NF (the document once misspells it NU)
    NO_CHARGE = "no_charge"  # EM
    FAULT = "fault"  # ER, usually without a bank id
    EMPTY = "empty"  # not listed in AQ, or listed as a bare slot number ("3;" / "3.;")


_STATE_BY_CODE: Final = {
    "FU": SlotState.FULL,
    "NF": SlotState.NOT_FULL,
    "NU": SlotState.NOT_FULL,
    "EM": SlotState.NO_CHARGE,
    "ER": SlotState.FAULT,
}
_CODE_BY_STATE: Final = {
    SlotState.FULL: "FU",
    SlotState.NOT_FULL: "NF",
    SlotState.NO_CHARGE: "EM",
    SlotState.FAULT: "ER",
}
_STATES_NEEDING_BANK: Final = frozenset({SlotState.FULL, SlotState.NOT_FULL})


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """One slot of a status report: its number, state and the power bank id in it, if any."""

    slot: int
    state: SlotState
    bank: str | None = None

    def __post_init__(self) -> None:
        _check_slot(self.slot)
        if not isinstance(self.state, SlotState):
            raise _fail("format", f"slot state must be a SlotState, got {self.state!r}")
        if self.bank is None:
            if self.state in _STATES_NEEDING_BANK:
                raise _fail("format", f"slot {self.slot} is {self.state} but has no bank id")
        elif self.state is SlotState.EMPTY:
            raise _fail("format", f"slot {self.slot} is empty but has bank id {self.bank!r}")
        else:
            _check_bank(self.bank)


@dataclass(frozen=True, slots=True)
class Packet:
    """Base of every packet: the cabinet's IMEI; subclasses name their command word."""

    COMMANDS: ClassVar[tuple[str, ...]] = ()
    FROM_DEVICE: ClassVar[bool] = True

    imei: str

    def __post_init__(self) -> None:
        _check_imei(self.imei)

    @property
    def command(self) -> str:
        """The command word on the wire (CH, CQ, AQ, ...)."""
        return self.COMMANDS[0]


@dataclass(frozen=True, slots=True)
class Heartbeat(Packet):
    """CH, device -> server: heartbeat; the server does not answer."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("CH",)


@dataclass(frozen=True, slots=True)
class StatusQuery(Packet):
    """CQ, server -> device: ask for the status of every slot."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("CQ",)
    FROM_DEVICE: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class StatusReport(Packet):
    """AQ, device -> server: the state of slots 1..3, always complete and in slot order.

    A slot the device does not list is ``EMPTY``; building omits ``EMPTY`` slots again.
    """

    COMMANDS: ClassVar[tuple[str, ...]] = ("AQ",)

    slots: tuple[SlotStatus, ...] = field(default=())

    def __post_init__(self) -> None:
        _check_imei(self.imei)
        by_slot: dict[int, SlotStatus] = {}
        for status in self.slots:
            if not isinstance(status, SlotStatus):
                raise _fail("format", f"slots must hold SlotStatus, got {status!r}")
            if status.slot in by_slot:
                raise _fail("slot", f"slot {status.slot} reported twice")
            by_slot[status.slot] = status
        complete = tuple(by_slot.get(n) or SlotStatus(n, SlotState.EMPTY) for n in SLOTS)
        object.__setattr__(self, "slots", complete)

    def status(self, slot: int) -> SlotStatus:
        """Return the status of ``slot`` (1..3)."""
        return self.slots[_check_slot(slot) - 1]


@dataclass(frozen=True, slots=True)
class _SlotBankPacket(Packet):
    """A packet about one slot and the power bank id (DEVID) in it."""

    slot: int
    bank: str

    def __post_init__(self) -> None:
        _check_imei(self.imei)
        _check_slot(self.slot)
        _check_bank(self.bank)

    @property
    def code(self) -> str | None:
        """The data prefix on the wire (BW, T/F, BO/RO, BF/RF), None when there is none."""
        return None


@dataclass(frozen=True, slots=True)
class LendRequest(_SlotBankPacket):
    """CC,BW, server -> device: eject power bank ``bank`` from ``slot``."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("CC",)
    FROM_DEVICE: ClassVar[bool] = False

    @property
    def code(self) -> str:
        """Always ``BW`` (the lend command data)."""
        return "BW"


@dataclass(frozen=True, slots=True)
class ReturnQuery(_SlotBankPacket):
    """MQ, device -> server: a bank was inserted; does it belong to the system?"""

    COMMANDS: ClassVar[tuple[str, ...]] = ("MQ",)

    def answer(self, accepted: bool) -> ReturnQueryAnswer:
        """Return the RQ answer (T when ``accepted``, else F) for this query."""
        return ReturnQueryAnswer(self.imei, self.slot, self.bank, accepted)


@dataclass(frozen=True, slots=True)
class ReturnQueryAnswer(_SlotBankPacket):
    """RQ,T / RQ,F, server -> device: the bank belongs (T) or does not belong (F) to the system."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("RQ",)
    FROM_DEVICE: ClassVar[bool] = False

    accepted: bool = True

    @property
    def code(self) -> str:
        """``T`` or ``F``."""
        return "T" if self.accepted else "F"


@dataclass(frozen=True, slots=True)
class _OutcomePacket(_SlotBankPacket):
    """A lend or return outcome (``ok``) or its acknowledgement; the command depends on ``ok``."""

    OK_CODE: ClassVar[str] = ""
    FAILED_CODE: ClassVar[str] = ""

    ok: bool = True

    @property
    def command(self) -> str:
        """First command word when ``ok`` (MC / AM), second when not (MR / AR)."""
        return self.COMMANDS[0] if self.ok else self.COMMANDS[1]

    @property
    def code(self) -> str:
        """BO / RO when ``ok``, BF / RF when not."""
        return self.OK_CODE if self.ok else self.FAILED_CODE


@dataclass(frozen=True, slots=True)
class LendResultAck(_OutcomePacket):
    """AM,BO (lend succeeded) / AR,BF (lend failed), server -> device: acknowledgement."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("AM", "AR")
    FROM_DEVICE: ClassVar[bool] = False
    OK_CODE: ClassVar[str] = "BO"
    FAILED_CODE: ClassVar[str] = "BF"


@dataclass(frozen=True, slots=True)
class ReturnResultAck(_OutcomePacket):
    """AM,RO (return succeeded) / AR,RF (return failed), server -> device: acknowledgement."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("AM", "AR")
    FROM_DEVICE: ClassVar[bool] = False
    OK_CODE: ClassVar[str] = "RO"
    FAILED_CODE: ClassVar[str] = "RF"


@dataclass(frozen=True, slots=True)
class LendResult(_OutcomePacket):
    """MC,BO (lend succeeded) / MR,BF (lend failed), device -> server."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("MC", "MR")
    OK_CODE: ClassVar[str] = "BO"
    FAILED_CODE: ClassVar[str] = "BF"

    def ack(self) -> LendResultAck:
        """Return the acknowledgement the server sends back (AM,BO or AR,BF)."""
        return LendResultAck(self.imei, self.slot, self.bank, self.ok)


@dataclass(frozen=True, slots=True)
class ReturnResult(_OutcomePacket):
    """MC,RO (return succeeded) / MR,RF (return failed), device -> server."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("MC", "MR")
    OK_CODE: ClassVar[str] = "RO"
    FAILED_CODE: ClassVar[str] = "RF"

    def ack(self) -> ReturnResultAck:
        """Return the acknowledgement the server sends back (AM,RO or AR,RF)."""
        return ReturnResultAck(self.imei, self.slot, self.bank, self.ok)


_TYPE_NAMES: Final = {
    Heartbeat: "heartbeat",
    StatusQuery: "status_query",
    StatusReport: "status_report",
    LendRequest: "lend_request",
    ReturnQuery: "return_query",
    ReturnQueryAnswer: "return_query_answer",
    LendResult: "lend_result",
    ReturnResult: "return_result",
    LendResultAck: "lend_result_ack",
    ReturnResultAck: "return_result_ack",
}


def packet_to_dict(packet: Packet) -> dict[str, Any]:
    """Return a JSON-able dict of ``packet``: ``type``, ``command``, ``code`` and its fields."""
    out: dict[str, Any] = {"type": _TYPE_NAMES[type(packet)], "command": packet.command}
    code = getattr(packet, "code", None)
    if code is not None:
        out["code"] = code
    for item in dataclasses.fields(packet):
        value = getattr(packet, item.name)
        if item.name == "slots":
            value = [{"slot": s.slot, "state": str(s.state), "bank": s.bank} for s in value]
        out[item.name] = value
    return out


# --------------------------------------------------------------------------------------------
# Tolerant normalisation: received line -> canonical ASCII frame
# --------------------------------------------------------------------------------------------

_FULLWIDTH: Final = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {
    0x3000: " ",  # ideographic space
    0x3001: ",",  # 、
    0x3002: ".",  # 。
    0x201C: '"',  # “
    0x201D: '"',  # ”
    0x2018: "'",
    0x2019: "'",
}
_SPACE_AROUND_PUNCTUATION = re.compile(r'\s*([,;.{}"])\s*')
_HAS_SPACE = re.compile(r"\s")


@dataclass(frozen=True, slots=True)
class _Line:
    """A received line after normalisation: the canonical frame and what raw CRC spans need."""

    canonical: bytes  # b'{"IMEI,...,CRC"}\r\n', ASCII, no whitespace around fields
    text: str  # the line as decoded, before any normalisation
    encoding: str  # how ``text`` was decoded (to re-encode raw CRC spans byte-exactly)


def _decode_line(line: bytes | bytearray | memoryview | str, max_length: int) -> tuple[str, str]:
    """Return (text, encoding) of a received line; bytes may be ASCII, UTF-8 or GB18030."""
    if isinstance(line, str):
        if len(line) > max_length:
            raise _fail("length", f"line of {len(line)} characters exceeds {max_length}")
        return line, "utf-8"
    if not isinstance(line, bytes | bytearray | memoryview):
        raise _fail("format", f"expected bytes or str, got {type(line).__name__}")
    data = bytes(line)
    if len(data) > max_length:
        raise _fail("length", f"line of {len(data)} bytes exceeds {max_length}")
    if data.isascii():
        return data.decode("ascii"), "ascii"
    for encoding in ("utf-8", "gb18030"):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise _fail("format", "line is neither ASCII, UTF-8 nor GB18030 text")


def normalise_line(line: bytes | str, max_length: int = MAX_LINE_LENGTH) -> bytes:
    r"""Return the canonical frame ``{"...,CRC"}\r\n`` of a received line (see module doc)."""
    return _normalise(line, max_length).canonical


def _normalise(line: bytes | str, max_length: int) -> _Line:
    """Decode, map full-width punctuation, strip whitespace around fields, resync on ``{"``."""
    text, encoding = _decode_line(line, max_length)
    work = text if text.isascii() else text.translate(_FULLWIDTH)
    work = work.strip()
    if _HAS_SPACE.search(work):
        work = _SPACE_AROUND_PUNCTUATION.sub(r"\1", work)
    start = work.find('{"')
    if start < 0:
        raise _fail("format", 'no frame start {" in line')
    if not work.endswith('"}'):
        raise _fail("format", 'line does not end with "}')
    frame = work[start:] if start else work
    if not frame.isascii():
        raise _fail("format", "non-ASCII character in frame")
    return _Line((frame + "\r\n").encode("ascii"), text, encoding)


# --------------------------------------------------------------------------------------------
# The construct declaration of the canonical frame
# --------------------------------------------------------------------------------------------


class _Ascii(TextAdapter):
    """A text field's ``str`` <-> its typed value; subclasses validate (each with its reason)."""


class _ImeiField(_Ascii):
    """IMEI: exactly 15 digits (reason ``imei``)."""

    def _decode(self, obj: str, context: Any, path: str) -> str:
        return _check_imei(obj)


class _CommandField(_Ascii):
    """Command word: one of the ten known (reason ``command``)."""

    def _decode(self, obj: str, context: Any, path: str) -> str:
        if obj not in _DATA_BY_COMMAND:
            raise _fail("command", f"unknown command {obj!r}")
        return obj


class _CodeField(_Ascii):
    """Data prefix allowed for one command (BW, T/F, BO/RO, BF/RF) (reason ``command``)."""

    def __init__(self, subcon: Construct, codes: tuple[str, ...]) -> None:
        super().__init__(subcon)
        self.codes = codes

    def _decode(self, obj: str, context: Any, path: str) -> str:
        if obj not in self.codes:
            raise _fail("command", f"data {obj!r} is not one of {'/'.join(self.codes)}")
        return obj


def _slot_from_text(text: str) -> int:
    """Slot number from its wire text ``1``..``3`` (reason ``slot``)."""
    if text not in ("1", "2", "3"):
        raise _fail("slot", f"slot must be 1..3, got {text!r}")
    return int(text)


class _SlotField(_Ascii):
    """Slot number 1..3 (reason ``slot``)."""

    def _decode(self, obj: str, context: Any, path: str) -> int:
        return _slot_from_text(obj)

    def _encode(self, obj: int, context: Any, path: str) -> str:
        return str(_check_slot(obj))


class _BankField(_Ascii):
    """Power bank id (DEVID): 1..32 letters or digits (reason ``format``)."""

    def _decode(self, obj: str, context: Any, path: str) -> str:
        return _check_bank(obj)


class _SlotListField(_Ascii):
    """AQ data ``1.FU.ID;2.NF.ID;3.ER;``: ``;``-separated, trailing ``;`` optional, -> statuses.

    Entry forms: ``N.STATE.ID``, ``N.STATE`` (EM, ER), and ``N`` or ``N.`` for an empty slot.
    Building writes every non-empty slot as ``N.STATE[.ID];`` and leaves empty slots out.
    """

    def _decode(self, obj: str, context: Any, path: str) -> tuple[SlotStatus, ...]:
        return tuple(self._entry(entry) for entry in obj.split(";") if entry)

    @staticmethod
    def _entry(entry: str) -> SlotStatus:
        parts = entry.split(".")
        if len(parts) > 3:
            raise _fail("format", f"slot entry {entry!r} has more than 3 parts")
        slot = _slot_from_text(parts[0])
        code = parts[1] if len(parts) > 1 else ""
        if not code:
            if len(parts) == 3:
                raise _fail("format", f"slot entry {entry!r} has a bank id but no state")
            return SlotStatus(slot, SlotState.EMPTY)
        state = _STATE_BY_CODE.get(code)
        if state is None:
            raise _fail("format", f"unknown slot state {code!r} in {entry!r}")
        return SlotStatus(slot, state, parts[2] if len(parts) == 3 else None)

    def _encode(self, obj: tuple[SlotStatus, ...], context: Any, path: str) -> str:
        entries = []
        for status in obj:
            if status.state is SlotState.EMPTY:
                continue
            entry = f"{status.slot}.{_CODE_BY_STATE[status.state]}"
            entries.append(f"{entry}.{status.bank};" if status.bank else f"{entry};")
        return "".join(entries)


class _CrcText(CrcText):
    """The 4 hex digits of the CRC as received (reason ``crc``; ``format`` if fields are off).

    Building writes the value given, or by default the CRC that the ``crc_text`` build parameter
    computes over the body just built (from ``body_offset`` through the comma before the CRC).
    """

    def __init__(self, subcon: Construct) -> None:
        super().__init__(subcon, compute="crc_text", start="body_offset", error=PowerbankError)

    def _decode(self, obj: str, context: Any, path: str) -> str:
        if _HEX4.fullmatch(obj):
            return obj
        if not obj or "," in obj:
            raise _fail("format", f"expected one CRC field after the data, got {obj!r}")
        raise _fail("crc", f"CRC must be 4 hex digits, got {obj!r}")


class _PacketField(TextAdapter):
    """``{imei, command, data}`` of the body Struct <-> a typed ``Packet``."""

    def _decode(self, obj: Any, context: Any, path: str) -> Packet:
        return _PACKET_FROM_WIRE[obj["command"]](obj["imei"], obj["data"])

    def _encode(self, packet: Packet, context: Any, path: str) -> dict[str, Any]:
        if not isinstance(packet, Packet) or type(packet) not in _TYPE_NAMES:
            raise _fail("format", f"cannot build {packet!r}: not a power-bank packet")
        if isinstance(packet, StatusReport):
            data: Any = packet.slots
        elif isinstance(packet, _SlotBankPacket):
            data = {"code": packet.code, "slot": packet.slot, "bank": packet.bank}
        else:
            data = None
        return {"imei": packet.imei, "command": packet.command, "data": data}


def _field(stops: bytes = b",", build_stop: bytes = b",") -> Token:
    """A comma-terminated (by default) text field."""
    return Token(stops, build_stop, error=PowerbankError)


_SLOT_THEN_BANK: Final = (
    # slot, then "," or "." (or " ." before normalisation), then the bank id up to the CRC comma
    "slot" / _SlotField(_field(b",.")),
    "bank" / _BankField(_field()),
)


def _slot_bank(*codes: str, code_stop: bytes = b".") -> Struct:
    """Data ``[CODE.]SLOT,BANK`` where CODE is one of ``codes`` (none for MQ)."""
    if not codes:
        return Struct(*_SLOT_THEN_BANK)
    return Struct("code" / _CodeField(_field(b".,", code_stop), codes), *_SLOT_THEN_BANK)


_DATA_BY_COMMAND: Final[dict[str, Construct]] = {
    "CH": Pass,
    "CQ": Pass,
    "AQ": _SlotListField(_field()),
    "CC": _slot_bank("BW", code_stop=b","),
    "MQ": _slot_bank(),
    "RQ": _slot_bank("T", "F"),
    "MC": _slot_bank("BO", "RO"),
    "AM": _slot_bank("BO", "RO"),
    "MR": _slot_bank("BF", "RF"),
    "AR": _slot_bank("BF", "RF"),
}

_PACKET_FROM_WIRE: Final[dict[str, Callable[[str, Any], Packet]]] = {
    "CH": lambda imei, data: Heartbeat(imei),
    "CQ": lambda imei, data: StatusQuery(imei),
    "AQ": lambda imei, slots: StatusReport(imei, slots),
    "CC": lambda imei, d: LendRequest(imei, d["slot"], d["bank"]),
    "MQ": lambda imei, d: ReturnQuery(imei, d["slot"], d["bank"]),
    "RQ": lambda imei, d: ReturnQueryAnswer(imei, d["slot"], d["bank"], d["code"] == "T"),
    "MC": lambda imei, d: (LendResult if d["code"] == "BO" else ReturnResult)(
        imei, d["slot"], d["bank"], True
    ),
    "MR": lambda imei, d: (LendResult if d["code"] == "BF" else ReturnResult)(
        imei, d["slot"], d["bank"], False
    ),
    "AM": lambda imei, d: (LendResultAck if d["code"] == "BO" else ReturnResultAck)(
        imei, d["slot"], d["bank"], True
    ),
    "AR": lambda imei, d: (LendResultAck if d["code"] == "BF" else ReturnResultAck)(
        imei, d["slot"], d["bank"], False
    ),
}

BODY: Final = _PacketField(
    Struct(
        "imei" / _ImeiField(_field()),
        "command" / _CommandField(_field()),
        "data" / Switch(this.command, _DATA_BY_COMMAND),
    )
)
"""``IMEI,CMD,DATA...,`` (through the comma before the CRC) <-> a typed ``Packet``."""

FRAME: Final = Struct(
    Const(b'{"'),
    "body_offset" / Tell,
    "body" / BODY,
    "crc" / _CrcText(Token(b'"', b"", keep_stop=True, error=PowerbankError)),
    Const(b'"}\r\n'),
    Terminated,
)
r"""The canonical frame ``{"IMEI,CMD[,DATA...],CRC"}\r\n``; builds need ``crc_text=``."""

_COMPILED_FRAME: Final = FRAME.compile()  # the same declaration, ~2x faster to parse and build


# --------------------------------------------------------------------------------------------
# CRC settings
# --------------------------------------------------------------------------------------------

# span -> (over the bytes as received?, include the opening {"?, include the comma before the CRC?)
_SPAN_PARTS: Final = {
    "imei_to_last_comma": (False, False, True),
    "imei_to_last_field": (False, False, False),
    "brace_to_last_comma": (False, True, True),
    "brace_to_last_field": (False, True, False),
    "raw_imei_to_crc": (True, False, True),
    "raw_imei_to_last_field": (True, False, False),
    "raw_brace_to_crc": (True, True, True),
    "raw_brace_to_last_field": (True, True, False),
}
SPANS: Final = tuple(_SPAN_PARTS)
"""CRC spans, the default first. ``raw_*`` cover the bytes as received (whitespace kept)."""

CRC_MODES: Final = ("strict", "log", "off")


@dataclass(frozen=True, slots=True)
class CrcSettings:
    """How the 4 CRC hex digits are computed and what a mismatch does.

    ``algorithm``: one of ``crc.ALGORITHMS``. ``span``: one of ``SPANS``. ``byte_order``: ``big``
    (high byte first) or ``little``. ``case``: ``upper`` or ``lower``; the received digits must
    match exactly. ``mode``: ``strict`` rejects a mismatch (reason ``crc``), ``log`` accepts the
    packet and reports the mismatch in ``DecodedFrame``, ``off`` does not check.
    """

    algorithm: str = "modbus"
    span: str = "imei_to_last_comma"
    byte_order: str = "big"
    case: str = "upper"
    mode: str = "strict"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("algorithm", ALGORITHMS),
            ("span", SPANS),
            ("byte_order", BYTE_ORDERS),
            ("case", LETTER_CASES),
            ("mode", CRC_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"crc {name} {getattr(self, name)!r} is not one of {allowed}")


def _covered(span: str, body: bytes, line: _Line | None) -> bytes:
    """Return the bytes the CRC covers under ``span``.

    ``body`` is the canonical ``IMEI,...,`` (through the comma before the CRC). ``line`` is the
    received line for ``raw_*`` spans; when building there is none and the canonical text is used.
    """
    raw, brace, comma = _SPAN_PARTS[span]
    if raw and line is not None:
        return _raw_covered(line, brace, comma)
    covered = body if comma else body[:-1]
    return b'{"' + covered if brace else covered


_RAW_OPEN = re.compile('[{\uff5b]\\s*["\u201c\u201d\uff02]')


def _raw_covered(line: _Line, brace: bool, comma: bool) -> bytes:
    """Return the received bytes from ``{`` or after ``{"`` through the last comma (+spaces)."""
    text = line.text
    opened = _RAW_OPEN.search(text)
    last_comma = max(text.rfind(","), text.rfind("\uff0c"), text.rfind("\u3001"))
    if opened is None or last_comma < opened.end():
        raise _fail("format", "cannot locate the CRC span in the received line")
    end = last_comma
    if comma:
        end += 1
        while end < len(text) and text[end].isspace():
            end += 1
    start = opened.start() if brace else opened.end()
    return text[start:end].encode(line.encoding)


# --------------------------------------------------------------------------------------------
# The codec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    """A parsed frame: the packet, the CRC as received and, when checked, the expected one."""

    packet: Packet
    crc: str
    expected_crc: str | None = None
    crc_ok: bool | None = None  # None when crc mode is "off"


class Codec:
    """Parse lines into packets and build packets into bytes, under one ``CrcSettings``.

    ``parse``/``decode`` raise only ``PowerbankError``; ``build`` returns the exact bytes to send.
    """

    max_length: int = MAX_LINE_LENGTH

    def __init__(self, crc: CrcSettings | None = None, *, max_length: int | None = None) -> None:
        self.crc = crc or CrcSettings()
        if max_length is not None:
            self.max_length = max_length
        self._crc16 = crc16_function(self.crc.algorithm)

    def parse(self, line: bytes | str) -> Packet:
        """Return the packet of one received line (terminator optional)."""
        return self.decode(line).packet

    def decode(self, line: bytes | str) -> DecodedFrame:
        """Return the packet and CRC check of one received line; strict mode raises on a bad CRC."""
        packet, received, body, normalised = self._dissect(line)
        if self.crc.mode == "off":
            return DecodedFrame(packet, received)
        expected = self.crc_text(_covered(self.crc.span, body, normalised))
        if received == expected:
            return DecodedFrame(packet, received, expected, True)
        if self.crc.mode == "strict":
            raise _fail("crc", f"CRC {received} does not match {expected} ({self._describe()})")
        return DecodedFrame(packet, received, expected, False)

    def build(self, packet: Packet, *, crc: str | None = None) -> bytes:
        r"""Return ``{"IMEI,CMD,...,CRC"}\r\n`` for ``packet``; ``crc`` forces the 4 digits."""
        try:
            return _COMPILED_FRAME.build(
                {"body": packet, "crc": crc}, crc_text=self._crc_text_of_body
            )
        except ConstructError as exc:
            raise _fail("format", f"cannot build {packet!r}: {exc}") from None

    def crc_text(self, covered: bytes) -> str:
        """Return the 4 CRC hex digits of ``covered`` bytes under these settings."""
        return crc16_text(self._crc16(covered), self.crc.byte_order, self.crc.case)

    def _crc_text_of_body(self, body: bytes) -> str:
        """CRC digits for a frame being built, whose canonical ``IMEI,...,`` is ``body``."""
        return self.crc_text(_covered(self.crc.span, body, None))

    def _dissect(self, line: bytes | str) -> tuple[Packet, str, bytes, _Line]:
        """Normalise and parse a line: (packet, received CRC, canonical body, normalised line)."""
        normalised = _normalise(line, self.max_length)
        try:
            parsed = _COMPILED_FRAME.parse(normalised.canonical)
        except ConstructError as exc:
            raise _fail("format", f"malformed frame: {_first_line(exc)}") from None
        canonical = normalised.canonical  # the CRC field has no comma: the last one ends the body
        body = canonical[parsed["body_offset"] : canonical.rfind(b",") + 1]
        return parsed["body"], parsed["crc"], body, normalised

    def _describe(self) -> str:
        c = self.crc
        return f"{c.algorithm}, {c.span}, {c.byte_order} endian, {c.case} case"


def _first_line(exc: Exception) -> str:
    """First line of a construct error (they carry the parse path on later lines)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Developer helpers: crc-detect and decode
# --------------------------------------------------------------------------------------------


def _all_settings() -> Iterator[CrcSettings]:
    """Every algorithm x span x byte order x case, the defaults first."""
    for algorithm in ALGORITHMS:
        for span in SPANS:
            for byte_order in BYTE_ORDERS:
                for case in LETTER_CASES:
                    yield CrcSettings(algorithm, span, byte_order, case)


def crc_detect(lines: list[str] | list[bytes]) -> list[CrcSettings]:
    """Return every CRC setting (mode ``strict``) under which all captured ``lines`` check.

    Capture two or three different commands so that one match is not a coincidence. A line that
    is malformed apart from its CRC raises ``PowerbankError``.
    """
    if not lines:
        raise _fail("format", "crc-detect needs at least one captured line")
    unchecked = Codec(CrcSettings(mode="off"), max_length=MAX_LINE_LENGTH)
    dissected = [unchecked._dissect(line) for line in lines]
    matches = []
    for settings in _all_settings():
        codec = Codec(settings)
        if all(
            codec.crc_text(_covered(settings.span, body, normalised)) == received
            for _packet, received, body, normalised in dissected
        ):
            matches.append(settings)
    return matches


_TYPED_TERMINATOR = re.compile(r"(?:\\r|\\n)+\s*$")


def decode_for_cli(text: str, settings: CrcSettings | None = None) -> dict[str, Any]:
    """Return a JSON-able dict for ``gatewayd decode powerbank``: packet, CRC check, canonical.

    A wrong CRC is reported (``crc.ok`` false, ``crc.expected``), not raised; any other defect
    raises ``PowerbankError``. A terminator typed as the characters ``\\r\\n`` is ignored.
    """
    settings = dataclasses.replace(settings or CrcSettings(), mode="log")
    codec = Codec(settings)
    decoded = codec.decode(_TYPED_TERMINATOR.sub("", text))
    crc: dict[str, Any] = {
        "received": decoded.crc,
        "ok": decoded.crc_ok,
        "algorithm": settings.algorithm,
        "span": settings.span,
        "byte_order": settings.byte_order,
        "case": settings.case,
    }
    if not decoded.crc_ok:
        crc["expected"] = decoded.expected_crc
    return {
        "packet": packet_to_dict(decoded.packet),
        "crc": crc,
        "canonical": codec.build(decoded.packet).decode("ascii"),
    }
