"""Repair: give every pack back its n good shards.

For each pack with missing, truncated or corrupt shards (from a fresh
listing and the verdicts earlier scrubs recorded), with shards on a peer
being removed, or with shards crowded together (two on one peer, more in one
zone than the configured zones require), so that it survives fewer peer or
zone failures than it should:

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

A crowded shard is rebuilt on a free peer in the least used zone, and its
old copy deleted once the new placement is committed; when no peer can take
it, it stays where it is (crowded beats missing).

Packs with fewer than k good shards are lost: they are reported with the
snapshots and files that need them, and nothing is written for them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from shardvault.errors import DataLossError, OverwriteRefusedError, PeerError, RepairIncompleteError, ShardvaultError
from shardvault.repository import Repository
from shardvault.repository.index import PackRecord
from shardvault.repository.metadata import pack_name
from shardvault.repository.sessions import SessionKind
from shardvault.shards.dispersal import ShardProblemKind, ShardRecord, build_shards
from shardvault.shards.peers import Peer
from shardvault.state import ShardKey

from .locks import LockRenewal, renew_locks
from .metadata import HealReport, MetadataReport, audit, heal
from .record import GOOD, Layout, ShardIssue, presence, record_pack_states

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
    shards_spread: int = 0  # good shards moved off a crowded peer or zone
    bytes_written: int = 0
    lost: list[LostPack] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)  # shards no peer could take
    issues: list[ShardIssue] = field(default_factory=list)
    peers_unreachable: dict[str, str] = field(default_factory=dict)
    duration_seconds: float = 0.0
    metadata: HealReport = field(default_factory=HealReport)
    metadata_after: MetadataReport = field(default_factory=MetadataReport)  # what is left after the heal
    object_lock: dict[str, LockRenewal] = field(default_factory=dict)  # retention renewed per object-lock peer

    @property
    def complete(self) -> bool:
        return not self.lost and not self.unplaced and not self.metadata.failed and not self.metadata_after.lost

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self) | {"complete": self.complete}
        doc["metadata"] = self.metadata.to_doc() | {"after": self.metadata_after.to_doc()}
        del doc["metadata_after"]
        return doc


ProgressFn = Callable[[int, int], None]


def raise_for_verdict(doc: dict[str, Any]) -> None:
    """The one exit rule of a repair (alone, or inside peers drain/remove), from its document.

    Lost data first (exit 7), then what could not be written (exit 5); what
    repair committed stays committed either way.
    """
    meta = doc.get("metadata") or {}
    lost_meta = (meta.get("after") or {}).get("lost", [])
    if doc["lost"]:
        raise DataLossError(f"{len(doc['lost'])} pack(s) lost, beyond repair")
    if lost_meta:
        raise DataLossError(f"{len(lost_meta)} metadata object(s) intact on no peer")
    failed = meta.get("failed", [])
    if doc["unplaced"] or failed:
        left = [f"{len(doc['unplaced'])} shard(s) could not be placed"] if doc["unplaced"] else []
        left += [f"metadata not written: {line}" for line in failed[:3]]
        raise RepairIncompleteError("; ".join(left))


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

    def store(self, name: str, data: bytes, candidates: list[Peer]) -> Peer | None:
        """Store on the first of ``candidates`` that accepts it, retrying each with backoff."""
        for peer in candidates:
            if self.repo.peers.is_down(peer.name):
                continue
            delay = BACKOFF
            for attempt in range(RETRIES):
                try:
                    peer.store.store(name, data)
                    self.load[peer.name] += 1
                    return peer
                except OverwriteRefusedError:
                    break  # an append-only client cannot replace this peer's copy: the next candidate, peer stays up
                except PeerError as exc:
                    if attempt == RETRIES - 1:
                        self.repo.peers.mark_down(peer, str(exc))
                    else:
                        time.sleep(delay)
                        delay *= 2
        return None


def repair(repo: Repository, exclude: frozenset[str] = frozenset(), progress: ProgressFn | None = None) -> RepairReport:
    """Rebuild what is missing or corrupt; relocate shards off ``exclude`` peers."""
    repo.announce(SessionKind.REPAIR)  # before the index is read (docs/concurrency.md)
    report = RepairReport()
    started, start = time.time(), time.perf_counter()
    # Metadata first: an empty or replaced peer gets its identity and every object back
    # before shards are rebuilt onto it (the new index files then reach every peer).
    report.metadata = heal(repo, audit(repo, read=True))
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
    layout = Layout(repo)
    todo = [p for p in repo.index.live_packs() if _needs_work(p, good_keys, layout)]
    report.packs = len(repo.index.live_packs())
    batch = _Batch()
    for done, pack in enumerate(todo, 1):
        _repair_pack(repo, pack, good_keys, placer, layout, report, batch)
        if len(batch.changed) >= COMMIT_EVERY:
            _commit(repo, batch)
        if progress:
            progress(done, len(todo))
    _commit(repo, batch)
    report.peers_unreachable = repo.peers.down()
    if report.lost:
        _name_lost_data(repo, report.lost)
    presence(repo, [])  # the state now describes the repaired repository
    record_pack_states(repo, repo.state.shard_rows())
    report.metadata_after = audit(repo)
    report.object_lock = renew_locks(repo)  # S3 Object Lock: keep what is still in use undeletable
    report.duration_seconds = round(time.perf_counter() - start, 3)
    repo.state.record_run(
        "repair",
        "ok" if report.complete else "incomplete",
        started,
        details={k: v for k, v in report.to_doc().items() if k not in ("issues", "lost")}
        | {"lost": [lp.pack for lp in report.lost]},
    )
    return report


@dataclass
class _Batch:
    """Placements waiting for the next index file, and what to record and delete after it."""

    changed: list[PackRecord] = field(default_factory=list)
    verdicts: list[tuple[ShardKey, str, str, bool]] = field(default_factory=list)
    forget: list[ShardKey] = field(default_factory=list)
    stale: list[tuple[str, str]] = field(default_factory=list)  # (peer, object): good copies moved away


def _good(pack: PackRecord, good_keys: set[ShardKey]) -> list[ShardRecord]:
    return [s for s in pack.shards if (pack.id, s.num, s.peer) in good_keys]


def _needs_work(pack: PackRecord, good_keys: set[ShardKey], layout: Layout) -> bool:
    good = _good(pack, good_keys)
    return len({s.num for s in good}) < pack.n or not layout.spread_well(pack, good)


@dataclass
class _Plan:
    keep: list[ShardRecord]
    writes: dict[int, list[Peer]]  # shard number -> peers to try, best first
    moved: dict[int, ShardRecord]  # good shards to be rebuilt elsewhere (kept if no peer takes them)


def _plan(pack: PackRecord, good: list[ShardRecord], placer: Placer, layout: Layout) -> _Plan:
    """Which shards stay, and where the missing and crowded ones go (nothing is written here)."""
    keep: list[ShardRecord] = []
    moved: dict[int, ShardRecord] = {}
    for s in sorted(good, key=lambda s: (s.num, s.peer)):
        if any(kept.peer == s.peer for kept in keep) and all(kept.num != s.num for kept in keep):
            moved[s.num] = s  # a second shard on one peer: one failure would cost both
        elif all(kept.num != s.num or kept.peer != s.peer for kept in keep):
            keep.append(s)
    have = {s.num for s in keep}
    old_peer = {s.num: s.peer for s in pack.shards}
    writes: dict[int, list[Peer]] = {}
    planned: dict[int, str] = {}
    for num in range(pack.n):
        if num in have:
            continue
        holders = [s.peer for s in keep] + list(planned.values())
        candidates = placer.candidates(holders, None if num in moved else old_peer.get(num))
        if num in moved:
            # Crowded beats missing: move it only to a peer that holds nothing of the pack.
            candidates = [p for p in candidates if p.name not in holders]
        if not candidates:
            if num in moved:
                keep.append(moved.pop(num))
            continue
        writes[num] = candidates
        planned[num] = candidates[0].name
    _spread_zones(pack, keep, writes, planned, moved, placer, layout)
    return _Plan(keep, writes, moved)


def _spread_zones(
    pack: PackRecord,
    keep: list[ShardRecord],
    writes: dict[int, list[Peer]],
    planned: dict[int, str],
    moved: dict[int, ShardRecord],
    placer: Placer,
    layout: Layout,
) -> None:
    """Move shards out of the most crowded zone until the pack survives the zone failures it should."""
    for _ in range(pack.n):
        where = {s.num: s.peer for s in keep} | planned
        simulated = [ShardRecord(num, peer, b"", 0) for num, peer in where.items()]
        if layout.spread_well(pack, simulated):
            return
        zones = Counter(layout.zone(peer) for peer in where.values())
        crowded, most = zones.most_common(1)[0]
        free = [
            p
            for p in placer.candidates(list(where.values()), None)
            if p.name not in where.values() and zones[p.zone] + 2 <= most
        ]
        sources = [s for s in keep if layout.zone(s.peer) == crowded]
        if not free or not sources:
            return
        shard = max(sources, key=lambda s: s.num)
        keep.remove(shard)
        moved[shard.num] = shard
        writes[shard.num] = free
        planned[shard.num] = free[0].name


def _repair_pack(
    repo: Repository,
    pack: PackRecord,
    good_keys: set[ShardKey],
    placer: Placer,
    layout: Layout,
    report: RepairReport,
    batch: _Batch,
) -> None:
    good = _good(pack, good_keys)
    if len({s.num for s in good}) < pack.k:
        report.lost.append(LostPack(pack.id, len({s.num for s in good}), pack.k))
        return
    if not _plan(pack, good, placer, layout).writes:
        return  # nothing missing, and no peer that would spread it better
    try:
        decoded = repo.fetch_pack(pack.with_shards(good))
    except ShardvaultError:
        decoded = None
    # Shards the reader found bad are not good any more: rebuild them too.
    for problem in repo.take_problems():
        good = [s for s in good if not (s.num == problem.num and s.peer == problem.peer)]
        key = (pack.id, problem.num, problem.peer)
        batch.verdicts.append((key, problem.kind, problem.detail, problem.kind is ShardProblemKind.CORRUPT))
    if decoded is None:
        report.lost.append(LostPack(pack.id, len({s.num for s in good}), pack.k))
        return
    plan = _plan(pack, good, placer, layout)
    raws = build_shards(bytes.fromhex(pack.id), decoded.tobytes(), pack.k, pack.n, nums=sorted(plan.writes))
    old_peer = {s.num: s.peer for s in pack.shards}
    new = list(plan.keep)
    for num, candidates in sorted(plan.writes.items()):
        name, raw = pack_name(pack.id, num), raws[num]
        peer = placer.store(name, raw, candidates)
        source = plan.moved.get(num)
        if peer is None:
            if source is not None:
                new.append(source)  # still good where it was
            else:
                report.unplaced.append(f"{name}: no peer could take it")
            continue
        new.append(ShardRecord(num, peer.name, raw[-32:], len(raw)))
        batch.verdicts.append(((pack.id, num, peer.name), "ok", "rebuilt by repair", True))
        report.bytes_written += len(raw)
        if source is not None:
            report.shards_spread += 1
            batch.stale.append((source.peer, name))
        else:
            report.shards_rebuilt += 1
            if peer.name != old_peer.get(num):
                report.shards_relocated += 1
    report.packs_repaired += 1
    record = pack.with_shards(new)
    if sorted(record.shards, key=lambda s: (s.num, s.peer)) != sorted(pack.shards, key=lambda s: (s.num, s.peer)):
        batch.changed.append(record)
        kept = {(s.num, s.peer) for s in new}
        batch.forget.extend((pack.id, s.num, s.peer) for s in pack.shards if (s.num, s.peer) not in kept)


def _commit(repo: Repository, batch: _Batch) -> None:
    """Write the new placements (the atomic step), then record what was done and delete moved copies."""
    if batch.changed:
        repo.write_index(batch.changed)
    repo.state.record_shards(batch.verdicts)
    repo.state.forget_shards(batch.forget)
    repaired: Counter[tuple[str, str]] = Counter()
    for (_, _, writer), _, detail, _ in batch.verdicts:
        if detail == "rebuilt by repair":
            repaired[(writer, "shards_repaired")] += 1
    repo.state.add_counters(dict(repaired))
    for holder, name in batch.stale:
        peer = repo.peers.get(holder)
        if peer is None:
            continue
        try:
            peer.store.delete(name)
        except PeerError:
            pass  # an unreferenced copy is harmless; check counts it and prune removes it
    batch.changed.clear()
    batch.verdicts.clear()
    batch.forget.clear()
    batch.stale.clear()


def _name_lost_data(repo: Repository, lost: list[LostPack], first_files: int = 5) -> None:
    """Which snapshots and files need each lost pack (as far as their trees can be read)."""
    by_id = {lp.pack: lp for lp in lost}
    repo.index.prefer(lambda pack_id: pack_id not in by_id)  # chunks also stored elsewhere are not lost
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
