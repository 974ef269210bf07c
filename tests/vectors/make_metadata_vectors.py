"""Regenerate tests/vectors/metadata_v1.json.  Run by hand ONLY when a metadata
format version changes on purpose; tests/test_format.py compares the code
against the file.

Pinned here, beside the shard and pack bytes of ``format_v1.json``: the key
object, the peer identity, an index file, a snapshot, a WAL record (each
sealed, so readers of version 1 are pinned) and tree lines (so the writer is
pinned too).  Sealing uses random nonces and scrypt salts, so sealed objects
are pinned for *reading*; the JSON bodies are pinned exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from shardvault.crypto import Cipher, MasterKeys
from shardvault.repository.index import PackRecord, index_doc
from shardvault.repository.metadata import make_identity, make_key_object, seal_object
from shardvault.repository.packs import PackEntry
from shardvault.repository.snapshot import Snapshot
from shardvault.shards.dispersal import ShardRecord
from shardvault.tree import CHAR_DEVICE, DIR, FIFO, FILE, SYMLINK, Entry

PASSPHRASE = "golden vectors"
KEYS = MasterKeys(bytes(range(32)), bytes(range(32, 64)))
REPO_ID = "5e" * 32
PACK = PackRecord(
    id="a1" * 32,
    kind=0,
    k=3,
    n=5,
    length=4096,
    shards=tuple(ShardRecord(i, f"p{i}", bytes([i]) * 32, 1450) for i in range(5)),
    entries=(PackEntry(b"\x07" * 32, 0, 5, 1000, 2000),),
    rev=2,
)
SNAPSHOT = Snapshot(
    id="b2" * 32,
    source="docs",
    source_type="files",
    path="/srv/docs",
    kind="incremental",
    parent="c3" * 32,
    started="2026-11-24T03:00:00+00:00",
    finished="2026-11-24T03:01:00+00:00",
    hostname="backup-1",
    tree=("d4" * 32,),
    stats={"files": 2},
)
ENTRIES = [
    Entry(".", DIR, 0o755, 0, 0, 1_700_000_000_000_000_000, 1_700_000_000_000_000_001, inode=2),
    Entry(
        "a/b.txt",
        FILE,
        0o644,
        1000,
        1000,
        1_700_000_000_123_456_789,
        1_700_000_000_123_456_790,
        size=5,
        inode=12,
        chunks=["e5" * 32],
        hash="f6" * 32,
    ),
    Entry("link", SYMLINK, 0o777, 0, 0, 1_700_000_000_000_000_000, target="a/b.txt", inode=13),
    # Issue 10's optional keys: a sparse, hard-linked file with attributes, an ACL and flags; a FIFO; a device.
    Entry(
        "disk.img",
        FILE,
        0o640,
        1000,
        1000,
        1_700_000_000_000_000_000,
        1_700_000_000_000_000_002,
        size=5 << 30,
        inode=14,
        chunks=["c7" * 32],
        hash="d8" * 32,
        atime_ns=1_700_000_001_000_000_003,
        user="alice",
        group="staff",
        nlink=2,
        dev=2049,
        extents=[(0, 4096), (2 << 30, 8192)],
        xattrs={"user.comment": "aGk=", "system.posix_acl_access": "AgAAAAEABgD/////"},
        flags=0x40,
    ),
    Entry("fifo", FIFO, 0o600, 0, 0, 1_700_000_000_000_000_000, inode=15, user="root", group="root"),
    Entry("null", CHAR_DEVICE, 0o666, 0, 0, 1_700_000_000_000_000_000, inode=16, rdev=259),
]
WAL = {"version": 1, "name": "000000010000000000000003", "size": 16, "hash": "aa" * 32, "chunks": ["bb" * 32]}


def build() -> dict[str, object]:
    cipher = Cipher(KEYS.encryption)
    index_name = "index/" + "0f" * 32
    snap_name = f"snapshots/{SNAPSHOT.id}"
    wal_name = "wal/db/000000010000000000000003"
    return {
        "passphrase": PASSPHRASE,
        "repository": REPO_ID,
        "keys": {"encryption": KEYS.encryption.hex(), "chunk_id": KEYS.chunk_id.hex()},
        "key_object": make_key_object(PASSPHRASE, KEYS, REPO_ID).decode(),
        "identity": make_identity(REPO_ID, "p0").decode(),
        "index": {
            "name": index_name,
            "doc": index_doc([PACK]),
            "sealed": seal_object(cipher, index_name, index_doc([PACK])).hex(),
        },
        "snapshot": {
            "name": snap_name,
            "doc": SNAPSHOT.to_doc(),
            "sealed": seal_object(cipher, snap_name, SNAPSHOT.to_doc()).hex(),
        },
        "wal": {"name": wal_name, "doc": WAL, "sealed": seal_object(cipher, wal_name, WAL).hex()},
        "tree_lines": [e.to_line().decode() for e in ENTRIES],
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("metadata_v1.json")
    out.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
