"""The meter side of the simulation: what a meter's ESAM does with the soft backend's output.

Why: the soft backend's answers only mean something if a meter accepts them. :class:`SoftMeter`
holds the same master keys (as a meter's ESAM holds its dispersed keys), runs the meter's half of
each exchange (identity and infrared authentication, MAC verification, decryption, key update,
read-back MACs, program compare) and refuses tampered input with :class:`MeterRefusal`. Tests use
it end to end; a DL/T 645 meter simulator can use it as its ESAM. Same convention, no SM1.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce

from gatewayd.protocols.esam import class2_p1
from gatewayd.protocols.esam_crypto import PROFILES, PaddingError, xor_bytes

from . import convention as cv
from .keys import EsamKeys

Randomness = Callable[[int], bytes]


class MeterRefusal(Exception):
    """The simulated meter refuses a command; ``reason`` is one word (``mac``, ``auth``, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class InstalledKey:
    """One key a key update delivered, as the meter's ESAM would install it."""

    key_sum: int
    slot: int
    state: int
    key: bytes

    def __repr__(self) -> str:
        return f"InstalledKey(key_sum={self.key_sum}, slot={self.slot:02X}, state={self.state})"


class SoftMeter:
    """A meter: number ``meter_number`` (12 hex digits), ESAM serial ``esam_no``, key state flag.

    Identity authentication (:meth:`authenticate`) opens the session whose R2 protects the later
    writes; :meth:`infrared_query` / :meth:`infrared_authenticate` are the infrared pair.
    """

    def __init__(
        self,
        keys: EsamKeys,
        meter_number: str,
        esam_no: bytes,
        flag: int = 0,
        randomness: Randomness = secrets.token_bytes,
    ) -> None:
        if len(meter_number) != 12:
            raise ValueError("meter_number must be 12 hex digits")
        self.keys = keys
        self.profile = PROFILES[keys.profile]
        self.div = bytes(2) + bytes.fromhex(meter_number)
        self.esam_no = esam_no
        self.flag = flag
        self._randomness = randomness
        self.r1: bytes | None = None
        self.r2: bytes | None = None
        self._infrared_r2: bytes | None = None
        self.infrared_authenticated = False

    def __repr__(self) -> str:
        return f"<SoftMeter {self.div[2:].hex().upper()} flag={self.flag}>"

    # --- keys and MACs -------------------------------------------------------------------------

    def _key(self, function: str, state: int | None = None) -> bytes:
        return cv.session_key(
            self.profile,
            self.keys,
            self.flag if state is None else state,
            function,
            self.div,
            self.esam_no,
        )

    def _session_rand(self) -> bytes:
        if self.r2 is None:
            raise MeterRefusal("auth", "no identity authentication in force")
        return self.r2

    def _verify(
        self, key: bytes, header: bytes, body: bytes, mac: bytes, rand: bytes | None = None
    ) -> None:
        expected = self.profile.mac(
            key, self._session_rand() if rand is None else rand, header + body
        )
        if not secrets.compare_digest(expected, mac):
            raise MeterRefusal("mac", "ESAM verification failed (MAC)")

    def _decrypt(self, key: bytes, cipher: bytes) -> bytes:
        try:
            return self.profile.decrypt(key, cipher)
        except PaddingError:
            raise MeterRefusal("decrypt", "ESAM decryption failed") from None

    # --- authentication ------------------------------------------------------------------------

    def authenticate(self, r1: bytes, k1: bytes) -> tuple[bytes, bytes]:
        """070000FF: check K1 = E(DK_01, R1); return (R2 of 4 bytes, ESAM serial)."""
        key = cv.session_key(
            self.profile, self.keys, self.flag, "identity_authentication", self.div
        )
        if not secrets.compare_digest(self.profile.challenge_response(key, r1), k1):
            self.r1 = self.r2 = None
            raise MeterRefusal("auth", "identity authentication failed")
        self.r1, self.r2 = r1, self._randomness(4)
        return self.r2, self.esam_no

    def infrared_query(self, r1: bytes) -> tuple[str, bytes, bytes, bytes]:
        """078003FF: return (meter number, ESAM serial, K1 = E(DK'_0C, R1), R2 of 8 bytes)."""
        key = self._key("infrared_auth")
        self._infrared_r2 = self._randomness(8)
        self.infrared_authenticated = False
        return (
            self.div[2:].hex().upper(),
            self.esam_no,
            self.profile.challenge_response(key, r1),
            self._infrared_r2,
        )

    def infrared_authenticate(self, k2: bytes) -> None:
        """070003FF: accept K2 = E(DK'_0C, R2) of the last query, else refuse."""
        if self._infrared_r2 is None:
            raise MeterRefusal("auth", "no infrared query before authentication")
        expected = self.profile.challenge_response(self._key("infrared_auth"), self._infrared_r2)
        self.infrared_authenticated = secrets.compare_digest(expected, k2)
        if not self.infrared_authenticated:
            raise MeterRefusal("auth", "infrared authentication failed")

    # --- writes --------------------------------------------------------------------------------

    def accept_user_control(self, endata: bytes) -> bytes:
        """1C: verify and decrypt the 20-byte block; return the 8-byte command plaintext."""
        key = self._key("user_control")
        cipher, mac = endata[:-4], endata[-4:]
        self._verify(key, cv.USER_CONTROL_HEADER, cipher, mac)
        return self._decrypt(key, cipher)

    def accept_data_clear(self, data: bytes) -> bytes:
        """1A/19/1B: verify and decrypt; return the 8- or 12-byte clear plaintext."""
        key = self._key("data_clear1")
        cipher, mac = data[:-4], data[-4:]
        self._verify(key, cv.DATA_CLEAR_HEADER, cipher, mac)
        return self._decrypt(key, cipher)

    def accept_class1(self, apdu: bytes, data: bytes, function: str = "parameter_update") -> bytes:
        """14 plaintext level: the ESAM executes ``apdu ‖ data ‖ MAC``; return the data."""
        body, mac = data[:-4], data[-4:]
        if apdu[4] != len(data):
            raise MeterRefusal("length", "Lc does not match data + MAC")
        self._verify(self._key(function), apdu, body, mac)
        return body

    def accept_class2(self, apdu: bytes, endata: bytes) -> bytes:
        """14 ciphertext level: verify, decrypt, check length and P1; return DI ‖ value."""
        key = self._key("parameter_else_update")
        cipher, mac = endata[:-4], endata[-4:]
        if apdu[4] != len(endata):
            raise MeterRefusal("length", "Lc does not match cipher + MAC")
        self._verify(key, apdu, cipher, mac)
        plain = self._decrypt(key, cipher)
        length, data = int.from_bytes(plain[:2], "big"), plain[2:]
        if length != len(data) or len(data) < 4:
            raise MeterRefusal("length", "stored length does not match the data")
        if apdu[2] != class2_p1(data[1]):
            raise MeterRefusal("file", "P1 does not match the DI's parameter file")
        return data

    def accept_file_write(self, data_begin: bytes, data: bytes, encrypted: bool) -> bytes:
        """070004FF / 070005FF: verify (and decrypt); return the plaintext written."""
        function = "enc_mac_write" if encrypted else "mac_write"
        key = self._key(function)
        body, mac = data[:-4], data[-4:]
        self._verify(key, cv.file_write_header(data_begin, len(body)), body, mac)
        return self._decrypt(key, body) if encrypted else body

    # --- purse ---------------------------------------------------------------------------------

    def accept_increase_purse(self, data: bytes) -> tuple[int, int, bytes]:
        """070101FF/070102FF: verify both MACs; return (amount, count, customer number)."""
        key = self._key("increase_purse")
        money, mac1, customer, mac2 = data[:8], data[8:12], data[12:18], data[18:22]
        self._verify(key, cv.CUSTOMER_NUMBER_HEADER, customer, mac2)
        self._verify(key, cv.PURSE_INCREASE_HEADER, money, mac1)
        return int.from_bytes(money[:4], "big"), int.from_bytes(money[4:], "big"), customer

    def accept_init_purse(self, data: bytes) -> int:
        """070103FF: verify both record MACs (count must be 0); return the preset amount."""
        key = self._key("init_purse")
        amount, mac1, count, mac2 = data[:4], data[4:8], data[8:12], data[12:16]
        self._verify(key, cv.PURSE_AMOUNT_HEADER, amount, mac1)
        self._verify(key, cv.PURSE_COUNT_HEADER, count, mac2)
        if count != bytes(4):
            raise MeterRefusal("count", "purse initialisation needs purchase count 0")
        return int.from_bytes(amount, "big")

    def accept_decrease_purse(self, endata: bytes) -> int:
        """Refund: verify and decrypt; return the refund amount."""
        key = self._key("decrease_purse")
        cipher, mac = endata[:-4], endata[-4:]
        self._verify(key, cv.REFUND_HEADER, cipher, mac)
        plain = self._decrypt(key, cipher)
        if len(plain) != 4:
            raise MeterRefusal("length", "refund amount is not 4 bytes")
        return int.from_bytes(plain, "big")

    def accept_switch_charge_mode(self, data: bytes) -> tuple[int, int, int]:
        """07A006FF: verify both MACs; return (mode, amount, count)."""
        key = self._key("switch_charge_mode")
        mode, mac1, money, mac2 = data[:1], data[1:5], data[5:13], data[13:17]
        self._verify(key, cv.CHARGE_MODE_HEADER, mode, mac1)
        self._verify(key, cv.PURSE_RECORD_HEADER, money, mac2)
        return mode[0], int.from_bytes(money[:4], "big"), int.from_bytes(money[4:], "big")

    # --- key update, read-back, compare ----------------------------------------------------------

    def accept_key_update(self, data: bytes) -> list[InstalledKey]:
        """070301FF: verify the MAC over div ‖ XOR of the blocks, decrypt and check each key."""
        count, rest = divmod(len(data) - 4, 36)
        if rest or not 1 <= count <= 4:
            raise MeterRefusal("length", "key update data is not N × 36 + 4 bytes")
        blocks = [data[i * 36 : (i + 1) * 36] for i in range(count)]
        key = self._key("key_update_v2", state=self.flag)
        self._verify(key, cv.KEY_UPDATE_HEADER, self.div + reduce(xor_bytes, blocks), data[-4:])
        installed = []
        for block in blocks:
            info, cipher = block[:4], block[4:]
            plain = self._decrypt(key, cipher)
            if len(plain) != 20 or plain[:4] != info:
                raise MeterRefusal("key", "key ciphertext does not carry its key information")
            if cv.key_update_protecting_state(info[3]) != self.flag:
                raise MeterRefusal("key", "key state does not follow the meter's state")
            installed.append(InstalledKey(info[0], info[2], info[3], plain[4:]))
        return installed

    def read_back(self, offset: int, data: bytes) -> tuple[bytes, bytes]:
        """078001FF: return (``04D686 P2 Lc`` for ``mac_check``, MAC(DK_0D) with IV R1[0:4])."""
        if self.r1 is None:
            raise MeterRefusal("auth", "no identity authentication in force")
        apdu = bytes([0x04, 0xD6, 0x86, offset, len(data) + 12])
        key = cv.session_key(self.profile, self.keys, self.flag, "mac_check", self.div)
        return apdu, self.profile.mac(key, self.r1[:4], apdu + data)

    def program_compare(
        self, key_index: int, factor: bytes, data: bytes, state: str = cv.COMPARE_KEY_STATE
    ) -> bytes:
        """078002FF: encrypt the 64-byte XOR block with the compare key dispersed by ``factor``."""
        key = cv.meter_key(self.profile, self.keys, state, key_index, factor)
        return self.profile.encrypt_blocks(key, data)
