"""Keys and the cryptographic primitives of the data path.

* A **chunk id** is BLAKE3 keyed with the repository's id key over the chunk's
  plaintext: equal data gets equal ids (deduplication), but without the key a
  peer cannot confirm a guess about the content.
* A **sealed** object is ``nonce (12) || AES-256-GCM ciphertext || tag (16)``,
  with a fresh random nonce, and associated data that binds the ciphertext to
  where it belongs (the chunk id for a chunk, the object name for metadata),
  so a ciphertext moved elsewhere fails to open.
* The **master keys** are random; a key object on the peers holds them
  encrypted under a key derived from the passphrase with scrypt.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
ID_SIZE = 32
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE

# scrypt work factor for new keys (about 0.1 s and 32 MiB) and the ceiling we
# accept from a key object: the peer is untrusted and must not make us
# allocate gigabytes.
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAX_N = 1 << 20
# Memory (128 * r * N * p bytes) a key object may ask of us: 4x today's default.
SCRYPT_MAX_MEMORY = 128 << 20


class OpenFailed(Exception):
    """A sealed object did not authenticate (wrong key, or tampered)."""


def b64e(data: bytes | bytearray) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True)
class MasterKeys:
    """The repository's secret keys."""

    encryption: bytes
    chunk_id: bytes

    @classmethod
    def generate(cls) -> MasterKeys:
        return cls(os.urandom(KEY_SIZE), os.urandom(KEY_SIZE))


class Cipher:
    """AES-256-GCM sealing with a fixed key; safe to share between threads."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes | memoryview, aad: bytes, nonce: bytes | None = None) -> bytearray:
        # A caller-supplied nonce exists only for golden test vectors.
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        # encrypt_into writes straight into the final buffer: no concatenation
        # copy, which on this hardware is slower than AES-GCM itself.
        out = bytearray(NONCE_SIZE + len(plaintext) + TAG_SIZE)
        out[:NONCE_SIZE] = nonce
        self._aead.encrypt_into(nonce, plaintext, aad, memoryview(out)[NONCE_SIZE:])
        return out

    def open(self, sealed: bytes | bytearray | memoryview, aad: bytes) -> bytearray:
        if len(sealed) < SEAL_OVERHEAD:
            raise OpenFailed("too short")
        view = memoryview(sealed)
        out = bytearray(len(sealed) - SEAL_OVERHEAD)
        try:
            self._aead.decrypt_into(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], aad, out)
        except InvalidTag:
            raise OpenFailed("authentication tag mismatch") from None
        return out


def chunk_id(id_key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """The keyed BLAKE3 id of a chunk's plaintext."""
    return blake3.blake3(data, key=id_key).digest()


def content_hash(data: bytes | memoryview) -> bytes:
    """Unkeyed BLAKE3, for shard hashes and file hashes (``b3sum`` compatible)."""
    return blake3.blake3(data).digest()


def new_content_hasher() -> blake3.blake3:
    return blake3.blake3()


def derive_key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    if not (2 <= n <= SCRYPT_MAX_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise OpenFailed(f"scrypt parameters out of range (N={n}, r={r}, p={p})")
    return hashlib.scrypt(
        passphrase.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * r * n + (1 << 20), dklen=KEY_SIZE
    )
