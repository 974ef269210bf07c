"""Which entries of a snapshot a restore writes: ``--include``, ``--exclude`` and ``--path``.

Patterns are globs over paths relative to the snapshot's root.  As in
restic, a pattern matches an entry when it matches the entry itself or one
of its parent directories: a pattern without ``/`` is matched against each
path component (``--exclude '*.log'``, ``--include docs``), a pattern with
``/`` against each leading part of the path (``--include 'srv/www/*.html'``).
An entry is written when some include matches (or none is given) and no
exclude does; the directories above a written entry are created as needed.

``--path P`` restores the subtree at ``P`` as the target itself (restic's
``snapshot:subfolder``): ``P/a/b`` is written as ``a/b``, and ``P``'s own
metadata goes to the target; a file ``P`` is written under its own name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from shardvault.errors import PathNotInSnapshotError
from shardvault.tree import DIR, Entry

from .browse import ROOT, normalise


def hits(pattern: str, path: str) -> bool:
    """Whether ``pattern`` matches ``path`` or one of its parent directories."""
    parts = path.split("/")
    anchored = "/" in pattern.strip("/")
    pattern = normalise(pattern) if anchored else pattern
    for i in range(1, len(parts) + 1):
        if fnmatch.fnmatchcase("/".join(parts[:i]) if anchored else parts[i - 1], pattern):
            return True
    return False


@dataclass(frozen=True)
class Selection:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    path: str = ""

    @property
    def everything(self) -> bool:
        return not (self.include or self.exclude or normalise(self.path))

    def wants(self, path: str) -> bool:
        if path == ROOT:
            return True
        if self.include and not any(hits(p, path) for p in self.include):
            return False
        return not any(hits(p, path) for p in self.exclude)

    def apply(self, entries: Iterable[Entry], snapshot: str) -> Iterator[Entry]:
        """The selected entries, re-rooted at ``path``; a ``path`` the snapshot lacks raises."""
        root = normalise(self.path)
        found = not root
        for entry in entries:
            if root:
                if entry.path == root:
                    found = True
                    entry = replace(entry, path=ROOT if entry.type == DIR else root.rsplit("/", 1)[-1])
                elif entry.path.startswith(root + "/"):
                    entry = replace(entry, path=entry.path[len(root) + 1 :])
                else:
                    continue
            if self.wants(entry.path):
                yield entry
        if not found:
            raise PathNotInSnapshotError(self.path, snapshot)
