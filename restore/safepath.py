"""Writing inside a target directory, and nowhere else (invariant 6).

Paths from a snapshot are untrusted: they may hold ``..``, be absolute, or
name a place where a symlink waits (planted in the target beforehand, or
created earlier by the same snapshot).  So:

* every path is checked component by component before use
  (:func:`safe_parts`), and
* every directory is opened relative to its parent's file descriptor with
  ``O_NOFOLLOW | O_DIRECTORY``, starting from the target's own descriptor, so
  the kernel refuses to follow a symlink anywhere on the way; files are
  created with ``O_EXCL | O_NOFOLLOW`` under a temporary name and renamed into
  place, and a rename replaces a symlink rather than writing through it.

The target itself can fail in ordinary ways (full, read-only, a file where a
directory should be).  Those are the operator's to fix, not lost data:
:func:`target_error` turns the ``OSError`` into a :class:`RestoreTargetError`
(exit 12) naming the path and the errno, in one place for every restore kind.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from enum import Enum
from pathlib import Path

from shardvault.errors import RestoreTargetError, UnsafePathError


class TargetProblem(Enum):
    """Why the target refused a write (the detail of a :class:`RestoreTargetError`)."""

    FULL = "no space left"
    READ_ONLY = "read-only file system"
    NO_PERMISSION = "permission denied"
    NOT_A_DIRECTORY = "not a directory"
    MISSING = "does not exist"
    IN_THE_WAY = "something else is in the way"
    OTHER = "cannot write"


_PROBLEMS = {
    errno.ENOSPC: TargetProblem.FULL,
    errno.EDQUOT: TargetProblem.FULL,
    errno.EFBIG: TargetProblem.FULL,
    errno.EROFS: TargetProblem.READ_ONLY,
    errno.EACCES: TargetProblem.NO_PERMISSION,
    errno.EPERM: TargetProblem.NO_PERMISSION,
    errno.ENOTDIR: TargetProblem.NOT_A_DIRECTORY,
    errno.ENOENT: TargetProblem.MISSING,
    errno.EISDIR: TargetProblem.IN_THE_WAY,
    errno.ENOTEMPTY: TargetProblem.IN_THE_WAY,
    errno.EEXIST: TargetProblem.IN_THE_WAY,
}


def target_error(exc: OSError, path: Path | str) -> RestoreTargetError:
    """The restore-target error for ``exc``, met while writing ``path`` (exit 12, never "data lost")."""
    problem = _PROBLEMS.get(exc.errno or 0, TargetProblem.OTHER)
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return RestoreTargetError(str(path), f"{problem.value} ({code}: {exc.strerror})", problem=problem)


class Existing(Enum):
    """What already occupies a path in the target."""

    DIRECTORY = "a directory"
    FILE = "a file"
    SYMLINK = "a symlink"
    OTHER = "a special file"


def _existing(mode: int) -> Existing:
    if stat.S_ISDIR(mode):
        return Existing.DIRECTORY
    if stat.S_ISLNK(mode):
        return Existing.SYMLINK
    if stat.S_ISREG(mode):
        return Existing.FILE
    return Existing.OTHER


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def safe_parts(path: str) -> list[str]:
    """The components of a snapshot path, or UnsafePathError."""
    if path == ".":
        return []
    if not path or "\0" in path:
        raise UnsafePathError(path, "empty name or NUL byte")
    if path.startswith("/"):
        raise UnsafePathError(path, "absolute path")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePathError(path, f"path component {part!r} is not allowed")
    return parts


class SafeTarget:
    """A target directory with descriptor-relative, symlink-refusing access.

    The target itself is created if missing, but not its parent: a mistyped
    path is an error, not a new tree somewhere.  With ``replace_files``, a
    file (never a symlink) found where a directory goes is removed first.
    """

    def __init__(self, root: Path, max_open: int = 64, replace_files: bool = False) -> None:
        self.root = root
        self.replace_files = replace_files
        self.root_fd = _open_root(root)
        self._fds: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self.max_open = max_open

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.root_fd)

    def __enter__(self) -> SafeTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_empty(self) -> bool:
        with os.scandir(self.root_fd) as entries:
            return next(entries, None) is None

    def existing(self, parts: list[str]) -> tuple[list[str], Existing] | None:
        """What is already at ``parts`` (or at a non-directory on the way there), without following symlinks."""
        fd = self.root_fd
        for i, name in enumerate(parts):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise target_error(exc, self.root.joinpath(*parts[: i + 1])) from None
            kind = _existing(st.st_mode)
            if i == len(parts) - 1 or kind is not Existing.DIRECTORY:
                return parts[: i + 1], kind
            fd = self.dir_fd(parts[: i + 1])
        return None

    def dir_fd(self, parts: list[str], create: bool = False, shown: str = "") -> int:
        """Descriptor of the directory ``parts`` below the root (cached)."""
        key = tuple(parts)
        if not key:
            return self.root_fd
        if key in self._fds:
            self._fds.move_to_end(key)
            return self._fds[key]
        parent = self.dir_fd(parts[:-1], create, shown)
        name = parts[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            self._mkdir(parent, name, parts)
            fd = self._open_existing(parent, name, parts, shown)
        except OSError as exc:
            if not (create and self.replace_files and self._replace_file(exc, parent, name, parts)):
                raise self._refusal(exc, parts, shown) from None
            fd = self._open_existing(parent, name, parts, shown)
        self._fds[key] = fd
        while len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _mkdir(self, parent: int, name: str, parts: list[str]) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass  # raced with ourselves or a dangling symlink: the open that follows decides
        except OSError as exc:
            raise target_error(exc, self.root.joinpath(*parts)) from None

    def _replace_file(self, exc: OSError, parent: int, name: str, parts: list[str]) -> bool:
        """Remove a file where a directory goes; False for anything else (a symlink is never replaced)."""
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            return False
        try:
            if _existing(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode) in (
                Existing.SYMLINK,
                Existing.DIRECTORY,
            ):
                return False
            os.unlink(name, dir_fd=parent)
        except OSError as err:
            raise target_error(err, self.root.joinpath(*parts)) from None
        self._mkdir(parent, name, parts)
        return True

    def _open_existing(self, parent: int, name: str, parts: list[str], shown: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise self._refusal(exc, parts, shown) from None

    def _refusal(self, exc: OSError, parts: list[str], shown: str) -> UnsafePathError | RestoreTargetError:
        where = "/".join(parts)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return UnsafePathError(
                shown or where, f"{self.root / where} is a symlink or not a directory; not following it"
            )
        return target_error(exc, self.root / where)


def _open_root(root: Path) -> int:
    """The target's descriptor, created if missing (its parent must exist); target errors otherwise."""
    try:
        if not root.is_dir():
            if root.exists() or root.is_symlink():
                raise RestoreTargetError(
                    str(root), "it exists and is not a directory", problem=TargetProblem.NOT_A_DIRECTORY
                )
            if root.parent.exists() and not root.parent.is_dir():
                raise RestoreTargetError(
                    str(root), f"{root.parent} is not a directory", problem=TargetProblem.NOT_A_DIRECTORY
                )
            if not root.parent.is_dir():
                raise RestoreTargetError(
                    str(root), f"its parent directory {root.parent} does not exist", problem=TargetProblem.MISSING
                )
            try:
                root.mkdir()
            except FileExistsError:
                pass  # created meanwhile: the open below decides
        return os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the operator chose the target itself
    except OSError as exc:
        raise target_error(exc, root) from None
