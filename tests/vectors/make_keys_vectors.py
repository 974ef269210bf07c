"""Regenerate tests/vectors/keys_v1.json.  Run by hand ONLY when the key object's
``info`` format changes on purpose; tests/test_keys.py compares the code against
the file.

Pinned: a key object of version 1 carrying the sealed ``info`` field (see
:mod:`shardvault.repository.keys`), with the master keys and passphrase of
``metadata_v1.json``.  scrypt salts are random, so the object is pinned for
*reading*; the info body (its plaintext JSON) and the rule for its digest are
pinned exactly.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from make_metadata_vectors import KEYS, PASSPHRASE, REPO_ID  # type: ignore[import-not-found]

from shardvault.crypto import Cipher
from shardvault.repository.keys import KeyInfo, make_key

NAME = "keys/0123456789abcdef"
INFO = KeyInfo("2026-11-24T09:00:00+00:00", "backup-1", "operator", "laptop of the on-call")
NONCE = bytes(range(12))


def build() -> dict[str, object]:
    data = make_key(PASSPHRASE, KEYS, REPO_ID, NAME, INFO, nonce=NONCE)
    doc = json.loads(data)
    sealed = Cipher(KEYS.encryption).open(base64.b64decode(doc["info"]), b"shardvault key info v1:" + NAME.encode())
    return {
        "passphrase": PASSPHRASE,
        "repository": REPO_ID,
        "keys": {"encryption": KEYS.encryption.hex(), "chunk_id": KEYS.chunk_id.hex()},
        "name": NAME,
        "key_object": data.decode(),
        "info_body": json.loads(sealed),
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("keys_v1.json")
    out.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
