"""Regenerate tests/vectors/tombstone_v1.json.  Run by hand ONLY when the tombstone format changes on purpose;
tests/test_forget.py compares the code against the file.

The body is pinned exactly (for writing); the sealed copy, under the keys of
metadata_v1.json, is pinned for reading (sealing uses a random nonce).
"""

from __future__ import annotations

import json
from pathlib import Path

from shardvault.crypto import Cipher
from shardvault.repository.metadata import seal_object
from shardvault.repository.tombstones import tombstone_doc

HERE = Path(__file__).parent
NAMES = [
    "wal/db/000000010000000000000003",
    "snapshots/" + "b2" * 32,
    "wal/db/000000010000000000000002.00000028.backup",
    "snapshots/" + "b2" * 32,  # twice: a tombstone lists each name once, sorted
]
NAME = "deleted/" + "d5" * 32


def build() -> dict[str, object]:
    body = tombstone_doc(NAMES, "forget", "2026-11-24T03:00:00+00:00", "backup-1")
    keys = json.loads((HERE / "metadata_v1.json").read_text())["keys"]
    sealed = seal_object(Cipher(bytes.fromhex(keys["encryption"])), NAME, body)
    return {
        "about": "Tombstone v1 (deleted/<64 hex>): the body, pinned exactly, and a sealed copy under the keys of "
        "metadata_v1.json, pinned for reading.  Regenerate only on a deliberate format change "
        "(make_tombstone_vectors.py).",
        "tombstone": {
            "names": NAMES,
            "reason": "forget",
            "time": "2026-11-24T03:00:00+00:00",
            "hostname": "backup-1",
            "json": json.dumps(body, sort_keys=True, separators=(",", ":")),
            "name": NAME,
            "sealed": sealed.hex(),
        },
    }


if __name__ == "__main__":
    (HERE / "tombstone_v1.json").write_text(json.dumps(build(), indent=2) + "\n")
