"""Software cryptography of the ESAM simulation: the SM4 and 3DES profiles as pure functions.

Why: the real master-station card and the meter's ESAM compute with SM1, a secret cipher that no
software can reproduce. The soft backend and the soft meter therefore agree on a public, documented
stand-in (SM4, which has SM1's block and key sizes, or a PBOC-style 3DES) so that every output has
the card's byte counts and every flow can be checked end to end. Nothing here interoperates with a
real meter. The arithmetic is ``cryptography``'s; this module only fixes the conventions: key
dispersal, the 8-byte challenge response (K1/K2), the 4-byte line-protection MAC, the ISO 9797-1
method 2 padding and the encryption of command data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Final

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import ProtocolError

ENCRYPTION_UNIT: Final = 16
"""Ciphertexts are padded to multiples of 16 bytes in both profiles (the seed's Lc rule)."""

MAC_SIZE: Final = 4
CHALLENGE_SIZE: Final = 8


class PaddingError(ProtocolError):
    """Decrypted data that does not end with ISO 9797-1 method 2 padding (wrong key or tampered)."""


def complement(data: bytes) -> bytes:
    """Return the bitwise complement of ``data`` (the ``~D`` of the key dispersal)."""
    return bytes(b ^ 0xFF for b in data)


def xor_bytes(left: bytes, right: bytes) -> bytes:
    """Return ``left XOR right`` for two byte strings of the same length."""
    if len(left) != len(right):
        raise ValueError("xor_bytes needs equal lengths")
    return bytes(a ^ b for a, b in zip(left, right, strict=True))


def pad_iso9797_m2(data: bytes, block_size: int) -> bytes:
    """Append ``80`` then ``00`` up to a multiple of ``block_size`` (always at least one byte)."""
    padded = data + b"\x80"
    return padded + bytes(-len(padded) % block_size)


def unpad_iso9797_m2(data: bytes) -> bytes:
    """Strip ISO 9797-1 method 2 padding; raise :class:`PaddingError` when it is not there."""
    stripped = data.rstrip(b"\x00")
    if not stripped or stripped[-1] != 0x80 or len(data) - len(stripped) >= ENCRYPTION_UNIT:
        raise PaddingError("padding", "decrypted data does not end with 80 00... padding")
    return stripped[:-1]


# --- raw block ciphers (ECB over whole blocks; CBC for the MACs) -------------------------------


def sm4_encrypt_ecb(key: bytes, data: bytes) -> bytes:
    """SM4-ECB encryption of whole 16-byte blocks."""
    encryptor = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def sm4_decrypt_ecb(key: bytes, data: bytes) -> bytes:
    """SM4-ECB decryption of whole 16-byte blocks."""
    decryptor = Cipher(algorithms.SM4(key), modes.ECB()).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def sm4_cbc_mac(key: bytes, iv: bytes, padded: bytes) -> bytes:
    """Return the last SM4-CBC block of ``padded`` (a multiple of 16 bytes) under ``iv``."""
    encryptor = Cipher(algorithms.SM4(key), modes.CBC(iv)).encryptor()
    return (encryptor.update(padded) + encryptor.finalize())[-16:]


def _tdes_key(key: bytes) -> bytes:
    """Expand an 8-byte (single DES) or 16-byte (two-key) key to the 24 bytes TripleDES takes.

    ``cryptography`` warns about short TripleDES keys, so they are expanded here (K, K1K2K1).
    """
    if len(key) == 8:
        return key * 3
    if len(key) == 16:
        return key + key[:8]
    return key


def tdes_encrypt_ecb(key: bytes, data: bytes) -> bytes:
    """3DES-EDE-ECB encryption of whole 8-byte blocks (an 8-byte key is single DES)."""
    encryptor = Cipher(TripleDES(_tdes_key(key)), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def tdes_decrypt_ecb(key: bytes, data: bytes) -> bytes:
    """3DES-EDE-ECB decryption of whole 8-byte blocks (an 8-byte key is single DES)."""
    decryptor = Cipher(TripleDES(_tdes_key(key)), modes.ECB()).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def des_cbc_last_block(key: bytes, iv: bytes, padded: bytes) -> bytes:
    """Return the last single-DES-CBC block of ``padded`` (a multiple of 8 bytes)."""
    encryptor = Cipher(TripleDES(_tdes_key(key)), modes.CBC(iv)).encryptor()
    return (encryptor.update(padded) + encryptor.finalize())[-8:]


def retail_mac(key: bytes, iv: bytes, padded: bytes) -> bytes:
    """ISO 9797-1 MAC algorithm 3 (the PBOC "retail MAC"): DES-CBC with K_L, then D(K_R), E(K_L)."""
    left, right = key[:8], key[8:16]
    last = des_cbc_last_block(left, iv, padded)
    return tdes_encrypt_ecb(left, tdes_decrypt_ecb(right, last))


# --- profiles ---------------------------------------------------------------------------------


class CryptoProfile(ABC):
    """One self-consistent convention for dispersal, K1/K2, MAC and encryption.

    Subclasses set ``name`` and ``block_size`` and implement the four primitives; the padding and
    the helpers on top are shared. Keys are 16 bytes in both profiles.
    """

    name: ClassVar[str]
    block_size: ClassVar[int]

    @abstractmethod
    def encrypt_blocks(self, key: bytes, data: bytes) -> bytes:
        """Raw ECB encryption of ``data`` (a multiple of the block size)."""

    @abstractmethod
    def decrypt_blocks(self, key: bytes, data: bytes) -> bytes:
        """Raw ECB decryption of ``data`` (a multiple of the block size)."""

    @abstractmethod
    def derive_key(self, master: bytes, factor: bytes) -> bytes:
        """Disperse the 16-byte ``master`` key with an 8-byte ``factor`` into a 16-byte key."""

    @abstractmethod
    def challenge_response(self, key: bytes, challenge: bytes) -> bytes:
        """Encrypt an 8-byte random number into the 8-byte cryptogram (K1, K2)."""

    @abstractmethod
    def _mac_block(self, key: bytes, iv: bytes, padded: bytes) -> bytes:
        """Return the final MAC block of already padded data."""

    def mac(self, key: bytes, rand: bytes, message: bytes) -> bytes:
        """The 4-byte line-protection MAC of ``message`` (header ‖ data), IV = rand ‖ 00…."""
        iv = rand + bytes(self.block_size - len(rand))
        return self._mac_block(key, iv, pad_iso9797_m2(message, self.block_size))[:MAC_SIZE]

    def encrypt(self, key: bytes, plaintext: bytes) -> bytes:
        """ECB-encrypt ``plaintext ‖ 80 00…`` padded to a multiple of 16 bytes."""
        return self.encrypt_blocks(key, pad_iso9797_m2(plaintext, ENCRYPTION_UNIT))

    def decrypt(self, key: bytes, ciphertext: bytes) -> bytes:
        """Inverse of :meth:`encrypt`; raises :class:`PaddingError` when the padding is wrong."""
        if not ciphertext or len(ciphertext) % ENCRYPTION_UNIT:
            raise PaddingError("length", "ciphertext is not a multiple of 16 bytes")
        return unpad_iso9797_m2(self.decrypt_blocks(key, ciphertext))


class Sm4Profile(CryptoProfile):
    """SM4 stand-in for SM1: DK = SM4(MK, D ‖ ~D); K = SM4(DK, R ‖ 00×8)[:8]; SM4 CBC-MAC."""

    name = "sm4"
    block_size = 16

    def encrypt_blocks(self, key: bytes, data: bytes) -> bytes:
        """SM4-ECB encryption."""
        return sm4_encrypt_ecb(key, data)

    def decrypt_blocks(self, key: bytes, data: bytes) -> bytes:
        """SM4-ECB decryption."""
        return sm4_decrypt_ecb(key, data)

    def derive_key(self, master: bytes, factor: bytes) -> bytes:
        """SM4(master, factor ‖ ~factor)."""
        return sm4_encrypt_ecb(master, factor + complement(factor))

    def challenge_response(self, key: bytes, challenge: bytes) -> bytes:
        """Left 8 bytes of SM4(key, challenge ‖ 00×8)."""
        return sm4_encrypt_ecb(key, challenge + bytes(8))[:CHALLENGE_SIZE]

    def _mac_block(self, key: bytes, iv: bytes, padded: bytes) -> bytes:
        return sm4_cbc_mac(key, iv, padded)


class TripleDesProfile(CryptoProfile):
    """PBOC-style 3DES: DK = 3DES(MK, D) ‖ 3DES(MK, ~D); K = 3DES(DK, R); ISO 9797-1 alg. 3 MAC."""

    name = "3des"
    block_size = 8

    def encrypt_blocks(self, key: bytes, data: bytes) -> bytes:
        """Two-key 3DES-ECB encryption."""
        return tdes_encrypt_ecb(key, data)

    def decrypt_blocks(self, key: bytes, data: bytes) -> bytes:
        """Two-key 3DES-ECB decryption."""
        return tdes_decrypt_ecb(key, data)

    def derive_key(self, master: bytes, factor: bytes) -> bytes:
        """3DES(master, factor) ‖ 3DES(master, ~factor)."""
        return tdes_encrypt_ecb(master, factor) + tdes_encrypt_ecb(master, complement(factor))

    def challenge_response(self, key: bytes, challenge: bytes) -> bytes:
        """3DES(key, challenge)."""
        return tdes_encrypt_ecb(key, challenge)

    def _mac_block(self, key: bytes, iv: bytes, padded: bytes) -> bytes:
        return retail_mac(key, iv, padded)


PROFILES: Final[dict[str, CryptoProfile]] = {"sm4": Sm4Profile(), "3des": TripleDesProfile()}
"""The profiles by the name the key file uses (``profile: sm4 | 3des``)."""
