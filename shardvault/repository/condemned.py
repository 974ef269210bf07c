"""Condemned sets: what a prune means to delete, written before anything is deleted.

Phase one of prune's two-phase deletion (``docs/concurrency.md``).  A
condemned set ``condemned/<64 hex>`` is a sealed metadata object, replicated
like the index (to at least the write quorum, so every process that can
back up sees it: two quorums of more than half the peers always meet)::

    {"version": 1, "id": hex, "marked": iso8601 (the pruning host's clock),
     "hostname": str, "grace_seconds": float,
     "packs": [pack id hex, ...],               # unreferenced, repacked or orphaned packs
     "stray_shards": [[pack id, num, peer], ...],  # shards outside their pack's placement
     "leftovers": [[peer, name], ...],          # temporaries of killed writes
     "sessions": [session id, ...],             # live when the set was written
     "snapshots": [snapshot id, ...]}           # the snapshots whose references were counted

From the moment the set exists, every process that announces a session
reads it and leans on nothing in it: its index leaves the condemned packs
out (:class:`~shardvault.repository.index.Index`), so a backup stores such a
chunk again and check, scrub and repair leave the pack to prune.  Phase two
(a later prune, or the same one when nothing else is running) deletes what
is still unreferenced, once the grace period has passed and every session
the set names has ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import Repository

CONDEMNED_VERSION = 1
PREFIX = "condemned/"


@dataclass
class CondemnedSet:
    id: str
    marked: str
    hostname: str
    grace_seconds: float
    packs: set[str] = field(default_factory=set)
    stray_shards: set[tuple[str, int, str]] = field(default_factory=set)
    leftovers: set[tuple[str, str]] = field(default_factory=set)
    sessions: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.id}"

    def empty(self) -> bool:
        return not (self.packs or self.stray_shards or self.leftovers)

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": CONDEMNED_VERSION,
            "id": self.id,
            "marked": self.marked,
            "hostname": self.hostname,
            "grace_seconds": self.grace_seconds,
            "packs": sorted(self.packs),
            "stray_shards": [list(s) for s in sorted(self.stray_shards)],
            "leftovers": [list(x) for x in sorted(self.leftovers)],
            "sessions": sorted(self.sessions),
            "snapshots": sorted(self.snapshots),
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> CondemnedSet:
        return cls(
            id=str(doc["id"]),
            marked=str(doc["marked"]),
            hostname=str(doc.get("hostname", "")),
            grace_seconds=float(doc["grace_seconds"]),
            packs={str(p) for p in doc["packs"]},
            stray_shards={(str(p), int(n), str(peer)) for p, n, peer in doc.get("stray_shards", [])},
            leftovers={(str(peer), str(name)) for peer, name in doc.get("leftovers", [])},
            sessions=[str(s) for s in doc.get("sessions", [])],
            snapshots=[str(s) for s in doc.get("snapshots", [])],
        )


def read_condemned(repo: Repository) -> list[CondemnedSet]:
    """Every condemned set the peers hold (unreadable ones are reported by the audit, and skipped)."""
    sets = []
    for name, doc in repo._read_all(repo.list_meta(PREFIX)):
        try:
            condemned = CondemnedSet.from_doc(doc)
        except (KeyError, ValueError, TypeError):
            continue
        if condemned.name == name:
            sets.append(condemned)
    return sorted(sets, key=lambda c: (c.marked, c.id))


def condemned_packs(sets: list[CondemnedSet]) -> set[str]:
    return set().union(*(c.packs for c in sets)) if sets else set()
