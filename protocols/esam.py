"""The ESAM master-station functions: names, argument rules, output sizes and error codes.

Why: the plugin's commands, the software backend and a future card-reader backend share one
description of the 20 functions of the CSG 2015 prepaid-meter master-station library (the seed's
DKQ-05 kit; the same API as ``MasterStation_HSM.dll``). Arguments are listed in the seed's order
because its error 150N means "argument N is wrong". :func:`validate_arguments` turns the command's
JSON arguments (hex strings, integers) into bytes and ints, or raises :class:`EsamError` with the
code the library would return. Pure: no I/O and no cryptography.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from .errors import ProtocolError

# --- errors -----------------------------------------------------------------------------------

ERROR_TEXT: Final[dict[int, str]] = {
    -1: "function not available (library call error)",
    202: "cannot open the device",
    203: "cannot close the device",
    301: "card reset failed",
    302: "card select failed (not a master-station card)",
    306: "random number failed",
    700: "key export failed",
    810: "MAC check failed",
    900: "data encryption failed",
    902: "MAC computation failed",
    1100: "infrared authentication: the meter's ciphertext does not match",
    1500: "argument not taken by this function",
    **{1500 + n: f"argument {n} is wrong" for n in range(1, 9)},
    1601: "unsupported device type",
}
"""Codes of the seed (202, 203, 301, 302, 1501..1508) and of the HSM build of the same API.

1500 is ours (an argument name the function does not take). -1 is the library's "call error",
used here for a function name that does not exist.
"""

UNKNOWN_FUNCTION: Final = -1
DEVICE_OPEN_FAILED: Final = 202
DEVICE_CLOSE_FAILED: Final = 203
CARD_RESET_FAILED: Final = 301
NOT_MASTER_CARD: Final = 302
RANDOM_FAILED: Final = 306
MAC_CHECK_FAILED: Final = 810
ENCRYPTION_FAILED: Final = 900
MAC_FAILED: Final = 902
INFRARED_MISMATCH: Final = 1100
UNKNOWN_ARGUMENT: Final = 1500


class EsamError(ProtocolError):
    """A refused ESAM call: ``code`` is the library's number (150N: argument N), ``reason`` a word.

    ``argument`` names the offending argument for argument errors. Messages never carry key
    material or derived keys.
    """

    def __init__(self, code: int, reason: str, message: str, *, argument: str | None = None):
        super().__init__(reason, message)
        self.code = code
        self.argument = argument

    @property
    def is_argument_error(self) -> bool:
        """True for the caller's mistakes (1500..1508, unknown function): a 4xx, not a 5xx."""
        return self.code == UNKNOWN_FUNCTION or 1500 <= self.code <= 1508

    def __repr__(self) -> str:
        return f"EsamError({self.code}, {self.reason!r}, {self.message!r})"


def argument_error(position: int, name: str, problem: str) -> EsamError:
    """The library's 150N error for argument ``name`` at 1-based ``position``."""
    return EsamError(
        1500 + position, "argument", f"argument {position} ({name}): {problem}", argument=name
    )


# --- argument and output specifications ---------------------------------------------------------

ArgKind = Literal["int", "hex"]
_HEX = re.compile(r"[0-9A-Fa-f]*")
_DECIMAL = re.compile(r"[0-9]{1,3}")


@dataclass(frozen=True)
class ArgSpec:
    """One input of a function: the command's argument name, the seed's name and its rules.

    ``hex`` arguments become ``bytes`` whose length is in ``sizes`` or within ``min_bytes`` ..
    ``max_bytes``; ``int`` arguments become ``int``. ``values`` restricts an int, or the value of a
    one-byte hex argument. ``default`` makes an argument optional.
    """

    name: str
    seed_name: str
    kind: ArgKind = "hex"
    sizes: tuple[int, ...] = ()
    min_bytes: int = 0
    max_bytes: int = 0
    values: frozenset[int] | None = None
    default: int | None = None
    description: str = ""

    def describe_size(self) -> str:
        """The accepted size in words, for documentation and error messages."""
        if self.kind == "int":
            return "integer"
        if self.sizes:
            return " or ".join(str(n) for n in self.sizes) + " bytes"
        return f"{self.min_bytes}..{self.max_bytes} bytes"

    def normalise(self, value: Any, position: int) -> bytes | int:
        """Return the argument as bytes / int, or raise the library's 150N error."""
        if self.kind == "int":
            number = _to_int(value)
            if number is None:
                raise argument_error(position, self.name, "not an integer")
            if self.values is not None and number not in self.values:
                raise argument_error(position, self.name, f"value {number} is not allowed")
            return number
        raw = _to_bytes(value)
        if raw is None:
            raise argument_error(position, self.name, "not an even-length hex string")
        if self.sizes:
            if len(raw) not in self.sizes:
                raise argument_error(
                    position, self.name, f"{len(raw)} bytes, expected {self.describe_size()}"
                )
        elif not self.min_bytes <= len(raw) <= self.max_bytes:
            raise argument_error(
                position, self.name, f"{len(raw)} bytes, expected {self.describe_size()}"
            )
        if self.values is not None and raw[0] not in self.values:
            raise argument_error(position, self.name, f"value {raw.hex().upper()} is not allowed")
        return raw


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return int(value)
    return None


