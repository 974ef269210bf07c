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
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from pathlib import Path

from shardvault.errors import UnsafePathError

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
    """A target directory with descriptor-relative, symlink-refusing access."""

    def __init__(self, root: Path, max_open: int = 64) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.root_fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the operator chose the target itself
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
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                pass  # raced with ourselves or a dangling symlink: the open below decides
            fd = self._open_existing(parent, name, parts, shown)
        except OSError as exc:
            raise self._refusal(exc, parts, shown) from None
        self._fds[key] = fd
        while len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _open_existing(self, parent: int, name: str, parts: list[str], shown: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise self._refusal(exc, parts, shown) from None

    def _refusal(self, exc: OSError, parts: list[str], shown: str) -> UnsafePathError:
        where = "/".join(parts)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return UnsafePathError(
                shown or where, f"{self.root / where} is a symlink or not a directory; not following it"
            )
        return UnsafePathError(shown or where, f"cannot open {self.root / where}: {exc.strerror}")
