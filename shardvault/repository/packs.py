"""Packs: containers of compressed, encrypted chunks, the unit of erasure coding.

A pack, format version 1::

    magic "SVPK" | version (1 byte)
    blob 0 | blob 1 | ... | blob m-1
    header: sealed(entries), associated data "pack header" + pack id
    header length (4 bytes, little-endian)

A blob is ``sealed(payload)`` with the chunk id as associated data.  The
payload is the zstd-compressed chunk when that is smaller than the chunk, and
the chunk itself otherwise (random data is not inflated), so no flag is
needed: a payload shorter than the plaintext length the index records is
compressed.  The chunk id binds the ciphertext to its content: a blob moved to
another id fails to open, and after opening, the keyed hash of the plaintext
must equal the id.

Each header entry is 45 bytes: chunk id (32), kind (1: 0 data, 1 tree),
offset (4), sealed length (4), plaintext length (4).  The index holds the same
facts, so the header is needed only to rebuild a lost index.
"""

from __future__ import annotations

import struct
import threading
from typing import NamedTuple

import zstandard

from shardvault.crypto import Cipher, OpenFailed

PACK_MAGIC = b"SVPK"
PACK_VERSION = 1
PACK_PREAMBLE = PACK_MAGIC + bytes([PACK_VERSION])
_ENTRY = struct.Struct("<32sBIII")
_LEN = struct.Struct("<I")
KIND_DATA = 0
KIND_TREE = 1


class PackFormatError(Exception):
    """A pack or blob does not parse or authenticate."""


class PackEntry(NamedTuple):  # a tuple: the index makes one per chunk when it loads
    chunk_id: bytes
    kind: int
    offset: int
    length: int
    raw_length: int


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; keep one per thread and level.
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor  # type: ignore[no-any-return]


def seal_blob(
    cipher: Cipher, chunk_id: bytes, data: bytes | memoryview, level: int, nonce: bytes | None = None
) -> bytearray:
    """Compress (if it helps) and encrypt one chunk."""
    compressed = _compressor(level).compress(data)
    return cipher.seal(compressed if len(compressed) < len(data) else data, chunk_id, nonce)


def open_blob(cipher: Cipher, chunk_id: bytes, sealed: bytes | memoryview, raw_length: int) -> bytes | bytearray:
    try:
        payload = cipher.open(sealed, chunk_id)
    except OpenFailed as exc:
        raise PackFormatError(f"blob {chunk_id.hex()[:16]} does not authenticate: {exc}") from None
    if len(payload) == raw_length:  # stored uncompressed: the decrypted buffer is the chunk
        return payload
    if len(payload) > raw_length:
        raise PackFormatError(f"blob {chunk_id.hex()[:16]} is longer than its recorded length")
    try:
        return _decompressor().decompress(payload, max_output_size=raw_length)
    except zstandard.ZstdError as exc:
        raise PackFormatError(f"blob {chunk_id.hex()[:16]} does not decompress: {exc}") from None


class PackWriter:
    """Accumulates sealed blobs into one pack (kept as parts: joined once, at the end)."""

    def __init__(self) -> None:
        self.parts: list[bytes | bytearray] = [PACK_PREAMBLE]
        self.size = len(PACK_PREAMBLE)
        self.entries: list[PackEntry] = []

    def __len__(self) -> int:
        return self.size

    def add(self, chunk_id: bytes, kind: int, sealed: bytes | bytearray, raw_length: int) -> PackEntry:
        entry = PackEntry(chunk_id, kind, self.size, len(sealed), raw_length)
        self.parts.append(sealed)
        self.size += len(sealed)
        self.entries.append(entry)
        return entry

    def finish(self, cipher: Cipher, pack_id: bytes, nonce: bytes | None = None) -> bytes:
        table = b"".join(_ENTRY.pack(e.chunk_id, e.kind, e.offset, e.length, e.raw_length) for e in self.entries)
        header = cipher.seal(table, b"pack header" + pack_id, nonce)
        data = b"".join([*self.parts, header, _LEN.pack(len(header))])
        self.parts = []
        return data


def read_pack_entries(cipher: Cipher, pack_id: bytes, data: bytes) -> list[PackEntry]:
    """Parse the header of a whole pack (for index rebuilding and checks)."""
    if data[:5] != PACK_PREAMBLE:
        raise PackFormatError("not a version 1 shardvault pack")
    if len(data) < 9:
        raise PackFormatError("truncated pack")
    (header_len,) = _LEN.unpack_from(data, len(data) - 4)
    start = len(data) - 4 - header_len
    if start < 5:
        raise PackFormatError("header length out of range")
    try:
        table = cipher.open(memoryview(data)[start:-4], b"pack header" + pack_id)
    except OpenFailed as exc:
        raise PackFormatError(f"pack header does not authenticate: {exc}") from None
    if len(table) % _ENTRY.size:
        raise PackFormatError("pack header has a partial entry")
    return [PackEntry(*_ENTRY.unpack_from(table, i)) for i in range(0, len(table), _ENTRY.size)]
