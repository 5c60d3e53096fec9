"""CRC-16 variants by catalogue name, and their rendering as hex text, for text protocols.

Why: device documents say "CRC16" without naming the variant, so codecs take the algorithm from
configuration. The arithmetic is ``anycrc`` (a C extension, ~0.4 µs per 60-byte frame against
~35 µs for the pure-Python ``crccheck``); this module only maps our names to catalogue models and
pins each one to its catalogue check value over ``b"123456789"``. Never write CRC tables by hand.

Use (``gatewayd.protocols.crc``)::

    crc = crc16_function("modbus")        # look the model up once, outside the per-frame path
    value = crc(b"123456789")              # 0x4B37, an int
    crc16_text(value)                      # "4B37": high byte first ("big"), upper case
    crc16_text(value, "little")            # "374B": low byte first, as a device sending the
                                           # CRC's bytes in memory order (Modbus RTU) writes it

``ALGORITHMS``, ``BYTE_ORDERS`` and ``LETTER_CASES`` list the accepted names, for a config
``Literal`` or a ``--help`` text; an unknown one raises ``ValueError`` naming the choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal

import anycrc

ByteOrder = Literal["big", "little"]
LetterCase = Literal["upper", "lower"]

# our name -> (anycrc catalogue model, check value over b"123456789" from the CRC catalogue)
_CATALOGUE: Final[dict[str, tuple[str, int]]] = {
    "modbus": ("CRC16-MODBUS", 0x4B37),
    "ccitt-false": ("CRC16-IBM-3740", 0x29B1),
    "xmodem": ("CRC16-XMODEM", 0x31C3),
    "arc": ("CRC16-ARC", 0xBB3D),
    "kermit": ("CRC16-KERMIT", 0x2189),
    "x25": ("CRC16-IBM-SDLC", 0x906E),
}

ALGORITHMS: Final[tuple[str, ...]] = tuple(_CATALOGUE)
"""Supported CRC-16 algorithm names, the default (``modbus``) first."""

BYTE_ORDERS: Final[tuple[ByteOrder, ...]] = ("big", "little")
LETTER_CASES: Final[tuple[LetterCase, ...]] = ("upper", "lower")

_MODELS: Final = {name: anycrc.Model(model) for name, (model, _check) in _CATALOGUE.items()}


def check_value(algorithm: str) -> int:
    """Return the catalogue check value of ``algorithm`` (its CRC over ``b"123456789"``)."""
    return _CATALOGUE[_known(algorithm)][1]


def crc16(algorithm: str, data: bytes) -> int:
    """Return the CRC-16 of ``data`` under the named catalogue ``algorithm`` (one of
    ``ALGORITHMS``), as an int 0..0xFFFF. Looks the model up per call: per frame, prefer
    ``crc16_function``."""
    return _MODELS[_known(algorithm)].calc(data)


def crc16_function(algorithm: str) -> Callable[[bytes], int]:
    """Return the CRC-16 function of ``algorithm``: ``bytes -> int`` (0..0xFFFF).

    Look it up once (in a codec's ``__init__``) and call it per frame: the lookup and the name
    check are then paid once. Raises ``ValueError`` for a name not in ``ALGORITHMS``.
    """
    return _MODELS[_known(algorithm)].calc


def crc16_text(value: int, byte_order: str = "big", case: str = "upper") -> str:
    """Render a CRC-16 ``value`` as the 4 hex digits a text frame carries.

    ``byte_order`` is the order of the CRC's two bytes in the text: ``big`` writes the high
    byte first, as the number reads (0x4B37 -> ``4B37``); ``little`` the low byte first
    (0x4B37 -> ``374B``), as devices that hex-dump the CRC from memory do. ``case``: ``upper``
    or ``lower`` hex letters. Raises ``ValueError`` for anything else.
    """
    if byte_order == "little":
        value = ((value & 0xFF) << 8) | (value >> 8)
    elif byte_order != "big":
        raise ValueError(f"unknown byte order {byte_order!r}, expected one of {BYTE_ORDERS}")
    if case == "upper":
        return f"{value:04X}"
    if case == "lower":
        return f"{value:04x}"
    raise ValueError(f"unknown letter case {case!r}, expected one of {LETTER_CASES}")


def _known(algorithm: str) -> str:
    """Return ``algorithm`` if it is supported, else raise ValueError naming the choices."""
    if algorithm not in _CATALOGUE:
        raise ValueError(f"unknown CRC-16 algorithm {algorithm!r}, expected one of {ALGORITHMS}")
    return algorithm
