"""Directory-tree sources: a deterministic, error-tolerant walk.

The walk yields the root (".") and then every entry depth-first with names
sorted at each level: the order :func:`shardvault.tree.path_key` defines, so
it can be merged with the previous snapshot's tree in one pass.  Like restic,
an unreadable entry is a warning, not the end of the backup; special files
(devices, FIFOs, sockets) are skipped with a warning.
"""

from __future__ import annotations

import fnmatch
import io
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from shardvault.errors import SourceError
from shardvault.tree import DIR, FILE, SYMLINK, Entry

_NOATIME = getattr(os, "O_NOATIME", 0)


def entry_from_stat(rel: str, st: os.stat_result, target: str | None = None) -> Entry | None:
    if stat.S_ISREG(st.st_mode):
        kind = FILE
    elif stat.S_ISDIR(st.st_mode):
        kind = DIR
    elif stat.S_ISLNK(st.st_mode):
        kind = SYMLINK
    else:
        return None
    return Entry(
        path=rel,
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        size=st.st_size if kind == FILE else 0,
        inode=st.st_ino,
        target=target,
    )


def _excluded(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def walk(
    root: Path, exclude: tuple[str, ...] = (), warn: Callable[[str], None] = lambda _: None
) -> Iterator[tuple[Entry, str]]:
    """Yield (entry, absolute path) for the tree under ``root``."""
    try:
        st = os.lstat(root)
    except OSError as exc:
        raise SourceError(str(root), f"cannot read: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(str(root), "is not a directory")
    top = entry_from_stat(".", st)
    assert top is not None
    yield top, str(root)
    yield from _walk_dir(str(root), "", exclude, warn)


def _walk_dir(
    abs_dir: str, rel_dir: str, exclude: tuple[str, ...], warn: Callable[[str], None]
) -> Iterator[tuple[Entry, str]]:
    try:
        with os.scandir(abs_dir) as it:
            names = sorted(e.name for e in it)
    except OSError as exc:
        warn(f"{abs_dir}: cannot list: {exc.strerror}")
        return
    for name in names:
        rel = f"{rel_dir}{name}"
        if exclude and _excluded(rel, name, exclude):
            continue
        path = os.path.join(abs_dir, name)
        try:
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        except OSError as exc:
            warn(f"{path}: {exc.strerror}")
            continue
        entry = entry_from_stat(rel, st, target)
        if entry is None:
            warn(f"{path}: special file skipped")
            continue
        yield entry, path
        if entry.type == DIR:
            yield from _walk_dir(path, rel + "/", exclude, warn)


def open_file(path: str) -> io.FileIO:
    """Open a source file for reading without touching its atime when allowed."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOATIME | os.O_NOFOLLOW)
    except PermissionError:  # O_NOATIME needs ownership (or root)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    return io.FileIO(fd, "rb")
