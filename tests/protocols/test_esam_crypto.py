"""The ESAM simulation crypto: Appendix A vectors, the SM4 standard vector, second implementations.

Second implementations: gmssl (pure-Python SM4) for the SM4 profile, pycryptodome (DES/DES3) for
the 3DES profile, each driven block by block here so nothing of esam_crypto is reused.
"""

from __future__ import annotations

import contextlib

import pytest
from Crypto.Cipher import DES, DES3
from gatewayd.protocols.esam_crypto import (
    PROFILES,
    PaddingError,
    Sm4Profile,
    TripleDesProfile,
    complement,
    pad_iso9797_m2,
    sm4_encrypt_ecb,
    unpad_iso9797_m2,
)
from gmssl import sm4 as gm
from hypothesis import given, settings
from hypothesis import strategies as st

MK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
DIV = bytes.fromhex("0000000000000001")
R1 = bytes.fromhex("1122334455667788")
R2 = bytes.fromhex("A1B2C3D4")
MAC_INPUT = bytes.fromhex("04D6811008") + bytes.fromhex("00000500")


# --- Appendix A (our convention, frozen) ---


def test_appendix_a_sm4():
    profile = Sm4Profile()
    dk = profile.derive_key(MK, DIV)
    assert dk.hex().upper() == "F435EBF1A1C1D0D03C66C6E244CBDBB4"
    assert profile.challenge_response(dk, R1).hex().upper() == "94E8FAC1AAAB7F11"
    assert profile.mac(dk, R2, MAC_INPUT).hex().upper() == "F53C0BB7"


def test_appendix_a_3des():
    profile = TripleDesProfile()
    dk = profile.derive_key(MK, DIV)
    assert dk.hex().upper() == "B2B0D54F8B1C61DA68A97C246D003EBA"
    assert profile.challenge_response(dk, R1).hex().upper() == "D4BCD710CFD45DA0"
    assert profile.mac(dk, R2, MAC_INPUT).hex().upper() == "80EE3052"


def test_sm4_standard_vector():
    """GB/T 32907 example 1: key = plaintext = 0123456789ABCDEFFEDCBA9876543210."""
    block = bytes.fromhex("0123456789abcdeffedcba9876543210")
    assert sm4_encrypt_ecb(block, block).hex() == "681edf34d206965e86b3e94f536e4246"


def test_profiles_by_name():
    assert set(PROFILES) == {"sm4", "3des"}
    assert PROFILES["sm4"].block_size == 16 and PROFILES["3des"].block_size == 8


# --- padding ---


@pytest.mark.parametrize(
    ("data", "padded"),
    [
        (b"", "80" + "00" * 15),
        (bytes(15), "00" * 15 + "80"),
        (bytes(16), "00" * 16 + "80" + "00" * 15),
        (b"\x80", "8080" + "00" * 14),
    ],
)
def test_padding_always_adds_at_least_one_byte(data, padded):
    assert pad_iso9797_m2(data, 16).hex() == padded
    assert unpad_iso9797_m2(bytes.fromhex(padded)) == data


@pytest.mark.parametrize("bad", [bytes(16), b"\x01" * 16, b"\x80" + bytes(16)])
def test_unpad_refuses_missing_padding(bad):
    with pytest.raises(PaddingError):
        unpad_iso9797_m2(bad)


@given(st.binary(max_size=80), st.sampled_from([8, 16]))
def test_padding_roundtrip(data, block):
    padded = pad_iso9797_m2(data, block)
    assert len(padded) % block == 0 and len(data) < len(padded) <= len(data) + block
    assert unpad_iso9797_m2(padded) == data


# --- second implementations ---


def gm_sm4_ecb(key: bytes, data: bytes) -> bytes:
    cipher = gm.CryptSM4()
    cipher.set_key(key, gm.SM4_ENCRYPT)
    out = b""
    for i in range(0, len(data), 16):
        out += bytes(cipher.one_round(cipher.sk, list(data[i : i + 16])))
    return out


