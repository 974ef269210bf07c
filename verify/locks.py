"""S3 Object Lock: the audit ``check`` reports, and the renewal ``repair`` performs.

Every object a peer with ``object_lock`` stores is written with a retention
of ``object_lock_days`` from that moment (:class:`~shardvault.shards.stores.s3.S3Store`).
History outlives that: a pack written a year ago may be referenced by
yesterday's snapshot (deduplication), so its lock must be renewed for as long
as the repository needs it, as Kopia's maintenance extends its blobs'
retention.

Audit (``check``).  For every reachable object-lock peer the audit lists the
objects and reads each one's retention (one HEAD each).  An object is

* ``retained`` while its retain-until date lies in the future (by this host's
  clock),
* ``lapsed`` once that date has passed: a client holding the peer's
  credentials may delete it,
* ``missing`` when it carries no retention at all (written before the lock
  was configured, by a client without ``object_lock``, or stripped by someone
  allowed to bypass governance mode),
* ``awaiting deletion`` when the repository no longer needs it (:func:`in_use`):
  shards no live pack places there (orphans of killed runs, strays, condemned
  packs), condemned sets and tombstoned names.  Prune deletes them once their
  retention has run out, which it is let do on purpose, so they are not
  findings.

Session heartbeats (``sessions/``) are written without retention on purpose
and are not asked about.  A lapsed or missing lock is a warning, not damage:
nothing is lost or unreadable, so ``check``'s exit code does not change
(exit 6 means damage).  The report gives counts and the first few names per
peer, in the text output and under ``object_lock`` in ``check --json``, and
the metric ``shardvault_object_lock_exposed_objects{peer}`` gives the count
of the last complete audit.

Renewal (``repair``).  Every object in use (not awaiting deletion, not a
heartbeat) whose retention ends within half of ``object_lock_days`` (or
has none) gets a new retain-until date of now + ``object_lock_days``; the
others are left alone, so a repair costs one HEAD per object and a
PutObjectRetention per object only about every ``object_lock_days / 2``.
Objects stay protected without a gap as long as repair (or prune, which may
call :func:`renew_locks` too) runs at least every ``object_lock_days / 2``.
What the repository no longer uses is not renewed, so its lock runs out and
a later prune deletes it (until then the delete is refused and retried).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from shardvault.config import PeerConfig
from shardvault.errors import ObjectNotFoundError, PeerError
from shardvault.repository import Repository
from shardvault.repository.condemned import PREFIX as CONDEMNED_PREFIX
from shardvault.repository.metadata import pack_name, parse_shard_name
from shardvault.shards.peers import Peer
from shardvault.shards.stores import PeerStore
from shardvault.shards.stores.base import UNRETAINED_PREFIXES

SHOWN = 5  # object names listed per kind of finding and peer


@dataclass
class LockFindings:
    """One object-lock peer's audit."""

    mode: str
    days: int
    objects: int = 0  # objects whose retention was read
    lapsed: int = 0
    missing: int = 0
    awaiting_deletion: int = 0  # not in use (orphaned, condemned, tombstoned): let run out on purpose
    lapsed_objects: list[str] = field(default_factory=list)  # the first SHOWN
    missing_objects: list[str] = field(default_factory=list)
    error: str = ""  # the peer failed during the audit: the counts are partial

    @property
    def exposed(self) -> int:
        """Objects a client with the peer's credentials could delete now."""
        return self.lapsed + self.missing


@dataclass
class LockRenewal:
    """What ``repair`` did to one object-lock peer's retention."""

    mode: str
    days: int
    objects: int = 0  # objects looked at
    extended: int = 0  # given a new retain-until date
    until: str = ""  # that date (ISO 8601, UTC)
    awaiting_deletion: int = 0  # left to run out
    error: str = ""  # the peer failed part-way: a later repair goes on


InUseFn = Callable[[str, str], bool]


