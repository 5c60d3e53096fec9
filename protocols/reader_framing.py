"""Card-reader link framing: "gatewayd reader framing v1" and the registry of framers by name.

Why: the ESAM plugin talks to a card reader over a serial line. The real reader (DKQ-05) speaks an
unpublished protocol, so the link is split in two layers that can be replaced separately:

1. A **framer** (this module) turns the byte stream into :class:`ReaderFrame` objects and back,
   resynchronising after garbage. Framers are registered by name (``framing:`` in the config);
   a ``dkq05`` framer can be added with :func:`register_framer` once a capture pins the real bytes.
2. The **reader command set** of ours (STATUS, POWER_ON, POWER_OFF, APDU, with a status byte in
   every reply) which a framer for another reader maps its own commands onto.

"gatewayd reader framing v1" (ours, not DKQ-05's)::

    STX  LEN        SEQ  CMD  PAYLOAD       CRC        ETX
    02   2 B (BE)   1 B  1 B  LEN - 2 bytes 2 B (BE)   03

    LEN = 2 + len(PAYLOAD), at most 2 + max_payload (512 by default)
    CRC = CRC-16/CCITT-FALSE (poly 1021, init FFFF) over LEN..PAYLOAD
    SEQ = request number 0..255, echoed in the reply; reply CMD = request CMD | 80

Pure: no I/O, no clock. Declared with construct; the stream scanning is ours because construct
cannot parse incrementally.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Final

from construct import (
    Checksum,
    ChecksumError,
    Const,
    ConstructError,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Prefixed,
    RawCopy,
    Struct,
    Terminated,
    this,
)

from .crc import crc16_function
from .errors import ReaderFramingError

__all__ = [
    "DEFAULT_FRAMING",
    "FRAMERS",
    "Framer",
    "GatewayV1Framer",
    "ReaderCommand",
    "ReaderFrame",
    "ReaderStatus",
    "Rejected",
    "available_framings",
    "decode_frame",
    "framer_for",
    "register_framer",
]

STX: Final = b"\x02"
ETX: Final = b"\x03"
REPLY_BIT: Final = 0x80
DEFAULT_MAX_PAYLOAD: Final = 512
DEFAULT_FRAMING: Final = "gatewayd-v1"

_crc16 = crc16_function("ccitt-false")


class ReaderCommand(IntEnum):
    """The reader command set of ours: every request payload starts with the slot number."""

    STATUS = 0x01  # slot → status ‖ card present (0/1) ‖ powered (0/1)
    POWER_ON = 0x10  # slot → status ‖ ATR
    POWER_OFF = 0x11  # slot → status
    APDU = 0x12  # slot ‖ C-APDU → status ‖ R-APDU (data ‖ SW1 SW2)


class ReaderStatus(IntEnum):
    """First payload byte of every reply."""

    OK = 0x00
    NO_CARD = 0x01  # the slot is empty
    CARD_MUTE = 0x02  # a card is there but gave no ATR
    NOT_POWERED = 0x03  # APDU to a card that is not powered on
    BAD_COMMAND = 0x04  # unknown command byte
    BAD_PARAMETER = 0x05  # bad slot or malformed payload


@dataclass(frozen=True)
class ReaderFrame:
    """One frame either way: request number, command byte (bit 7 set in replies), payload."""

    seq: int
    command: int
    payload: bytes = b""

    @property
    def is_reply(self) -> bool:
        return bool(self.command & REPLY_BIT)

    def reply(self, status: int, data: bytes = b"") -> ReaderFrame:
        """The reply to this request: same SEQ, CMD | 80, payload = status ‖ data."""
        return ReaderFrame(self.seq, self.command | REPLY_BIT, bytes([status]) + data)

    @property
    def slot(self) -> int | None:
        """The slot of a request (its first payload byte), None when the payload is empty."""
        return self.payload[0] if self.payload else None

    @property
    def status(self) -> int | None:
        """The status byte of a reply, None when the payload is empty."""
        return self.payload[0] if self.payload else None

    @property
    def data(self) -> bytes:
        """The payload after the slot (requests) or the status byte (replies)."""
        return self.payload[1:]


def request(seq: int, command: ReaderCommand | int, slot: int, data: bytes = b"") -> ReaderFrame:
    """A request frame of our command set: payload = slot ‖ data."""
    return ReaderFrame(seq & 0xFF, int(command), bytes([slot]) + data)


@dataclass(frozen=True)
class Rejected:
    """Bytes a framer dropped: ``reason`` is ``garbage``, ``length``, ``crc`` or ``format``."""

    reason: str
    raw: bytes


# --- the framer interface and registry ----------------------------------------------------------


class Framer(ABC):
    """Turns a byte stream into frames and frames into bytes, for one reader framing.

    ``feed(data)`` returns the complete frames found so far and the bytes it had to drop
    (:class:`Rejected`), in stream order, keeping an incomplete frame for the next call. It never
    raises on input and never buffers more than one maximal frame. ``encode`` raises
    :class:`ReaderFramingError` for a frame that cannot be expressed.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload

    @abstractmethod
    def encode(self, frame: ReaderFrame) -> bytes:
        """The bytes on the wire for ``frame``."""

    @abstractmethod
    def feed(self, data: bytes) -> list[ReaderFrame | Rejected]:
        """Frames and rejected bytes completed by ``data``."""

    @abstractmethod
    def reset(self) -> None:
        """Forget any partial frame (after a timeout, a reconnect)."""

    @property
    @abstractmethod
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame."""


FRAMERS: dict[str, type[Framer]] = {}
"""Framer classes by their ``framing:`` name."""


def register_framer(cls: type[Framer]) -> type[Framer]:
    """Class decorator: make ``cls`` available as ``framing: <cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    FRAMERS[cls.name] = cls
    return cls


