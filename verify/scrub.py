"""Scrub: read shards and check their hashes, oldest-checked first, within a budget.

A full ``check --read-data`` reads everything at once; a scrub spreads the
same work over time, as Tahoe's crawlers and ZFS scrubs do.  Each run:

1. lists every peer once (presence, sizes) and records what is missing or
   truncated without reading it;
2. orders the present shards by when they were last read (never read
   first), and reads them in that order, verifying each against its own
   hash and the index's, until the byte budget or the time limit is spent,
   at a limited rate if asked;
3. records every result as it goes, so an interrupted scrub loses at most a
   few seconds of work and the next one continues with what is still oldest.

Coverage is the fraction of the index's shards read within the window; a
scrub is *complete* when no shard is left unread within the window.  Every
result lands in the state, where ``check``, repair, the metrics and the
alerts read it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from shardvault.config import ScrubConfig
from shardvault.repository import Repository
from shardvault.repository.index import PackRecord
from shardvault.repository.metadata import pack_name
from shardvault.repository.sessions import SessionKind
from shardvault.shards.dispersal import ShardProblemKind, ShardRecord, classify
from shardvault.state import ShardKey

from .check import Admit, read_ahead
from .metadata import MetadataReport, audit
from .record import ShardIssue, presence, record_pack_states

DAY = 86400.0
FLUSH_SECONDS = 1.0


@dataclass
class ScrubReport:
    window_days: float
    shards_total: int = 0
    shards_read: int = 0
    bytes_read: int = 0
    shards_due: int = 0  # due (not read within the window) when the scrub started
    shards_left: int = 0  # still due when it stopped
    complete: bool = False
    coverage: float = 0.0
    corruption_ratio: float = 0.0
    stopped_by: str = ""  # "", "budget" or "time"
    duration_seconds: float = 0.0
    issues: list[ShardIssue] = field(default_factory=list)
    peers_unreachable: dict[str, str] = field(default_factory=dict)
    packs: dict[str, int] = field(default_factory=dict)
    metadata: MetadataReport = field(default_factory=MetadataReport)

    @property
    def damaged(self) -> bool:
        return bool(self.issues) or self.metadata.damaged

    def to_doc(self) -> dict[str, Any]:
        return asdict(self) | {"damaged": self.damaged, "metadata": self.metadata.to_doc()}


ProgressFn = Callable[[int, int, int], None]  # shards read, shards planned, bytes read


def scrub(
    repo: Repository,
    settings: ScrubConfig,
    *,
    budget_bytes: int | None = None,
    max_seconds: float | None = None,
    window_days: float | None = None,
    rate_mib: float | None = None,
    progress: ProgressFn | None = None,
    clock: Callable[[], float] = time.time,
) -> ScrubReport:
    window = (window_days or settings.window_days) * DAY
    rate = (settings.rate_mib if rate_mib is None else rate_mib) * (1 << 20)
    repo.announce(SessionKind.VERIFY)
    report = ScrubReport(window_days=window / DAY)
    started, start = clock(), time.perf_counter()
    state = repo.state

    present, _ = presence(repo, report.issues)
    report.peers_unreachable = repo.peers.down()
    rows = state.shard_rows()
    report.shards_total = sum(len(p.shards) for p in repo.index.live_packs())

    def last_read(key: ShardKey) -> float:
        row = rows.get(key)
        return row[0] if row and row[0] is not None else float("-inf")

    candidates = sorted(present, key=lambda ps: (last_read((ps[0].id, ps[1].num, ps[1].peer)), ps[0].id))
    report.shards_due = sum(1 for p, s in candidates if last_read((p.id, s.num, s.peer)) < started - window)

    results: list[tuple[ShardKey, str, str, bool]] = []
    planned = 0
    last_flush = time.perf_counter()

    def admit(pack: PackRecord, shard: ShardRecord) -> Admit:
        nonlocal planned
        if budget_bytes is not None and planned + shard.size > budget_bytes and planned > 0:
            report.stopped_by = "budget"
            return Admit.STOP
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            report.stopped_by = "time"
            return Admit.STOP
        if rate and planned / rate > time.perf_counter() - start:
            return Admit.LATER  # ahead of the rate
        planned += shard.size
        return Admit.TAKE

    for pack, shard, outcome in read_ahead(repo, candidates, admit, poll=0.2 if rate else None):
        key = (pack.id, shard.num, shard.peer)
        if isinstance(outcome, int):
            report.bytes_read += outcome
            report.shards_read += 1
            results.append((key, "ok", "", True))
        else:
            kind = classify(outcome)
            read = kind is ShardProblemKind.CORRUPT  # the bytes arrived and were judged
            if read:
                report.shards_read += 1
            results.append((key, kind, str(outcome), read))
            report.issues.append(issue(pack, shard, kind, str(outcome)))
        if time.perf_counter() - last_flush >= FLUSH_SECONDS:
            state.record_shards(results)
            results, last_flush = [], time.perf_counter()
        if progress:
            progress(report.shards_read, len(candidates), report.bytes_read)
    state.record_shards(results)

    finished = clock()
    rows = state.shard_rows()
    expected = [(p.id, s.num, s.peer) for p in repo.index.live_packs() for s in p.shards]
    recent = [row for k in expected if (row := rows.get(k)) is not None and (row[0] or 0.0) >= finished - window]
    report.shards_left = len(expected) - len(recent)
    report.complete = report.shards_left == 0
    report.coverage = len(recent) / len(expected) if expected else 1.0
    corrupt = sum(1 for r in recent if r[1] == ShardProblemKind.CORRUPT)
    report.corruption_ratio = corrupt / len(recent) if recent else 0.0
    report.packs = record_pack_states(repo, present_rows=state.shard_rows())
    # Metadata is small: every scrub reads every copy on every peer (bit rot in an index is found here).
    report.metadata = audit(repo, read=True)
    report.duration_seconds = round(time.perf_counter() - start, 3)
    state.set_fact("scrub_last_run_timestamp_seconds", finished)
    if report.complete:
        state.set_fact("scrub_last_complete_timestamp_seconds", finished)
    state.set_fact("scrub_window_seconds", window)
    state.record_run(
        "scrub",
        "damaged" if report.damaged else "ok",
        started,
        details={k: v for k, v in report.to_doc().items() if k not in ("issues", "metadata")}
        | {"issues": len(report.issues), "metadata": report.metadata.summary()},
    )
    return report


def issue(pack: PackRecord, shard: ShardRecord, problem: ShardProblemKind, detail: str) -> ShardIssue:
    return ShardIssue(pack.id, shard.num, shard.peer, pack_name(pack.id, shard.num), problem, detail)