def _to_bytes(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and len(value) % 2 == 0 and _HEX.fullmatch(value):
        return bytes.fromhex(value)
    return None


OutputSize = int | Callable[[Mapping[str, Any]], int] | None


@dataclass(frozen=True)
class OutputSpec:
    """One result field: its name and its size in bytes (a function of the arguments, or None)."""

    name: str
    size: OutputSize
    description: str = ""

    def size_for(self, args: Mapping[str, Any]) -> int | None:
        """The size in bytes for these (normalised) arguments; None for a non-hex result."""
        return self.size(args) if callable(self.size) else self.size


@dataclass(frozen=True)
class FunctionSpec:
    """One library function: its arguments in the seed's order, allowed flags, outputs, checks."""

    name: str
    seed_name: str
    summary: str
    arguments: tuple[ArgSpec, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()
    flags: frozenset[int] = frozenset({0, 1})
    check: Callable[[FunctionSpec, Mapping[str, Any]], None] | None = None

    def position(self, name: str) -> int:
        """The 1-based position of argument ``name`` (its error is 1500 + position)."""
        for index, arg in enumerate(self.arguments, start=1):
            if arg.name == name:
                return index
        raise KeyError(name)

    def fail(self, name: str, problem: str) -> EsamError:
        """The 150N error for argument ``name`` of this function."""
        return argument_error(self.position(name), name, problem)


# --- the seed's layout rules --------------------------------------------------------------------

CLASS1_MAX_DATA: Final = 251  # Lc = len + 4 <= 255
CLASS2_MAX_DATA: Final = 237  # Lc = roundup16(len + 3) + 4 <= 255
READBACK_MAX_DATA: Final = 243  # Lc = len + 4 (MAC) + 8 (div) <= 255
FILE_MAX_DATA: Final = 0x95
MAX_KEYS_PER_CALL: Final = 4
MAX_KEY_SUM: Final = 17


def class2_lc(data_length: int) -> int:
    """Lc of a class-2 parameter write: (len(data) + 3 rounded up to 16) + 4 (the seed, §8)."""
    return (data_length + 3 + 15) // 16 * 16 + 4


def class2_p1(di2: int) -> int:
    """P1 of a class-2 parameter write: file 88, 89, 90, 91 or 92 for DI2 mod 5 = 0..4.

    The seed lists the P1 bytes 88, 89, 90, 91, 92 (hex, as written in the APDU), i.e. 88 + n
    counted in decimal digits; zaxai/MeterCommServer builds the same bytes for CSG meters.
    """
    return int(str(88 + di2 % 5), 16)


def meter_number_from_div(div: bytes | str | None) -> str | None:
    """The 12-digit meter number of a dispersal factor ``0000`` ‖ meter number, else None."""
    raw = _to_bytes(div) if div is not None else None
    if raw is None or len(raw) != 8 or raw[:2] != b"\x00\x00":
        return None
    return raw[2:].hex().upper()


# --- cross-argument checks ------------------------------------------------------------------------


def _check_class1(spec: FunctionSpec, args: Mapping[str, Any]) -> None:
    apdu, data = args["apdu"], args["data"]
    if apdu[:2] != b"\x04\xd6":
        raise spec.fail("apdu", "must start with 04D6 (UPDATE BINARY with MAC)")
    if apdu[4] != len(data) + 4:
        raise spec.fail("apdu", f"Lc must be {len(data) + 4:02X} (data + 4 MAC bytes)")


def _check_class2(spec: FunctionSpec, args: Mapping[str, Any]) -> None:
    apdu, data = args["apdu"], args["data"]
    if apdu[:2] != b"\x04\xd6":
        raise spec.fail("apdu", "must start with 04D6 (UPDATE BINARY with MAC)")
    expected_p1 = class2_p1(data[1])
    if apdu[2] != expected_p1:
        raise spec.fail("apdu", f"P1 must be {expected_p1:02X} for DI2 {data[1]:02X}")
    expected_lc = class2_lc(len(data))
    if apdu[4] != expected_lc:
        raise spec.fail("apdu", f"Lc must be {expected_lc:02X} for {len(data)} data bytes")


def _check_readback(spec: FunctionSpec, args: Mapping[str, Any]) -> None:
    apdu, data = args["apdu"], args["data"]
    if apdu[:3] != b"\x04\xd6\x86":
        raise spec.fail("apdu", "must be 04D686 P2 Lc")
    if apdu[4] != len(data) + 12:
        raise spec.fail("apdu", f"Lc must be {len(data) + 12:02X} (data + 4 MAC + 8 div)")


def _check_key_ids(spec: FunctionSpec, args: Mapping[str, Any]) -> None:
    ids, total = args["key_id"], args["key_sum"]
    if any(later <= earlier for earlier, later in zip(ids, ids[1:], strict=False)):
        raise spec.fail("key_id", "key ids must be in ascending order without repeats")
    if ids[-1] >= total:
        raise spec.fail("key_id", f"key id {ids[-1]:02X} is not below key_sum {total}")


# --- the function table ---------------------------------------------------------------------------

FLAG = ArgSpec(
    "flag",
    "Flag",
    "int",
    values=frozenset({0, 1}),
    description="meter key state: 0 test keys, 1 formal keys",
)
RAND = ArgSpec(
    "rand", "PutRand", sizes=(4,), description="R2 returned by the meter's identity auth"
)
DIV = ArgSpec("div", "PutDiv", sizes=(8,), description='dispersal factor "0000" + meter number')
ESAM_NO = ArgSpec("esam_no", "PutEsamNo", sizes=(8,), description="the meter's ESAM serial number")
APDU = ArgSpec("apdu", "PutApdu", sizes=(5,), description="ESAM command header CLA INS P1 P2 Lc")
CLASS1_DATA = ArgSpec(
    "data", "PutData", min_bytes=1, max_bytes=CLASS1_MAX_DATA, description="parameter plaintext"
)


def _fixed(*sizes: int, description: str = "") -> ArgSpec:
    return ArgSpec("data", "PutData", sizes=sizes, description=description)


def _plain_mac(args: Mapping[str, Any]) -> int:
    return len(args["data"]) + 4


def _cipher_mac(args: Mapping[str, Any]) -> int:
    return (len(args["data"]) + 1 + 15) // 16 * 16 + 4


def _class1(name: str, seed_name: str, summary: str) -> FunctionSpec:
    return FunctionSpec(
        name,
        seed_name,
        summary,
        (FLAG, RAND, DIV, APDU, CLASS1_DATA),
        (OutputSpec("data", _plain_mac, "data ‖ MAC(4)"),),
        check=_check_class1,
    )


def _file_write(name: str, seed_name: str, summary: str, output: OutputSpec) -> FunctionSpec:
    return FunctionSpec(
        name,
        seed_name,
        summary,
        (
            FLAG,
            RAND,
            DIV,
            ESAM_NO,
            ArgSpec("file_id", "PutFileID", sizes=(1,), description="file identifier"),
            ArgSpec("data_begin", "PutDataBegin", sizes=(2,), description="start offset"),
            ArgSpec(
                "data",
                "PutData",
                min_bytes=1,
                max_bytes=FILE_MAX_DATA,
                description="plaintext, at most 0x95 bytes",
            ),
        ),
        (output,),
    )


_FUNCTION_LIST: Final[tuple[FunctionSpec, ...]] = (
    FunctionSpec(
        "open_device",
        "OpenDevice",
        "connect the reader and the master-station card",
        (
            ArgSpec(
                "reader_type",
                "ReaderType",
                "int",
                values=frozenset({0}),
                default=0,
                description="0: DKQ-05 (the only type)",
            ),
        ),
    ),
    FunctionSpec("close_device", "CloseDevice", "disconnect the reader"),
    FunctionSpec(
        "identity_authentication",
        "IdentityAuthentication",
        "R1 and K1 for the meter's remote identity authentication (070000FF)",
        (FLAG, DIV),
        (OutputSpec("rand", 8, "R1"), OutputSpec("endata", 8, "K1 = E(DK, R1)")),
    ),
    FunctionSpec(
        "user_control",
        "UserControl",
        "remote trip / close / alarm command ciphertext (1C)",
        (
            FLAG,
            RAND,
            DIV,
            ESAM_NO,
            _fixed(8, description="N1 command, N2 00, N3..N8 deadline YYMMDDhhmmss"),
        ),
        (OutputSpec("endata", 20, "cipher(16) ‖ MAC(4)"),),
    ),
    _class1("parameter_update", "ParameterUpdate", "class-1 parameter plaintext + MAC (14)"),
    _class1("price1_update", "Price1Update", "current tariff set plaintext + MAC (14)"),
    _class1("price2_update", "Price2Update", "standby tariff set plaintext + MAC (14)"),
    FunctionSpec(
        "parameter_else_update",
        "ParameterElseUpdate",
        "class-2 parameter ciphertext + MAC (14)",
        (
            FLAG,
            RAND,
            DIV,
            APDU,
            ArgSpec(
                "data",
                "PutData",
                min_bytes=5,
                max_bytes=CLASS2_MAX_DATA,
                description="DI(4) ‖ value plaintext",
            ),
        ),
        (OutputSpec("endata", lambda a: class2_lc(len(a["data"])), "cipher(Lc - 4) ‖ MAC(4)"),),
        check=_check_class2,
    ),
    FunctionSpec(
        "increase_purse",
        "IncreasePurse",
        "open account / recharge (070101FF / 070102FF); formal keys only",
        (FLAG, RAND, DIV, _fixed(14, description="amount(4) ‖ count(4) ‖ customer number(6)")),
        (OutputSpec("data", 22, "amount ‖ count ‖ MAC1 ‖ customer ‖ MAC2"),),
        flags=frozenset({1}),
    ),
    FunctionSpec(
        "init_purse",
        "InitPurse",
        "purse initialisation (070103FF); test keys only",
        (FLAG, RAND, DIV, _fixed(4, description="preset amount")),
        (OutputSpec("data", 16, "amount ‖ MAC1 ‖ 00000000 ‖ MAC2"),),
        flags=frozenset({0}),
    ),
    FunctionSpec(
        "key_update_v2",
        "KeyUpdateV2",
        "key ciphertexts for key update (070301FF)",
        (
            ArgSpec(
                "key_sum",
                "PutKeySum",
                "int",
                values=frozenset(range(1, 18)),
                description="total number of keys, at most 17",
            ),
            ArgSpec(
                "key_state",
                "PutKeyState",
                sizes=(1,),
                values=frozenset({0, 1}),
                description="target state: 00 test, 01 formal",
            ),
            ArgSpec(
                "key_id",
                "PutKeyId",
                min_bytes=1,
                max_bytes=MAX_KEYS_PER_CALL,
                description="1..4 key ids 00..10, ascending, below key_sum",
            ),
            RAND,
            DIV,
            ESAM_NO,
        ),
        (
            OutputSpec(
                "data", lambda a: len(a["key_id"]) * 36 + 4, "N × (info(4) ‖ cipher(32)) ‖ MAC(4)"
            ),
        ),
        check=_check_key_ids,
    ),
    FunctionSpec(
        "data_clear1",
        "DataClear1",
        "meter / demand / event clear ciphertext (1A/19/1B)",
        (FLAG, RAND, DIV, _fixed(8, 12, description="clear command plaintext")),
        (OutputSpec("data", 20, "cipher(16) ‖ MAC(4)"),),
    ),
    FunctionSpec(
        "infrared_rand",
        "InfraredRand",
        "R1 for the infrared authentication query",
        (),
        (OutputSpec("rand1", 8, "R1"),),
    ),
    FunctionSpec(
        "infrared_auth",
        "InfraredAuth",
        "check the meter's K1, return K2 for infrared authentication (070003FF)",
        (
            FLAG,
            DIV,
            ESAM_NO,
            ArgSpec("rand1", "PutRand1", sizes=(8,), description="R1 from infrared_rand"),
            ArgSpec(
                "rand1_endata", "PutRand1Endata", sizes=(8,), description="K1 returned by the meter"
            ),
            ArgSpec("rand2", "PutRand2", sizes=(8,), description="R2 returned by the meter"),
        ),
        (OutputSpec("rand2_endata", 8, "K2 = E(DK, R2)"),),
    ),
    FunctionSpec(
        "mac_check",
        "MacCheck",
        "verify a read-back MAC (078001FF)",
        (
            FLAG,
            ArgSpec("rand", "PutRand", sizes=(4,), description="first 4 bytes of R1"),
            DIV,
            ArgSpec("apdu", "PutApdu", sizes=(5,), description="04D686 P2 Lc"),
            ArgSpec(
                "data",
                "PutData",
                min_bytes=1,
                max_bytes=READBACK_MAX_DATA,
                description="the read-back data",
            ),
            ArgSpec("mac", "PutMac", sizes=(4,), description="the read-back MAC"),
        ),
        (OutputSpec("valid", None, "true"),),
        check=_check_readback,
    ),
    _file_write(
        "mac_write",
        "MacWrite",
        "plaintext file write + MAC (070004FF)",
        OutputSpec("data", _plain_mac, "data ‖ MAC(4)"),
    ),
    _file_write(
        "enc_mac_write",
        "EncMacWrite",
        "ciphertext file write + MAC (070005FF)",
        OutputSpec("data", _cipher_mac, "cipher ‖ MAC(4)"),
    ),
    FunctionSpec(
        "enc_for_compare",
        "EncForCompare",
        "program compare ciphertext (078002FF)",
        (
            ArgSpec(
                "key_index",
                "PutKeyid",
                sizes=(1,),
                values=frozenset(range(5, 11)),
                description="compare key index 05..0A",
            ),
            ArgSpec(
                "div",
                "PutDiv",
                sizes=(8,),
                description="compare factor: XOR of the two 8-byte halves",
            ),
            _fixed(64, description="XOR of the four 64-byte data blocks"),
        ),
        (OutputSpec("data", 64, "ciphertext"),),
    ),
    FunctionSpec(
        "decrease_purse",
        "DecreasePurse",
        "purse refund ciphertext; formal keys only",
        (FLAG, RAND, DIV, _fixed(4, description="refund amount")),
        (OutputSpec("endata", 20, "cipher(16) ‖ MAC(4)"),),
        flags=frozenset({1}),
    ),
    FunctionSpec(
        "switch_charge_mode",
        "SwitchChargeMode",
        "charge-mode switch (07A006FF)",
        (FLAG, RAND, DIV, _fixed(9, description="mode(1) ‖ amount(4) ‖ count(4)")),
        (OutputSpec("data", 17, "mode ‖ MAC1 ‖ amount ‖ count ‖ MAC2"),),
    ),
)

FUNCTIONS: Final[dict[str, FunctionSpec]] = {spec.name: spec for spec in _FUNCTION_LIST}
"""The 20 functions by command name, in the seed's order."""


def validate_arguments(function: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Check a command's arguments as the library does; return them as bytes / ints.

    Arguments are checked in the seed's order and the first wrong one raises its 150N error;
    then the flag rule of the function (1501) and the cross-argument rules (Lc, P1, key ids).
    """
    spec = FUNCTIONS.get(function) if isinstance(function, str) else None
    if spec is None:
        raise EsamError(UNKNOWN_FUNCTION, "unknown_function", f"no ESAM function {function!r}")
    if not isinstance(args, Mapping):
        raise EsamError(UNKNOWN_ARGUMENT, "arguments", "arguments must be an object")
    known = {arg.name for arg in spec.arguments}
    for name in args:
        if name not in known:
            raise EsamError(
                UNKNOWN_ARGUMENT,
                "unknown_argument",
                f"{function} takes no argument {name!r}",
                argument=str(name),
            )
    result: dict[str, Any] = {}
    for position, arg in enumerate(spec.arguments, start=1):
        if arg.name in args:
            result[arg.name] = arg.normalise(args[arg.name], position)
        elif arg.default is not None:
            result[arg.name] = arg.default
        else:
            raise argument_error(position, arg.name, "missing")
    if "flag" in result and result["flag"] not in spec.flags:
        allowed = " or ".join(str(flag) for flag in sorted(spec.flags))
        raise spec.fail("flag", f"{function} needs flag {allowed}")
    if spec.check is not None:
        spec.check(spec, result)
    return result


def output_sizes(function: str, args: Mapping[str, Any]) -> dict[str, int | None]:
    """The byte size of each result field for these normalised arguments (None: not hex)."""
    return {out.name: out.size_for(args) for out in FUNCTIONS[function].outputs}


def call_context(function: str, args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The non-secret facts of a call for its ``esam.operation`` event, even for bad arguments.

    Returns ``function``, ``flag`` (int or None) and ``meter`` (the meter number from ``div``,
    None for the compare factor of ``enc_for_compare`` or when absent).
    """
    args = args if isinstance(args, Mapping) else {}
    flag = _to_int(args.get("flag"))
    meter = None if function == "enc_for_compare" else meter_number_from_div(args.get("div"))
    return {"function": function, "flag": flag if flag in (0, 1) else None, "meter": meter}
