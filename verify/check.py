"""Checks: is every shard the index expects present (and, on request, intact)?

The presence check lists each peer once and compares with the index: a shard
is good if its object is on the recorded peer with the recorded size.  With
``read_data`` every present shard is also read and verified against its own
hash and the index's (bit rot, truncation, a swapped or replayed shard).  Each
pack is then

* ``healthy``  all n shards good, surviving any n-k peer failures and as
  many zone failures as the configured zones allow,
* ``degraded`` restorable after any one more peer failure, but short of that
  (fewer than n good shards, two on one peer, too many in one zone),
* ``at_risk``  one more peer failure can lose it (exactly k shards, or a
  peer holding several),
* ``lost``     fewer than k.

Damaged packs carry how many peer and zone failures they survive.

The check also counts leftovers: shard objects no index names, and temporary
objects of killed runs (prune removes both).  They are not damage.

On peers configured with S3 Object Lock the check also reports objects whose
retention has lapsed or is missing (:mod:`.locks`): a warning, not damage.

The check also walks every snapshot's tree and confirms each chunk it names is
in the index, so a snapshot that references missing data is caught here, not
at restore time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from shardvault.config import PostgresSource
from shardvault.errors import PeerError, ShardvaultError
from shardvault.repository import Repository
from shardvault.repository.index import PackRecord
from shardvault.repository.metadata import pack_name
from shardvault.repository.sessions import SessionKind
from shardvault.shards.dispersal import ShardProblemKind, ShardRecord, classify
from shardvault.shards.dispersal import read_shard as read_verified
from shardvault.shards.format import ShardFormatError
from shardvault.state import ShardKey

from .locks import LockFindings, audit_locks
from .metadata import MetadataReport, audit
from .record import STATES, Layout, PackState, ShardIssue, presence

READ_AHEAD = 8


@dataclass
class PackStatus:
    pack: str
    kind: str
    k: int
    n: int
    good: int
    state: str
    peer_failures_survived: int = 0
    zone_failures_survived: int = 0
    zone_failures_possible: int = 0


@dataclass
class Leftovers:
    """Objects on one peer that no index names; prune removes them."""

    objects: int = 0
    bytes: int = 0
    unreferenced_shards: int = 0
    temporary: int = 0  # objects a killed run left half-written


@dataclass
class CheckReport:
    read_data: bool
    packs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    damaged_packs: list[PackStatus] = field(default_factory=list)
    shard_issues: list[ShardIssue] = field(default_factory=list)
    peers_unreachable: dict[str, str] = field(default_factory=dict)
    shards_checked: int = 0
    shards_read: int = 0
    bytes_read: int = 0
    unreferenced_shards: int = 0
    leftovers: dict[str, Leftovers] = field(default_factory=dict)
    # pack counts by how many peer / zone failures they survive (-1: lost)
    peer_failures_survived: dict[int, int] = field(default_factory=dict)
    zone_failures_survived: dict[int, int] = field(default_factory=dict)
    snapshots: int = 0
    snapshot_errors: list[str] = field(default_factory=list)
    metadata: MetadataReport = field(default_factory=MetadataReport)
    object_lock: dict[str, LockFindings] = field(default_factory=dict)  # per object-lock peer; not damage

    @property
    def damaged(self) -> bool:
        return bool(
            self.shard_issues or self.snapshot_errors or any(self.packs[s] for s in STATES[1:]) or self.metadata.damaged
        )

    def summary(self) -> str:
        parts = [f"{self.packs[s]} {s}" for s in STATES]
        missing = sum(1 for i in self.shard_issues if i.problem != ShardProblemKind.CORRUPT)
        corrupt = sum(1 for i in self.shard_issues if i.problem == ShardProblemKind.CORRUPT)
        return f"packs: {', '.join(parts)}; shards missing: {missing}, corrupt: {corrupt}; {self.metadata.summary()}"

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["damaged"] = self.damaged
        doc["metadata"] = self.metadata.to_doc()
        return doc


ProgressFn = Callable[[int, int], None]


def check(repo: Repository, read_data: bool = False, progress: ProgressFn | None = None) -> CheckReport:
    repo.announce(SessionKind.VERIFY)
    report = CheckReport(read_data=read_data)
    started = time.time()
    present, listed = presence(repo, report.shard_issues)
    report.peers_unreachable = repo.peers.down()
    index = repo.index
    report.shards_checked = sum(len(p.shards) for p in index.live_packs())
    _count_leftovers(repo, report, listed)

    good: dict[str, list[ShardRecord]] = {}
    if read_data:
        results: list[tuple[ShardKey, str, str, bool]] = []
        for pack, shard, error in _read_all(repo, present, report, progress):
            key = (pack.id, shard.num, shard.peer)
            if error is None:
                good.setdefault(pack.id, []).append(shard)
                results.append((key, "ok", "", True))
            else:
                problem = classify(error)
                name = pack_name(pack.id, shard.num)
                report.shard_issues.append(ShardIssue(pack.id, shard.num, shard.peer, name, problem, str(error)))
                results.append((key, problem, str(error), problem is ShardProblemKind.CORRUPT))
        repo.state.record_shards(results)
    else:
        # A listing cannot see bit rot: a shard an earlier read (scrub) found corrupt stays corrupt
        # until repair replaces it, and does not count as good however present it looks.
        corrupt = repo.recorded_corrupt()
        for pack, shard in present:
            if (pack.id, shard.num, shard.peer) in corrupt:
                detail = "found corrupt by an earlier read (scrub or check --read-data); repair rebuilds it"
                name = pack_name(pack.id, shard.num)
                corrupt_kind = ShardProblemKind.CORRUPT
                report.shard_issues.append(ShardIssue(pack.id, shard.num, shard.peer, name, corrupt_kind, detail))
            else:
                good.setdefault(pack.id, []).append(shard)

    layout = Layout(repo)
    states: dict[str, tuple[str, int, int, int]] = {}
    for pack in index.live_packs():
        r = layout.assess(pack, good.get(pack.id, []))
        states[pack.id] = (r.state.value, r.good, pack.k, pack.n)
        report.packs[r.state] += 1
        report.peer_failures_survived[r.peer_failures] = report.peer_failures_survived.get(r.peer_failures, 0) + 1
        report.zone_failures_survived[r.zone_failures] = report.zone_failures_survived.get(r.zone_failures, 0) + 1
        if r.state is not PackState.HEALTHY:
            kind = "tree" if pack.kind else "data"
            report.damaged_packs.append(
                PackStatus(
                    pack.id,
                    kind,
                    pack.k,
                    pack.n,
                    r.good,
                    r.state.value,
                    r.peer_failures,
                    r.zone_failures,
                    r.zone_failures_possible,
                )
            )
    repo.state.record_packs(states)

    lost = {p.pack for p in report.damaged_packs if p.state == PackState.LOST}
    index.prefer(lambda pack_id: pack_id not in lost)  # a snapshot is fine if another copy of its chunk is
    _check_snapshots(repo, report, lost)
    _check_wal(repo, report)
    # Metadata is verified on every peer like shards (with --read-data, every copy is read).
    report.metadata = audit(repo, read=read_data)
    report.object_lock = audit_locks(repo)
    repo.state.record_run(
        "check",
        "damaged" if report.damaged else "ok",
        started,
        details={"read_data": read_data, "summary": report.summary(), "shards_read": report.shards_read},
    )
    return report


def read_shard(repo: Repository, pack: PackRecord, shard: ShardRecord) -> int:
    """Read one shard and verify it against its own hash and the index's; return its size."""
    name = pack_name(pack.id, shard.num)
    verified = read_verified(repo.peers, shard, name, pack_id=bytes.fromhex(pack.id), k=pack.k, n=pack.n)
    return len(verified.raw)


