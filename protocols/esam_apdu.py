"""The master-station card's APDUs of ours: the 18 card functions as ISO 7816-4 commands.

Why: the serial backend sends each library function to the card in the reader, and the reader
simulator's card must understand the same bytes. The real card's command set is unpublished (it
must be captured from the vendor DLL, see the plugin README), so this is **our** command set, built
the way a PBOC-style PSAM would be and kept in one place so a captured script can replace it.

Commands (CLA 80, proprietary)::

    80 INS 00 00 Lc DATA 00      a function with arguments and an output (case 4)
    80 INS 00 00 00              a function without arguments (case 2: infrared_rand)
    80 INS 00 00 Lc DATA         a function without output (case 3: mac_check)
    90 INS 00 00 Lc DATA         a chained part (CLA bit 10): DATA longer than 255 bytes is sent
                                 in parts of 255, every part but the last with the chaining bit

    INS   = 30 + the function's number in the seed (identity_authentication 33 ... 44)
    DATA  = the validated arguments in the seed's order: integers as one byte, hex arguments as
            their bytes (each function has at most one argument of variable size; its size is
            what remains)
    SELECT of the master-station application: 00 A4 04 00 07 F0 47 57 44 4D 53 43 (an AID of
            ours, category F = proprietary, "GWDMSC")
    GET RESPONSE: 00 C0 00 00 Le

Answers: output fields concatenated in the seed's order, then SW1 SW2. As a T=0 card does, the
card answers a case-4 command with ``61xx`` (xx bytes wait for GET RESPONSE) and a case-2 command
whose Le is not the output size with ``6Cxx`` (re-send with Le = xx). Error status words map to
the library's codes (:data:`SW_FOR_CODE`). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import ReaderFramingError
from .esam import (
    DEVICE_OPEN_FAILED,
    ENCRYPTION_FAILED,
    FUNCTIONS,
    INFRARED_MISMATCH,
    MAC_CHECK_FAILED,
    MAC_FAILED,
    NOT_MASTER_CARD,
    RANDOM_FAILED,
    UNKNOWN_ARGUMENT,
    UNKNOWN_FUNCTION,
    EsamError,
    output_sizes,
)

CLA: Final = 0x80
CHAINING_BIT: Final = 0x10
INS_SELECT: Final = 0xA4
INS_GET_RESPONSE: Final = 0xC0
MAX_LC: Final = 255

MASTER_CARD_AID: Final = bytes.fromhex("F04757444D5343")
"""Our AID of the master-station application (ISO 7816-5 category F: proprietary)."""

SELECT_MASTER_CARD: Final = bytes([0x00, INS_SELECT, 0x04, 0x00, len(MASTER_CARD_AID)]) + (
    MASTER_CARD_AID
)

SW_OK: Final = 0x9000

READER_FUNCTIONS: Final = ("open_device", "close_device")
"""Functions the reader does itself (power on + SELECT, power off); the card runs the rest."""

CARD_FUNCTIONS: Final[tuple[str, ...]] = tuple(
    name for name in FUNCTIONS if name not in READER_FUNCTIONS
)

INS_FOR_FUNCTION: Final[dict[str, int]] = {
    name: 0x30 + number
    for number, name in enumerate(FUNCTIONS, start=1)
    if name not in READER_FUNCTIONS
}
FUNCTION_FOR_INS: Final[dict[int, str]] = {ins: name for name, ins in INS_FOR_FUNCTION.items()}

SW_FOR_CODE: Final[dict[int, int]] = {
    UNKNOWN_FUNCTION: 0x6D00,  # ISO: INS not supported
    DEVICE_OPEN_FAILED: 0x6985,  # ISO: conditions of use not satisfied (application not selected)
    NOT_MASTER_CARD: 0x6A82,  # ISO: application not found (answer to SELECT)
    RANDOM_FAILED: 0x6F06,  # ours
    700: 0x6F07,  # ours: key export failed
    MAC_CHECK_FAILED: 0x6988,  # ISO / PBOC: secure-messaging data incorrect (MAC wrong)
    ENCRYPTION_FAILED: 0x6F00,  # ISO: no precise diagnosis
    MAC_FAILED: 0x6F02,  # ours
    INFRARED_MISMATCH: 0x6300,  # ISO: verification failed
    UNKNOWN_ARGUMENT: 0x6F10,  # ours: 6F10 + N is argument N wrong
    **{UNKNOWN_ARGUMENT + n: 0x6F10 + n for n in range(1, 9)},
}
"""Status word the card answers for each library code; every other error SW means 900."""

CODE_FOR_SW: Final[dict[int, int]] = {sw: code for code, sw in SW_FOR_CODE.items()}


# --- argument layout -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ApduField:
    """One argument in the APDU data: its name, kind and size (None: the variable one)."""

    name: str
    kind: str
    size: int | None


def _layout(function: str) -> tuple[ApduField, ...]:
    fields = []
    for arg in FUNCTIONS[function].arguments:
        if arg.kind == "int":
            fields.append(ApduField(arg.name, "int", 1))
        elif len(arg.sizes) == 1:
            fields.append(ApduField(arg.name, "hex", arg.sizes[0]))
        else:
            fields.append(ApduField(arg.name, "hex", None))
    if sum(field.size is None for field in fields) > 1:
        raise AssertionError(f"{function}: more than one variable-size argument")
    return tuple(fields)


LAYOUT: Final[dict[str, tuple[ApduField, ...]]] = {name: _layout(name) for name in CARD_FUNCTIONS}


def encode_arguments(function: str, args: Mapping[str, Any]) -> bytes:
    """The APDU data of ``function`` for validated (normalised) ``args``."""
    parts = []
    for field in LAYOUT[function]:
        value = args[field.name]
        parts.append(bytes([value]) if field.kind == "int" else bytes(value))
    return b"".join(parts)


def decode_arguments(function: str, data: bytes) -> dict[str, Any]:
    """The arguments in ``data`` as the command takes them (ints, uppercase hex strings).

    Raises :class:`ReaderFramingError` (reason ``apdu``) when the sizes do not add up; the values
    themselves are checked afterwards by :func:`gatewayd.protocols.esam.validate_arguments`.
    """
    layout = LAYOUT[function]
    fixed = sum(field.size or 0 for field in layout)
    variable = len(data) - fixed
    has_variable = any(field.size is None for field in layout)
    if variable < 0 or (variable and not has_variable) or (has_variable and variable == 0):
        raise ReaderFramingError("apdu", f"{function}: {len(data)} data bytes do not fit")
    result: dict[str, Any] = {}
    position = 0
    for field in layout:
        size = field.size if field.size is not None else variable
        chunk = data[position : position + size]
        position += size
        result[field.name] = chunk[0] if field.kind == "int" else chunk.hex().upper()
    return result


# --- command and response APDUs ------------------------------------------------------------------


def expects_output(function: str) -> bool:
    """True when the function answers data (all but mac_check)."""
    return any(out.size is not None for out in FUNCTIONS[function].outputs)


def command_apdus(function: str, args: Mapping[str, Any]) -> list[bytes]:
    """The APDUs that send ``function`` with validated ``args``: chained parts, then the last."""
    ins = INS_FOR_FUNCTION[function]
    data = encode_arguments(function, args)
    le = b"\x00" if expects_output(function) else b""
    if not data:
        return [bytes([CLA, ins, 0, 0]) + (le or b"\x00")]
    parts = [data[i : i + MAX_LC] for i in range(0, len(data), MAX_LC)]
    apdus = [bytes([CLA | CHAINING_BIT, ins, 0, 0, len(part)]) + part for part in parts[:-1]]
    apdus.append(bytes([CLA, ins, 0, 0, len(parts[-1])]) + parts[-1] + le)
    return apdus


def get_response(length: int) -> bytes:
    """GET RESPONSE for ``length`` bytes (1..256)."""
    return bytes([0x00, INS_GET_RESPONSE, 0x00, 0x00, length & 0xFF])


def with_le(apdu: bytes, length: int) -> bytes:
    """``apdu`` (which ends with its Le byte) re-sent with Le = ``length`` (the 6Cxx rule)."""
    return apdu[:-1] + bytes([length & 0xFF])


def split_response(response: bytes) -> tuple[bytes, int]:
    """``(data, SW)`` of a response APDU; ReaderFramingError when it is shorter than SW1 SW2."""
    if len(response) < 2:
        raise ReaderFramingError("apdu", f"response APDU of {len(response)} bytes has no SW")
    return response[:-2], int.from_bytes(response[-2:], "big")


def error_for_sw(sw: int, function: str) -> EsamError:
    """The library error a status word stands for (900 for a status word we do not know)."""
    code = CODE_FOR_SW.get(sw)
    if code is None:
        return EsamError(
            ENCRYPTION_FAILED, "card_status", f"{function}: the card answered SW {sw:04X}"
        )
    argument = None
    if 1501 <= code <= 1508 and function in FUNCTIONS:
        arguments = FUNCTIONS[function].arguments
        if code - 1500 <= len(arguments):
            argument = arguments[code - 1501].name
    return EsamError(
        code, "card", f"{function}: the card refused (SW {sw:04X}, code {code})", argument=argument
    )


def sw_for_error(error: EsamError) -> int:
    """The status word the card answers for ``error`` (6F00 for a code without its own SW)."""
    return SW_FOR_CODE.get(error.code, SW_FOR_CODE[ENCRYPTION_FAILED])


def encode_outputs(function: str, result: Mapping[str, Any]) -> bytes:
    """The card's answer data for a backend result: the hex output fields, concatenated."""
    return b"".join(
        bytes.fromhex(result[out.name])
        for out in FUNCTIONS[function].outputs
        if out.size is not None
    )


def decode_outputs(function: str, args: Mapping[str, Any], data: bytes) -> dict[str, Any]:
    """The function's result from the card's answer data (sizes from the validated ``args``).

    Raises :class:`EsamError` 900 when the answer does not have the expected size.
    """
    sizes = output_sizes(function, args)
    if not expects_output(function):
        if data:
            raise EsamError(ENCRYPTION_FAILED, "card_answer", f"{function}: unexpected answer data")
        return {"valid": True}
    expected = sum(size or 0 for size in sizes.values())
    if len(data) != expected:
        raise EsamError(
            ENCRYPTION_FAILED,
            "card_answer",
            f"{function}: the card answered {len(data)} bytes, expected {expected}",
        )
    result: dict[str, Any] = {}
    position = 0
    for name, size in sizes.items():
        result[name] = data[position : position + (size or 0)].hex().upper()
        position += size or 0
    return result