def in_use(repo: Repository) -> InUseFn:
    """``used(peer, name)``: whether the repository still needs that object on that peer.

    A shard is in use when a pack the index holds, and no prune has condemned,
    places that shard on that peer; orphans of killed runs, stray copies and
    condemned packs are not (prune deletes them).  A metadata object is in use
    unless a tombstone names it or it is a condemned set (prune's own
    bookkeeping, deleted when done).
    """
    shards = {(s.peer, pack_name(p.id, s.num)) for p in repo.index.live_packs() for s in p.shards}

    def used(peer: str, name: str) -> bool:
        if parse_shard_name(name) is not None:
            return (peer, name) in shards
        return not name.startswith(CONDEMNED_PREFIX) and not repo.is_deleted(name)

    return used


def _lock_peers(repo: Repository) -> list[tuple[PeerConfig, Peer]]:
    down = repo.peers.down()
    chosen = []
    for config in repo.config.peers:
        peer = repo.peers.get(config.name)
        if config.object_lock is not None and peer is not None and config.name not in down:
            chosen.append((config, peer))
    return chosen


def _retained_names(store: PeerStore) -> list[str]:
    return [i.name for i in store.list("") if not i.name.startswith(UNRETAINED_PREFIXES)]


def audit_locks(repo: Repository, now: datetime | None = None) -> dict[str, LockFindings]:
    """The audit of every reachable peer configured with object lock (empty when none is)."""
    now = now or datetime.now(UTC)
    findings: dict[str, LockFindings] = {}
    peers = _lock_peers(repo)
    used = in_use(repo) if peers else None
    for config, peer in peers:
        assert config.object_lock is not None and used is not None
        report = findings[config.name] = LockFindings(config.object_lock.value, config.object_lock_days)
        try:
            names = _retained_names(peer.store)
            for name, until in zip(names, repo.io.map(lambda n, s=peer.store: _retention(s, n), names), strict=True):
                if isinstance(until, bool):
                    continue  # deleted while we looked (a prune on another host)
                report.objects += 1
                if not used(peer.name, name):
                    report.awaiting_deletion += 1
                elif until is None:
                    report.missing += 1
                    if len(report.missing_objects) < SHOWN:
                        report.missing_objects.append(name)
                elif until <= now:
                    report.lapsed += 1
                    if len(report.lapsed_objects) < SHOWN:
                        report.lapsed_objects.append(name)
        except PeerError as exc:
            report.error = str(exc)
            continue  # partial counts: the metric keeps the last complete audit
        repo.state.set_fact(f"object_lock_exposed:{config.name}", float(report.exposed))
    return findings


def renew_locks(repo: Repository, now: datetime | None = None) -> dict[str, LockRenewal]:
    """Extend the retention of every object in use whose lock ends within half of ``object_lock_days``."""
    now = now or datetime.now(UTC)
    renewals: dict[str, LockRenewal] = {}
    peers = _lock_peers(repo)
    used = in_use(repo) if peers else None
    for config, peer in peers:
        assert config.object_lock is not None and used is not None
        days = config.object_lock_days
        until = now + timedelta(days=days)
        renewal = renewals[config.name] = LockRenewal(
            config.object_lock.value, days, until=until.isoformat(timespec="seconds")
        )
        soon = now + timedelta(days=days / 2)
        try:
            names = _retained_names(peer.store)
            wanted = [name for name in names if used(peer.name, name)]
            renewal.awaiting_deletion = len(names) - len(wanted)
            renewal.objects = len(wanted)
            renewal.extended = sum(repo.io.map(lambda n, s=peer.store, a=soon, b=until: _renew(s, n, a, b), wanted))
        except PeerError as exc:
            renewal.error = str(exc)
    return renewals


def _renew(store: PeerStore, name: str, soon: datetime, until: datetime) -> bool:
    """Extend one object's retention to ``until`` unless it already lasts past ``soon``."""
    current = _retention(store, name)
    if isinstance(current, bool) or (current is not None and current > soon):
        return False  # gone meanwhile, or retained long enough
    store.extend_retention(name, until)
    return True


def _retention(store: PeerStore, name: str) -> datetime | bool | None:
    """The object's retain-until date, None without one, False once it is gone."""
    try:
        return store.retention(name)
    except ObjectNotFoundError:
        return False