def _count_leftovers(repo: Repository, report: CheckReport, listed: dict[tuple[str, int], dict[str, int]]) -> None:
    """Shard objects no index names, and temporary objects of killed runs, per peer."""
    expected = {(p.id, s.num, s.peer) for p in repo.index.packs.values() for s in p.shards}
    for (pack_id, num), holders in listed.items():
        for holder, size in holders.items():
            if (pack_id, num, holder) not in expected:
                left = report.leftovers.setdefault(holder, Leftovers())
                left.objects += 1
                left.bytes += size
                left.unreferenced_shards += 1
                report.unreferenced_shards += 1
    down = repo.peers.down()
    for peer in repo.peers:
        if peer.name in down:
            continue
        try:
            items = list(peer.store.list_leftovers())
        except PeerError:
            continue  # a listing that fails now is not damage; the next check counts them
        for item in items:
            left = report.leftovers.setdefault(peer.name, Leftovers())
            left.objects += 1
            left.bytes += int(item.size)
            left.temporary += 1


class Admit(Enum):
    """What a reader's admission rule says about the next shard."""

    TAKE = "take"
    LATER = "later"  # not yet (a rate limit): wait for reads in flight, or a moment
    STOP = "stop"  # no more (a budget or time limit)


def read_ahead(
    repo: Repository,
    items: list[tuple[PackRecord, ShardRecord]],
    admit: Callable[[PackRecord, ShardRecord], Admit] = lambda pack, shard: Admit.TAKE,
    poll: float | None = None,
) -> Iterator[tuple[PackRecord, ShardRecord, int | PeerError | ShardFormatError]]:
    """The one bounded read-ahead loop of check and scrub.

    At most READ_AHEAD shards are read and verified at once; each result
    (its size, or the error) is yielded as it completes.  ``admit`` decides,
    shard by shard, whether to start the next read now, later or never.
    """
    queue = deque(items)
    pending: dict[Future[int], tuple[PackRecord, ShardRecord]] = {}
    while queue or pending:
        while queue and len(pending) < READ_AHEAD:
            verdict = admit(*queue[0])
            if verdict is Admit.STOP:
                queue.clear()
            if verdict is not Admit.TAKE:
                break
            pack, shard = queue.popleft()
            pending[repo.io.submit(read_shard, repo, pack, shard)] = (pack, shard)
        if not pending:
            if queue:  # held back with nothing in flight
                time.sleep(poll or 0.05)
            continue
        done, _ = wait(pending, timeout=poll, return_when=FIRST_COMPLETED)
        for future in done:
            pack, shard = pending.pop(future)
            try:
                yield pack, shard, future.result()
            except (PeerError, ShardFormatError) as exc:
                yield pack, shard, exc


