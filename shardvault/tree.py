"""The tree of a files snapshot: one JSON line per entry, in walk order.

Entries come in depth-first order with names sorted at each level, so the
stream of a snapshot and the walk of a source can be merged in one pass
(:func:`path_key` orders both), which is how an incremental backup finds each
file's previous version without holding either tree in memory.

The stream itself is chunked and stored like file data (as tree blobs in tree
packs, so reading a tree never fetches file data), and the snapshot names its
chunk ids.  Entry keys::

    p  path relative to the source root, '/'-separated ("." for the root)
    t  type: "f" file, "d" directory, "l" symlink, "p" FIFO,
       "c" character device, "b" block device
    m  permission bits (with setuid, setgid, sticky)
    u, g  uid, gid     mt  mtime in ns   ct  ctime in ns
    s  size (logical)  i   inode          c   chunk ids (hex), files only
    h  BLAKE3 of the content (hex), files only (holes hash as zeros)
    l  link target, symlinks only
    cw 1 when the file changed while it was read (absent otherwise): its
       content may be torn, so the next incremental backup reads it again

Optional keys (absent when empty), added in the same format version: a
reader that ignores them restores the content and the keys above::

    at  atime in ns             un, gn  owner's user and group names
    n   link count, when > 1 (not for directories); with
    dv  the device number: entries with the same (dv, i) are one inode,
        restored as hard links
    rd  device number of a character or block device
    sp  data extents of a sparse file, [[offset, length], ...] in order:
        the chunks hold those bytes only, everything else is a hole
    xa  extended attributes, {name: base64 value}; POSIX ACLs are the
        system.posix_acl_access and system.posix_acl_default attributes
    fl  inode flags (Linux ``chattr``: FS_IOC_GETFLAGS), the settable ones
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps without its per-call set-up

FILE = "f"
DIR = "d"
SYMLINK = "l"
FIFO = "p"
CHAR_DEVICE = "c"
BLOCK_DEVICE = "b"
SPECIAL = frozenset({FIFO, CHAR_DEVICE, BLOCK_DEVICE})  # recreated, not read


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
    atime_ns: int = 0
    user: str | None = None
    group: str | None = None
    nlink: int = 1
    dev: int = 0  # recorded only with nlink > 1
    rdev: int = 0
    extents: list[tuple[int, int]] | None = None  # data extents of a sparse file
    xattrs: dict[str, str] | None = None
    flags: int = 0
    # The line this entry was read from (parse_lines(keep_lines=True)): an unchanged file's entry equal to
    # its previous version is written as that line again, not encoded again (see to_line).
    line: bytes | None = field(default=None, compare=False, repr=False)

    def to_line(self) -> bytes:
        if self.line is not None:
            return self.line + b"\n"
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
        optional = {
            "at": self.atime_ns,
            "un": self.user,
            "gn": self.group,
            "n": self.nlink if self.nlink > 1 else 0,
            "dv": self.dev if self.nlink > 1 else 0,
            "rd": self.rdev,
            "xa": self.xattrs,
            "fl": self.flags,
        }
        doc.update((key, value) for key, value in optional.items() if value)
        if self.extents is not None:  # [] too: a file that is one hole
            doc["sp"] = [list(extent) for extent in self.extents]
        # ASCII escapes keep undecodable file names (surrogate escapes) intact.
        return _encode(doc).encode() + b"\n"

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Entry:
        # Positional and without a get per absent key: an unchanged re-backup of 100,000 files
        # parses 100,000 of these on its critical path (the order is the fields').
        get = doc.get
        extents, xattrs = get("sp"), get("xa")
        return cls(
            str(doc["p"]),
            str(doc["t"]),
            int(doc["m"]),
            int(doc["u"]),
            int(doc["g"]),
            int(doc["mt"]),
            int(get("ct", 0)),
            int(get("s", 0)),
            int(get("i", 0)),
            [str(c) for c in get("c", ())],
            get("h"),
            get("l"),
            False,
            get("x"),
            bool(get("cw", 0)),
            int(get("at", 0)),
            get("un"),
            get("gn"),
            int(get("n", 1)),
            int(get("dv", 0)),
            int(get("rd", 0)),
            None if extents is None else [(int(o), int(n)) for o, n in extents],
            None if xattrs is None else {str(k): str(v) for k, v in xattrs.items()},
            int(get("fl", 0)),
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


def extents_in_order(entry: Entry) -> bool:
    """Whether a sparse file's extents are increasing, non-empty, apart and inside its size (a reader's check)."""
    position = 0
    for offset, length in entry.extents or ():
        if offset < position or length <= 0 or offset + length > entry.size:
            return False
        position = offset + length
    return True


_ZEROS = bytes(1 << 20)


def zeros(n: int) -> Iterator[bytes]:
    """``n`` zero bytes in blocks of at most 1 MiB: a hole's content, for hashes and streams."""
    while n > 0:
        yield _ZEROS[: min(n, len(_ZEROS))]
        n -= len(_ZEROS)


def link_key(entry: Entry) -> tuple[int, int, str | None] | None:
    """The inode a hard-linked file shares with its other names, or None.

    The content hash is part of it: names of one inode read at different
    moments (the file rewritten in between) hold different content, and
    each must come back with its own.
    """
    return (entry.dev, entry.inode, entry.hash) if entry.type == FILE and entry.nlink > 1 else None


def path_key(path: str) -> tuple[str, ...]:
    """Sort key matching the walk: depth-first, names sorted per level."""
    return () if path == "." else tuple(path.split("/"))


def parse_lines(blocks: Iterable[bytes | bytearray], keep_lines: bool = False) -> Iterator[Entry]:
    """Entries from a byte stream cut at arbitrary points (chunk boundaries).

    The whole lines of a block are decoded as one JSON array: one call into
    the decoder per block instead of one per entry.  ``keep_lines``: each
    entry keeps its line (:attr:`Entry.line`), for a backup to write again.
    """
    rest = b""
    for block in blocks:
        data = rest + block
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        lines = [line for line in data[:cut].split(b"\n") if line]
        if lines:
            docs = json.loads(b"[" + b",".join(lines) + b"]")
            if not keep_lines:
                yield from map(Entry.from_doc, docs)
                continue
            for line, doc in zip(lines, docs, strict=True):
                entry = Entry.from_doc(doc)
                entry.line = line
                yield entry
    if rest.strip():
        entry = Entry.from_doc(json.loads(rest))
        entry.line = rest.strip() if keep_lines else None
        yield entry
