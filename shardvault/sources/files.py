"""Directory-tree sources: a deterministic, error-tolerant walk by handles.

The walk yields the root (".") and then every entry depth-first with names
sorted at each level: the order :func:`shardvault.tree.path_key` defines, so
it can be merged with the previous snapshot's tree in one pass.  Like restic,
an unreadable entry is a warning, not the end of the backup.  FIFOs and
device nodes are recorded (not read) and recreated by a restore as root, as
restic and Borg do; sockets are skipped with a note (the program that
listens on one creates it).  Each entry carries what
:mod:`shardvault.sources.inode` reads besides its stat: extended attributes
and ACLs (unless turned off) and inode flags of directories and special
files (regular files get theirs when they are read, see
:mod:`shardvault.backup.files`), owner names, and the link count and device
of hard links.

The walk never follows a path twice.  Each directory is opened once, relative
to its parent's descriptor with ``O_NOFOLLOW``, and checked with ``fstat``
to be the directory that was listed; its entries are stat'ed and opened
relative to that descriptor.  A directory swapped for a symlink (or renamed
away) while the backup runs therefore cannot lead the backup outside its
source: the swap is reported, and what is read is what the handle names.

The names and stats of a directory come from :mod:`.listing`: for a large
tree a lister process lists ahead on the other core (an unchanged
re-backup of many small files is mostly listing); the walk takes a listing
only for the directory its own handle holds, and lists itself whatever the
lister did not.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shardvault.backup_warnings import BackupWarning, WarningKind
from shardvault.errors import SourceError
from shardvault.progress import Totals
from shardvault.tree import BLOCK_DEVICE, CHAR_DEVICE, DIR, FIFO, FILE, SYMLINK, Entry

from .inode import group_name, proc_path, read_flags, read_xattrs, user_name
from .listing import DIR_FLAGS, Lister, Stat, excluded

_NOATIME = getattr(os, "O_NOATIME", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: a FIFO swapped in for a file must not hang the open; reads of regular files ignore it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
# What open(O_NOFOLLOW | O_DIRECTORY) says when the name is now a symlink or not a directory.
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)

Warn = Callable[[BackupWarning], None]


class ReplacedError(Exception):
    """The object opened is not the one the walk listed (and not a regular file)."""


@dataclass
class SourceItem:
    """One entry of the walk, with the handle to open it by.

    ``dir_fd`` is the parent directory's descriptor: it stays open while the
    walk is suspended at this item, so :func:`open_file` must be called
    before the walk is resumed.
    """

    entry: Entry
    path: str  # absolute, for messages only: nothing is opened by it
    dir_fd: int | None = None
    name: str = ""
    dev: int = 0


_KINDS = {
    stat.S_IFREG: FILE,
    stat.S_IFDIR: DIR,
    stat.S_IFLNK: SYMLINK,
    stat.S_IFIFO: FIFO,
    stat.S_IFCHR: CHAR_DEVICE,
    stat.S_IFBLK: BLOCK_DEVICE,
}


@dataclass(frozen=True)
class WalkOptions:
    """What the walk records besides the stat (a files source's ``xattrs`` and ``acls``)."""

    exclude: tuple[str, ...] = ()
    xattrs: bool = True
    acls: bool = True


def entry_from_stat(rel: str, st: os.stat_result | Stat, target: str | None = None) -> Entry | None:
    """The tree entry for a stat; None for what is not recorded (sockets)."""
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    linked = kind != DIR and st.st_nlink > 1
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
        atime_ns=st.st_atime_ns,
        user=user_name(st.st_uid),
        group=group_name(st.st_gid),
        nlink=st.st_nlink if linked else 1,
        dev=st.st_dev if linked else 0,
        rdev=st.st_rdev if kind in (CHAR_DEVICE, BLOCK_DEVICE) else 0,
    )


