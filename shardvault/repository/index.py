"""The index: which pack holds each chunk, and where each pack's shards are.

Each backup run writes index files (``index/<id>``) naming only the packs it
created: one at each checkpoint and one at the end, so a killed run leaves
index files for the packs it finished and a rerun deduplicates against them
(it resumes instead of re-uploading).  The in-memory :class:`Index` is the
union of all index files.  Index file body (inside the sealed metadata
envelope)::

    {"version": 1, "packs": [
        {"id": hex, "kind": 0|1, "k": 4, "n": 6, "length": bytes,
         "shards": [[num, peer, hash hex, size], ...],
         "blobs":  [[chunk id hex, offset, length, plaintext length], ...],
         "rev": 1}]}

Repair and rebalancing move shards without rewriting history: they write a
new index file with the pack's record at ``rev`` + 1 (``rev`` is absent, 0,
for the record a backup wrote), and the union keeps, for each pack, the
record with the highest ``rev``.  Writing that file is the one atomic step
of a move: before it, readers use the old placement (whose shards are only
deleted after it); after it, the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from shardvault.shards.dispersal import ShardRecord

from .packs import PackEntry

INDEX_VERSION = 1


class BlobLocation(NamedTuple):  # a tuple: one per chunk when the index loads, fast to make
    pack_id: str
    offset: int
    length: int
    raw_length: int


@dataclass(frozen=True)
class PackRecord:
    id: str
    kind: int
    k: int
    n: int
    length: int
    shards: tuple[ShardRecord, ...]
    entries: tuple[PackEntry, ...]
    rev: int = 0

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "k": self.k,
            "n": self.n,
            "length": self.length,
            "shards": [[s.num, s.peer, s.hash.hex(), s.size] for s in self.shards],
            "blobs": [[e.chunk_id.hex(), e.offset, e.length, e.raw_length] for e in self.entries],
        }
        if self.rev:
            doc["rev"] = self.rev
        return doc

    def with_shards(self, shards: list[ShardRecord]) -> PackRecord:
        """The next revision of this record, with a new placement."""
        return replace(self, shards=tuple(sorted(shards, key=lambda s: (s.num, s.peer))), rev=self.rev + 1)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> PackRecord:
        kind = int(doc["kind"])
        return cls(
            id=str(doc["id"]),
            kind=kind,
            k=int(doc["k"]),
            n=int(doc["n"]),
            length=int(doc["length"]),
            shards=tuple(ShardRecord(int(s[0]), str(s[1]), bytes.fromhex(s[2]), int(s[3])) for s in doc["shards"]),
            entries=tuple(PackEntry(bytes.fromhex(b[0]), kind, int(b[1]), int(b[2]), int(b[3])) for b in doc["blobs"]),
            rev=int(doc.get("rev", 0)),
        )


def index_doc(packs: Iterable[PackRecord]) -> dict[str, Any]:
    return {"version": INDEX_VERSION, "packs": [p.to_doc() for p in packs]}


class Index:
    """The union of the repository's index files."""

    def __init__(self, condemned: set[str] | None = None) -> None:
        # Packs a prune has condemned (shardvault.repository.condemned): readers still find
        # them (a backup that began before the prune may lean on them, and the next prune
        # keeps what a snapshot needs), but no backup dedups against them and check, scrub
        # and repair leave them to prune (:meth:`live_packs`).
        self.condemned_ids: frozenset[str] = frozenset(condemned or ())
        self.packs: dict[str, PackRecord] = {}
        self.blobs: dict[bytes, BlobLocation] = {}
        # Further locations of chunks stored more than once: a backup stores a chunk again when
        # its pack is lost (finding 1 of issue 7), and two writers may store the same chunk.
        self.alternatives: dict[bytes, list[BlobLocation]] = {}
        self.files: set[str] = set()

    def add(self, record: PackRecord) -> None:
        old = self.packs.get(record.id)
        # The highest revision wins, whatever order index files are read in;
        # equal revisions (two repairs at once) are ordered by their bytes.
        if old is not None and (old.rev, repr(old.shards)) >= (record.rev, repr(record.shards)):
            return
        self.packs[record.id] = record
        for e in record.entries:
            loc = BlobLocation(record.id, e.offset, e.length, e.raw_length)
            first = self.blobs.setdefault(e.chunk_id, loc)
            if first.pack_id != record.id:
                others = self.alternatives.setdefault(e.chunk_id, [])
                if all(o.pack_id != record.id for o in others):
                    others.append(loc)

    def locations(self, chunk_id: bytes) -> list[BlobLocation]:
        """Every known location of a chunk, the preferred one first."""
        first = self.blobs.get(chunk_id)
        return ([first] if first else []) + self.alternatives.get(chunk_id, [])

    def live_packs(self) -> list[PackRecord]:
        """The packs no prune has condemned: what check, scrub and repair look after."""
        return [p for p in self.packs.values() if p.id not in self.condemned_ids]

    def prefer(self, usable: Callable[[str], bool]) -> int:
        """Point chunks whose pack is not ``usable`` at a copy in a usable pack; return how many moved.

        Which index file is read first is arbitrary, so without this a restore
        could pick a lost pack's copy of a chunk that a later backup stored again.
        """
        moved = 0
        for chunk, others in self.alternatives.items():
            first = self.blobs[chunk]
            if usable(first.pack_id):
                continue
            for i, loc in enumerate(others):
                if usable(loc.pack_id):
                    others[i] = first
                    self.blobs[chunk] = loc
                    moved += 1
                    break
        return moved

    def add_doc(self, name: str, doc: dict[str, Any]) -> None:
        for pack in doc.get("packs", []):
            self.add(PackRecord.from_doc(pack))
        self.files.add(name)

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self.blobs


# (pack id, shard number) -> {peer: size}: one listing of every peer's shards
Listing = dict[tuple[str, int], dict[str, int]]


def intact_shard_nums(record: PackRecord, listing: Listing, corrupt: set[tuple[str, int, str]]) -> set[int]:
    """The one rule for "which of a pack's shards can be counted on" without reading them.

    A shard counts if it is on its recorded peer with its recorded size and
    no read has found it corrupt since (``corrupt``: (pack, num, peer) keys
    from the state).  Backups (dedup), restore plans, check and the reader's
    choice between copies of a chunk all use it.
    """
    return {
        s.num
        for s in record.shards
        if listing.get((record.id, s.num), {}).get(s.peer) == s.size and (record.id, s.num, s.peer) not in corrupt
    }
