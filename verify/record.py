"""What a presence listing says, recorded in the state (shared by check, scrub and repair)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from shardvault.index import PackRecord
from shardvault.metadata import pack_name
from shardvault.repository import Repository
from shardvault.shards.dispersal import ShardRecord
from shardvault.state import ShardKey

STATES = ("healthy", "degraded", "at_risk", "lost")
GOOD = ("ok", "present")


@dataclass
class ShardIssue:
    pack: str
    shard: int
    peer: str
    object: str
    problem: str  # missing | corrupt | unreachable
    detail: str


def pack_state(good: int, k: int, n: int) -> str:
    if good >= n:
        return "healthy"
    if good > k:
        return "degraded"
    if good == k:
        return "at_risk"
    return "lost"


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
    for pack in repo.index.packs.values():
        for shard in pack.shards:
            key = (pack.id, shard.num, shard.peer)
            expected.add(key)
            holders = listed.get((pack.id, shard.num), {})
            if shard.peer not in holders:
                if shard.peer in down or repo.peers.get(shard.peer) is None:
                    problem = "unreachable"
                    detail = down.get(shard.peer, "peer not in the configuration")
                else:
                    problem, detail = "missing", "object not on the peer"
            elif holders[shard.peer] != shard.size:
                problem = "corrupt"
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
    counts = dict.fromkeys(STATES, 0)
    states: dict[str, tuple[str, int, int, int]] = {}
    for pack in repo.index.packs.values():
        good = sum(
            1 for s in pack.shards if (row := present_rows.get((pack.id, s.num, s.peer))) is not None and row[1] in GOOD
        )
        state = pack_state(good, pack.k, pack.n)
        counts[state] += 1
        states[pack.id] = (state, good, pack.k, pack.n)
    repo.state.record_packs(states)
    return counts