def available_framings() -> tuple[str, ...]:
    """The registered framing names, sorted."""
    return tuple(sorted(FRAMERS))


def framer_for(name: str, **options: Any) -> Framer:
    """A new framer of the registered framing ``name``; ReaderFramingError names the choices."""
    cls = FRAMERS.get(name)
    if cls is None:
        raise ReaderFramingError(
            "framing",
            f"unknown reader framing {name!r} (available: {', '.join(available_framings())})",
        )
    return cls(**options)


# --- gatewayd reader framing v1 -------------------------------------------------------------------

_BODY = Struct("seq" / Int8ub, "command" / Int8ub, "payload" / GreedyBytes)

FRAME_V1 = Struct(
    "stx" / Const(STX),
    "body" / RawCopy(Prefixed(Int16ub, _BODY)),
    "crc" / Checksum(Int16ub, _crc16, this.body.data),
    "etx" / Const(ETX),
    Terminated,
)
"""One v1 frame; the CRC covers the raw LEN..PAYLOAD bytes (RawCopy keeps them)."""

_HEADER_SIZE: Final = 3  # STX + LEN
_OVERHEAD: Final = 6  # STX, LEN(2), CRC(2), ETX
_MIN_LEN: Final = 2  # SEQ + CMD


@register_framer
class GatewayV1Framer(Framer):
    """gatewayd reader framing v1 (see the module docstring): STX LEN SEQ CMD PAYLOAD CRC ETX."""

    name = DEFAULT_FRAMING
    description = "gatewayd reader framing v1: 02 LEN(2) SEQ CMD PAYLOAD CRC16/CCITT-FALSE(2) 03"

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if not 0 <= max_payload <= 0xFFFF - _MIN_LEN:
            raise ValueError(f"max_payload must be 0..{0xFFFF - _MIN_LEN}")
        super().__init__(max_payload)
        self._buffer = b""
        self._covered = 0  # bytes at the head of the buffer already reported in a rejection

    @property
    def max_frame(self) -> int:
        """The longest frame accepted, in bytes."""
        return _OVERHEAD + _MIN_LEN + self.max_payload

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def reset(self) -> None:
        self._buffer = b""
        self._covered = 0

    def encode(self, frame: ReaderFrame) -> bytes:
        if not (0 <= frame.seq <= 0xFF and 0 <= frame.command <= 0xFF):
            raise ReaderFramingError("format", "seq and command must be bytes (0..255)")
        if len(frame.payload) > self.max_payload:
            raise ReaderFramingError(
                "length", f"payload of {len(frame.payload)} bytes exceeds {self.max_payload}"
            )
        body = {"seq": frame.seq, "command": frame.command, "payload": bytes(frame.payload)}
        return FRAME_V1.build({"body": {"value": body}})

    def feed(self, data: bytes) -> list[ReaderFrame | Rejected]:
        buffer = self._buffer + bytes(data)
        found: list[ReaderFrame | Rejected] = []
        position, covered = 0, self._covered
        while position < len(buffer):
            start = buffer.find(STX, position)
            if start < 0:
                start = len(buffer)
            if start > max(position, covered):
                found.append(Rejected("garbage", buffer[max(position, covered) : start]))
            position = start
            if len(buffer) - position < _HEADER_SIZE:
                break  # wait for the length
            length = int.from_bytes(buffer[position + 1 : position + 3], "big")
            if not _MIN_LEN <= length <= _MIN_LEN + self.max_payload:
                end = position + _HEADER_SIZE
                if end > covered:
                    found.append(Rejected("length", buffer[max(position, covered) : end]))
                covered = max(covered, end)
                position += 1
                continue
            end = position + _OVERHEAD + length
            if len(buffer) < end:
                break  # wait for the rest (bounded by max_frame)
            candidate = buffer[position:end]
            parsed = self._parse(candidate)
            if isinstance(parsed, str):
                if end > covered:
                    found.append(Rejected(parsed, candidate))
                covered = max(covered, end)
                position += 1  # a real frame may start inside a bad candidate
                continue
            found.append(parsed)
            position = covered = end
        self._buffer = buffer[position:]
        self._covered = max(0, covered - position)
        return found

    @staticmethod
    def _parse(candidate: bytes) -> ReaderFrame | str:
        """The frame in ``candidate`` (exactly one frame's bytes), or the rejection reason."""
        try:
            parsed = FRAME_V1.parse(candidate)
        except ChecksumError:
            return "crc"
        except ConstructError:
            return "format"
        body = parsed.body.value
        return ReaderFrame(body.seq, body.command, bytes(body.payload))


