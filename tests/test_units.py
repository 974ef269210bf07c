"""Unit tests of the building blocks: chunker, erasure coding, placement, crypto, keys."""

from __future__ import annotations

import io
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

import pytest
from vectors.make_vectors import stream  # type: ignore[import-not-found]

from shardvault.chunker import Chunker
from shardvault.crypto import MasterKeys, OpenFailed
from shardvault.repository.metadata import make_key_object, open_key_object
from shardvault.shards import erasure
from shardvault.shards.dispersal import get_pack, put_pack
from shardvault.shards.peers import Peer, PeerSet
from shardvault.shards.placement import place
from shardvault.shards.stores import LocalStore


@pytest.mark.parametrize("window", [2 << 20, 3 << 20 | 12345, 16 << 20])
def test_streaming_chunker_cuts_like_the_whole_buffer(window: int) -> None:
    data = stream(b"w", 9 << 20) + b"\0" * (3 << 20) + stream(b"x", 1 << 20)
    chunker = Chunker(64 << 10, 256 << 10, 1 << 20, window=window)
    whole = [data[o : o + n] for o, n in chunker.cuts(data)]
    streamed = list(chunker.chunks(io.BytesIO(data)))
    assert streamed == whole
    assert b"".join(streamed) == data
    assert all(len(c) <= 1 << 20 for c in streamed)
    assert all(len(c) >= 64 << 10 for c in streamed[:-1])


@pytest.mark.parametrize("hint", [0, 1, 300 << 10, 9 << 20, 13 << 20, 40 << 20])
def test_a_size_hint_never_moves_a_cut(hint: int) -> None:
    """A file shorter, longer or as long as its hint (it changed since its stat) is cut the same."""
    data = stream(b"h", 9 << 20) + b"\0" * (3 << 20) + stream(b"i", 1 << 20)
    chunker = Chunker(64 << 10, 256 << 10, 1 << 20, window=4 << 20)
    assert list(chunker.chunks(io.BytesIO(data), hint)) == list(chunker.chunks(io.BytesIO(data)))


def test_chunker_dedups_shifted_data() -> None:
    """An insertion near the start changes only the chunks around it."""
    base = stream(b"d", 8 << 20)
    chunker = Chunker(64 << 10, 256 << 10, 1 << 20)
    a = set(chunker.chunks(io.BytesIO(base)))
    b = set(chunker.chunks(io.BytesIO(base[:1000] + b"inserted" + base[1000:])))
    assert len(a & b) >= len(a) - 3


def test_chunker_small_and_empty_streams() -> None:
    chunker = Chunker(64 << 10, 256 << 10, 1 << 20)
    assert list(chunker.chunks(io.BytesIO(b""))) == []
    assert list(chunker.chunks(io.BytesIO(b"abc"))) == [b"abc"]


@pytest.mark.parametrize(("k", "n"), [(1, 3), (2, 2), (3, 5), (4, 6), (10, 14)])
def test_any_k_blocks_rebuild(k: int, n: int) -> None:
    rng = random.Random(k * 100 + n)
    for length in (0, 1, k - 1, 1000, 65536 + 3):
        data = rng.randbytes(length)
        blocks = erasure.encode(data, k, n)
        assert len(blocks) == n
        assert b"".join(bytes(blocks[i]) for i in range(k))[:length] == data  # systematic
        combos = list(combinations(range(n), k))
        for combo in rng.sample(combos, min(len(combos), 30)):
            assert erasure.decode({i: blocks[i] for i in combo}, k, n, length).tobytes() == data


def test_parity_only_encoding_matches() -> None:
    data = os.urandom(100_003)
    full = erasure.encode(data, 4, 6)
    parity = erasure.encode(data, 4, 6, wanted=[5])
    assert list(parity) == [5] and bytes(parity[5]) == bytes(full[5])


def _peers(zones: list[str]) -> list[Peer]:
    return [Peer(f"p{i}", z, LocalStore(f"p{i}", "/nonexistent")) for i, z in enumerate(zones)]


def test_placement_spreads_over_zones_first() -> None:
    peers = _peers(["a", "a", "a", "b", "b", "c"])
    for seed in range(20):
        chosen = place(peers, 3, seed.to_bytes(4, "little"))
        assert len({p.name for p in chosen}) == 3
        assert {p.zone for p in chosen} == {"a", "b", "c"}
    chosen = place(peers, 6, b"\0\0\0\0")
    assert len({p.name for p in chosen}) == 6


def test_placement_excludes_and_rotates() -> None:
    peers = _peers(["a", "b", "c", "d", "e", "f", "g"])
    firsts = {place(peers, 4, i.to_bytes(4, "little"))[0].name for i in range(7)}
    assert len(firsts) == 7  # the primary shard moves around
    chosen = place(peers, 6, b"\0\0\0\0", exclude=frozenset({"p0", "p1"}))
    assert len(chosen) == 5 and not {"p0", "p1"} & {p.name for p in chosen}


class _CountingStore(LocalStore):
    """A local peer that records what was read from it and can be made slow."""

    def __init__(self, peer: str, root: Path, delay: float = 0.0) -> None:
        super().__init__(peer, root, fsync=False)
        self.delay = delay
        self.loads: list[str] = []

    def load(self, name: str) -> bytes:
        self.loads.append(name)
        time.sleep(self.delay)
        return super().load(name)


def test_reader_prefers_primary_shards_and_avoids_slow_peers(tmp_path: Path) -> None:
    stores = [_CountingStore(f"p{i}", tmp_path / f"p{i}") for i in range(6)]
    for store in stores:
        store.root.mkdir()
    peers = PeerSet([Peer(s.peer, f"z{i}", s) for i, s in enumerate(stores)])
    data, pack_id = os.urandom(1 << 20), os.urandom(32)
    with ThreadPoolExecutor(6) as pool:
        records = put_pack(peers, pool, pack_id, data, 4, 6, 6, lambda num: f"data/00/x.{num:02d}")
        by_num = {r.num: r.peer for r in records}
        problems: list[object] = []

        def read() -> set[int]:
            for store in stores:
                store.loads.clear()
            got = get_pack(
                peers, pool, pack_id, 4, 6, len(data), records, lambda num: f"data/00/x.{num:02d}", problems.append
            )
            assert got.tobytes() == data and not problems
            return {int(name[-2:]) for s in stores for name in s.loads}

        # Peers of about one speed: the primary shards, whose decoding is a copy.
        assert read() == {0, 1, 2, 3}
        # The peer of shard 0 turns slow: a parity shard from a fast peer is read instead.
        slow = next(s for s in stores if s.peer == by_num[0])
        slow.delay = 0.3
        read()
        slow.delay = 0.0
        assert 0 not in read()


def test_key_object_opens_only_with_its_passphrase() -> None:
    keys = MasterKeys.generate()
    blob = make_key_object("right", keys, "repo")
    assert open_key_object("right", blob) == (keys, "repo")
    with pytest.raises(OpenFailed):
        open_key_object("wrong", blob)
    assert b"right" not in blob and keys.encryption not in blob
