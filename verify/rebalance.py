"""Peers joining and leaving: add (and rebalance onto), drain, remove.

* **add**: the new peer (already in the configuration) gets a copy of every
  metadata object, so it can tell the whole story like the others
  (invariant 1), then shards move onto it from the most loaded peers until it
  holds its share, only where that does not put more of a pack in one zone.
  Packs crowded on one peer or zone are then spread out by a repair, which
  picks the least used peers (the new one first).
* **drain**: every shard on the peer is copied to another peer (chosen as
  repair chooses), the new placement is committed, and only then is the old
  copy deleted: a pack never has fewer good shards than before the move.
  A shard that cannot be read from the draining peer is rebuilt from the
  others instead.  A backup running meanwhile may commit packs with shards
  on the peer, so after each round the index is read again from the peers
  and the next round moves what appeared; only when a fresh index names no
  shard on the peer does the report call it removable.
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

from shardvault.errors import ConfigValueError, PeerError
from shardvault.repository import Repository
from shardvault.repository.index import PackRecord
from shardvault.repository.metadata import pack_name, parse_shard_name
from shardvault.repository.sessions import SessionKind
from shardvault.shards.dispersal import ShardRecord, read_shard
from shardvault.shards.format import ShardFormatError
from shardvault.shards.peers import Peer

from .metadata import audit, heal
from .record import Layout, presence, record_pack_states
from .repair import COMMIT_EVERY, Placer, RepairReport, repair

DRAIN_ROUNDS = 5  # re-reads of the index for shards concurrent backups put on a draining peer


@dataclass
class MoveReport:
    peer: str
    action: str
    shards_moved: int = 0
    bytes_moved: int = 0
    metadata_copied: int = 0
    unreadable: list[str] = field(default_factory=list)  # rebuilt by the follow-up repair
    repair: dict[str, Any] | None = None
    # drain and remove: shards a fresh index still names on the peer (a backup wrote them meanwhile)
    shards_remaining: int = 0
    superseded_deleted: int = 0  # drain: copies on the peer that the index places elsewhere
    leftovers: int = 0  # drain: objects left on the peer that no index knows (an unfinished backup's)
    rounds: int = 0
    duration_seconds: float = 0.0

    @property
    def removable(self) -> bool:
        """Drain and remove: the peer may be taken out of the configuration."""
        complete = self.repair is None or bool(self.repair["complete"])
        return self.action in ("drain", "remove") and self.shards_remaining == 0 and complete

    def to_doc(self) -> dict[str, Any]:
        return asdict(self) | {"removable": self.removable}


def _peer(repo: Repository, name: str) -> Peer:
    peer = repo.peers.get(name)
    if peer is None:
        known = ", ".join(p.name for p in repo.peers)
        raise ConfigValueError(repo.config.path, "peers", f"no peer named {name!r} (configured: {known})")
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
            raw = read_shard(self.repo.peers, shard, name, pack_id=bytes.fromhex(pack.id), k=pack.k, n=pack.n).raw
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
    repo.announce(SessionKind.REPAIR)
    report = MoveReport(name, "drain")
    start = time.perf_counter()
    peer.store.probe()
    for _ in range(DRAIN_ROUNDS):
        held = _held_by(repo, name)
        if not held:
            break
        report.rounds += 1
        _drain_round(repo, peer, held, report)
    report.shards_remaining = len(_held_by(repo, name))
    if report.shards_remaining == 0:
        _clear_superseded(repo, peer, report)
    _finish(repo, report, start)
    return report


def _clear_superseded(repo: Repository, peer: Peer, report: MoveReport) -> None:
    """Delete the drained peer's copies of shards the index now places elsewhere.

    A drain killed between its commit and its deletes leaves such copies; once
    the peer leaves the configuration nothing would ever see them.  Shards of
    packs the index does not know are left alone (a backup may be writing
    them right now) and counted as leftovers.
    """
    for item in list(peer.store.list("data/")):
        parsed = parse_shard_name(item.name)
        pack = repo.index.packs.get(parsed[0]) if parsed else None
        if pack is None:
            report.leftovers += 1
            continue
        try:
            peer.store.delete(item.name)
            report.superseded_deleted += 1
        except PeerError:
            report.leftovers += 1


def _drain_round(repo: Repository, peer: Peer, held: list[tuple[PackRecord, ShardRecord]], report: MoveReport) -> None:
    """Move the shards ``held`` off ``peer``; rebuild from the others what cannot be read."""
    unreadable = len(report.unreadable)
    placer = Placer(repo, _load(repo), frozenset({peer.name}))
    mover = _Mover(repo, report)
    for pack, shard in held:
        holders = [s.peer for s in mover.shards(pack) if s.peer != peer.name]
        mover.move(pack, shard, peer, placer.candidates(holders, None))
    mover.commit()
    moved_all = not any(s.peer == peer.name for p in repo.index.packs.values() for s in p.shards)
    if len(report.unreadable) > unreadable or not moved_all:
        report.repair = repair(repo, exclude=frozenset({peer.name})).to_doc()


def _held_by(repo: Repository, name: str) -> list[tuple[PackRecord, ShardRecord]]:
    """The shards on peer ``name`` that the index, as the peers hold it now, names.

    Read afresh: a backup that committed since this run loaded the index may
    have placed shards on the peer.
    """
    for pack in repo.load_index().packs.values():
        repo.index.add(pack)  # the higher revision wins, so this only ever brings news
    return [(pack, s) for pack in repo.index.live_packs() for s in pack.shards if s.peer == name]


def remove(repo: Repository, name: str) -> MoveReport:
    repo.announce(SessionKind.REPAIR)
    report = MoveReport(name, "remove")
    start = time.perf_counter()
    for _ in range(DRAIN_ROUNDS):
        report.rounds += 1
        result: RepairReport = repair(repo, exclude=frozenset({name}))
        report.repair = result.to_doc()
        report.shards_moved += result.shards_relocated
        report.bytes_moved += result.bytes_written
        # A backup may have committed packs with shards on the peer meanwhile.
        report.shards_remaining = len(_held_by(repo, name))
        if not report.shards_remaining or not result.complete:
            break
    _finish(repo, report, start)
    return report


def add(repo: Repository, name: str) -> MoveReport:
    peer = _peer(repo, name)
    repo.announce(SessionKind.REPAIR)
    report = MoveReport(name, "add")
    start = time.perf_counter()
    peer.store.probe()
    # The new peer gets its identity and a verified copy of every metadata object (the same
    # heal repair uses), so it can tell the whole story like the others (invariant 1).
    report.metadata_copied = heal(repo, audit(repo, read=True)).copies_written
    _rebalance_onto(repo, peer, report)
    # Packs crowded on one peer or zone survive fewer failures than their shard count says;
    # repair spreads them, and the new, least loaded peer is the first it offers.
    layout = Layout(repo)
    if any(not layout.spread_well(pack, pack.shards) for pack in repo.index.live_packs()):
        report.repair = repair(repo).to_doc()
    _finish(repo, report, start)
    return report


def _rebalance_onto(repo: Repository, peer: Peer, report: MoveReport) -> None:
    load = _load(repo)
    up = repo.peers.up()
    share = sum(load.values()) // max(1, len(up))
    zone_of = {p.name: p.zone for p in repo.peers}
    mover = _Mover(repo, report)
    for pack in sorted(repo.index.live_packs(), key=lambda p: p.id):
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
