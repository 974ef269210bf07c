"""The shard format, version 1: one zfec block of a pack, self-describing.

Every shard is one object on one peer::

    offset  size  field
    0       4     magic "SVSH"
    4       1     format version (1)
    5       1     k  (shards needed)
    6       1     n  (shards made)
    7       1     shard number (0..n-1; below k: a primary block)
    8       32    pack id
    40      8     pack length in bytes, little-endian (gives zfec's padding)
    48      8     payload length in bytes, little-endian
    56      L     payload: zfec block number ``shard number``
    56+L    32    BLAKE3 of bytes 0 .. 56+L

The trailing hash lets anyone with the object alone detect bit rot or a
truncation; the index also records each shard's hash, so a well-formed shard
that belongs elsewhere (another pack's, an older write replayed) is caught as
well.  Golden vectors in ``tests/vectors`` pin these bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shardvault.crypto import content_hash, new_content_hasher

SHARD_MAGIC = b"SVSH"
SHARD_VERSION = 1
_HEADER = struct.Struct("<4sBBBB32sQQ")
HEADER_SIZE = _HEADER.size  # 56
HASH_SIZE = 32
OVERHEAD = HEADER_SIZE + HASH_SIZE


class ShardFormatError(Exception):
    """The bytes are not a well-formed shard (the message says why)."""


@dataclass(frozen=True)
class ShardHeader:
    k: int
    n: int
    num: int
    pack_id: bytes
    pack_length: int
    payload_length: int


def build_shard(header: ShardHeader, payload: bytes | memoryview) -> bytes:
    if len(payload) != header.payload_length:
        raise ValueError("payload length does not match the header")
    head = _HEADER.pack(
        SHARD_MAGIC,
        SHARD_VERSION,
        header.k,
        header.n,
        header.num,
        header.pack_id,
        header.pack_length,
        header.payload_length,
    )
    hasher = new_content_hasher()
    hasher.update(head)
    hasher.update(payload)
    return b"".join((head, payload, hasher.digest()))


def parse_shard(raw: bytes | memoryview) -> tuple[ShardHeader, memoryview, bytes]:
    """Return (header, payload, hash) after checking structure and hash."""
    view = memoryview(raw)
    if len(view) < OVERHEAD:
        raise ShardFormatError(f"truncated: {len(view)} bytes, a shard has at least {OVERHEAD}")
    magic, version, k, n, num, pack_id, pack_length, payload_length = _HEADER.unpack_from(view)
    if magic != SHARD_MAGIC:
        raise ShardFormatError("bad magic: not a shardvault shard")
    if version != SHARD_VERSION:
        raise ShardFormatError(f"unsupported shard format version {version} (this shardvault reads {SHARD_VERSION})")
    if len(view) != HEADER_SIZE + payload_length + HASH_SIZE:
        raise ShardFormatError(
            f"truncated or extended: {len(view)} bytes, header says {HEADER_SIZE + payload_length + HASH_SIZE}"
        )
    digest = bytes(view[-HASH_SIZE:])
    if content_hash(view[:-HASH_SIZE]) != digest:
        raise ShardFormatError("hash mismatch: the shard's bytes changed (bit rot or tampering)")
    header = ShardHeader(k, n, num, pack_id, pack_length, payload_length)
    return header, view[HEADER_SIZE:-HASH_SIZE], digest


def verify_shard(
    raw: bytes | memoryview, *, pack_id: bytes, num: int, k: int, n: int, expected_hash: bytes | None
) -> memoryview:
    """Parse ``raw`` and check it is exactly the shard the index expects."""
    header, payload, digest = parse_shard(raw)
    if header.pack_id != pack_id:
        raise ShardFormatError(f"belongs to pack {header.pack_id.hex()[:16]}, not this one (swapped)")
    if (header.num, header.k, header.n) != (num, k, n):
        raise ShardFormatError(
            f"header says shard {header.num} of {header.k}-of-{header.n}, expected {num} of {k}-of-{n}"
        )
    if expected_hash is not None and digest != expected_hash:
        raise ShardFormatError("hash differs from the index (an older or foreign write replayed)")
    return payload
