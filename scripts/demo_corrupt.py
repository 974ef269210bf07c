"""Flip one bit in the shard, on the given peer, of a source's latest data pack.

Part of the demo: it uses the library to find the object, then damages it the
way bit rot would, behind shardvault's back.
"""

from __future__ import annotations

import os
import sys

from shardvault.config import load_config, read_password
from shardvault.repository import Repository
from shardvault.repository.metadata import pack_name


def main(peer_name: str, source: str) -> None:
    config = load_config()
    with Repository.open(config, read_password()) as repo:
        snap = [s for s in repo.snapshots() if s.source == source][-1]
        chunk = next(repo.iter_tree(snap)).chunks or [c for e in repo.iter_tree(snap) for c in e.chunks]
        pack_id = repo.index.blobs[bytes.fromhex(chunk[0])].pack_id
        shard = next(s for s in repo.index.packs[pack_id].shards if s.peer == peer_name)
    path = config.peer(peer_name).url.removeprefix("file://") + "/" + pack_name(pack_id, shard.num)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    print(
        f"flipped one bit in {pack_name(pack_id, shard.num)} on peer {peer_name} "
        f"(shard {shard.num} of pack {pack_id[:16]}, data of snapshot {snap.short_id} of {source!r})"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