def refresh_entry(entry: Entry, st: os.stat_result) -> None:
    """Describe ``entry`` by the stat of what was actually opened."""
    fresh = entry_from_stat(entry.path, st)
    assert fresh is not None and fresh.type == FILE
    for name in ("mode", "uid", "gid", "mtime_ns", "ctime_ns", "size", "inode", "atime_ns", "user", "group"):
        setattr(entry, name, getattr(fresh, name))
    entry.nlink, entry.dev = fresh.nlink, fresh.dev


def walk(
    root: Path, options: WalkOptions = WalkOptions(), warn: Warn = lambda _: None, ahead: bool = False
) -> Iterator[SourceItem]:
    """Yield the items of the tree under ``root`` (which must be a directory, not a symlink to one).

    ``ahead``: a lister process lists and stats directories ahead of the
    walk (:mod:`.listing`), for large trees; the items are the same.
    """
    try:
        fd = os.open(root, DIR_FLAGS)
    except OSError as exc:
        if exc.errno in _NOT_A_DIR:
            raise SourceError(str(root), "is not a directory") from None
        raise SourceError(str(root), f"cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        top = entry_from_stat(".", st)
        assert top is not None
        _describe_open(top, fd, options, str(root), warn)
        yield SourceItem(top, str(root), dev=st.st_dev)
        with Lister(fd, options.exclude, ahead) as lister:
            yield from _walk_dir(fd, st, str(root), "", options, warn, lister)
    finally:
        os.close(fd)


def _describe_open(entry: Entry, fd: int, options: WalkOptions, path: str, warn: Warn) -> None:
    """Add what only an open directory tells: its flags and extended attributes."""
    try:
        entry.flags = read_flags(fd)
        if options.xattrs:
            entry.xattrs = read_xattrs(fd, options.acls)
    except OSError as exc:
        warn(BackupWarning(path, WarningKind.UNREADABLE_METADATA, f"cannot read its attributes: {exc.strerror}"))


def _walk_dir(
    fd: int, dir_st: os.stat_result, abs_dir: str, rel_dir: str, options: WalkOptions, warn: Warn, lister: Lister
) -> Iterator[SourceItem]:
    try:
        names = lister.take(fd, rel_dir, dir_st)
    except OSError as exc:
        warn(BackupWarning(abs_dir, WarningKind.UNREADABLE_DIR, f"cannot list: {exc.strerror}"))
        return
    for name, fields, target, error in names:
        rel = f"{rel_dir}{name}"
        path = os.path.join(abs_dir, name)
        if fields is None:
            assert error is not None
            if error[0] == errno.ENOENT:
                warn(BackupWarning(path, WarningKind.VANISHED, "vanished while the backup ran"))
            else:
                warn(BackupWarning(path, WarningKind.UNREADABLE_FILE, f"cannot read: {error[1]}"))
            continue
        st = Stat(*fields)
        entry = entry_from_stat(rel, st, target)
        if entry is None:
            warn(BackupWarning(path, WarningKind.SPECIAL_FILE, "socket skipped (its program creates it again)"))
            continue
        item = SourceItem(entry, path, fd, name, st.st_dev)
        if entry.type != DIR:
            # A regular file's attributes are read by its own handle when it is read (or kept from its
            # previous version, unchanged like its ctime): a path lookup per file is a cost that counts.
            if options.xattrs and entry.type != FILE:
                try:
                    # By the parent's handle: a swap of this name is seen, not followed.
                    entry.xattrs = read_xattrs(proc_path(fd, name), options.acls)
                except FileNotFoundError:
                    pass  # vanished: reading the file says so
                except OSError as exc:
                    why = f"cannot read its attributes: {exc.strerror}"
                    warn(BackupWarning(path, WarningKind.UNREADABLE_METADATA, why))
            yield item
            continue
        try:
            child = os.open(name, DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno in _NOT_A_DIR:
                why = "was a directory when listed, is not one now: not followed"
                warn(BackupWarning(path, WarningKind.REPLACED, why))
            elif exc.errno == errno.ENOENT:
                warn(BackupWarning(path, WarningKind.VANISHED, "vanished while the backup ran"))
            else:
                # The directory itself is kept (its mode and owner are known); its content is not.
                warn(BackupWarning(path, WarningKind.UNREADABLE_DIR, f"cannot read directory: {exc.strerror}"))
                yield item
            continue
        try:
            cst = os.fstat(child)
            if (cst.st_dev, cst.st_ino) != (st.st_dev, st.st_ino):
                warn(BackupWarning(path, WarningKind.REPLACED, "was replaced by another directory while listed"))
                continue
            _describe_open(entry, child, options, path, warn)
            yield item
            yield from _walk_dir(child, cst, path, rel + "/", options, warn, lister)
        finally:
            os.close(child)


def count(root: Path, exclude: tuple[str, ...], totals: Totals, stop: threading.Event) -> None:
    """Count the regular files under ``root`` and their bytes into ``totals`` (progress's scanner).

    An estimate for the progress display only, run beside the backup: it
    follows no symlink, skips what the walk excludes, ignores what it cannot
    read, and stops early when ``stop`` is set.
    """
    pending = [(str(root), "")]
    while pending and not stop.is_set():
        path, rel_dir = pending.pop()
        try:
            with os.scandir(path) as it:
                for item in it:
                    rel = rel_dir + item.name
                    if exclude and excluded(rel, item.name, exclude):
                        continue
                    if item.is_dir(follow_symlinks=False):
                        pending.append((item.path, rel + "/"))
                    elif item.is_file(follow_symlinks=False):
                        totals.files += 1
                        totals.bytes += item.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    totals.complete = not stop.is_set()


class OpenFile:
    """A source file open for reading, with the stat taken when it was opened.

    Thin on purpose: a tree of many small files pays for every syscall, and
    ``io.FileIO`` adds an fstat on creation and an lseek and an fstat per
    ``read()``.
    """

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self.fd, self.stat = fd, st

    def fileno(self) -> int:
        return self.fd

    def readinto(self, buffer: memoryview, /) -> int:
        return os.readv(self.fd, [buffer])

    def read_small(self, size: int) -> bytes:
        """The whole content of a file whose size at opening was ``size`` (what is there now, up to one more byte)."""
        data = os.read(self.fd, size + 1)
        if len(data) <= size:
            return data
        parts = [data]  # it grew while read: take the rest too (the change is detected by the caller)
        while block := os.read(self.fd, 1 << 20):
            parts.append(block)
        return b"".join(parts)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_file(item: SourceItem) -> OpenFile:
    """Open a listed file by its parent's handle, and check it is a regular file.

    Raises :class:`ReplacedError` when the name now holds something else
    than a regular file (a symlink, a FIFO, a directory).  A regular file
    with another inode (saved by rename, say) is inside the source all the
    same: the entry is refreshed to describe it.
    """
    # Only an item built by hand (a caller's own list of entries) has no directory handle: the walk
    # yields one only for the root, a directory, which is never opened as a file.
    name = item.name if item.dir_fd is not None else item.path
    try:
        fd = os.open(name, _FILE_FLAGS | _NOATIME, dir_fd=item.dir_fd)
    except PermissionError:  # O_NOATIME needs ownership (or root)
        fd = _open_plain(name, item.dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ReplacedError("is a symlink now, not the file listed: not followed") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReplacedError("is no longer a regular file: not read")
        if (st.st_dev, st.st_ino) != (item.dev, item.entry.inode) and item.dir_fd is not None:
            refresh_entry(item.entry, st)
        return OpenFile(fd, st)
    except BaseException:
        os.close(fd)
        raise


def _open_plain(name: str, dir_fd: int | None) -> int:
    try:
        return os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ReplacedError("is a symlink now, not the file listed: not followed") from None
        raise
