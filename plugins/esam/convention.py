"""The simulation convention shared by the soft backend (master) and the soft meter (ESAM side).

Why: which key slot protects which function, whether the ESAM serial number enters the key, and
which ESAM command header each MAC covers must be the same on both sides, so they live here once.
Headers marked "reference" come from public meter firmware (see the ESAM research notes); the
others are ours, chosen to look like their neighbours. None of this is the real card's SM1 scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gatewayd.protocols.esam_crypto import CryptoProfile

from .keys import EsamKeys

# Key slots (the same 17 slots "00".."10" as PutKeySum <= 17).
SLOT_MASTER: Final = 0x00  # master control: protects key update
SLOT_IDENTITY: Final = 0x01  # remote identity authentication
SLOT_CONTROL: Final = 0x02  # remote control, clears
SLOT_CLASS1: Final = 0x03  # class-1 parameters and tariffs (plaintext + MAC)
SLOT_CLASS2: Final = 0x04  # class-2 parameters, ciphertext file writes
SLOT_COMPARE: Final = range(0x05, 0x0B)  # program compare, PutKeyid 05..0A
SLOT_PURSE: Final = 0x0B  # purse: open/recharge, init, refund, charge-mode switch
SLOT_INFRARED: Final = 0x0C  # infrared authentication
SLOT_FILE: Final = 0x0D  # plaintext file writes and read-back MACs


@dataclass(frozen=True)
class Protection:
    """The key of one function: a slot, with the ESAM serial mixed in or not."""

    slot: int
    with_esam: bool = False


PROTECTION: Final[dict[str, Protection]] = {
    "identity_authentication": Protection(SLOT_IDENTITY),
    "user_control": Protection(SLOT_CONTROL, with_esam=True),
    "parameter_update": Protection(SLOT_CLASS1),
    "price1_update": Protection(SLOT_CLASS1),
    "price2_update": Protection(SLOT_CLASS1),
    "parameter_else_update": Protection(SLOT_CLASS2),
    "increase_purse": Protection(SLOT_PURSE),
    "init_purse": Protection(SLOT_PURSE),
    "key_update_v2": Protection(SLOT_MASTER, with_esam=True),
    "data_clear1": Protection(SLOT_CONTROL),
    "infrared_auth": Protection(SLOT_INFRARED, with_esam=True),
    "mac_check": Protection(SLOT_FILE),
    "mac_write": Protection(SLOT_FILE, with_esam=True),
    "enc_mac_write": Protection(SLOT_CLASS2, with_esam=True),
    "decrease_purse": Protection(SLOT_PURSE),
    "switch_charge_mode": Protection(SLOT_PURSE),
}

# Implied ESAM command headers (CLA INS P1 P2 Lc) that the MACs cover.
USER_CONTROL_HEADER: Final = bytes.fromhex("04D6870014")  # reference: file 87, 16 + 4
DATA_CLEAR_HEADER: Final = bytes.fromhex("04D6930014")  # reference: file 93
KEY_UPDATE_HEADER: Final = bytes.fromhex("04D6950030")  # reference: div(8) ‖ XOR(36) ‖ MAC(4)
PURSE_INCREASE_HEADER: Final = bytes.fromhex("8432010C0C")  # reference: INCREASE with MAC
CUSTOMER_NUMBER_HEADER: Final = bytes.fromhex("04D681240A")  # reference: file 81 offset 24
PURSE_AMOUNT_HEADER: Final = bytes.fromhex("04DC010C08")  # reference 04DC010C; Lc ours
PURSE_COUNT_HEADER: Final = bytes.fromhex("04DC030C08")  # reference 04DC030C; Lc ours
REFUND_HEADER: Final = bytes.fromhex("04D6940014")  # ours
CHARGE_MODE_HEADER: Final = bytes.fromhex("04D6810005")  # ours: mode(1) + MAC
PURSE_RECORD_HEADER: Final = bytes.fromhex("04DC010C0C")  # ours: amount ‖ count + MAC


def file_write_header(data_begin: bytes, body_length: int) -> bytes:
    """``04 D6 offset_hi offset_lo Lc``: the meter selects the file, then writes at the offset.

    Reference: SG-2013 meter firmware (070004FF/070005FF), Lc = body + 4 MAC bytes.
    """
    return b"\x04\xd6" + data_begin + bytes([body_length + 4])


COMPARE_KEY_STATE: Final = "formal"
"""EncForCompare takes no flag; the simulated card uses the formal compare keys by default."""


def key_update_protecting_state(target_state: int) -> int:
    """The key state whose master key protects a key update towards ``target_state``.

    Ours: a meter moving to formal keys still holds test keys and vice versa, so the update is
    protected by the other state's master control key.
    """
    return 1 - target_state


def meter_key(
    profile: CryptoProfile, keys: EsamKeys, state: int | str, slot: int, div: bytes
) -> bytes:
    """The meter's own key of a slot: the master key dispersed with ``div``."""
    return profile.derive_key(keys.key(state, slot), div)


def session_key(
    profile: CryptoProfile,
    keys: EsamKeys,
    state: int | str,
    function: str,
    div: bytes,
    esam_no: bytes | None = None,
) -> bytes:
    """The key a function computes with: DK, or DK' = derive(DK, esam) where it takes the serial."""
    protection = PROTECTION[function]
    key = meter_key(profile, keys, state, protection.slot, div)
    if protection.with_esam:
        if esam_no is None:
            raise ValueError(f"{function} needs the ESAM serial number")
        key = profile.derive_key(key, esam_no)
    return key
