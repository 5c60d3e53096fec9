"""Errors raised by the protocol codecs: one base class with a machine-readable ``reason``."""


class ProtocolError(ValueError):
    """A frame or message a codec rejects; ``reason`` is a short stable word (``checksum``...)."""

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
