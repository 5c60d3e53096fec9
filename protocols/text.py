r"""construct building blocks for text protocols: delimited fields and a CRC written as hex text.

Why: construct (https://construct.readthedocs.io) declares binary formats well, but a text frame
such as ``{"860000000000001,CH,3F2A"}\r\n`` has fields of varying length ended by a delimiter,
and a CRC that is not bytes but four hex digits computed over the text before it. These classes
fill that gap; one declaration then both parses and builds, as for a binary format.

- ``Token``: text up to a delimiter, as ``str``; building writes the text and the delimiter.
- ``TextAdapter``: an ``Adapter`` over a ``Token`` that types and validates a field; it keeps
  ``Struct.compile()`` working (construct's compiler would otherwise fall back to the slow
  interpreter for everything under an Adapter).
- ``CrcText``: the CRC field. Parsing checks it looks like hex digits (comparing it with the CRC
  of the received bytes is the codec's business: which bytes it covers is often a setting);
  building computes it over the bytes built since an offset recorded with ``Tell``.

Errors are ``ProtocolError(reason, message)`` (``format`` for a missing delimiter, ``crc`` for a
malformed CRC), or the codec's own subclass given as ``error=``. No I/O, no Twisted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from construct import Adapter, Construct

from .errors import ProtocolError

__all__ = ["CrcText", "TextAdapter", "Token"]

#: Builds the exception a field raises: ``error(reason, message)``; a ``ProtocolError`` subclass.
ErrorFactory = Callable[[str, str], Exception]


class Token(Construct):
    """Text up to the first byte of ``stops`` (the stop consumed unless ``keep_stop``), as ``str``.

    Parsing: ``Token(b",", b",")`` reads ``b"abc,def"`` as ``"abc"`` and leaves ``def``; more
    than one stop byte (``b",."``) ends the field at whichever comes first. Bytes are decoded as
    latin-1, so every byte survives; validate the text in a ``TextAdapter`` over it. A missing
    stop raises ``error("format", ...)``.

    Building writes the text (ASCII) and then ``build_stop`` (``b""`` for none: the last field
    before a closing ``"`` that ``keep_stop`` leaves for a ``Const``).

    It reads the whole input as ``Construct.parse(bytes)`` provides it (an in-memory stream),
    and searches it without copying: parse complete frames, not a socket stream.
    """

    def __init__(
        self,
        stops: bytes,
        build_stop: bytes = b"",
        *,
        keep_stop: bool = False,
        error: ErrorFactory = ProtocolError,
    ) -> None:
        super().__init__()
        if not stops:
            raise ValueError("Token needs at least one stop byte")
        self.stops = stops
        self.build_stop = build_stop
        self.keep_stop = keep_stop
        self.error = error
        self._single = stops if len(stops) == 1 else None
        self._search = re.compile(b"[" + re.escape(stops) + b"]").search

    def _parse(self, stream: Any, context: Any, path: str) -> str:
        data = stream.getvalue()
        start = stream.tell()
        if self._single is not None:
            end = data.find(self._single, start)
        else:
            found = self._search(data, start)
            end = -1 if found is None else found.start()
        if end < 0:
            stops = self.stops.decode("latin-1")
            raise self.error("format", f"no {stops!r} after the field at offset {start}")
        stream.seek(end if self.keep_stop else end + 1)
        return data[start:end].decode("latin-1")

    def _build(self, obj: str, stream: Any, context: Any, path: str) -> str:
        stream.write(obj.encode("ascii") + self.build_stop)
        return obj


class TextAdapter(Adapter):
    """A text field's ``str`` <-> its typed value: override ``_decode`` (validate, convert;
    raise your ``ProtocolError`` with its reason) and ``_encode`` (value -> ``str``). Both
    default to the text unchanged.

    Unlike a plain ``Adapter`` it compiles: ``Struct(...).compile()`` inlines the field's parser
    and calls ``_decode``, and builds the same way (measured on the power-bank frame: parsing
    and building about 2x faster than interpreted).
    """

    def _decode(self, obj: str, context: Any, path: str) -> Any:
        return obj

    def _encode(self, obj: Any, context: Any, path: str) -> Any:
        return obj

    def _emitparse(self, code: Any) -> str:
        self._compileinstance(code)
        return f"linkedinstances[{id(self)}]._decode({self.subcon._compileparse(code)}, this, None)"

    def _emitbuild(self, code: Any) -> str:
        self._compileinstance(code)
        encoded = f"linkedinstances[{id(self)}]._encode(obj, this, None)"
        return f"reuse({encoded}, lambda obj: ({self.subcon._compilebuild(code)}))"


class CrcText(TextAdapter):
    """A CRC written as hex digits, e.g. the ``3F2A`` of ``{"...,CH,3F2A"}``.

    Parsing returns the digits as received once they match ``pattern`` (default: exactly 4 hex
    digits, either case), else raises ``error("crc", ...)``. Whether they are the right CRC is
    for the codec to check: it knows which bytes the CRC covers.

    Building writes the value given, or, for ``None``, computes it: ``compute(covered)`` where
    ``covered`` is every byte built from the offset in context key ``start`` (record it with
    ``"start" / Tell`` before the first covered field) up to this field. ``compute`` is a
    function ``bytes -> str`` (``lambda b: crc16_text(crc16("modbus", b))``), or the name of
    a build parameter holding one (``FRAME.build(value, crc_text=...)``), for a format whose
    CRC settings are chosen per connection while the declaration stays module-level.

    A built CRC reads the bytes already in the stream, so this field builds interpreted even
    inside a compiled ``Struct`` (the rest of the Struct stays compiled).
    """

    def __init__(
        self,
        subcon: Construct,
        *,
        compute: Callable[[bytes], str] | str = "crc_text",
        start: str = "body_offset",
        pattern: str = r"[0-9A-Fa-f]{4}",
        error: ErrorFactory = ProtocolError,
    ) -> None:
        super().__init__(subcon)
        self.compute = compute
        self.start = start
        self.pattern = re.compile(pattern)
        self.error = error
        self.flagbuildnone = True  # built from the bytes before it when no value is given

    def _decode(self, obj: str, context: Any, path: str) -> str:
        if not self.pattern.fullmatch(obj):
            raise self.error("crc", f"CRC must match {self.pattern.pattern}, got {obj!r}")
        return obj

    def _emitbuild(self, code: Any) -> str:
        raise NotImplementedError  # builds through _build below, which reads the stream

    def _build(self, obj: str | None, stream: Any, context: Any, path: str) -> str:
        if obj is None:
            compute = self.compute
            if isinstance(compute, str):
                compute = context["_params"][compute]
            obj = compute(stream.getvalue()[context[self.start] :])
        elif not isinstance(obj, str) or not self.pattern.fullmatch(obj):
            raise self.error("crc", f"a forced CRC must match {self.pattern.pattern}, got {obj!r}")
        self.subcon._build(obj, stream, context, path)
        return obj
