"""The repository's small objects: key, config, index and snapshot files.

Every one is replicated to every peer (invariant 1: any surviving peer can
tell the whole story), and every one is self-describing::

    magic "SVMD" | version (1 byte) | nonce | AES-256-GCM(zstd(JSON)) | tag

with the object's own name as associated data, so a peer cannot pass off one
object as another (an old index as a snapshot, one snapshot as another).

The key object is the exception: it is JSON in the clear around the master
keys sealed under a scrypt-derived key, because it must be readable before
any key is known::

    {"format": "shardvault-key", "version": 1, "kdf": "scrypt",
     "n": 32768, "r": 8, "p": 1, "salt": b64, "data": b64(sealed master keys)}

Object names (all lower-case hex, opaque to the peer)::

    config                       repository config (format version, k, n, chunker)
    keys/<16 hex>                one per passphrase
    index/<64 hex>               pack -> shards and chunk -> pack, per backup run
    snapshots/<64 hex>           one per committed snapshot
    data/<2 hex>/<64 hex>.<nn>   shard nn of a pack
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import zstandard

from shardvault.crypto import (
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    Cipher,
    MasterKeys,
    OpenFailed,
    b64d,
    b64e,
    derive_key,
)
from shardvault.errors import UnsupportedFormatError

FORMAT_VERSION = 1
META_MAGIC = b"SVMD"
_KEY_AAD = b"shardvault key v1"


class MalformedObject(Exception):
    """An object's bytes do not parse or authenticate."""


def new_id() -> str:
    return secrets.token_hex(32)


def pack_name(pack_id: str, shard_num: int) -> str:
    return f"data/{pack_id[:2]}/{pack_id}.{shard_num:02d}"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    """``data/ab/<id>.03`` -> (id, 3); None for anything else."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "data":
        return None
    pack_id, _, num = parts[2].partition(".")
    if len(pack_id) != 64 or parts[1] != pack_id[:2] or not num.isdigit():
        return None
    return pack_id, int(num)


def seal_object(cipher: Cipher, name: str, doc: dict[str, Any]) -> bytes:
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    body = zstandard.ZstdCompressor(level=3).compress(raw)
    return META_MAGIC + bytes([FORMAT_VERSION]) + cipher.seal(body, name.encode())


def open_object(cipher: Cipher, name: str, data: bytes) -> dict[str, Any]:
    if len(data) < 5 or data[:4] != META_MAGIC:
        raise MalformedObject("not a shardvault metadata object")
    if data[4] != FORMAT_VERSION:
        raise UnsupportedFormatError(name, data[4], FORMAT_VERSION)
    try:
        body = cipher.open(memoryview(data)[5:], name.encode())
    except OpenFailed as exc:
        raise MalformedObject(str(exc)) from None
    try:
        doc = json.loads(zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 30))
    except (zstandard.ZstdError, ValueError) as exc:
        raise MalformedObject(f"undecodable body: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedObject("body is not a JSON object")
    return doc


def make_key_object(passphrase: str, keys: MasterKeys, repo_id: str) -> bytes:
    salt = os.urandom(16)
    kek = Cipher(derive_key(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))
    secret = json.dumps({"encryption": b64e(keys.encryption), "chunk_id": b64e(keys.chunk_id), "repository": repo_id})
    doc = {
        "format": "shardvault-key",
        "version": FORMAT_VERSION,
        "kdf": "scrypt",
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": b64e(salt),
        "data": b64e(kek.seal(secret.encode(), _KEY_AAD)),
    }
    return json.dumps(doc, indent=1).encode()


def open_key_object(passphrase: str, data: bytes) -> tuple[MasterKeys, str]:
    """Return (keys, repository id); OpenFailed on a wrong passphrase."""
    try:
        doc = json.loads(data)
        if doc.get("format") != "shardvault-key":
            raise MalformedObject("not a shardvault key object")
        if doc.get("version") != FORMAT_VERSION:
            raise UnsupportedFormatError("key object", doc.get("version"), FORMAT_VERSION)
        kek = Cipher(derive_key(passphrase, b64d(doc["salt"]), int(doc["n"]), int(doc["r"]), int(doc["p"])))
        sealed = b64d(doc["data"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedObject(f"unparsable key object: {exc}") from None
    secret = json.loads(kek.open(sealed, _KEY_AAD))
    return MasterKeys(b64d(secret["encryption"]), b64d(secret["chunk_id"])), str(secret["repository"])
