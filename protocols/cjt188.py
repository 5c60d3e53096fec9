"""CJ/T 188 meter frames: parse and build, plus payload decoders for the heating gateway family.

Pure codec: bytes in, typed objects out, no I/O. The frame

    FE* 68 T A0..A6 C L DI0 DI1 SER DATA.. CS 16

is declared once with ``construct`` (``FRAME``) and serves both parse and build; ``parse_frame``
reads the checked header through a ``struct`` layout derived from that declaration
(``protocols/layout.py``: ~8 us a frame, where construct's compiled parser took ~60). Around it a
small explicit check layer gives every failure its own ``Cjt188Error.reason``: ``start`` (no 68H
after the preambles), ``truncated`` (fewer bytes than L announces), ``end`` (no 16H where L says
the frame ends), ``length`` (L disagrees with the frame: bytes after the end byte), ``checksum``
(CS is not the byte sum from 68H to the last data byte). A live frame is never repaired.

Conventions (see the heating plugin README and /work/shared/reference/cjt188-heating.md):

- ``address`` is the 7 address bytes in *wire order* as 14 upper-case hex digits, which is how the
  heating gateway writes meter ids (``27 10 05 83 00 11 11`` -> ``"27100583001111"``).
  ``address_standard_order`` gives the CJ/T 188 reading (low byte first).
- ``di`` is normalised to the printed form (``0x901F``) whatever the byte order on the wire;
  ``di_byte_order`` says which order was seen (``high_first`` = ``90 1F``, ``low_first`` =
  ``1F 90``). An unknown DI is read ``high_first``.
- ``decode_payload`` returns ``{"decoder", "fields", "inferred", "unparsed"}``: ``fields`` holds
  what the reference confirms, each ``{"value", "unit", "raw"}`` (plus ``"bcd"`` and
  ``"unit_code"`` for BCD quantities with a unit byte); ``inferred`` holds guesses the reference
  marks as such; ``unparsed`` keeps the bytes nobody explains, keyed by data offset (``d21_25``).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from construct import (
    Bytes,
    Checksum,
    Const,
    ConstructError,
    GreedyBytes,
    Int8ul,
    Optional,
    Prefixed,
    RawCopy,
    Struct,
    this,
)

from .errors import Cjt188Error
from .layout import fixed_layout

__all__ = [
    "BCD_DECIMALS_STANDARD",
    "BCD_DECIMALS_VENDOR",
    "DI_BUILDING_VALVE_OPENING",
    "DI_HOUSEHOLD_VALVE_OPENING",
    "DI_METERING_DATA",
    "FRAME",
    "KNOWN_DIS",
    "METER_BUILDING_VALVE",
    "METER_HOUSEHOLD_VALVE",
    "UNIT_CODES",
    "Cjt188Error",
    "Frame",
    "UnitCode",
    "address_standard_order",
    "build_frame",
    "build_valve_opening",
    "decode_for_cli",
    "decode_payload",
    "decode_valve_reply",
    "is_reply_to",
    "parse_frame",
    "parse_hex",
]

PREAMBLE = 0xFE
_PREAMBLES = bytes([PREAMBLE])
START = 0x68
END = 0x16
HEADER_SIZE = 11  # 68 T A0..A6 C L
MAX_DATA = 255 - 3  # L is one byte and counts DI0 DI1 SER too

METER_HOUSEHOLD_VALVE = 0x53  # vendor type: household temperature-control valve (户阀)
METER_BUILDING_VALVE = 0x55  # vendor type: building valve / control cabinet (楼前阀)

DI_METERING_DATA = 0x901F
DI_BUILDING_VALVE_OPENING = 0x902F  # vendor: C=16H, uint16 LE in 0.1 %
DI_HOUSEHOLD_VALVE_OPENING = 0xA019  # vendor: C=04H, one byte %
DI_VALVE_CONTROL = 0xA017  # standard: 55H open, 99H close

CONTROL_READ = 0x01
CONTROL_WRITE = 0x04
CONTROL_WRITE_SYNC = 0x16
REPLY_BIT = 0x80
ERROR_BIT = 0x40

BCD_DECIMALS_VENDOR = 0  # the vendor's decoder: the BCD totals count whole units
BCD_DECIMALS_STANDARD = 2  # CJ/T 188: XXXXXX.XX

DiByteOrder = Literal["high_first", "low_first"]

# DIs from CJ/T 188-2004/2018 and the vendor extensions listed in the reference (§4.6). Used
# only to detect the DI byte order; no DI here has a byte-swapped twin in the set.
KNOWN_DIS: frozenset[int] = frozenset(
    {
        0x901F,
        0x902D,
        0x902F,
        0x903F,
        0x904F,
        0x905F,
        0x906F,
        0x907F,
        0x911F,
        0x8102,
        0x8103,
        0x8104,
        0x8105,
        0x8106,
        0x810A,
        0x8120,
        0x8121,
        0xA0EC,
        *range(0xD120, 0xD12C),
        *range(0xA010, 0xA01A),
        *range(0xA020, 0xA033),
        *range(0xA101, 0xA108),
    }
)


# --- the frame, declared once ------------------------------------------------------------------


def _sum8(data: bytes) -> int:
    """CJ/T 188 checksum: arithmetic sum of every byte from 68H to the last data byte, mod 256."""
    return sum(data) & 0xFF


_IDENT = Struct("di" / Bytes(2), "ser" / Int8ul)
_BODY = Struct(
    # L < 3 (a bare error reply, or L = 0) carries no DI/SER: Optional yields None then.
    "ident" / Optional(_IDENT),
    "data" / GreedyBytes,
)
_SIGNED = Struct(
    "start" / Const(bytes([START])),
    "meter_type" / Int8ul,
    "address" / Bytes(7),
    "control" / Int8ul,
    "body" / Prefixed(Int8ul, _BODY),
)
FRAME = Struct(
    "signed" / RawCopy(_SIGNED),
    "checksum" / Checksum(Int8ul, _sum8, this.signed.data),
    "end" / Const(bytes([END])),
)
"""One CJ/T 188 frame without preambles: parse and build (``build_frame`` fills it in)."""

#: The same declaration's fixed header, read with one struct call: ``parse_frame`` uses it once
#: ``_check_framing`` has verified start, length, end and checksum.
#: ``tests/heating/test_codec_fast_paths.py`` checks the two readers agree on random frames.
_HEADER = fixed_layout(_SIGNED)  # start, meter_type, address, control, L
_IDENT_LAYOUT = fixed_layout(_IDENT)  # di, ser
assert _HEADER.size == HEADER_SIZE and _HEADER.names[-1] == "body"


class Frame(NamedTuple):
    """One parsed CJ/T 188 frame; ``raw`` is the input exactly as received (preambles included).

    Immutable; a NamedTuple rather than a frozen dataclass because it is made for every report
    and costs a third as much to create.
    """

    meter_type: int
    address: str
    control: int
    length: int
    di: int | None
    di_byte_order: DiByteOrder | None
    ser: int | None
    data: bytes
    preambles: int
    checksum: int
    raw: bytes

    @property
    def is_reply(self) -> bool:
        """True for a slave-to-master frame (control bit D7)."""
        return bool(self.control & REPLY_BIT)

    @property
    def is_error_reply(self) -> bool:
        """True for an abnormal reply (D7 and D6 set, e.g. C1H, C4H, D6H)."""
        return self.is_reply and bool(self.control & ERROR_BIT)

    @property
    def di_hex(self) -> str | None:
        """The DI in printed form, ``"901F"``, or None when the frame carries none."""
        return None if self.di is None else f"{self.di:04X}"

    def to_dict(self) -> dict[str, Any]:
        """The header fields as JSON-able values (codes as hex strings, as the reference writes)."""
        return {
            "preambles": self.preambles,
            "meter_type": f"{self.meter_type:02X}",
            "address": self.address,
            "control": f"{self.control:02X}",
            "length": self.length,
            "di": self.di_hex,
            "di_byte_order": self.di_byte_order,
            "ser": None if self.ser is None else f"{self.ser:02X}",
            "data": self.data.hex().upper(),
            "checksum": f"{self.checksum:02X}",
            "raw": self.raw.hex().upper(),
        }


def _detect_di(wire: bytes) -> tuple[int, DiByteOrder]:
    """Normalise a DI read from the wire; either byte order is accepted (reference §4.5)."""
    high_first = wire[0] << 8 | wire[1]
    low_first = wire[1] << 8 | wire[0]
    if high_first not in KNOWN_DIS and low_first in KNOWN_DIS:
        return low_first, "low_first"
    return high_first, "high_first"


def _di_wire(di: int, order: DiByteOrder) -> bytes:
    """The two DI bytes as sent for ``order``."""
    return di.to_bytes(2, "big" if order == "high_first" else "little")


def _check_framing(frame: bytes) -> None:
    """Raise the specific Cjt188Error for a frame (preambles stripped) that is not well formed."""
    if not frame:
        raise Cjt188Error("truncated", "no bytes after the preambles")
    if frame[0] != START:
        raise Cjt188Error("start", f"expected 68 after the preambles, got {frame[0]:02X}")
    if len(frame) < HEADER_SIZE:
        raise Cjt188Error("truncated", f"{len(frame)} bytes, the header alone needs {HEADER_SIZE}")
    length = frame[HEADER_SIZE - 1]
    total = HEADER_SIZE + length + 2
    if len(frame) < total:
        raise Cjt188Error("truncated", f"L={length:02X} needs {total} bytes, got {len(frame)}")
    if frame[total - 1] != END:
        if len(frame) > total and frame[-1] == END:
            raise Cjt188Error(
                "length",
                f"L={length:02X} ends the frame at byte {total}, "
                f"but the input is {len(frame)} bytes long",
            )
        raise Cjt188Error("end", f"expected 16 at byte {total}, got {frame[total - 1]:02X}")
    if len(frame) > total:
        raise Cjt188Error(
            "length", f"{len(frame) - total} bytes after the end of an L={length:02X} frame"
        )
    computed = _sum8(frame[: total - 2])
    if frame[total - 2] != computed:
        raise Cjt188Error("checksum", f"CS is {frame[total - 2]:02X}, byte sum is {computed:02X}")


def parse_frame(data: bytes) -> Frame:
    """Parse one frame, with any number of FE preambles; raise Cjt188Error(reason) if invalid."""
    if not isinstance(data, bytes):
        if not isinstance(data, bytearray | memoryview):
            raise Cjt188Error("argument", f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
    body = data.lstrip(_PREAMBLES)
    _check_framing(body)
    _start, meter_type, address, control, length = _HEADER.unpack_from(body)
    di: int | None = None
    order: DiByteOrder | None = None
    ser: int | None = None
    data_start = HEADER_SIZE
    if length >= _IDENT_LAYOUT.size:  # as Optional(_IDENT) in the declaration
        di_wire, ser = _IDENT_LAYOUT.unpack_from(body, HEADER_SIZE)
        di, order = _detect_di(di_wire)
        data_start += _IDENT_LAYOUT.size
    return Frame(
        meter_type=meter_type,
        address=address.hex().upper(),
        control=control,
        length=length,
        di=di,
        di_byte_order=order,
        ser=ser,
        data=body[data_start : HEADER_SIZE + length],
        preambles=len(data) - len(body),
        checksum=body[-2],
        raw=data,
    )


_HEX_SEPARATORS = re.compile(r"\s+")


def parse_hex(text: str) -> Frame:
    """Parse a frame written as hex (spaces allowed, any case); bad hex is reason ``format``."""
    try:  # the usual case: plain hex (ASCII whitespace between bytes is fine too)
        data = bytes.fromhex(text)
    except (ValueError, TypeError):
        data = _hex_with_separators(text)
    return parse_frame(data)


def _hex_with_separators(text: str) -> bytes:
    """Hex with any whitespace, even inside a byte; the specific ``format`` error otherwise."""
    if not isinstance(text, str):
        raise Cjt188Error("format", f"expected hex text, got {type(text).__name__}")
    compact = _HEX_SEPARATORS.sub("", text)
    if len(compact) % 2:
        raise Cjt188Error("format", f"odd number of hex digits ({len(compact)})")
    try:
        return bytes.fromhex(compact)
    except ValueError:
        raise Cjt188Error("format", "not a hex string") from None


def _address_bytes(address: str | bytes) -> bytes:
    """Seven address bytes from 14 hex digits (wire order) or from bytes."""
    if isinstance(address, bytes | bytearray):
        raw = bytes(address)
    else:
        try:
            raw = bytes.fromhex(address)
        except (ValueError, TypeError):
            raise Cjt188Error("argument", f"address {address!r} is not hex") from None
    if len(raw) != 7:
        raise Cjt188Error("argument", f"address must be 7 bytes, got {len(raw)}")
    return raw


def _check_byte(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise Cjt188Error("argument", f"{name} must be a byte, got {value!r}")


def build_frame(
    meter_type: int,
    address: str | bytes,
    control: int,
    di: int,
    ser: int,
    data: bytes = b"",
    *,
    preambles: int = 0,
    di_byte_order: DiByteOrder = "high_first",
) -> bytes:
    """Build one frame: ``preambles`` x FE, 68 T A C L DI SER DATA CS 16 (L and CS computed)."""
    _check_byte("meter_type", meter_type)
    _check_byte("control", control)
    _check_byte("ser", ser)
    if not isinstance(di, int) or not 0 <= di <= 0xFFFF:
        raise Cjt188Error("argument", f"di must be 0..FFFF, got {di!r}")
    if di_byte_order not in ("high_first", "low_first"):
        raise Cjt188Error("argument", f"unknown di_byte_order {di_byte_order!r}")
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_DATA:
        raise Cjt188Error("argument", f"data must be bytes of at most {MAX_DATA}")
    if not isinstance(preambles, int) or not 0 <= preambles <= 16:
        raise Cjt188Error("argument", f"preambles must be 0..16, got {preambles!r}")
    value = {
        "meter_type": meter_type,
        "address": _address_bytes(address),
        "control": control,
        "body": {"ident": {"di": _di_wire(di, di_byte_order), "ser": ser}, "data": bytes(data)},
    }
    try:
        frame = FRAME.build({"signed": {"value": value}})
    except ConstructError as exc:  # arguments are checked above; keep construct's errors inside
        raise Cjt188Error("argument", f"{exc}") from None
    return bytes([PREAMBLE]) * preambles + frame


def address_standard_order(address: str) -> str:
    """The address the CJ/T 188 way (low byte first): ``27100583001111`` -> ``11110083051027``."""
    return _address_bytes(address)[::-1].hex().upper()


def is_reply_to(request: Frame, reply: Frame) -> bool:
    """True if ``reply`` answers ``request``: same T and address, C = request|80H or |C0H, same DI.

    The DI is compared normalised, so either byte order matches; an error reply may carry no DI.
    A 55H opening command (C=16H) is answered by any 96H/D6H frame of that meter: the vendor's
    ack reports done (DI 902F), running (901F) or failed (other DI) through its DI.
    """
    if reply.meter_type != request.meter_type or reply.address != request.address:
        return False
    if reply.control not in (request.control | REPLY_BIT, request.control | REPLY_BIT | ERROR_BIT):
        return False
    if request.meter_type == METER_BUILDING_VALVE and request.control == CONTROL_WRITE_SYNC:
        return True  # the vendor's 96H ack signals done/running/failed through its DI
    return (reply.di is None and reply.is_error_reply) or reply.di == request.di


# --- units and field helpers -------------------------------------------------------------------


@dataclass(frozen=True)
class UnitCode:
    """One CJ/T 188 unit code: the unit name, its multiplier (x10/x100 codes) and its group."""

    unit: str
    multiplier: int
    group: str


UNIT_CODES: dict[int, UnitCode] = {
    # CJ/T 188-2004 table 13 / 2018 table 20 as printed in the reference (§4.9).
    0x01: UnitCode("J", 1, "energy"),
    0x02: UnitCode("Wh", 1, "energy"),
    0x03: UnitCode("Wh", 10, "energy"),
    0x04: UnitCode("Wh", 100, "energy"),
    0x05: UnitCode("kWh", 1, "energy"),
    0x06: UnitCode("kWh", 10, "energy"),
    0x07: UnitCode("kWh", 100, "energy"),
    0x08: UnitCode("MWh", 1, "energy"),
    0x09: UnitCode("MWh", 10, "energy"),
    0x0A: UnitCode("MWh", 100, "energy"),
    0x0B: UnitCode("kJ", 1, "energy"),
    0x0C: UnitCode("kJ", 10, "energy"),
    0x0D: UnitCode("kJ", 100, "energy"),
    0x0E: UnitCode("MJ", 1, "energy"),
    0x0F: UnitCode("MJ", 10, "energy"),
    0x10: UnitCode("MJ", 100, "energy"),
    0x11: UnitCode("GJ", 1, "energy"),
    0x12: UnitCode("GJ", 10, "energy"),
    0x13: UnitCode("GJ", 100, "energy"),
    0x14: UnitCode("W", 1, "power"),
    0x15: UnitCode("W", 10, "power"),
    0x16: UnitCode("W", 100, "power"),
    0x17: UnitCode("kW", 1, "power"),
    0x18: UnitCode("kW", 10, "power"),
    0x19: UnitCode("kW", 100, "power"),
    0x1A: UnitCode("MW", 1, "power"),
    0x1B: UnitCode("MW", 10, "power"),
    0x1C: UnitCode("MW", 100, "power"),
    0x29: UnitCode("L", 1, "volume"),
    0x2A: UnitCode("L", 10, "volume"),
    0x2B: UnitCode("L", 100, "volume"),
    0x2C: UnitCode("m³", 1, "volume"),
    0x2D: UnitCode("m³", 10, "volume"),
    0x2E: UnitCode("m³", 100, "volume"),
    0x32: UnitCode("L/h", 1, "flow"),
    0x33: UnitCode("L/h", 10, "flow"),
    0x34: UnitCode("L/h", 100, "flow"),
    0x35: UnitCode("m³/h", 1, "flow"),
    0x36: UnitCode("m³/h", 10, "flow"),
    0x37: UnitCode("m³/h", 100, "flow"),
    0x40: UnitCode("J/h", 1, "power"),
    0x43: UnitCode("kJ/h", 1, "power"),
    0x44: UnitCode("kJ/h", 10, "power"),
    0x45: UnitCode("kJ/h", 100, "power"),
    0x46: UnitCode("MJ/h", 1, "power"),
    0x47: UnitCode("MJ/h", 10, "power"),
    0x48: UnitCode("MJ/h", 100, "power"),
    0x49: UnitCode("GJ/h", 1, "power"),
    0x4A: UnitCode("GJ/h", 10, "power"),
    0x4B: UnitCode("GJ/h", 100, "power"),
}
"""Unit code -> unit; a value is multiplied by ``multiplier`` and reported in ``unit``."""

_UNIT_GROUPS = {code: unit.group for code, unit in UNIT_CODES.items()}

_UNIT_LAST = "last"
_UNIT_FIRST = "first"


def _hex(raw: bytes) -> str:
    return raw.hex().upper()


class _Hexed(NamedTuple):
    """A frame's data in hex both ways, so that every field is two string slices.

    ``hex[2a:2b]`` is the raw hex of data bytes ``a..b``; ``reversed[2(n-b):2(n-a)]`` is the
    same bytes high byte first, i.e. the digits of a low-byte-first BCD number.
    """

    data: bytes
    hex: str
    reversed: str

    @classmethod
    def of(cls, data: bytes) -> _Hexed:
        return cls(data, data.hex().upper(), data[::-1].hex().upper())

    def raw(self, start: int, stop: int) -> str:
        return self.hex[2 * start : 2 * stop]

    def bcd(self, start: int, stop: int) -> str:
        size = len(self.data)
        return self.reversed[2 * (size - stop) : 2 * (size - start)]


def _bcd_value(digits: str, *, signed: bool = False) -> int | None:
    """The integer of BCD ``digits`` (high digit first); None when one is not a decimal digit.

    With ``signed``, an F high nibble on the top byte means negative (the seed vendor's rule).
    """
    if signed and digits[:1] == "F":
        digits = digits[1:]
        return -int(digits) if digits.isdigit() else None
    return int(digits) if digits.isdigit() else None


def _scaled(number: int, multiplier: int, decimals: int) -> float:
    """``number * multiplier / 10**decimals`` rounded once (int true division is exact-rounded)."""
    return number * multiplier / _POWERS_OF_TEN[decimals]


_POWERS_OF_TEN = tuple(10**n for n in range(8))
_UNIT_CODE_HEX = tuple(f"{code:02X}" for code in range(256))


def _bcd_quantity(
    view: _Hexed,
    start: int,
    unit_first: bool,
    decimals: int,
    *,
    signed: bool = False,
    scaling: str | None = None,
) -> dict[str, Any]:
    """The 4+1 block at ``start``: 4 BCD bytes and a unit code before or after them, scaled by
    ``decimals`` and the unit's multiplier."""
    data = view.data
    if unit_first:
        unit_code, value_start = data[start], start + 1
    else:
        unit_code, value_start = data[start + 4], start
    bcd = view.bcd(value_start, value_start + 4)
    number = _bcd_value(bcd, signed=signed)
    unit = UNIT_CODES.get(unit_code)
    field: dict[str, Any] = {
        "value": None
        if number is None or unit is None
        else _scaled(number, unit.multiplier, decimals),
        "unit": None if unit is None else unit.unit,
        "raw": view.raw(start, start + 5),
        "bcd": bcd,
        "unit_code": _UNIT_CODE_HEX[unit_code],
    }
    if scaling is not None:
        field["scaling"] = scaling
    if number is None:
        field["error"] = "bcd"
    elif unit is None:
        field["error"] = "unit_code"
    return field


def _bcd_plain(view: _Hexed, start: int, stop: int, decimals: int, unit: str | None) -> dict:
    """A BCD value without a unit byte (temperatures, hours) in data bytes ``start..stop``."""
    bcd = view.bcd(start, stop)
    number = _bcd_value(bcd)
    field: dict[str, Any] = {
        "value": None if number is None else _scaled(number, 1, decimals),
        "unit": unit,
        "raw": view.raw(start, stop),
        "bcd": bcd,
    }
    if number is None:
        field["error"] = "bcd"
    return field


def _binary(raw: bytes | str, value: float | int | str | None, unit: str | None) -> dict:
    """A binary field: its value, unit and raw hex (given as bytes, or as hex already)."""
    return {"value": value, "unit": unit, "raw": raw if isinstance(raw, str) else _hex(raw)}


def _bcd_clock(raw: bytes) -> dict[str, Any]:
    """CJ/T 188 real time: BCD ss mm hh DD MM YY(lo) YY(hi) -> ISO 8601 local time, no zone."""
    digits = raw.hex()
    field: dict[str, Any] = {"value": None, "unit": None, "raw": digits.upper()}
    if len(raw) != 7 or not digits.isdigit():
        field["error"] = "bcd"
        return field
    year = digits[12:14] + digits[10:12]
    month, day, hour, minute, second = (
        digits[8:10],
        digits[6:8],
        digits[4:6],
        digits[2:4],
        digits[:2],
    )
    try:  # validates the date; the text is the digits themselves (datetime.isoformat's form)
        datetime.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError:
        field["error"] = "date"
        return field
    field["value"] = f"{year}-{month}-{day}T{hour}:{minute}:{second}"
    return field


def _signed_nibble_tenths(value: int) -> float:
    """uint16 in 0.1 units where an F high nibble means negative (vendor rule, sign-magnitude)."""
    if value >> 12 == 0xF:
        return -(value & 0x0FFF) / 10
    return value / 10


def _unit_first(data: bytes, blocks: tuple[tuple[str, int, int, str], ...]) -> bool:
    """Whether the unit byte comes before the value in the 4+1 blocks (JY style) rather than
    after it (the standard).

    ``blocks`` are (name, offset, decimals, expected unit group), as ``_HEAT_BLOCKS``. The
    variant whose unit bytes are known codes of the expected group more often wins; a tie keeps
    the standard layout.
    """
    first = last = 0
    for _name, start, _decimals, group in blocks:
        if _UNIT_GROUPS.get(data[start]) == group:
            first += 1
        if _UNIT_GROUPS.get(data[start + 4]) == group:
            last += 1
    return first > last


Spans = tuple[tuple[str, int, int], ...]


def _spans(*inclusive: tuple[int, int]) -> Spans:
    """Data spans nobody explains, as (key ``dA_B`` with inclusive offsets, start, stop)."""
    return tuple((f"d{a}_{b}", a, b + 1) for a, b in inclusive)


def _unparsed(view: _Hexed, spans: Spans) -> dict[str, str]:
    """Raw hex of the data spans no decoder explains, keyed ``dA_B``."""
    return {key: view.raw(start, stop) for key, start, stop in spans}


def _result(
    decoder: str,
    fields: dict[str, Any] | None = None,
    inferred: dict[str, Any] | None = None,
    unparsed: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    result: dict[str, Any] = {"decoder": decoder, **extra}
    result["fields"] = fields or {}
    result["inferred"] = inferred or {}
    result["unparsed"] = unparsed or {}
    return result


# --- payload decoders ----------------------------------------------------------------------------

_HEAT_TYPES = range(0x20, 0x23)  # 20H heat, 21H cooling, 22H heat + cooling (2018)
_WATER_TYPES = range(0x10, 0x20)
_GAS_TYPES = range(0x30, 0x40)
_HEAT_901F_SIZE = 43
_WATER_901F_SIZE = 19
_BUILDING_VALVE_901F_SIZE = 56
_HOUSEHOLD_VALVE_901F_SIZE = 42

# (name, offset of the 4+1 block, decimals, unit group) of the heat and water meter layouts.
_HEAT_BLOCKS = (
    ("settlement_heat", 0, 2, "energy"),
    ("heat_total", 5, 2, "energy"),
    ("heat_power", 10, 2, "power"),
    ("flow_rate", 15, 4, "flow"),
    ("volume_total", 20, 2, "volume"),
)
_WATER_BLOCKS = (("volume_total", 0, 2, "volume"), ("settlement_volume", 5, 2, "volume"))
_HEAT_METER_NOTE = "settlement_heat: many vendors put cumulative cold energy here"


def _decode_heat_meter(data: bytes) -> dict[str, Any]:
    """Standard heat meter 901F, CJ/T 188-2004 layout (reference §4.7)."""
    view = _Hexed.of(data)
    unit_first = _unit_first(data, _HEAT_BLOCKS)
    fields: dict[str, Any] = {
        name: _bcd_quantity(view, at, unit_first, decimals)
        for name, at, decimals, _ in _HEAT_BLOCKS
    }
    fields["supply_temperature"] = _bcd_plain(view, 25, 28, 2, "°C")
    fields["return_temperature"] = _bcd_plain(view, 28, 31, 2, "°C")
    fields["working_hours"] = _bcd_plain(view, 31, 34, 0, "h")
    fields["meter_clock"] = _bcd_clock(data[34:41])
    fields["status"] = _binary(view.raw(41, 43), int.from_bytes(data[41:43], "little"), None)
    return _result(
        "heat_meter",
        fields,
        _status_bits(data[41]),
        unit_position=_UNIT_FIRST if unit_first else _UNIT_LAST,
        note=_HEAT_METER_NOTE,
    )


def _decode_water_meter(data: bytes, decoder: str) -> dict[str, Any]:
    """Standard water/gas meter 901F (reference §4.8)."""
    view = _Hexed.of(data)
    unit_first = _unit_first(data, _WATER_BLOCKS)
    fields: dict[str, Any] = {
        name: _bcd_quantity(view, at, unit_first, decimals)
        for name, at, decimals, _ in _WATER_BLOCKS
    }
    fields["meter_clock"] = _bcd_clock(data[10:17])
    fields["status"] = _binary(view.raw(17, 19), int.from_bytes(data[17:19], "little"), None)
    position = _UNIT_FIRST if unit_first else _UNIT_LAST
    return _result(decoder, fields, _status_bits(data[17]), unit_position=position)


_VALVE_STATES = {0b00: "open", 0b01: "closed", 0b11: "abnormal"}


def _status_bits(st1: int) -> dict[str, Any]:
    """ST byte 1 per the common reading (valve D0-D1, battery D2); vendors differ (§4.10)."""
    return {"valve_state": _VALVE_STATES.get(st1 & 0x03, "unknown"), "battery_low": bool(st1 & 4)}


_BUILDING_VALVE_UNPARSED = _spans((21, 25), (26, 30), (31, 34), (39, 55))
_HOUSEHOLD_VALVE_UNPARSED = _spans((0, 4), (9, 9), (11, 18), (23, 31), (33, 33))


def _decode_building_valve(data: bytes, bcd_decimals: int) -> dict[str, Any]:
    """Vendor type 55H building valve 901F, 56 data bytes (reference §5.1)."""
    view = _Hexed.of(data)
    standard = bcd_decimals == BCD_DECIMALS_STANDARD
    scaling = "standard" if standard else "vendor_integer"
    fields = {
        "heat_total": _bcd_quantity(view, 0, False, bcd_decimals, scaling=scaling),
        "flow_rate": _bcd_quantity(
            view, 5, False, 4 if standard else 0, signed=True, scaling=scaling
        ),
        "volume_total": _bcd_quantity(view, 10, False, bcd_decimals, scaling=scaling),
        "supply_temperature": _bcd_plain(view, 15, 18, 2, "°C"),
        "return_temperature": _bcd_plain(view, 18, 21, 2, "°C"),
        "valve_opening": _binary(view.raw(35, 37), int.from_bytes(data[35:37], "little") / 10, "%"),
        "valve_setpoint": _binary(
            view.raw(37, 39), int.from_bytes(data[37:39], "little") / 10, "%"
        ),
    }
    return _result("building_valve_55", fields, {}, _unparsed(view, _BUILDING_VALVE_UNPARSED))


def _decode_household_valve(data: bytes) -> dict[str, Any]:
    """Vendor type 53H household valve 901F, 42 data bytes (reference §5.2)."""
    view = _Hexed.of(data)
    raw = view.raw
    fields = {
        "room_temperature": _binary(
            raw(5, 7), _signed_nibble_tenths(int.from_bytes(data[5:7], "little")), "°C"
        ),
        "room_setpoint": _binary(
            raw(7, 9), _signed_nibble_tenths(int.from_bytes(data[7:9], "little")), "°C"
        ),
        "valve_opening": _binary(raw(10, 11), float(data[10]), "%"),
        "supply_temperature": _binary(raw(19, 21), int.from_bytes(data[19:21], "big") / 10, "°C"),
        "return_temperature": _binary(raw(21, 23), int.from_bytes(data[21:23], "big") / 10, "°C"),
        "battery_voltage": _binary(raw(32, 33), data[32] * 2 / 100, "V"),
        "status": _binary(raw(41, 42), data[41], None),
    }
    inferred = {"meter_clock": _bcd_clock(data[34:41])["value"]}
    return _result(
        "household_valve_53", fields, inferred, _unparsed(view, _HOUSEHOLD_VALVE_UNPARSED)
    )


def _decode_valve_command(frame: Frame) -> dict[str, Any] | None:
    """Vendor valve-opening commands and their replies (reference §5.3); None if not one."""
    data = frame.data
    if frame.meter_type == METER_BUILDING_VALVE and frame.di in (
        DI_BUILDING_VALVE_OPENING,
        DI_METERING_DATA,
    ):
        if frame.control == CONTROL_WRITE_SYNC and frame.di == DI_BUILDING_VALVE_OPENING:
            if len(data) == 2:
                opening = int.from_bytes(data, "little") / 10
                return _result("valve_55_command", {"valve_opening": _binary(data, opening, "%")})
        elif frame.control == CONTROL_WRITE_SYNC | REPLY_BIT:
            state = _valve_55_state(frame.di)
            wire_di = _di_wire(frame.di, frame.di_byte_order or "high_first")
            return _result(
                "valve_55_ack",
                {"command_state": _binary(wire_di, state, None)},
                unparsed={"data": _hex(data)} if data else {},
            )
    if (
        frame.meter_type == METER_HOUSEHOLD_VALVE
        and frame.di == DI_HOUSEHOLD_VALVE_OPENING
        and frame.control in (CONTROL_WRITE, CONTROL_WRITE | REPLY_BIT)
        and len(data) == 1
    ):
        name = "valve_53_command" if frame.control == CONTROL_WRITE else "valve_53_reply"
        return _result(name, {"valve_opening": _binary(data, float(data[0]), "%")})
    return None


def _valve_55_state(di: int | None) -> str:
    """The vendor reads DI1 of the 96H ack: 2F done, 1F still running, anything else failed."""
    if di == DI_BUILDING_VALVE_OPENING:
        return "done"
    if di == DI_METERING_DATA:
        return "running"
    return "failed"


def decode_payload(frame: Frame, bcd_decimals: Literal[0, 2] = BCD_DECIMALS_VENDOR) -> dict:
    """Decode the data of a parsed frame into named fields; unknown T/DI/size says so, no raise.

    ``bcd_decimals`` is the scaling of the 55H BCD totals (heat, volume): 0 reads them as whole
    units as the vendor's decoder does, 2 as CJ/T 188 XXXXXX.XX. Standard meters always use the
    standard decimals. Result: ``{"decoder", "fields", "inferred", "unparsed", ...}``.
    """
    if bcd_decimals not in (BCD_DECIMALS_VENDOR, BCD_DECIMALS_STANDARD):
        raise Cjt188Error("argument", f"bcd_decimals must be 0 or 2, not {bcd_decimals!r}")
    data = frame.data
    if frame.is_error_reply:
        return _result("error_reply", unparsed={"data": _hex(data)} if data else {})
    command = _decode_valve_command(frame)
    if command is not None:
        return command
    if frame.di == DI_VALVE_CONTROL and frame.control == CONTROL_WRITE and len(data) == 1:
        action = {0x55: "open", 0x99: "close"}.get(data[0], "unknown")
        return _result("valve_control_command", {"valve_action": _binary(data, action, None)})
    if not frame.is_reply and not data and frame.di is not None:
        return _result("request")
    if frame.di == DI_METERING_DATA and frame.control == CONTROL_READ | REPLY_BIT:
        size, kind = len(data), frame.meter_type
        if kind == METER_BUILDING_VALVE and size == _BUILDING_VALVE_901F_SIZE:
            return _decode_building_valve(data, bcd_decimals)
        if kind == METER_HOUSEHOLD_VALVE and size == _HOUSEHOLD_VALVE_901F_SIZE:
            return _decode_household_valve(data)
        if kind in _HEAT_TYPES and size == _HEAT_901F_SIZE:
            return _decode_heat_meter(data)
        if kind in _WATER_TYPES and size == _WATER_901F_SIZE:
            return _decode_water_meter(data, "water_meter")
        if kind in _GAS_TYPES and size == _WATER_901F_SIZE:
            return _decode_water_meter(data, "gas_meter")
    return _result(
        "unknown",
        unparsed={"data": _hex(data)} if data else {},
        reason=(
            f"no decoder for T={frame.meter_type:02X} C={frame.control:02X} "
            f"DI={frame.di_hex} with {len(data)} data bytes"
        ),
    )


# --- valve commands ------------------------------------------------------------------------------

_VALVE_DEFAULT_SER = {METER_BUILDING_VALVE: 0x01, METER_HOUSEHOLD_VALVE: 0x00}


def build_valve_opening(
    meter_type: int,
    address: str | bytes,
    opening_percent: float,
    ser: int | None = None,
    *,
    preambles: int = 3,
) -> bytes:
    """Build a valve-opening command for a 55H building valve or a 53H household valve.

    55H: C=16H, DI 902F, opening as uint16 LE in 0.1 % (so at most one decimal).
    53H: C=04H, DI A019, opening as one byte in whole % (so an integer).
    ``ser`` defaults to the vendor templates' SER (01 for 55H, 00 for 53H); 3 FE preambles as the
    vendor sends in ``transparent``.
    """
    if isinstance(opening_percent, bool) or not isinstance(opening_percent, int | float):
        raise Cjt188Error("argument", f"opening must be a number, got {opening_percent!r}")
    if not 0 <= opening_percent <= 100:
        raise Cjt188Error("argument", f"opening {opening_percent} is not in 0..100 %")
    if meter_type not in _VALVE_DEFAULT_SER:
        raise Cjt188Error("argument", f"no valve command for meter type {meter_type!r}")
    ser = _VALVE_DEFAULT_SER[meter_type] if ser is None else ser
    if meter_type == METER_BUILDING_VALVE:
        tenths = round(opening_percent * 10)
        if abs(tenths - opening_percent * 10) > 1e-6:
            raise Cjt188Error("argument", "55H opening has a resolution of 0.1 %")
        return build_frame(
            METER_BUILDING_VALVE,
            address,
            CONTROL_WRITE_SYNC,
            DI_BUILDING_VALVE_OPENING,
            ser,
            tenths.to_bytes(2, "little"),
            preambles=preambles,
        )
    percent = round(opening_percent)
    if abs(percent - opening_percent) > 1e-9:
        raise Cjt188Error("argument", "53H opening is a whole percent")
    return build_frame(
        METER_HOUSEHOLD_VALVE,
        address,
        CONTROL_WRITE,
        DI_HOUSEHOLD_VALVE_OPENING,
        ser,
        bytes([percent]),
        preambles=preambles,
    )


def decode_valve_reply(frame: Frame) -> dict[str, Any]:
    """The result of a valve-opening command from the meter's reply frame.

    Returns ``{"meter_type", "address", "state", "ok", "opening_percent"}`` where ``state`` is
    ``done`` (55H ack with DI 902F, or a 53H echo), ``running`` (55H ack with DI 901F),
    ``failed`` (55H ack with another DI), ``error_reply`` (D6 set) or ``not_a_valve_reply``.
    ``opening_percent`` is the echoed opening (53H only; the 55H ack carries none).
    """
    result: dict[str, Any] = {
        "meter_type": f"{frame.meter_type:02X}",
        "address": frame.address,
        "state": "not_a_valve_reply",
        "ok": False,
        "opening_percent": None,
    }
    if frame.meter_type not in _VALVE_DEFAULT_SER or not frame.is_reply:
        return result
    if frame.is_error_reply:
        result["state"] = "error_reply"
    elif (
        frame.meter_type == METER_BUILDING_VALVE and frame.control == CONTROL_WRITE_SYNC | REPLY_BIT
    ):
        result["state"] = _valve_55_state(frame.di)
    elif (
        frame.meter_type == METER_HOUSEHOLD_VALVE
        and frame.control == CONTROL_WRITE | REPLY_BIT
        and frame.di == DI_HOUSEHOLD_VALVE_OPENING
        and len(frame.data) == 1
    ):
        result["state"] = "done"
        result["opening_percent"] = float(frame.data[0])
    result["ok"] = result["state"] == "done"
    return result


def decode_for_cli(hex_text: str, bcd_decimals: Literal[0, 2] = BCD_DECIMALS_VENDOR) -> dict:
    """``gatewayd decode cjt188 HEX``: header fields and decoded payload of one hex frame.

    Raises Cjt188Error (reason ``format`` for text that is not hex) so the CLI can print it.
    """
    frame = parse_hex(hex_text)
    return {"frame": frame.to_dict(), "payload": decode_payload(frame, bcd_decimals)}
