"""Directory listings for the walk: names, lstat and link targets, one directory at a time.

A listing is what :mod:`shardvault.sources.files` needs of a directory
before it yields its entries: the names (sorted, exclusions applied), each
name's ``lstat`` and a symlink's target, or why one could not be had.  The
walk makes the listings itself (``inline``), or a *lister* process makes
them ahead of it (``ahead``): for a tree of many small files, listing and
stat'ing are most of an unchanged re-backup, and in the lister they run on
the other core, outside this interpreter's GIL, while the walk merges with
the parent snapshot.

The lister is only an accelerator, never trusted for more than the names
and stats of a directory.  It gets the walk's own root handle, and opens
each directory by its parent's handle with ``O_NOFOLLOW`` as the walk does;
every listing carries the device and inode of the directory it lists, and
the walk uses it only for the directory its own handle holds (same device
and inode).  Whatever the lister did not list (it failed, fell behind a
swap, or died) the walk lists itself.  Listings go over a pipe as pickled
batches of plain tuples; the pipe's buffer is the only read-ahead, so
memory stays flat in the tree's size.

This file runs as a script too (``python -I -S listing.py FD [PATTERN...]``):
it imports nothing but the standard library, so the lister starts in a few
milliseconds.
"""

from __future__ import annotations

import fnmatch
import os
import pickle
import stat
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from typing import IO, NamedTuple

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
BATCH = 512  # entries per pickled batch: one write and one read per a few directories


class Stat(NamedTuple):
    """The fields of an ``lstat`` the walk records (attribute names as ``os.stat_result``'s)."""

    st_mode: int
    st_ino: int
    st_dev: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_rdev: int


def stat_fields(st: os.stat_result) -> tuple[int, ...]:
    """A ``Stat``'s fields as a plain tuple: what crosses the pipe (a class would be pickled by name)."""
    return (
        st.st_mode,
        st.st_ino,
        st.st_dev,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_rdev,
    )


# One name of a listing: (name, stat fields, symlink target, None) or (name, None, None, (errno, strerror)).
Listed = tuple[str, tuple[int, ...] | None, str | None, tuple[int, str] | None]


class Listing(NamedTuple):
    """One directory's listing: its path in the tree ("" for the root, else ending in "/"), identity, names."""

    rel_dir: str
    dev: int
    ino: int
    names: list[Listed]


def excluded(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def list_dir(fd: int, rel_dir: str, exclude: tuple[str, ...]) -> list[Listed]:
    """The names of the directory open as ``fd``, sorted, with their lstat (raises OSError if it cannot be listed)."""
    listed: list[Listed] = []
    for name in sorted(os.listdir(fd)):  # names only: no DirEntry per entry (each is stat'ed below anyway)
        if exclude and excluded(f"{rel_dir}{name}", name, exclude):
            continue
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
        except OSError as exc:
            listed.append((name, None, None, (exc.errno or 0, exc.strerror or str(exc))))
            continue
        listed.append((name, stat_fields(st), target, None))
    return listed


def listings(fd: int, exclude: tuple[str, ...], rel_dir: str = "") -> Iterator[Listing]:
    """The listings of the tree open as ``fd``, depth-first in the walk's order; what fails is left out."""
    try:
        st = os.fstat(fd)
        names = list_dir(fd, rel_dir, exclude)
    except OSError:
        return  # the walk lists it itself, and says what failed
    yield Listing(rel_dir, st.st_dev, st.st_ino, names)
    for name, fields, _, _ in names:
        if fields is None or not stat.S_ISDIR(fields[0]):
            continue
        try:
            child = os.open(name, DIR_FLAGS, dir_fd=fd)
        except OSError:
            continue
        try:
            yield from listings(child, exclude, f"{rel_dir}{name}/")
        finally:
            os.close(child)


class Lister:
    """The listings of a tree for the walk to take in order: made inline, or ahead by a lister process."""

    def __init__(self, root_fd: int, exclude: tuple[str, ...], ahead: bool) -> None:
        self.exclude = exclude
        self._pending: deque[Listing] = deque()
        self._process: subprocess.Popen[bytes] | None = None
        self._stream: IO[bytes] | None = None
        if ahead:
            args = [sys.executable, "-I", "-S", __file__, str(root_fd), *exclude]
            try:
                self._process = subprocess.Popen(
                    args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, pass_fds=(root_fd,)
                )
                self._stream = self._process.stdout
            except OSError:
                self._process = None  # cannot start one: the walk lists everything itself

    def take(self, fd: int, rel_dir: str, st: os.stat_result) -> list[Listed]:
        """The listing of the directory the walk holds open as ``fd`` (device and inode ``st``'s).

        The lister's, when it listed that very directory; the walk's own
        otherwise.  Raises OSError when the walk's own listing fails.
        """
        listing = self._next(rel_dir)
        if listing is not None and (listing.dev, listing.ino) == (st.st_dev, st.st_ino):
            return listing.names
        return list_dir(fd, rel_dir, self.exclude)

    def _next(self, rel_dir: str) -> Listing | None:
        """The lister's listing of ``rel_dir``, skipping those of subtrees the walk left out."""
        key = _key(rel_dir)
        while True:
            if not self._pending and not self._receive():
                return None
            head = self._pending[0]
            head_key = _key(head.rel_dir)
            if head_key > key:
                return None  # the lister could not list it: it moved on
            self._pending.popleft()
            if head_key == key:
                return head

    def _receive(self) -> bool:
        if self._stream is None:
            return False
        try:
            batch = pickle.load(self._stream)
        except (EOFError, pickle.UnpicklingError, OSError):
            self.close()  # ended or died: the walk lists the rest itself
            return False
        self._pending.extend(Listing(*listing) for listing in batch)
        return True

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> Lister:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key(rel_dir: str) -> tuple[str, ...]:
    """The walk's order of directories (depth-first, names sorted per level)."""
    return tuple(rel_dir.split("/")[:-1]) if rel_dir else ()


def _serve(fd: int, exclude: tuple[str, ...], out: IO[bytes]) -> None:
    """The lister process: the tree's listings to ``out`` in pickled batches, until the reader goes."""
    batch: list[tuple[object, ...]] = []
    size = 0
    for listing in listings(fd, exclude):
        batch.append(tuple(listing))
        size += len(listing.names) + 1
        if size >= BATCH:
            pickle.dump(batch, out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
            batch, size = [], 0
    pickle.dump(batch, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


if __name__ == "__main__":
    try:
        _serve(int(sys.argv[1]), tuple(sys.argv[2:]), sys.stdout.buffer)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
