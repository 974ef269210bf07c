"""Regenerate tests/vectors/format_v1.json.  Run by hand ONLY when the format
version changes on purpose; the tests compare the code against the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shardvault.chunker import Chunker
from shardvault.crypto import Cipher, chunk_id
from shardvault.repository.metadata import seal_object
from shardvault.repository.packs import KIND_DATA, PackWriter, seal_blob
from shardvault.shards.dispersal import shard_objects


def stream(seed: bytes, size: int) -> bytes:
    """Deterministic incompressible bytes (SHA-256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


ENC_KEY = bytes(range(32))
ID_KEY = bytes(range(32, 64))
PACK_ID = bytes.fromhex("5a" * 32)
NONCES = [bytes([i]) * 12 for i in range(1, 4)]
HEADER_NONCE = b"\xee" * 12
CHUNKS = [stream(b"chunk-a", 1000), stream(b"chunk-b", 3333), b""]


def build() -> dict[str, object]:
    cipher = Cipher(ENC_KEY)
    writer = PackWriter()
    ids = []
    for data, nonce in zip(CHUNKS, NONCES, strict=True):
        cid = chunk_id(ID_KEY, data)
        ids.append(cid.hex())
        writer.add(cid, KIND_DATA, seal_blob(cipher, cid, data, 3, nonce), len(data))
    pack = writer.finish(cipher, PACK_ID, HEADER_NONCE)
    shards = shard_objects(PACK_ID, pack, 3, 5)
    text = b"hello shardvault " * 64
    text_id = chunk_id(ID_KEY, text)
    cdc_input = stream(b"cdc", 3 << 20)
    return {
        "enc_key": ENC_KEY.hex(),
        "id_key": ID_KEY.hex(),
        "pack_id": PACK_ID.hex(),
        "nonces": [n.hex() for n in NONCES],
        "header_nonce": HEADER_NONCE.hex(),
        "chunk_ids": ids,
        "pack": pack.hex(),
        "k": 3,
        "n": 5,
        "shards": {str(num): raw.hex() for num, raw in shards.items()},
        "zstd_blob": {
            "id": text_id.hex(),
            "plaintext": text.hex(),
            "sealed": seal_blob(cipher, text_id, text, 3, b"\x07" * 12).hex(),
        },
        "metadata": {
            "name": "snapshots/" + "ab" * 32,
            "doc": {"hello": "world", "n": 1},
            "sealed": seal_object(cipher, "snapshots/" + "ab" * 32, {"hello": "world", "n": 1}).hex(),
        },
        "cdc": {
            "min": 65536,
            "avg": 262144,
            "max": 1048576,
            "cuts": [list(c) for c in Chunker(65536, 262144, 1048576).cuts(cdc_input)],
        },
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("format_v1.json")
    out.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