def _read_all(
    repo: Repository, items: list[tuple[PackRecord, ShardRecord]], report: CheckReport, progress: ProgressFn | None
) -> list[tuple[PackRecord, ShardRecord, Exception | None]]:
    """Read and verify every shard given."""
    results: list[tuple[PackRecord, ShardRecord, Exception | None]] = []
    for pack, shard, outcome in read_ahead(repo, items):
        if isinstance(outcome, int):
            report.bytes_read += outcome
            report.shards_read += 1
            results.append((pack, shard, None))
        else:
            results.append((pack, shard, outcome))
        if progress:
            progress(len(results), len(items))
    return results


def _check_wal(repo: Repository, report: CheckReport) -> None:
    """Each PostgreSQL archive must be gap-free; record its gaps and newest file for the metrics."""
    from shardvault.repository.wal import archived, record_name
    from shardvault.walnames import gaps

    for source in repo.config.sources:
        if not isinstance(source, PostgresSource) or source.mode != "physical":
            continue
        names = archived(repo, source)
        missing = gaps(names)
        repo.state.set_fact(f"wal_gaps:{source.name}", len(missing))
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            report.snapshot_errors.append(
                f"source {source.name}: {len(missing)} WAL segment(s) missing from the archive: {shown}"
            )
        segments = [n for n in names if len(n) == 24]
        if segments:
            pushed = repo.read_meta(record_name(source.name, segments[-1])).get("pushed")
            if pushed:
                when = datetime.fromisoformat(pushed).timestamp()
                repo.state.set_fact(f"wal_last_archived_timestamp_seconds:{source.name}", when)


def _check_snapshots(repo: Repository, report: CheckReport, lost: set[str]) -> None:
    """Every chunk a snapshot names must be indexed, in a pack that is not lost."""
    blobs = repo.index.blobs
    for snapshot in repo.snapshots():
        report.snapshots += 1
        name = f"snapshot {snapshot.short_id} ({snapshot.source})"
        chunks = [bytes.fromhex(c) for c in snapshot.tree]
        try:
            if all(c in blobs and blobs[c].pack_id not in lost for c in chunks):
                chunks += [bytes.fromhex(c) for e in repo.iter_tree(snapshot) for c in e.chunks]
        except ShardvaultError as exc:
            report.snapshot_errors.append(f"{name}: tree unreadable: {exc}")
            continue
        missing = sum(1 for c in chunks if c not in blobs)
        packs = sorted({blobs[c].pack_id[:16] for c in chunks if c in blobs and blobs[c].pack_id in lost})
        if missing:
            report.snapshot_errors.append(f"{name}: {missing} chunk(s) not in the index")
        if packs:
            report.snapshot_errors.append(f"{name}: cannot be restored, needs lost pack(s) {', '.join(packs)}")


@dataclass
class PeerUsage:
    name: str
    zone: str
    url: str
    reachable: bool
    error: str | None
    shards: int
    shard_bytes: int
    metadata_objects: int


def peer_usage(repo: Repository) -> list[PeerUsage]:
    """What each configured peer holds, listing it directly."""
    rows: list[PeerUsage] = []
    for peer, conf in zip(repo.peers, repo.config.peers, strict=True):
        shards = size = meta = 0
        error: str | None = None
        try:
            peer.store.probe()
            for item in peer.store.list(""):
                if item.name.startswith("data/"):
                    shards += 1
                    size += item.size
                else:
                    meta += 1
        except PeerError as exc:
            error = str(exc)
        rows.append(PeerUsage(peer.name, peer.zone, conf.url, error is None, error, shards, size, meta))
    return rows
