"""Snapshots: the immutable, committed record of one backup run.

A snapshot object (``snapshots/<id>``) is written last, after every pack it
needs is stored and indexed (invariant 4): if it exists, everything it names
can be read.  Body::

    {"version": 1, "id": hex, "source": name, "source_type": "files",
     "path": "/srv/docs", "kind": "full"|"incremental", "parent": hex|null,
     "started": iso8601, "finished": iso8601, "hostname": str,
     "tree": [chunk id hex, ...], "stats": {...}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardvault.errors import AmbiguousSnapshotError, LatestNeedsSourceError, SnapshotNotFoundError

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    id: str
    source: str
    source_type: str
    path: str
    kind: str
    parent: str | None
    started: str
    finished: str
    hostname: str
    tree: tuple[str, ...]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": SNAPSHOT_VERSION,
            "id": self.id,
            "source": self.source,
            "source_type": self.source_type,
            "path": self.path,
            "kind": self.kind,
            "parent": self.parent,
            "started": self.started,
            "finished": self.finished,
            "hostname": self.hostname,
            "tree": list(self.tree),
            "stats": self.stats,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Snapshot:
        return cls(
            id=str(doc["id"]),
            source=str(doc["source"]),
            source_type=str(doc["source_type"]),
            path=str(doc["path"]),
            kind=str(doc["kind"]),
            parent=doc.get("parent"),
            started=str(doc["started"]),
            finished=str(doc["finished"]),
            hostname=str(doc.get("hostname", "")),
            tree=tuple(str(t) for t in doc["tree"]),
            stats=dict(doc.get("stats", {})),
        )

    def summary(self) -> dict[str, Any]:
        """What ``snapshots --json`` shows (no tree)."""
        doc = self.to_doc()
        del doc["tree"]
        return doc


def latest(snapshots: list[Snapshot], source: str, source_type: str, kind: str | None = None) -> Snapshot | None:
    """The newest snapshot of a source (of one kind, if given): the parent of the next backup."""
    matching = [s for s in snapshots if s.source == source and s.source_type == source_type and kind in (None, s.kind)]
    return max(matching, key=lambda s: (s.finished, s.id)) if matching else None


def resolve(snapshots: list[Snapshot], spec: str, source: str | None = None) -> Snapshot:
    """An id, a unique id prefix, or ``latest`` (of ``source``).

    ``latest`` without a source is accepted only while the repository holds
    one source: with several, "the newest of any" would quietly restore
    another machine's data over this one's.
    """
    candidates = [s for s in snapshots if source is None or s.source == source]
    where = f" for source {source!r}" if source else ""
    if spec == "latest":
        if not candidates:
            raise SnapshotNotFoundError(spec, where)
        sources = sorted({s.source for s in candidates})
        if len(sources) > 1:
            raise LatestNeedsSourceError(len(sources), ", ".join(sources))
        return max(candidates, key=lambda s: (s.finished, s.id))
    spec = spec.lower()
    matches = [s for s in candidates if s.id.startswith(spec)]
    if not matches:
        raise SnapshotNotFoundError(spec, where)
    if len(matches) > 1:
        raise AmbiguousSnapshotError(spec, len(matches))
    return matches[0]