def gm_sm4_cbc_mac(key: bytes, iv: bytes, padded: bytes) -> bytes:
    state = iv
    for i in range(0, len(padded), 16):
        block = bytes(a ^ b for a, b in zip(state, padded[i : i + 16], strict=True))
        state = gm_sm4_ecb(key, block)
    return state


def pcd_3des(key: bytes, data: bytes) -> bytes:
    """Two-key EDE from single DES (pycryptodome's DES3 refuses keys with K1 == K2)."""
    if key[:8] != key[8:]:
        return DES3.new(key + key[:8], DES3.MODE_ECB).encrypt(data)
    left, right = DES.new(key[:8], DES.MODE_ECB), DES.new(key[8:], DES.MODE_ECB)
    return left.encrypt(right.decrypt(left.encrypt(data)))


def pcd_retail_mac(key: bytes, iv: bytes, padded: bytes) -> bytes:
    left = DES.new(key[:8], DES.MODE_ECB)
    state = iv
    for i in range(0, len(padded), 8):
        state = left.encrypt(bytes(a ^ b for a, b in zip(state, padded[i : i + 8], strict=True)))
    state = DES.new(key[8:], DES.MODE_ECB).decrypt(state)
    return left.encrypt(state)


keys16 = st.binary(min_size=16, max_size=16)
blocks8 = st.binary(min_size=8, max_size=8)
rands4 = st.binary(min_size=4, max_size=4)


@settings(max_examples=60)
@given(keys16, blocks8, blocks8, rands4, st.binary(max_size=70))
def test_sm4_profile_agrees_with_gmssl(master, factor, challenge, rand, message):
    profile = Sm4Profile()
    dk = profile.derive_key(master, factor)
    assert dk == gm_sm4_ecb(master, factor + complement(factor))
    assert profile.challenge_response(dk, challenge) == gm_sm4_ecb(dk, challenge + bytes(8))[:8]
    padded = message + b"\x80" + bytes(-(len(message) + 1) % 16)
    expected_mac = gm_sm4_cbc_mac(dk, rand + bytes(12), padded)[:4]
    assert profile.mac(dk, rand, message) == expected_mac
    assert profile.encrypt(dk, message) == gm_sm4_ecb(dk, padded)
    assert profile.decrypt(dk, gm_sm4_ecb(dk, padded)) == message


@settings(max_examples=60)
@given(keys16, blocks8, blocks8, rands4, st.binary(max_size=70))
def test_3des_profile_agrees_with_pycryptodome(master, factor, challenge, rand, message):
    profile = TripleDesProfile()
    dk = profile.derive_key(master, factor)
    assert dk == pcd_3des(master, factor) + pcd_3des(master, complement(factor))
    assert profile.challenge_response(dk, challenge) == pcd_3des(dk, challenge)
    mac_padded = message + b"\x80" + bytes(-(len(message) + 1) % 8)
    assert profile.mac(dk, rand, message) == pcd_retail_mac(dk, rand + bytes(4), mac_padded)[:4]
    enc_padded = message + b"\x80" + bytes(-(len(message) + 1) % 16)
    assert profile.encrypt(dk, message) == pcd_3des(dk, enc_padded)
    assert profile.decrypt(dk, pcd_3des(dk, enc_padded)) == message


@pytest.mark.parametrize("profile", list(PROFILES.values()), ids=list(PROFILES))
def test_decrypt_with_wrong_key_is_refused_or_differs(profile):
    key, other = bytes(range(16)), bytes(range(1, 17))
    cipher = profile.encrypt(key, b"\x1a\x00" + bytes(6))
    with contextlib.suppress(PaddingError):
        assert profile.decrypt(other, cipher) != b"\x1a\x00" + bytes(6)
    with pytest.raises(PaddingError):
        profile.decrypt(key, cipher[:-1])
