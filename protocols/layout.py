"""Fixed-offset readers derived from construct declarations, for hot paths.

construct parses generically, at tens of microseconds a frame. Where a frame's framing has been
verified already, its leading fixed-size fields can be read with one ``struct.unpack_from``.
``fixed_layout`` derives that ``struct.Struct`` from the construct ``Struct`` itself, so the
wire format stays declared once: change the declaration and the fast reader follows (or
``fixed_layout`` raises at import when it meets a field it cannot translate).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from construct import Bytes, Const, FormatField, Prefixed, Renamed, Struct

__all__ = ["FixedLayout", "fixed_layout"]


@dataclass(frozen=True)
class FixedLayout:
    """The leading fixed-size fields of a construct Struct as one ``struct.Struct``.

    ``names`` are the field names in order; a trailing ``Prefixed`` contributes its length
    field under the Prefixed field's name, and nothing after it is read.
    """

    names: tuple[str, ...]
    struct: struct.Struct

    @property
    def size(self) -> int:
        return self.struct.size

    def unpack_from(self, buffer: bytes, offset: int = 0) -> tuple:
        return self.struct.unpack_from(buffer, offset)


def _code(subcon: object) -> str:
    """One field's struct code (little-endian or single-byte fields only)."""
    if isinstance(subcon, Const):
        return _code(subcon.subcon)
    if isinstance(subcon, Bytes) and isinstance(subcon.length, int):
        return f"{subcon.length}s"
    if isinstance(subcon, FormatField):
        order, code = subcon.fmtstr[0], subcon.fmtstr[1:]
        if order in "<=" or struct.calcsize(code) == 1:
            return code
    raise TypeError(f"no fixed-size struct code for {subcon!r}")


def fixed_layout(declaration: Struct) -> FixedLayout:
    """The ``FixedLayout`` of ``declaration``'s fields up to and including a ``Prefixed``."""
    names: list[str] = []
    codes = ["<"]
    for field in declaration.subcons:
        if not isinstance(field, Renamed) or field.name is None:
            raise TypeError(f"unnamed field {field!r} in a fixed layout")
        subcon = field.subcon
        names.append(field.name)
        if isinstance(subcon, Prefixed):
            codes.append(_code(subcon.lengthfield))
            break
        codes.append(_code(subcon))
    return FixedLayout(tuple(names), struct.Struct("".join(codes)))
