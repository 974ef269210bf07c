"""Repair: give every pack back its n good shards.

For each pack with missing, truncated or corrupt shards (from a fresh
listing and the verdicts earlier scrubs recorded), or with shards on a peer
being removed:

1. read k good shards (the reader skips and reports any further bad ones)
   and decode the pack;
2. encode only the missing shard numbers (zfec makes any block on its own);
   the bytes are exactly the ones written at backup time, so their hash
   matches the index;
3. write each shard back to its own peer when that peer is up, otherwise to
   another peer: one that holds nothing of this pack, in the zone with the
   fewest of its shards, the least loaded first (as Tahoe's "servers of
   happiness").  A second shard of a pack goes to a peer that already holds
   one only when no other peer can take it.  Each write is retried with
   backoff before the peer is given up for this run;
4. commit new placements in one index file (records at ``rev`` + 1): the
   atomic step.  A repair killed before it leaves only unreferenced shards.

Packs with fewer than k good shards are lost: they are reported with the
snapshots and files that need them, and nothing is written for them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from shardvault.errors import PeerError, ShardvaultError
from shardvault.index import PackRecord
from shardvault.metadata import pack_name
from shardvault.repository import Repository
from shardvault.shards import erasure
from shardvault.shards.dispersal import ShardRecord
from shardvault.shards.format import ShardHeader, build_shard
from shardvault.shards.peers import Peer
from shardvault.state import ShardKey

from .record import GOOD, ShardIssue, presence, record_pack_states

RETRIES = 3
BACKOFF = 0.2  # seconds, doubled after each failed attempt
COMMIT_EVERY = 32  # packs per index file, so a long repair commits as it goes


@dataclass
class LostPack:
    pack: str
    good: int
    k: int
    snapshots: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass
class RepairReport:
    packs: int = 0
    packs_repaired: int = 0
    shards_rebuilt: int = 0
    shards_relocated: int = 0
    bytes_written: int = 0
    lost: list[LostPack] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)  # shards no peer could take
    issues: list[ShardIssue] = field(default_factory=list)
    peers_unreachable: dict[str, str] = field(default_factory=dict)
    duration_seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.lost and not self.unplaced

    def to_doc(self) -> dict[str, Any]:
        return asdict(self) | {"complete": self.complete}


ProgressFn = Callable[[int, int], None]


class Placer:
    """Chooses peers for new shards: zones first, then load, never a dead or excluded peer."""

    def __init__(self, repo: Repository, load: Counter[str], exclude: frozenset[str]) -> None:
        self.repo = repo
        self.load = load
        self.exclude = exclude

    def candidates(self, holders: list[str], preferred: str | None) -> list[Peer]:
        peers = [p for p in self.repo.peers.up() if p.name not in self.exclude]
        zones = Counter(p.zone for p in self.repo.peers if p.name in holders)
        free = [p for p in peers if p.name not in holders]
        free.sort(key=lambda p: (p.name != preferred, zones[p.zone], self.load[p.name], p.name))
        doubled = sorted((p for p in peers if p.name in holders), key=lambda p: (self.load[p.name], p.name))
        return free + doubled

    def store(self, name: str, data: bytes, holders: list[str], preferred: str | None) -> Peer | None:
        """Store on the best peer that accepts it, retrying each with backoff."""
        for peer in self.candidates(holders, preferred):
            delay = BACKOFF
            for attempt in range(RETRIES):
                try:
                    peer.store.store(name, data)
                    self.load[peer.name] += 1
                    return peer
                except PeerError as exc:
                    if attempt == RETRIES - 1:
                        self.repo.peers.mark_down(peer, str(exc))
                    else:
                        time.sleep(delay)
                        delay *= 2
        return None


def repair(repo: Repository, exclude: frozenset[str] = frozenset(), progress: ProgressFn | None = None) -> RepairReport:
    """Rebuild what is missing or corrupt; relocate shards off ``exclude`` peers."""
    report = RepairReport()
    started, start = time.time(), time.perf_counter()
    present, listed = presence(repo, report.issues)
    rows = repo.state.shard_rows()
    good_keys = {
        (p.id, s.num, s.peer)
        for p, s in present
        if s.peer not in exclude and rows.get((p.id, s.num, s.peer), (None, "present", ""))[1] in GOOD
    }
    load: Counter[str] = Counter()
    for holders in listed.values():
        load.update(holders.keys())
    placer = Placer(repo, load, exclude)
    todo = [p for p in repo.index.packs.values() if _missing(p, good_keys)]
    report.packs = len(repo.index.packs)
    changed: list[PackRecord] = []
    verdicts: list[tuple[ShardKey, str, str, bool]] = []
    forget: list[ShardKey] = []
    for done, pack in enumerate(todo, 1):
        _repair_pack(repo, pack, good_keys, placer, report, changed, verdicts, forget)
        if len(changed) >= COMMIT_EVERY:
            _commit(repo, changed, verdicts, forget)
        if progress:
            progress(done, len(todo))
    _commit(repo, changed, verdicts, forget)
    report.peers_unreachable = repo.peers.down()
    if report.lost:
        _name_lost_data(repo, report.lost)
    presence(repo, [])  # the state now describes the repaired repository
    record_pack_states(repo, repo.state.shard_rows())
    report.duration_seconds = round(time.perf_counter() - start, 3)
    repo.state.record_run(
        "repair",
        "ok" if report.complete else "incomplete",
        started,
        details={k: v for k, v in report.to_doc().items() if k not in ("issues", "lost")}
        | {"lost": [lp.pack for lp in report.lost]},
    )
    return report


def _missing(pack: PackRecord, good_keys: set[ShardKey]) -> list[int]:
    have = {s.num for s in pack.shards if (pack.id, s.num, s.peer) in good_keys}
    return [num for num in range(pack.n) if num not in have]


def _repair_pack(
    repo: Repository,
    pack: PackRecord,
    good_keys: set[ShardKey],
    placer: Placer,
    report: RepairReport,
    changed: list[PackRecord],
    verdicts: list[tuple[ShardKey, str, str, bool]],
    forget: list[ShardKey],
) -> None:
    good = [s for s in pack.shards if (pack.id, s.num, s.peer) in good_keys]
    if len({s.num for s in good}) < pack.k:
        report.lost.append(LostPack(pack.id, len({s.num for s in good}), pack.k))
        return
    try:
        decoded = repo.fetch_pack(pack.with_shards(good))
    except ShardvaultError:
        decoded = None
    # Shards the reader found bad are not good any more: rebuild them too.
    for problem in repo.take_problems():
        good = [s for s in good if not (s.num == problem.num and s.peer == problem.peer)]
        verdicts.append(((pack.id, problem.num, problem.peer), problem.kind, problem.detail, problem.kind == "corrupt"))
    if decoded is None:
        report.lost.append(LostPack(pack.id, len({s.num for s in good}), pack.k))
        return
    have = {s.num for s in good}
    missing = [num for num in range(pack.n) if num not in have]
    data = decoded.tobytes()
    blocks = erasure.encode(data, pack.k, pack.n, wanted=missing)
    pack_id = bytes.fromhex(pack.id)
    old_peer = {s.num: s.peer for s in pack.shards}
    new = list(good)
    for num in missing:
        raw = build_shard(ShardHeader(pack.k, pack.n, num, pack_id, len(data), len(blocks[num])), blocks[num])
        holders = [s.peer for s in new]
        peer = placer.store(pack_name(pack.id, num), raw, holders, old_peer.get(num))
        if peer is None:
            report.unplaced.append(f"{pack_name(pack.id, num)}: no peer could take it")
            continue
        new.append(ShardRecord(num, peer.name, raw[-32:], len(raw)))
        verdicts.append(((pack.id, num, peer.name), "ok", "rebuilt by repair", True))
        report.shards_rebuilt += 1
        report.bytes_written += len(raw)
        if peer.name != old_peer.get(num):
            report.shards_relocated += 1
    report.packs_repaired += 1
    record = pack.with_shards(new)
    if sorted(record.shards, key=lambda s: (s.num, s.peer)) != sorted(pack.shards, key=lambda s: (s.num, s.peer)):
        changed.append(record)
        kept = {(s.num, s.peer) for s in new}
        forget.extend((pack.id, s.num, s.peer) for s in pack.shards if (s.num, s.peer) not in kept)


def _commit(
    repo: Repository, changed: list[PackRecord], verdicts: list[tuple[ShardKey, str, str, bool]], forget: list[ShardKey]
) -> None:
    """Write the new placements (the atomic step), then record what was done."""
    if changed:
        repo.write_index(changed)
    repo.state.record_shards(verdicts)
    repo.state.forget_shards(forget)
    repaired: Counter[tuple[str, str]] = Counter()
    for (_, _, peer), _, detail, _ in verdicts:
        if detail == "rebuilt by repair":
            repaired[(peer, "shards_repaired")] += 1
    repo.state.add_counters(dict(repaired))
    changed.clear()
    verdicts.clear()
    forget.clear()


def _name_lost_data(repo: Repository, lost: list[LostPack], first_files: int = 5) -> None:
    """Which snapshots and files need each lost pack (as far as their trees can be read)."""
    by_id = {lp.pack: lp for lp in lost}
    blobs = repo.index.blobs
    for snapshot in repo.snapshots():
        label = f"{snapshot.short_id} ({snapshot.source})"
        tree_packs = {blobs[bytes.fromhex(c)].pack_id for c in snapshot.tree if bytes.fromhex(c) in blobs}
        for pack_id in tree_packs & by_id.keys():
            by_id[pack_id].snapshots.append(label)
            by_id[pack_id].files.append(f"{label}: the snapshot's file list itself")
        if tree_packs & by_id.keys():
            continue
        try:
            for entry in repo.iter_tree(snapshot):
                for pack_id in {blobs[bytes.fromhex(c)].pack_id for c in entry.chunks} & by_id.keys():
                    lp = by_id[pack_id]
                    if label not in lp.snapshots:
                        lp.snapshots.append(label)
                    if len(lp.files) < first_files:
                        lp.files.append(f"{label}: {entry.path}")
        except ShardvaultError:
            continue
