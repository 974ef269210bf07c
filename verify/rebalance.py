"""Peers joining and leaving: add (and rebalance onto), drain, remove.

* **add**: the new peer (already in the configuration) gets a copy of every
  metadata object, so it can tell the whole story like the others
  (invariant 1), then shards move onto it from the most loaded peers until it
  holds its share, only where that does not put more of a pack in one zone.
* **drain**: every shard on the peer is copied to another peer (chosen as
  repair chooses), the new placement is committed, and only then is the old
  copy deleted: a pack never has fewer good shards than before the move.
  A shard that cannot be read from the draining peer is rebuilt from the
  others instead.
* **remove**: for a dead peer: its shards are rebuilt from the other peers
  onto the others (a repair that treats the peer as gone), and the index
  stops naming it.  Nothing is read from or written to the removed peer.

Every move is copy → verify → commit (index file, ``rev`` + 1) → delete.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from shardvault.errors import PeerError, RepositoryError
from shardvault.index import PackRecord
from shardvault.metadata import pack_name
from shardvault.repository import Repository
from shardvault.shards.dispersal import ShardRecord
from shardvault.shards.format import ShardFormatError, verify_shard
from shardvault.shards.peers import Peer

from .record import presence, record_pack_states
from .repair import COMMIT_EVERY, Placer, RepairReport, repair


@dataclass
class MoveReport:
    peer: str
    action: str
    shards_moved: int = 0
    bytes_moved: int = 0
    metadata_copied: int = 0
    unreadable: list[str] = field(default_factory=list)  # rebuilt by the follow-up repair
    repair: dict[str, Any] | None = None
    duration_seconds: float = 0.0

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)


def _peer(repo: Repository, name: str) -> Peer:
    peer = repo.peers.get(name)
    if peer is None:
        known = ", ".join(p.name for p in repo.peers)
        raise RepositoryError(f"peer {name!r} is not in the configuration (configured: {known})")
    return peer


def _load(repo: Repository) -> Counter[str]:
    load: Counter[str] = Counter()
    for holders in repo.list_shards().values():
        load.update(holders.keys())
    return load


class _Mover:
    """Copies shards, commits placements in batches, then deletes the sources."""

    def __init__(self, repo: Repository, report: MoveReport) -> None:
        self.repo = repo
        self.report = report
        self.placements: dict[str, tuple[PackRecord, list[ShardRecord]]] = {}  # pack id -> (record, new shards)
        self.sources: list[tuple[Peer, str]] = []

    def shards(self, pack: PackRecord) -> list[ShardRecord]:
        """The pack's shards as they will be once this batch is committed."""
        return self.placements.get(pack.id, (pack, list(pack.shards)))[1]

    def move(self, pack: PackRecord, shard: ShardRecord, source: Peer, targets: list[Peer]) -> bool:
        name = pack_name(pack.id, shard.num)
        try:
            raw = source.store.load(name)
            verify_shard(
                raw, pack_id=bytes.fromhex(pack.id), num=shard.num, k=pack.k, n=pack.n, expected_hash=shard.hash
            )
        except (PeerError, ShardFormatError) as exc:
            self.report.unreadable.append(f"{source.name}:{name}: {exc}")
            return False
        for target in targets:
            try:
                target.store.store(name, raw)
            except PeerError as exc:
                self.repo.peers.mark_down(target, str(exc))
                continue
            shards = [s for s in self.shards(pack) if not (s.num == shard.num and s.peer == source.name)]
            shards.append(ShardRecord(shard.num, target.name, shard.hash, shard.size))
            self.placements[pack.id] = (pack, shards)
            self.sources.append((source, name))
            self.report.shards_moved += 1
            self.report.bytes_moved += len(raw)
            if len(self.placements) >= COMMIT_EVERY:
                self.commit()
            return True
        return False

    def commit(self) -> None:
        """Commit the new placements, then delete the copies they replaced."""
        if self.placements:
            self.repo.write_index([pack.with_shards(shards) for pack, shards in self.placements.values()])
        for source, name in self.sources:
            try:
                source.store.delete(name)
            except PeerError:
                pass  # an unreferenced copy is harmless; prune removes it
        self.placements.clear()
        self.sources.clear()


def drain(repo: Repository, name: str) -> MoveReport:
    peer = _peer(repo, name)
    report = MoveReport(name, "drain")
    start = time.perf_counter()
    peer.store.probe()
    placer = Placer(repo, _load(repo), frozenset({name}))
    mover = _Mover(repo, report)
    for pack in list(repo.index.packs.values()):
        for shard in pack.shards:
            if shard.peer == name:
                holders = [s.peer for s in mover.shards(pack) if s.peer != name]
                mover.move(pack, shard, peer, placer.candidates(holders, None))
    mover.commit()
    if report.unreadable or any(s.peer == name for p in repo.index.packs.values() for s in p.shards):
        report.repair = repair(repo, exclude=frozenset({name})).to_doc()
    _finish(repo, report, start)
    return report


def remove(repo: Repository, name: str) -> MoveReport:
    report = MoveReport(name, "remove")
    start = time.perf_counter()
    result: RepairReport = repair(repo, exclude=frozenset({name}))
    report.repair = result.to_doc()
    report.shards_moved = result.shards_relocated
    report.bytes_moved = result.bytes_written
    _finish(repo, report, start)
    return report


def add(repo: Repository, name: str) -> MoveReport:
    peer = _peer(repo, name)
    report = MoveReport(name, "add")
    start = time.perf_counter()
    peer.store.probe()
    have = {item.name for item in peer.store.list("")}
    donors = [p for p in repo.peers.up() if p.name != name]
    for meta in ["config", *repo.list_meta("keys/"), *repo.list_meta("index/"), *repo.list_meta("snapshots/")]:
        if meta in have:
            continue
        for donor in donors:
            try:
                peer.store.store(meta, donor.store.load(meta))
                report.metadata_copied += 1
                break
            except PeerError:
                continue
    _rebalance_onto(repo, peer, report)
    _finish(repo, report, start)
    return report


def _rebalance_onto(repo: Repository, peer: Peer, report: MoveReport) -> None:
    load = _load(repo)
    up = repo.peers.up()
    share = sum(load.values()) // max(1, len(up))
    zone_of = {p.name: p.zone for p in repo.peers}
    mover = _Mover(repo, report)
    for pack in sorted(repo.index.packs.values(), key=lambda p: p.id):
        if load[peer.name] >= share:
            break
        if any(s.peer == peer.name for s in pack.shards):
            continue
        zones = Counter(zone_of.get(s.peer, s.peer) for s in pack.shards)
        # Move from the most loaded peer whose zone keeps at least as many of
        # this pack's shards as the new peer's zone will have.
        options = [
            s
            for s in pack.shards
            if (src := repo.peers.get(s.peer)) is not None
            and src in up
            and zones[zone_of[s.peer]] >= zones[peer.zone] + 1
            and load[s.peer] > share
        ]
        if not options:
            continue
        shard = max(options, key=lambda s: (load[s.peer], s.peer))
        source = repo.peers.get(shard.peer)
        if source is not None and mover.move(pack, shard, source, [peer]):
            load[shard.peer] -= 1
            load[peer.name] += 1
    mover.commit()


def _finish(repo: Repository, report: MoveReport, start: float) -> None:
    presence(repo, [])
    record_pack_states(repo, repo.state.shard_rows())
    report.duration_seconds = round(time.perf_counter() - start, 3)
    repo.state.record_run(
        f"peers-{report.action}", "ok", time.time() - report.duration_seconds, details=report.to_doc()
    )
