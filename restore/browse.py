"""Browsing snapshots without their data: ``ls``, ``find`` and ``diff`` read trees only.

A snapshot's tree is stored in its own packs (kind tree, see
:mod:`shardvault.repository.packs`), apart from file data, so listing a
snapshot of a million files fetches tree packs and never a data pack.
Paths are relative to the snapshot's root, ``/``-separated; ``""`` (or
``/``) is the root, which the tree records as ``.``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shardvault.errors import PathNotInSnapshotError
from shardvault.repository import Repository
from shardvault.repository.snapshot import Snapshot
from shardvault.tree import DIR, Entry

ROOT = "."  # the tree's entry for the snapshot's root directory


def normalise(path: str) -> str:
    return "/".join(part for part in path.split("/") if part not in ("", "."))


TYPE_NAMES = {"f": "file", "d": "dir", "l": "symlink", "p": "fifo", "c": "chardev", "b": "blockdev"}


def entry_doc(entry: Entry) -> dict[str, Any]:
    doc = {
        "path": entry.path,
        "type": TYPE_NAMES.get(entry.type, entry.type),
        "mode": f"{entry.mode:04o}",
        "uid": entry.uid,
        "gid": entry.gid,
        "size": entry.size,
        "mtime": datetime.fromtimestamp(entry.mtime_ns / 1e9, UTC).isoformat(),
        **({"target": entry.target} if entry.target is not None else {}),
    }
    optional = {
        "user": entry.user,
        "group": entry.group,
        "links": entry.nlink if entry.nlink > 1 else None,
        "sparse": True if entry.extents is not None else None,
        "xattrs": sorted(entry.xattrs) if entry.xattrs else None,
    }
    return doc | {key: value for key, value in optional.items() if value is not None}


def ls(repo: Repository, snapshot: Snapshot, path: str = "", recursive: bool = False) -> list[Entry]:
    """The entries below ``path`` (its children, or everything under it with ``recursive``); a file lists itself."""
    prefix = normalise(path)
    listed: list[Entry] = []
    found = not prefix
    for entry in repo.iter_tree(snapshot):
        if entry.path == ROOT:
            continue
        if entry.path == prefix:
            found = True
            if entry.type != DIR:
                listed.append(entry)
            continue
        if prefix and not entry.path.startswith(prefix + "/"):
            continue
        rest = entry.path[len(prefix) + 1 :] if prefix else entry.path
        if recursive or "/" not in rest:
            listed.append(entry)
    if not found:
        raise PathNotInSnapshotError(path, snapshot.short_id)
    return listed


def matches(pattern: str, path: str) -> bool:
    """restic's rule: a pattern with a ``/`` matches the whole path, else the last component."""
    if "/" in pattern.strip("/"):
        return fnmatch.fnmatchcase(path, normalise(pattern))
    return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)


def find(
    repo: Repository, pattern: str, source: str | None = None, newest: int | None = None
) -> Iterator[tuple[Snapshot, Entry]]:
    """Every entry matching ``pattern`` in the snapshots (newest first; only the ``newest`` N if given)."""
    snapshots = [s for s in repo.snapshots() if source is None or s.source == source]
    snapshots.sort(key=lambda s: (s.finished, s.id), reverse=True)
    for snapshot in snapshots[:newest] if newest else snapshots:
        for entry in repo.iter_tree(snapshot):
            if entry.path != ROOT and matches(pattern, entry.path):
                yield snapshot, entry


@dataclass
class Diff:
    """What changed from one snapshot to another, as restic diff says it."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # content, type or link target
    metadata: list[str] = field(default_factory=list)  # mode, owner, mtime, attributes or flags only

    def to_doc(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "metadata": self.metadata,
            "stats": {k: len(v) for k, v in self.__dict__.items()},
        }


def _content(entry: Entry) -> tuple[Any, ...]:
    # The hash, not the chunk ids: a file that became sparse (or was cut otherwise) with the same bytes is the same.
    return (entry.type, entry.size, entry.hash, entry.target, entry.rdev)


def _metadata(entry: Entry) -> tuple[Any, ...]:
    # Not atime (reading changes it) nor ctime, inode or link count (they follow the others, or a copy).
    return (entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs or {}, entry.flags)


def diff(repo: Repository, old: Snapshot, new: Snapshot) -> Diff:
    before = {e.path: e for e in repo.iter_tree(old) if e.path}
    result = Diff()
    seen: set[str] = set()
    for entry in repo.iter_tree(new):
        if not entry.path:
            continue
        seen.add(entry.path)
        was = before.get(entry.path)
        if was is None:
            result.added.append(entry.path)
        elif _content(was) != _content(entry):
            result.changed.append(entry.path)
        elif _metadata(was) != _metadata(entry):
            result.metadata.append(entry.path)
    result.removed = sorted(p for p in before if p not in seen)
    result.added.sort()
    result.changed.sort()
    result.metadata.sort()
    return result
