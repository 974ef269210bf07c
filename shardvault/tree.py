"""The tree of a files snapshot: one JSON line per entry, in walk order.

Entries come in depth-first order with names sorted at each level, so the
stream of a snapshot and the walk of a source can be merged in one pass
(:func:`path_key` orders both), which is how an incremental backup finds each
file's previous version without holding either tree in memory.

The stream itself is chunked and stored like file data (as tree blobs in tree
packs, so reading a tree never fetches file data), and the snapshot names its
chunk ids.  Entry keys::

    p  path relative to the source root, '/'-separated ("." for the root)
    t  type: "f" file, "d" directory, "l" symlink
    m  permission bits     u, g  uid, gid     mt  mtime in ns   ct  ctime in ns
    s  size                i   inode          c   chunk ids (hex), files only
    h  BLAKE3 of the content (hex), files only      l  link target, symlinks only
    cw 1 when the file changed while it was read (absent otherwise): its
       content may be torn, so the next incremental backup reads it again
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

FILE = "f"
DIR = "d"
SYMLINK = "l"


@dataclass
class Entry:
    path: str
    type: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int = 0
    size: int = 0
    inode: int = 0
    chunks: list[str] = field(default_factory=list)
    hash: str | None = None
    target: str | None = None
    skip: bool = field(default=False, compare=False)  # unreadable during backup: left out of the tree
    meta: dict[str, Any] | None = None  # bucket objects: etag, content type, user metadata
    changed: bool = False  # changed while read: never "unchanged" for the next run

    def to_line(self) -> bytes:
        doc: dict[str, Any] = {
            "p": self.path,
            "t": self.type,
            "m": self.mode,
            "u": self.uid,
            "g": self.gid,
            "mt": self.mtime_ns,
            "ct": self.ctime_ns,
            "i": self.inode,
        }
        if self.type == FILE:
            doc.update(s=self.size, c=self.chunks, h=self.hash)
        elif self.type == SYMLINK:
            doc["l"] = self.target
        if self.meta:
            doc["x"] = self.meta
        if self.changed:
            doc["cw"] = 1
        # ASCII escapes keep undecodable file names (surrogate escapes) intact.
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Entry:
        return cls(
            path=str(doc["p"]),
            type=str(doc["t"]),
            mode=int(doc["m"]),
            uid=int(doc["u"]),
            gid=int(doc["g"]),
            mtime_ns=int(doc["mt"]),
            ctime_ns=int(doc.get("ct", 0)),
            size=int(doc.get("s", 0)),
            inode=int(doc.get("i", 0)),
            chunks=[str(c) for c in doc.get("c", [])],
            hash=doc.get("h"),
            target=doc.get("l"),
            meta=doc.get("x"),
            changed=bool(doc.get("cw", 0)),
        )

    def unchanged_since(self, old: Entry) -> bool:
        """restic's rule: same type, size, mtime, ctime and inode."""
        return (
            old.type == self.type == FILE
            and old.size == self.size
            and old.mtime_ns == self.mtime_ns
            and old.ctime_ns == self.ctime_ns
            and old.inode == self.inode
            and old.hash is not None
            and not old.changed
        )


def path_key(path: str) -> tuple[str, ...]:
    """Sort key matching the walk: depth-first, names sorted per level."""
    return () if path == "." else tuple(path.split("/"))


def parse_lines(blocks: Iterable[bytes | bytearray]) -> Iterator[Entry]:
    """Entries from a byte stream cut at arbitrary points (chunk boundaries)."""
    rest = b""
    for block in blocks:
        data = rest + block
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            if line:
                yield Entry.from_doc(json.loads(line))
    if rest.strip():
        yield Entry.from_doc(json.loads(rest))
