"""Errors raised by the protocol codecs: one base class with a machine-readable ``reason``.

A codec of your own raises ``ProtocolError(reason, message)`` or, better, a subclass of its own
(``class ThermoError(ProtocolError)``), so that a caller can catch one family's errors apart.
"""


class ProtocolError(ValueError):
    """A frame or message a codec rejects: ``ProtocolError(reason, message)``.

    ``reason`` is a short stable word (``crc``, ``format``, ``length``...) for programs: a plugin
    puts it in its ``frame.invalid`` event's ``data.reason`` and in metrics, so keep each codec's
    set small and listed (as ``ERROR_REASONS``). ``message`` is for people: what was wrong,
    with the offending value. ``str(error)`` is the message. A ``ValueError``, so code that
    converts input and catches ``ValueError`` catches it too.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Cjt188Error(ProtocolError):
    """A CJ/T 188 frame that cannot be parsed or built (reasons: start, truncated, length, ...)."""


class HygwError(ProtocolError):
    """A hy/gw JSON message that cannot be decoded or encoded (reasons: json, msg_id, gw_id…)."""


class PowerbankError(ProtocolError):
    """A power-bank text frame rejected (reasons: crc, format, imei, slot, command, length)."""


class ReaderFramingError(ProtocolError):
    """A card-reader link frame or card APDU that cannot be built or parsed (reasons: length,
    crc, format, framing, apdu)."""
