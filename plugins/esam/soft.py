"""The software backend (``backend: soft``): a self-consistent simulation of the master card.

Why: without the DKQ-05 reader and its card (whose SM1 cryptograms no software can reproduce) the
plugin, its commands and a meter simulator still need a card that answers every function with the
real byte counts, the real argument rules and the real error codes. This backend computes with the
SM4 or 3DES profile of :mod:`gatewayd.protocols.esam_crypto` under the slot/header convention of
:mod:`.convention`; :class:`~.meter.SoftMeter` is its counterpart on the meter side.

Every method is pure computation (tens of microseconds), so the plugin can call it on the reactor
thread. Randomness comes from ``secrets.token_bytes`` unless a test injects its own.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from functools import reduce

from gatewayd.protocols.esam import (
    DEVICE_CLOSE_FAILED,
    DEVICE_OPEN_FAILED,
    INFRARED_MISMATCH,
    MAC_CHECK_FAILED,
    RANDOM_FAILED,
    EsamError,
)
from gatewayd.protocols.esam_crypto import PROFILES, CryptoProfile, xor_bytes

from . import convention as cv
from .backend import EsamBackend, Result, hex_upper
from .keys import EsamKeys

Randomness = Callable[[int], bytes]


class SoftBackend(EsamBackend):
    """The 20 functions computed in software from a key file's master keys.

    ``randomness(n)`` returns ``n`` random bytes (R1 of identity and infrared authentication).
    ``compare_key_state`` picks the key state of ``enc_for_compare``, which takes no flag.
    The device must be opened with :meth:`open_device` first (202 otherwise), as with the card.
    """

    def __init__(
        self,
        keys: EsamKeys,
        randomness: Randomness = secrets.token_bytes,
        compare_key_state: str = cv.COMPARE_KEY_STATE,
    ) -> None:
        self._keys = keys
        self._profile: CryptoProfile = PROFILES[keys.profile]
        self._randomness = randomness
        self._compare_state = compare_key_state
        self._open = False

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<SoftBackend profile={self._profile.name} {state}>"

    @property
    def is_open(self) -> bool:
        """True between :meth:`open_device` and :meth:`close_device`."""
        return self._open

    # --- helpers -----------------------------------------------------------------------------

    def _require_open(self) -> None:
        if not self._open:
            raise EsamError(DEVICE_OPEN_FAILED, "not_open", "the device is not open")

    def _key(self, function: str, flag: int, div: bytes, esam_no: bytes | None = None) -> bytes:
        self._require_open()
        return cv.session_key(self._profile, self._keys, flag, function, div, esam_no)

    def _random(self, size: int) -> bytes:
        try:
            value = self._randomness(size)
        except Exception:
            raise EsamError(RANDOM_FAILED, "random", "random number generation failed") from None
        if not isinstance(value, bytes) or len(value) != size:
            raise EsamError(RANDOM_FAILED, "random", "random number generation failed")
        return value

    def _mac(self, key: bytes, rand: bytes, header: bytes, body: bytes) -> bytes:
        return self._profile.mac(key, rand, header + body)

    # --- device ----------------------------------------------------------------------------------

    def open_device(self, *, reader_type: int = 0) -> Result:
        """Mark the simulated card present and selected; opening twice is harmless."""
        self._open = True
        return {}

    def close_device(self) -> Result:
        """Close; 203 when the device was not open."""
        if not self._open:
            raise EsamError(DEVICE_CLOSE_FAILED, "not_open", "the device is not open")
        self._open = False
        return {}

    # --- authentication ----------------------------------------------------------------------

    def identity_authentication(self, *, flag: int, div: bytes) -> Result:
        """R1 from the card's randomness and K1 = E(DK_01, R1)."""
        key = self._key("identity_authentication", flag, div)
        r1 = self._random(8)
        return {
            "rand": hex_upper(r1),
            "endata": hex_upper(self._profile.challenge_response(key, r1)),
        }

    def infrared_rand(self) -> Result:
        """R1 for the meter's infrared authentication query."""
        self._require_open()
        return {"rand1": hex_upper(self._random(8))}

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
        """Check the meter's K1 = E(DK'_0C, R1) (1100 if not), then return K2 = E(DK'_0C, R2)."""
        key = self._key("infrared_auth", flag, div, esam_no)
        expected = self._profile.challenge_response(key, rand1)
        if not secrets.compare_digest(expected, rand1_endata):
            raise EsamError(
                INFRARED_MISMATCH, "infrared_mismatch", "the meter's R1 ciphertext does not match"
            )
        return {"rand2_endata": hex_upper(self._profile.challenge_response(key, rand2))}

    # --- line-protected writes ---------------------------------------------------------------

    def user_control(
        self, *, flag: int, rand: bytes, div: bytes, esam_no: bytes, data: bytes
    ) -> Result:
        """E(DK'_02, data ‖ 80…) ‖ MAC over 04D6870014 ‖ cipher."""
        key = self._key("user_control", flag, div, esam_no)
        cipher = self._profile.encrypt(key, data)
        return {"endata": hex_upper(cipher + self._mac(key, rand, cv.USER_CONTROL_HEADER, cipher))}

    def _plain_with_mac(
        self, function: str, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes
    ) -> Result:
        key = self._key(function, flag, div)
        return {"data": hex_upper(data + self._mac(key, rand, apdu, data))}

    def parameter_update(
        self, *, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes
    ) -> Result:
        """data ‖ MAC(DK_03) over apdu ‖ data."""
        return self._plain_with_mac("parameter_update", flag, rand, div, apdu, data)

    def price1_update(
        self, *, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes
    ) -> Result:
        """data ‖ MAC(DK_03) over apdu ‖ data."""
        return self._plain_with_mac("price1_update", flag, rand, div, apdu, data)

    def price2_update(
        self, *, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes
    ) -> Result:
        """data ‖ MAC(DK_03) over apdu ‖ data."""
        return self._plain_with_mac("price2_update", flag, rand, div, apdu, data)

    def parameter_else_update(
        self, *, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes
    ) -> Result:
        """E(DK_04, len(2) ‖ data ‖ 80…) ‖ MAC over apdu ‖ cipher."""
        key = self._key("parameter_else_update", flag, div)
        cipher = self._profile.encrypt(key, len(data).to_bytes(2, "big") + data)
        return {"endata": hex_upper(cipher + self._mac(key, rand, apdu, cipher))}

    def data_clear1(self, *, flag: int, rand: bytes, div: bytes, data: bytes) -> Result:
        """E(DK_02, data ‖ 80…) ‖ MAC over 04D6930014 ‖ cipher."""
        key = self._key("data_clear1", flag, div)
        cipher = self._profile.encrypt(key, data)
        return {"data": hex_upper(cipher + self._mac(key, rand, cv.DATA_CLEAR_HEADER, cipher))}

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
        """data ‖ MAC(DK'_0D) over 04D6 offset Lc ‖ data."""
        key = self._key("mac_write", flag, div, esam_no)
        header = cv.file_write_header(data_begin, len(data))
        return {"data": hex_upper(data + self._mac(key, rand, header, data))}

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
        """E(DK'_04, data ‖ 80…) ‖ MAC over 04D6 offset Lc ‖ cipher."""
        key = self._key("enc_mac_write", flag, div, esam_no)
        cipher = self._profile.encrypt(key, data)
        header = cv.file_write_header(data_begin, len(cipher))
        return {"data": hex_upper(cipher + self._mac(key, rand, header, cipher))}

    # --- purse -------------------------------------------------------------------------------

    def increase_purse(self, *, flag: int, rand: bytes, div: bytes, data: bytes) -> Result:
        """amount ‖ count ‖ MAC1 (INCREASE) ‖ customer ‖ MAC2 (customer-number write)."""
        key = self._key("increase_purse", flag, div)
        money, customer = data[:8], data[8:]
        mac1 = self._mac(key, rand, cv.PURSE_INCREASE_HEADER, money)
        mac2 = self._mac(key, rand, cv.CUSTOMER_NUMBER_HEADER, customer)
        return {"data": hex_upper(money + mac1 + customer + mac2)}

    def init_purse(self, *, flag: int, rand: bytes, div: bytes, data: bytes) -> Result:
        """amount ‖ MAC1 (amount record) ‖ 00000000 ‖ MAC2 (count record)."""
        key = self._key("init_purse", flag, div)
        count = bytes(4)
        mac1 = self._mac(key, rand, cv.PURSE_AMOUNT_HEADER, data)
        mac2 = self._mac(key, rand, cv.PURSE_COUNT_HEADER, count)
        return {"data": hex_upper(data + mac1 + count + mac2)}

    def decrease_purse(self, *, flag: int, rand: bytes, div: bytes, data: bytes) -> Result:
        """E(DK_0B, amount ‖ 80…) ‖ MAC over 04D6940014 ‖ cipher."""
        key = self._key("decrease_purse", flag, div)
        cipher = self._profile.encrypt(key, data)
        return {"endata": hex_upper(cipher + self._mac(key, rand, cv.REFUND_HEADER, cipher))}

    def switch_charge_mode(self, *, flag: int, rand: bytes, div: bytes, data: bytes) -> Result:
        """mode ‖ MAC1 (mode) ‖ amount ‖ count ‖ MAC2 (purse record)."""
        key = self._key("switch_charge_mode", flag, div)
        mode, money = data[:1], data[1:]
        mac1 = self._mac(key, rand, cv.CHARGE_MODE_HEADER, mode)
        mac2 = self._mac(key, rand, cv.PURSE_RECORD_HEADER, money)
        return {"data": hex_upper(mode + mac1 + money + mac2)}

    # --- keys, read-back, compare --------------------------------------------------------------

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
        """N × (info ‖ E(DK'_00, info ‖ new meter key ‖ 80…)) ‖ MAC over div ‖ XOR of the blocks.

        info = key_sum ‖ 00 ‖ id ‖ state; the new key is the target state's master key of that
        slot dispersed with ``div``; DK'_00 is the other state's master control key.
        """
        target = key_state[0]
        protecting = cv.key_update_protecting_state(target)
        key = self._key("key_update_v2", protecting, div, esam_no)
        blocks = []
        for slot in key_id:
            info = bytes([key_sum, 0x00, slot, target])
            new_key = cv.meter_key(self._profile, self._keys, target, slot, div)
            blocks.append(info + self._profile.encrypt(key, info + new_key))
        folded = reduce(xor_bytes, blocks)
        mac = self._mac(key, rand, cv.KEY_UPDATE_HEADER, div + folded)
        return {"data": hex_upper(b"".join(blocks) + mac)}

    def mac_check(
        self, *, flag: int, rand: bytes, div: bytes, apdu: bytes, data: bytes, mac: bytes
    ) -> Result:
        """Verify the read-back MAC(DK_0D) over apdu ‖ data with IV R1[0:4]; 810 if wrong."""
        key = self._key("mac_check", flag, div)
        if not secrets.compare_digest(self._mac(key, rand, apdu, data), mac):
            raise EsamError(MAC_CHECK_FAILED, "mac_mismatch", "the read-back MAC does not match")
        return {"valid": True}

    def enc_for_compare(self, *, key_index: bytes, div: bytes, data: bytes) -> Result:
        """E(derive(MK_kid, factor), data): 64 bytes, no padding (the meter's 80FA0100 40)."""
        self._require_open()
        key = cv.meter_key(self._profile, self._keys, self._compare_state, key_index[0], div)
        return {"data": hex_upper(self._profile.encrypt_blocks(key, data))}
