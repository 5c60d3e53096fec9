"""The interface every ESAM backend offers: the 20 library functions as plain, blocking methods.

Why: the plugin should not care whether answers come from the software simulation or from a card
in a serial reader. Each method takes the arguments :func:`validate_arguments` returns (bytes and
ints, keyword-only, named as the commands' arguments) and returns the result dict (uppercase hex
strings, or ``{"valid": True}``), or raises :class:`EsamError` with the library's code.
:meth:`EsamBackend.call` is the single entry point: validate, then dispatch.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gatewayd.protocols.esam import FUNCTIONS, EsamError, call_context, validate_arguments

Result = dict[str, Any]


class EsamBackend(ABC):
    """One method per library function; implementations may block (a serial reader does)."""

    def call(self, function: str, args: Mapping[str, Any]) -> Result:
        """Validate ``args`` for ``function`` as the library does, then run it."""
        normalised = validate_arguments(function, args)
        return getattr(self, FUNCTIONS[function].name)(**normalised)

    @abstractmethod
    def open_device(self, *, reader_type: int = 0) -> Result:
        """Connect the reader / card (202 open failed, 301 reset, 302 not a master card)."""

    @abstractmethod
    def close_device(self) -> Result:
        """Disconnect (203 close failed)."""

    @abstractmethod
    def identity_authentication(self, *, flag: int, div: bytes) -> Result:
        """``{"rand": R1(8), "endata": K1(8)}``."""

    @abstractmethod
    def user_control(
        self, *, flag: int, rand: bytes, div: bytes, esam_no: bytes, data: bytes
    ) -> Result:
        """``{"endata": cipher(16) ‖ MAC(4)}``."""

    @abstractmethod
    def parameter_update(
        self, *, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes
    ) -> Result:
        """``{"data": data ‖ MAC(4)}``."""

    @abstractmethod
    def price1_update(
        self, *, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes
    ) -> Result:
        """``{"data": data ‖ MAC(4)}``."""

    @abstractmethod
    def price2_update(
        self, *, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes
    ) -> Result:
        """``{"data": data ‖ MAC(4)}``."""

    @abstractmethod
    def parameter_else_update(
        self, *, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes
    ) -> Result:
        """``{"endata": cipher ‖ MAC(4)}``, Lc bytes in all."""

    @abstractmethod
    def increase_purse(self, *, flag: int, rand: bytes, div: bytes, data: bytes) -> Result:
        """``{"data": amount ‖ count ‖ MAC1 ‖ customer ‖ MAC2}`` (22 bytes)."""

    @abstractmethod
    def init_purse(self, *, flag: int, rand: bytes, div: bytes, data: bytes) -> Result:
        """``{"data": amount ‖ MAC1 ‖ 00000000 ‖ MAC2}`` (16 bytes)."""

    @abstractmethod
    def key_update_v2(
        self,
        *,
        key_sum: int,
        key_state: bytes,
        key_id: bytes,
        rand: bytes,
        div: bytes,
        esam_no: bytes,
    ) -> Result:
        """``{"data": N × (info(4) ‖ cipher(32)) ‖ MAC(4)}``."""

    @abstractmethod
    def data_clear1(self, *, flag: int, rand: bytes, div: bytes, data: bytes) -> Result:
        """``{"data": cipher(16) ‖ MAC(4)}``."""

    @abstractmethod
    def infrared_rand(self) -> Result:
        """``{"rand1": R1(8)}``."""

    @abstractmethod
    def infrared_auth(
        self,
        *,
        flag: int,
        div: bytes,
        esam_no: bytes,
        rand1: bytes,
        rand1_endata: bytes,
        rand2: bytes,
    ) -> Result:
        """``{"rand2_endata": K2(8)}``; 1100 when the meter's K1 does not match."""

    @abstractmethod
    def mac_check(
        self, *, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes, mac: bytes
    ) -> Result:
        """``{"valid": True}``; 810 when the MAC is wrong."""

    @abstractmethod
    def mac_write(
        self,
        *,
        flag: int,
        rand: bytes,
        div: bytes,
        esam_no: bytes,
        file_id: bytes,
        data_begin: bytes,
        data: bytes,
    ) -> Result:
        """``{"data": data ‖ MAC(4)}``."""

    @abstractmethod
    def enc_mac_write(
        self,
        *,
        flag: int,
        rand: bytes,
        div: bytes,
        esam_no: bytes,
        file_id: bytes,
        data_begin: bytes,
        data: bytes,
    ) -> Result:
        """``{"data": cipher ‖ MAC(4)}``."""

    @abstractmethod
    def enc_for_compare(self, *, key_index: bytes, div: bytes, data: bytes) -> Result:
        """``{"data": cipher(64)}``."""

    @abstractmethod
    def decrease_purse(self, *, flag: int, rand: bytes, div: bytes, data: bytes) -> Result:
        """``{"endata": cipher(16) ‖ MAC(4)}``."""

    @abstractmethod
    def switch_charge_mode(self, *, flag: int, rand: bytes, div: bytes, data: bytes) -> Result:
        """``{"data": mode ‖ MAC1 ‖ amount ‖ count ‖ MAC2}`` (17 bytes)."""


def hex_upper(data: bytes) -> str:
    """Uppercase hex, as the library writes its outputs."""
    return data.hex().upper()


@dataclass(frozen=True)
class Operation:
    """The outcome of one backend call and the non-secret facts of its ``esam.operation`` event."""

    function: str
    flag: int | None
    meter: str | None
    code: int
    duration: float
    result: Result | None = None
    error: EsamError | None = None

    def event_data(self) -> dict[str, Any]:
        """``function``, ``flag``, ``meter``, ``code`` (0 = success) and ``duration_ms``."""
        return {
            "function": self.function,
            "flag": self.flag,
            "meter": self.meter,
            "code": self.code,
            "duration_ms": round(self.duration * 1000, 3),
        }


def run_operation(
    backend: EsamBackend,
    function: str,
    args: Mapping[str, Any],
    clock: Callable[[], float] = time.monotonic,
) -> Operation:
    """Call ``backend.call(function, args)`` and record the outcome; raises nothing but bugs.

    The event facts come from :func:`call_context` (function, flag, meter number from ``div``),
    never from results or keys.
    """
    context = call_context(function, args)
    started = clock()
    try:
        result = backend.call(function, args)
    except EsamError as error:
        return Operation(**context, code=error.code, duration=clock() - started, error=error)
    return Operation(**context, code=0, duration=clock() - started, result=result)
