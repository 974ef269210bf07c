"""``forget``: remove the snapshots a retention policy does not keep (and expired WAL).

The policy (:mod:`.retention`) chooses per source; this module turns the
choice into deletions, as restic's ``forget`` does:

1. Each source's snapshots are judged by its policy.  A kept PostgreSQL
   incremental snapshot (a WAL checkpoint) is restored from its parent base
   backup, so that parent is kept too ("base of <id>"), whatever the policy
   says of it.
2. PostgreSQL WAL expiry: for a physical PostgreSQL source, a WAL record
   ``wal/<source>/<file>`` expires with the snapshots when its segment lies
   before the start WAL segment of *every* kept base backup (the segment
   and timeline each backup's backup_label named, kept in its stats): on
   the same or an earlier timeline, and at a lower segment number.  So the
   oldest kept base backup and every later one can still be restored and
   recovered to any point after their start (their PITR window).  History
   files (``.history``) are always kept; ``.backup`` labels and ``.partial``
   files go when their segment does.  With no kept base backup, or one
   whose start is unknown, no WAL expires.
3. Without ``dry_run``: ONE tombstone naming every snapshot object and WAL
   record that goes is written first (a metadata commit with the write
   quorum: if it cannot be written, nothing is deleted), then the objects are
   deleted from every reachable peer and from the local cache.  A peer that
   is down keeps its copies; every reader ignores them (they are
   tombstoned) and ``repair`` deletes them.  So does a peer that refuses a
   deletion for now (S3 Object Lock retention): the copy stays until a
   repair after the retention.

Where this client may not delete at all (an append-only peer in its
configuration) forget refuses before writing anything
(:class:`~shardvault.errors.DeletionRefusedError`, exit 16), as prune does:
a tombstone is only an added object, but it would hide history all the same,
which is what append-only exists to prevent.  A dry run still works.

Forget deletes no pack: the data the forgotten snapshots alone referenced is
freed by ``prune``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shardvault.config import Config
from shardvault.errors import ConfigValueError, DeletionRefusedError
from shardvault.repository import Repository
from shardvault.repository.snapshot import Snapshot
from shardvault.repository.tombstones import DeletionReason, write_tombstone
from shardvault.repository.wal import postgres_name
from shardvault.shards.stores.immutable import deletion_blockers
from shardvault.walnames import WAL_NAME, segment_number

from .retention import Decision, RetentionPolicy, Verdict, apply_policy

ProgressFn = Callable[[str], None]


@dataclass
class SourcePlan:
    """What forget keeps and removes of one source."""

    source: str
    policy: RetentionPolicy
    keep: list[Decision] = field(default_factory=list)
    remove: list[Decision] = field(default_factory=list)
    wal_expired: list[str] = field(default_factory=list)  # WAL file names, as PostgreSQL writes them
    wal_records: list[str] = field(default_factory=list)  # their objects (wal/<source>/<file, lower case>)
    wal_note: str = ""  # why no WAL expires, when that is not obvious

    def to_doc(self) -> dict[str, Any]:
        def row(d: Decision) -> dict[str, Any]:
            snap: Snapshot = d.snapshot
            return {"id": snap.id, "time": d.time.isoformat(), "kind": snap.kind, "hostname": snap.hostname}

        return {
            "source": self.source,
            "policy": self.policy.to_doc(),
            "keep": [row(d) | {"reasons": list(d.reasons)} for d in self.keep],
            "remove": [row(d) for d in self.remove],
            "wal_expired": self.wal_expired,
            "wal_note": self.wal_note,
        }


@dataclass
class ForgetReport:
    dry_run: bool
    sources: list[SourcePlan] = field(default_factory=list)
    unconfigured: list[str] = field(default_factory=list)  # sources with snapshots but no policy: left alone
    tombstone: str = ""
    deleted: dict[str, int] = field(default_factory=dict)  # peer -> objects deleted there
    peers_missed: dict[str, str] = field(default_factory=dict)  # peer -> why it keeps stray copies (repair)

    @property
    def snapshots_removed(self) -> int:
        return sum(len(p.remove) for p in self.sources)

    @property
    def wal_removed(self) -> int:
        return sum(len(p.wal_expired) for p in self.sources)

    def to_doc(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "sources": [p.to_doc() for p in self.sources],
            "unconfigured": self.unconfigured,
            "tombstone": self.tombstone or None,
            "snapshots_removed": self.snapshots_removed,
            "wal_removed": self.wal_removed,
            "deleted": self.deleted,
            "peers_missed": self.peers_missed,
        }


def plan(
    repo: Repository,
    policies: dict[str, RetentionPolicy | None],
    now: datetime | None = None,
    tz: tzinfo = UTC,
) -> ForgetReport:
    """Judge the snapshots of every source in ``policies`` (None: selected, but no policy); change nothing."""
    now = now or datetime.now(UTC)
    report = ForgetReport(dry_run=True)
    snapshots = repo.snapshots()
    by_source: dict[str, list[Snapshot]] = {}
    for snap in snapshots:
        by_source.setdefault(snap.source, []).append(snap)
    report.unconfigured = sorted(name for name, policy in policies.items() if policy is None)
    for source in sorted(policies):
        policy = policies[source]
        if policy is None:
            continue
        mine = by_source.get(source, [])
        # Each host's history of a source is judged on its own, as restic groups by host and
        # paths: keep-last 1 keeps the newest of every host backing the source up, whose next
        # incremental leans on it (a backup's parent is its own host's newest snapshot).
        decisions = []
        for host in sorted({s.hostname for s in mine}):
            decisions += apply_policy([s for s in mine if s.hostname == host], policy, now, tz)
        decisions = _keep_bases(sorted(decisions, key=lambda d: (d.time, d.snapshot.id), reverse=True))
        source_plan = SourcePlan(
            source,
            policy,
            keep=[d for d in decisions if d.keep],
            remove=[d for d in decisions if not d.keep],
        )
        if any(s.source_type == "postgres" and s.stats.get("postgres", {}).get("mode") == "physical" for s in mine):
            _expire_wal(repo, source_plan)  # a physical source archives WAL (a logical one has none)
        report.sources.append(source_plan)
    return report


def forget(
    repo: Repository,
    policies: dict[str, RetentionPolicy | None],
    dry_run: bool = False,
    now: datetime | None = None,
    tz: tzinfo = UTC,
    progress: ProgressFn | None = None,
) -> ForgetReport:
    """Apply ``policies`` (source -> policy, None: left alone): tombstone, then delete what they do not keep."""
    started = time.time()
    if not dry_run:
        if blockers := deletion_blockers(repo.peers):
            peer, why = blockers[0]
            raise DeletionRefusedError(peer, why, "forget removes nothing; run it where the peers allow deletion")
        repo.require_quorum()  # before judging: a forget that cannot commit its tombstone decides nothing
    report = plan(repo, policies, now, tz)
    report.dry_run = dry_run
    names = [f"snapshots/{d.snapshot.id}" for p in report.sources for d in p.remove]
    names += [record for p in report.sources for record in p.wal_records]
    if dry_run or not names:
        return report
    if progress:
        progress(f"tombstone for {len(names)} object(s)")
    report.tombstone = write_tombstone(repo, names, DeletionReason.FORGET)  # first: a crash leaves the record
    if progress:
        progress(f"deleting {len(names)} object(s)")
    _delete_everywhere(repo, names, report)
    repo.state.record_run(
        "forget",
        "ok" if not report.peers_missed else "degraded",
        started,
        details={
            "tombstone": report.tombstone,
            "snapshots_removed": report.snapshots_removed,
            "wal_removed": report.wal_removed,
            "peers_missed": report.peers_missed,
        },
    )
    return report


def _keep_bases(decisions: list[Decision]) -> list[Decision]:
    """A kept PostgreSQL incremental needs its parent base backup: keep that too."""
    by_id = {d.snapshot.id: d for d in decisions}
    for d in list(decisions):
        snap: Snapshot = d.snapshot
        if not (d.keep and snap.source_type == "postgres" and snap.kind == "incremental" and snap.parent):
            continue
        parent = by_id.get(snap.parent)
        if parent is not None:
            reason = f"base of {snap.short_id}"
            if reason not in parent.reasons:
                by_id[parent.snapshot.id] = Decision(
                    parent.snapshot, Verdict.KEEP, (*parent.reasons, reason), parent.time
                )
    return [by_id[d.snapshot.id] for d in decisions]


def _expire_wal(repo: Repository, source_plan: SourcePlan) -> None:
    """Choose the WAL records of one PostgreSQL source that go with its forgotten snapshots (module docstring)."""
    starts: list[tuple[int, int]] = []
    for d in source_plan.keep:
        snap: Snapshot = d.snapshot
        facts = snap.stats.get("postgres", {})
        if snap.kind != "full" or facts.get("mode") != "physical":
            continue  # logical dumps and WAL checkpoints start no PITR window of their own
        start = segment_number(str(facts.get("start_wal_file", "")))
        if start is None:
            source_plan.wal_note = f"base backup {snap.short_id} does not record its start WAL segment: no WAL expires"
            return
        starts.append(start)
    if not starts:
        if any(d.snapshot.kind == "full" for d in source_plan.remove):
            source_plan.wal_note = "no base backup is kept: no WAL expires"
        return
    prefix = f"wal/{source_plan.source}/"
    for record in repo.list_meta(prefix):
        wal_file = postgres_name(record[len(prefix) :])
        if not WAL_NAME.match(wal_file) or wal_file.endswith(".history"):
            continue  # timeline history is small and every later timeline needs it
        number = segment_number(wal_file[:24])
        if number is None:
            continue
        timeline, segment = number
        if all(timeline <= start_tli and segment < start_seg for start_tli, start_seg in starts):
            source_plan.wal_expired.append(wal_file)
            source_plan.wal_records.append(record)


def _delete_everywhere(repo: Repository, names: list[str], report: ForgetReport) -> None:
    """Delete ``names`` everywhere; a peer that fails or refuses keeps stray copies (repair removes them)."""
    outcome = repo.delete_everywhere(names)
    report.deleted = outcome.deleted
    report.peers_missed = dict(outcome.missed)
    for peer, refused in outcome.refused.items():  # kept for now (object lock): a stray copy, repair retries
        report.peers_missed[peer] = f"{len(refused)} deletion(s) refused: {refused[0]}"


def configured_policies(config: Config) -> tuple[dict[str, RetentionPolicy | None], tzinfo]:
    """Each source's ``[sources.retention]`` (sources without one are left out) and the buckets' time zone.

    What a scheduled forget (the ``prune`` flow) applies; ``shardvault forget``
    without ``--keep-*`` flags chooses the same.
    """
    try:
        tz: tzinfo = ZoneInfo(config.schedule.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigValueError(
            config.path, "schedule.timezone", f"unknown time zone {config.schedule.timezone!r}"
        ) from None
    policies: dict[str, RetentionPolicy | None] = {s.name: s.retention for s in config.sources if s.retention}
    return policies, tz
