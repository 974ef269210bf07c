"""S3 Object Lock audit: which objects on a locked peer could be deleted now?

For every peer configured with ``object_lock``, ``check`` lists the peer's
objects and reads each one's retention (a HEAD on S3: ``retention(name)``).
An object is

* ``retained`` while its retain-until date lies in the future (by this host's
  clock),
* ``lapsed`` once that date has passed: a client holding the peer's
  credentials may delete it,
* ``missing`` when it carries no retention at all (written before the lock
  was configured, by a client without ``object_lock`` in its configuration,
  or stripped by someone allowed to bypass governance mode).

Session heartbeats (``sessions/``) are written without retention on purpose
and are not asked about.

Retention runs from the moment an object was written: a pack deduplicated
into many later snapshots is protected only until its own date.  So on a
repository older than ``object_lock_days`` lapsed objects are expected, and
this report says how much of the history is exposed.  It is a warning, not
damage: nothing is lost or unreadable, so ``check``'s exit code does not
change (exit 6 means damage), and the report names counts and the first few
objects of each peer, in the text output and under ``object_lock`` in
``check --json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from shardvault.errors import ObjectNotFoundError, PeerError
from shardvault.repository import Repository
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
    lapsed_objects: list[str] = field(default_factory=list)  # the first SHOWN
    missing_objects: list[str] = field(default_factory=list)
    error: str = ""  # the peer failed during the audit: the counts are partial

    @property
    def exposed(self) -> int:
        """Objects a client with the peer's credentials could delete now."""
        return self.lapsed + self.missing


def audit_locks(repo: Repository, now: datetime | None = None) -> dict[str, LockFindings]:
    """The audit of every reachable peer configured with object lock (empty when none is)."""
    now = now or datetime.now(UTC)
    findings: dict[str, LockFindings] = {}
    down = repo.peers.down()
    for config in repo.config.peers:
        peer = repo.peers.get(config.name)
        if config.object_lock is None or peer is None or config.name in down:
            continue
        report = findings[config.name] = LockFindings(config.object_lock.value, config.object_lock_days)
        try:
            names = [i.name for i in peer.store.list("") if not i.name.startswith(UNRETAINED_PREFIXES)]
            for name, until in zip(names, repo.io.map(lambda n, s=peer.store: _retention(s, n), names), strict=True):
                if isinstance(until, bool):
                    continue  # deleted while we looked (a prune on another host)
                report.objects += 1
                if until is None:
                    report.missing += 1
                    if len(report.missing_objects) < SHOWN:
                        report.missing_objects.append(name)
                elif until <= now:
                    report.lapsed += 1
                    if len(report.lapsed_objects) < SHOWN:
                        report.lapsed_objects.append(name)
        except PeerError as exc:
            report.error = str(exc)
    return findings


def _retention(store: PeerStore, name: str) -> datetime | bool | None:
    """The object's retain-until date, None without one, False once it is gone."""
    try:
        return store.retention(name)
    except ObjectNotFoundError:
        return False
