"""What a presence listing says, recorded in the state (shared by check, scrub and repair).

A pack's redundancy is judged here, once, for every command: by the failures
it survives, not by its shard count (:class:`Layout`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from shardvault.repository import Repository
from shardvault.repository.index import PackRecord
from shardvault.repository.metadata import pack_name
from shardvault.shards.dispersal import ShardProblemKind, ShardRecord
from shardvault.shards.placement import best_failures_survived, failures_survived
from shardvault.state import ShardKey


class PackState(StrEnum):
    HEALTHY = "healthy"  # all n shards good, and they survive n-k peer failures and the zone failures the layout allows
    DEGRADED = "degraded"  # restorable and survives at least one more peer failure, but less than it should
    AT_RISK = "at_risk"  # restorable, but one more peer failure can lose it
    LOST = "lost"  # fewer than k good shards


STATES = tuple(s.value for s in PackState)
GOOD = ("ok", "present")


@dataclass
class ShardIssue:
    pack: str
    shard: int
    peer: str
    object: str
    problem: ShardProblemKind
    detail: str


@dataclass(frozen=True)
class Redundancy:
    """How much of a pack is left, and how many failures it survives."""

    state: PackState
    good: int  # distinct good shard numbers
    peer_failures: int  # any this many peers may fail and the pack is still restorable (-1: lost)
    zone_failures: int  # the same for zones
    zone_failures_possible: int  # what the best placement over the configured zones would survive


class Layout:
    """The configured peers and zones, and what the best placement over them survives."""

    def __init__(self, repo: Repository) -> None:
        # A peer not (or no more) configured is a failure domain of its own.
        self.zone_of = {p.name: p.zone for p in repo.peers}
        self.zones = Counter(self.zone_of.values())
        self.peer_count = len(self.zone_of)
        self._best: dict[tuple[int, int], tuple[int, int]] = {}

    def best(self, k: int, n: int) -> tuple[int, int]:
        """(peer failures, zone failures) the best placement of a k-of-n pack survives."""
        if (k, n) not in self._best:
            peers = best_failures_survived([1] * self.peer_count, n, k)
            zones = best_failures_survived(list(self.zones.values()), n, k)
            self._best[(k, n)] = (peers, zones)
        return self._best[(k, n)]

    def zone(self, peer: str) -> str:
        return self.zone_of.get(peer, f"peer:{peer}")

    def assess(self, pack: PackRecord, good: Iterable[ShardRecord]) -> Redundancy:
        by_peer: dict[str, set[int]] = {}
        by_zone: dict[str, set[int]] = {}
        for s in good:
            by_peer.setdefault(s.peer, set()).add(s.num)
            by_zone.setdefault(self.zone(s.peer), set()).add(s.num)
        distinct = len(set().union(*by_peer.values())) if by_peer else 0
        peer_f = failures_survived(by_peer, pack.k)
        zone_f = failures_survived(by_zone, pack.k)
        _, zone_best = self.best(pack.k, pack.n)
        if distinct < pack.k:
            state = PackState.LOST
        elif peer_f <= 0:
            state = PackState.AT_RISK
        elif distinct >= pack.n and peer_f >= pack.n - pack.k and zone_f >= zone_best:
            state = PackState.HEALTHY
        else:
            state = PackState.DEGRADED
        return Redundancy(state, distinct, peer_f, zone_f, zone_best)

    def spread_well(self, pack: PackRecord, shards: Iterable[ShardRecord]) -> bool:
        """True when the shards survive as many peer and zone failures as their count allows."""
        r = self.assess(pack, shards)
        peers_best = min(pack.n - pack.k, r.good - pack.k)
        return r.peer_failures >= peers_best and r.zone_failures >= min(r.zone_failures_possible, peers_best)


Listing = dict[tuple[str, int], dict[str, int]]


def presence(repo: Repository, issues: list[ShardIssue]) -> tuple[list[tuple[PackRecord, ShardRecord]], Listing]:
    """List every peer once; record missing, truncated and unreachable shards.

    Returns the shards that are where the index says, with the right size,
    and the listing itself ((pack, num) -> {peer: size}).
    A shard found present keeps a ``corrupt`` verdict from an earlier read
    (a listing cannot see bit rot); ``missing`` and ``unreachable`` verdicts
    are replaced by ``present``.  ``issues`` receives a ShardIssue per problem.
    """
    repo.peers.probe_all()
    sync_backup_runs(repo)
    listed = repo.list_shards()
    down = repo.peers.down()
    rows = repo.state.shard_rows()
    present: list[tuple[PackRecord, ShardRecord]] = []
    results: list[tuple[ShardKey, str, str, bool]] = []
    expected: set[ShardKey] = set()
    for pack in repo.index.live_packs():
        for shard in pack.shards:
            key = (pack.id, shard.num, shard.peer)
            expected.add(key)
            holders = listed.get((pack.id, shard.num), {})
            if shard.peer not in holders:
                if shard.peer in down or repo.peers.get(shard.peer) is None:
                    problem = ShardProblemKind.UNREACHABLE
                    detail = down.get(shard.peer, "peer not in the configuration")
                else:
                    problem, detail = ShardProblemKind.MISSING, "object not on the peer"
            elif holders[shard.peer] != shard.size:
                problem = ShardProblemKind.CORRUPT
                detail = f"size {holders[shard.peer]}, expected {shard.size} (truncated or replaced)"
            else:
                present.append((pack, shard))
                old = rows.get(key)
                if old is None or old[1] not in ("ok", "corrupt"):
                    results.append((key, "present", "", False))
                continue
            results.append((key, problem, detail, False))
            issues.append(ShardIssue(pack.id, shard.num, shard.peer, pack_name(pack.id, shard.num), problem, detail))
    state = repo.state
    state.forget_shards([k for k in rows if k not in expected])
    state.record_shards(results)
    held: Counter[str] = Counter()
    held_bytes: Counter[str] = Counter()
    for holders in listed.values():
        for peer, size in holders.items():
            held[peer] += 1
            held_bytes[peer] += size
    state.record_peers(
        {p.name: (p.name not in down, down.get(p.name, ""), held[p.name], held_bytes[p.name]) for p in repo.peers}
    )
    return present, listed


def sync_backup_runs(repo: Repository) -> int:
    """Record every committed snapshot as a backup run, if the state does not have it yet.

    This rebuilds the backup history of a lost state, and brings in backups
    made from other machines, so RPO metrics see every writer.  Returns how
    many runs were added.
    """
    known = {row[0] for row in repo.state.query("SELECT snapshot FROM runs WHERE kind = 'backup'")}
    added = 0
    for snap in repo.snapshots():
        if snap.id in known:
            continue
        details = {k: v for k, v in snap.stats.items() if k != "warnings"} | {"kind": snap.kind}
        started = datetime.fromisoformat(snap.started).timestamp()
        finished = datetime.fromisoformat(snap.finished).timestamp()
        repo.state.record_run(
            "backup", "ok", started, source=snap.source, snapshot=snap.id, details=details, finished=finished
        )
        added += 1
    return added


def record_pack_states(repo: Repository, present_rows: dict[ShardKey, tuple[float | None, str, str]]) -> dict[str, int]:
    """Each pack's redundancy state from the shards' latest verdicts; returns counts by state."""
    layout = Layout(repo)
    counts = dict.fromkeys(STATES, 0)
    states: dict[str, tuple[str, int, int, int]] = {}
    for pack in repo.index.live_packs():
        good = [
            s for s in pack.shards if (row := present_rows.get((pack.id, s.num, s.peer))) is not None and row[1] in GOOD
        ]
        r = layout.assess(pack, good)
        counts[r.state] += 1
        states[pack.id] = (r.state.value, r.good, pack.k, pack.n)
    repo.state.record_packs(states)
    return counts
