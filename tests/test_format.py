"""Golden vectors: fixed keys, nonces and input give exactly these bytes.

If one of these fails, the on-disk format changed: old repositories would no
longer read.  Bump the format version and keep a reader for the old one
instead of regenerating the vectors.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest
from vectors.make_vectors import CHUNKS, build, stream  # type: ignore[import-not-found]

from shardvault.chunker import Chunker
from shardvault.crypto import Cipher
from shardvault.repository.metadata import FORMAT_VERSION, MalformedObject, open_object
from shardvault.repository.packs import open_blob, read_pack_entries
from shardvault.shards import erasure
from shardvault.shards.format import HEADER_SIZE, SHARD_VERSION, ShardFormatError, parse_shard, verify_shard

VECTORS = json.loads((Path(__file__).parent / "vectors" / "format_v1.json").read_text())


def test_versions_are_one() -> None:
    assert SHARD_VERSION == 1 and FORMAT_VERSION == 1


def test_shard_bytes_are_pinned() -> None:
    """Same key, nonces and chunks -> the same pack and the same shard objects, byte for byte."""
    fresh = build()
    assert fresh["chunk_ids"] == VECTORS["chunk_ids"]
    assert fresh["pack"] == VECTORS["pack"]
    assert fresh["shards"] == VECTORS["shards"]


def test_chunk_boundaries_are_pinned() -> None:
    """Dedup across versions needs the same cuts for the same data."""
    cdc = VECTORS["cdc"]
    cuts = Chunker(cdc["min"], cdc["avg"], cdc["max"]).cuts(stream(b"cdc", 3 << 20))
    assert [list(c) for c in cuts] == cdc["cuts"]


def test_golden_shards_decode_from_any_k() -> None:
    k, n = VECTORS["k"], VECTORS["n"]
    pack_id = bytes.fromhex(VECTORS["pack_id"])
    shards = {int(num): bytes.fromhex(raw) for num, raw in VECTORS["shards"].items()}
    pack = bytes.fromhex(VECTORS["pack"])
    for combo in combinations(range(n), k):
        blocks = {}
        for num in combo:
            header, payload, _ = parse_shard(shards[num])
            assert (header.k, header.n, header.num, header.pack_id) == (k, n, num, pack_id)
            blocks[num] = payload
        assert erasure.decode(blocks, k, n, header.pack_length).tobytes() == pack
    cipher = Cipher(bytes.fromhex(VECTORS["enc_key"]))
    entries = read_pack_entries(cipher, pack_id, pack)
    assert [e.chunk_id.hex() for e in entries] == VECTORS["chunk_ids"]
    for entry, plain in zip(entries, CHUNKS, strict=True):
        assert (
            open_blob(cipher, entry.chunk_id, pack[entry.offset : entry.offset + entry.length], entry.raw_length)
            == plain
        )


def test_compressed_blob_and_metadata_still_open() -> None:
    """zstd output may differ between library versions, so these are pinned for reading."""
    cipher = Cipher(bytes.fromhex(VECTORS["enc_key"]))
    blob = VECTORS["zstd_blob"]
    sealed = bytes.fromhex(blob["sealed"])
    plain = bytes.fromhex(blob["plaintext"])
    assert len(sealed) < len(plain)  # it really is compressed
    assert open_blob(cipher, bytes.fromhex(blob["id"]), sealed, len(plain)) == plain
    meta = VECTORS["metadata"]
    assert open_object(cipher, meta["name"], bytes.fromhex(meta["sealed"])) == meta["doc"]
    with pytest.raises(MalformedObject):  # the name is bound: the same bytes under another name fail
        open_object(cipher, "snapshots/" + "cd" * 32, bytes.fromhex(meta["sealed"]))


def _shard(num: int = 0) -> bytes:
    return bytes.fromhex(VECTORS["shards"][str(num)])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[: HEADER_SIZE + 10], "truncated"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b + b"\0", "extended"),
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "hash mismatch"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], "version 9"),
    ],
)
def test_damaged_shards_are_named(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ShardFormatError, match=message):
        verify_shard(mutate(_shard()), pack_id=bytes.fromhex(VECTORS["pack_id"]), num=0, k=3, n=5, expected_hash=None)


def test_swapped_and_replayed_shards_are_caught() -> None:
    pack_id = bytes.fromhex(VECTORS["pack_id"])
    good = _shard(1)
    with pytest.raises(ShardFormatError, match="expected 0"):  # shard 1 served as shard 0
        verify_shard(good, pack_id=pack_id, num=0, k=3, n=5, expected_hash=None)
    with pytest.raises(ShardFormatError, match="swapped"):  # another pack's shard
        verify_shard(good, pack_id=b"\x01" * 32, num=1, k=3, n=5, expected_hash=None)
    with pytest.raises(ShardFormatError, match="replayed"):  # well-formed but not what the index recorded
        verify_shard(good, pack_id=pack_id, num=1, k=3, n=5, expected_hash=b"\x00" * 32)
    assert verify_shard(good, pack_id=pack_id, num=1, k=3, n=5, expected_hash=good[-32:])


# --- metadata objects (tests/vectors/metadata_v1.json) ----------------------------------------

META = json.loads((Path(__file__).parent / "vectors" / "metadata_v1.json").read_text())


def test_metadata_vectors_read_and_write_exactly() -> None:
    from vectors.make_metadata_vectors import ENTRIES, PACK, SNAPSHOT  # type: ignore[import-not-found]

    from shardvault.repository.index import PackRecord, index_doc
    from shardvault.repository.metadata import open_key_object, parse_identity
    from shardvault.repository.snapshot import Snapshot
    from shardvault.tree import parse_lines

    keys, repo_id = open_key_object(META["passphrase"], META["key_object"].encode())
    assert (keys.encryption.hex(), keys.chunk_id.hex(), repo_id) == (
        META["keys"]["encryption"],
        META["keys"]["chunk_id"],
        META["repository"],
    )
    assert parse_identity(META["identity"].encode())["repository"] == META["repository"]
    cipher = Cipher(keys.encryption)
    for kind in ("index", "snapshot", "wal"):
        vec = META[kind]
        assert open_object(cipher, vec["name"], bytes.fromhex(vec["sealed"])) == vec["doc"]
    assert index_doc([PACK]) == META["index"]["doc"]
    assert PackRecord.from_doc(META["index"]["doc"]["packs"][0]) == PACK
    assert SNAPSHOT.to_doc() == META["snapshot"]["doc"]
    assert Snapshot.from_doc(META["snapshot"]["doc"]) == SNAPSHOT
    assert [e.to_line().decode() for e in ENTRIES] == META["tree_lines"]
    assert list(parse_lines([line.encode() for line in META["tree_lines"]])) == ENTRIES


@pytest.mark.parametrize("kind", ["config", "key", "identity", "index", "snapshot", "wal"])
def test_unknown_body_versions_are_refused_by_name(kind: str) -> None:
    from shardvault.errors import UnsupportedFormatError
    from shardvault.repository.metadata import KNOWN_VERSIONS, check_version

    assert 1 in KNOWN_VERSIONS[kind]
    check_version(kind, {"version": 1}, "obj")
    with pytest.raises(UnsupportedFormatError, match="obj has format version 2"):
        check_version(kind, {"version": 2}, "obj")