def decode_frame(data: bytes, framing: str = DEFAULT_FRAMING) -> ReaderFrame:
    """Exactly one complete frame of ``framing``; ReaderFramingError says why not."""
    framer = framer_for(framing)
    items = framer.feed(data)
    rejected = [item for item in items if isinstance(item, Rejected)]
    frames = [item for item in items if isinstance(item, ReaderFrame)]
    if rejected:
        raise ReaderFramingError(
            rejected[0].reason, f"not a {framing} frame ({rejected[0].reason})"
        )
    if len(frames) != 1 or framer.buffered:
        raise ReaderFramingError("length", f"expected exactly one complete {framing} frame")
    return frames[0]


def describe_frame(frame: ReaderFrame) -> dict[str, Any]:
    """A JSON-able view of a frame of our command set, for ``gatewayd decode`` and captures."""
    base = frame.command & ~REPLY_BIT
    try:
        name = ReaderCommand(base).name
    except ValueError:
        name = f"0x{base:02X}"
    described: dict[str, Any] = {
        "seq": frame.seq,
        "direction": "reply" if frame.is_reply else "request",
        "command": name,
    }
    if frame.is_reply:
        status = frame.status
        try:
            described["status"] = ReaderStatus(status).name if status is not None else None
        except ValueError:
            described["status"] = f"0x{status:02X}"
    else:
        described["slot"] = frame.slot
    described["data"] = frame.data.hex().upper()
    return described
