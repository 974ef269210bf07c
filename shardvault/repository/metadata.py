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

The peer identity object is the other exception, JSON in the clear, one per
peer, written at ``init`` and ``peers add`` (and by ``repair`` onto an empty
or replaced peer)::

    {"format": "shardvault-peer", "version": 1, "repository": hex,
     "peer": 32 hex (random, this storage's own token), "name": name at creation}

It lets a run tell, before any key is derived, that two configured peers are
the same storage (they show the same token), that a peer belongs to another
repository, or that a peer is empty or replaced (no identity at all).  It is
not secret and proves nothing against a hostile peer; it catches mistakes.

Every JSON body carries a ``version`` that readers look up in
:data:`KNOWN_VERSIONS`, so a future format is refused by name rather than
misread.

Object names (all lower-case hex, opaque to the peer)::

    config                       repository config (format version, k, n, chunker)
    identity                     this peer's identity (clear JSON, see above)
    keys/<16 hex>                one per passphrase or key file (see repository/keys.py)
    index/<64 hex>               pack -> shards and chunk -> pack, per backup run
    snapshots/<64 hex>           one per committed snapshot
    wal/<source>/<file>          one per archived WAL file (PostgreSQL sources)
    condemned/<64 hex>           a set of packs and objects prune means to delete (two-phase deletion)
    deleted/<64 hex>             a tombstone: names deleted on purpose (forget, prune); see tombstones.py
    sessions/<16 hex>/<seq>|end  a running process's heartbeat (not replicated by repair: ephemeral)
    data/<2 hex>/<64 hex>.<nn>   shard nn of a pack
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

import zstandard

from shardvault.crypto import (
    SCRYPT_MAX_MEMORY,
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
IDENTITY_NAME = "identity"
CONFIG_NAME = "config"

# The body versions each reader knows (Tahoe's ALL_SCHEMAS): a version not
# listed is refused by name, never guessed at.
KNOWN_VERSIONS: dict[str, frozenset[int]] = {
    "envelope": frozenset({1}),
    "config": frozenset({1}),
    "key": frozenset({1}),
    "key-info": frozenset({1}),  # the sealed info inside a key object (repository/keys.py)
    "identity": frozenset({1}),
    "index": frozenset({1}),
    "snapshot": frozenset({1}),
    "wal": frozenset({1}),
    "session": frozenset({1}),
    "condemned": frozenset({1}),
    "tombstone": frozenset({1}),
}
# Metadata prefixes, each replicated to every peer (invariant 1).
META_PREFIXES = ("keys/", "index/", "snapshots/", "wal/", "condemned/", "deleted/")


def check_version(kind: str, doc: dict[str, Any], name: str) -> None:
    """Refuse a body whose version this shardvault does not read."""
    version = doc.get("version")
    known = KNOWN_VERSIONS[kind]
    if version not in known:
        raise UnsupportedFormatError(name, version, ", ".join(str(v) for v in sorted(known)))


def kind_of(name: str) -> str | None:
    """The metadata kind an object name holds, or None for a name that is not metadata."""
    if name in (CONFIG_NAME, IDENTITY_NAME):
        return name
    head, _, rest = name.partition("/")
    if head == "keys" and len(rest) == 16 and _is_hex(rest):
        return "key"
    if head in ("index", "snapshots") and len(rest) == 64 and _is_hex(rest):
        return "index" if head == "index" else "snapshot"
    if head == "wal" and rest.count("/") == 1:
        return "wal"
    if head == "condemned" and len(rest) == 64 and _is_hex(rest):
        return "condemned"
    if head == "deleted" and len(rest) == 64 and _is_hex(rest):
        return "tombstone"
    if head == "sessions" and _is_session_rest(rest):
        return "session"
    return None


def _is_session_rest(rest: str) -> bool:
    """``<16 hex>/<10 digits>`` (a heartbeat) or ``<16 hex>/end`` (see :mod:`shardvault.repository.sessions`)."""
    sid, _, tail = rest.partition("/")
    return len(sid) == 16 and _is_hex(sid) and (tail == "end" or (len(tail) == 10 and tail.isdigit()))


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


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
    if data[4] not in KNOWN_VERSIONS["envelope"]:
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


def parse_key_object(data: bytes) -> dict[str, Any]:
    """The key object's clear fields, checked before any work is spent on it.

    A peer is untrusted: KDF parameters beyond :data:`SCRYPT_MAX_MEMORY` (a
    planted key asking for gigabytes and a minute of scrypt) are refused here,
    without deriving anything.
    """
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != "shardvault-key":
            raise MalformedObject("not a shardvault key object")
        if doc.get("version") not in KNOWN_VERSIONS["key"]:
            raise MalformedObject(f"key object version {doc.get('version')!r} is not one this shardvault reads")
        if doc.get("kdf") != "scrypt":
            raise MalformedObject(f"unknown KDF {doc.get('kdf')!r}")
        n, r, p = int(doc["n"]), int(doc["r"]), int(doc["p"])
        b64d(doc["salt"]), b64d(doc["data"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedObject(f"unparsable key object: {exc}") from None
    if not (n >= 2 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 4) or 128 * r * n * p > SCRYPT_MAX_MEMORY:
        raise MalformedObject(f"scrypt parameters N={n}, r={r}, p={p} exceed the accepted bounds")
    return doc


def open_key_object(passphrase: str, data: bytes) -> tuple[MasterKeys, str]:
    """Return (keys, repository id); OpenFailed on a wrong passphrase, MalformedObject on junk."""
    doc = parse_key_object(data)
    kek = Cipher(derive_key(passphrase, b64d(doc["salt"]), int(doc["n"]), int(doc["r"]), int(doc["p"])))
    try:
        secret = json.loads(kek.open(b64d(doc["data"]), _KEY_AAD))
        return MasterKeys(b64d(secret["encryption"]), b64d(secret["chunk_id"])), str(secret["repository"])
    except (ValueError, KeyError, TypeError) as exc:  # authenticated but malformed: a bug or a forgery
        raise MalformedObject(f"key object content: {exc}") from None


def make_identity(repo_id: str, peer_name: str) -> bytes:
    doc = {
        "format": "shardvault-peer",
        "version": 1,
        "repository": repo_id,
        "peer": secrets.token_hex(16),
        "name": peer_name,
    }
    return json.dumps(doc, sort_keys=True).encode()


def parse_identity(data: bytes) -> dict[str, str]:
    """(repository, peer token, name) of an identity object; MalformedObject otherwise."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != "shardvault-peer":
            raise MalformedObject("not a shardvault peer identity")
        if doc.get("version") not in KNOWN_VERSIONS["identity"]:
            raise MalformedObject(f"identity version {doc.get('version')!r} is not one this shardvault reads")
        out = {"repository": str(doc["repository"]), "peer": str(doc["peer"]), "name": str(doc.get("name", ""))}
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedObject(f"unparsable identity: {exc}") from None
    if len(out["repository"]) != 64 or len(out["peer"]) != 32:
        raise MalformedObject("identity fields have the wrong length")
    return out


@dataclass(frozen=True)
class MetaProblem:
    """A copy of a metadata object that could not be used, or an object no peer holds intact."""

    name: str
    peer: str  # "" when the object as a whole is unreadable
    detail: str

    def to_doc(self) -> dict[str, str]:
        return {"object": self.name, "peer": self.peer, "detail": self.detail}
