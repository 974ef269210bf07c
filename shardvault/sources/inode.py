"""What a file is besides its bytes and its stat: attributes, flags, holes, owner names.

Read at backup (:mod:`shardvault.sources.files`, :mod:`shardvault.backup.files`)
and recorded in the tree (:mod:`shardvault.tree`); applied again at restore
(:mod:`shardvault.restore.inode`).

* Extended attributes, POSIX ACLs among them (``system.posix_acl_access``
  and ``system.posix_acl_default`` hold the kernel's binary form, which is
  what ``setfacl`` writes): read by the entry's handle, never by a path a
  swap could redirect.  A file system without them yields nothing.
* Inode flags (``chattr``): only the ones an operator sets and a restore
  can set again; flags the file system keeps for itself (extents, inline
  data, encryption) are masked out.
* Holes: a file using fewer blocks than its size is sparse; its data
  extents come from ``SEEK_DATA``/``SEEK_HOLE``, so a 5 GiB file with 4 KiB
  of data is read as 4 KiB and restored using as much as the source.
* Owner names, so a restore on another machine maps them back by name (tar
  and Borg's habit); ids without a name stay numbers.
"""

from __future__ import annotations

import array
import base64
import errno
import fcntl
import functools
import grp
import os
import pwd

# FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (linux/fs.h; the "long" variants, as chattr uses them).
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
# The flags chattr offers that mean something after a restore: s u S a c d i A D t T C j e(no) x(no).
# Left out on purpose: extents (e), inline data, encrypted, verity, casefold: the file system's own.
SETTABLE_FLAGS = (
    0x00000001  # s  secure deletion
    | 0x00000002  # u  undeletable
    | 0x00000004  # c  compressed
    | 0x00000008  # S  synchronous updates
    | 0x00000010  # i  immutable
    | 0x00000020  # a  append only
    | 0x00000040  # d  no dump
    | 0x00000080  # A  no atime updates
    | 0x00004000  # j  data journalling
    | 0x00008000  # t  no tail merging
    | 0x00010000  # D  synchronous directory updates
    | 0x00020000  # T  top of directory hierarchy
    | 0x00800000  # C  no copy on write
)
# Flags that forbid the restore's own later steps (times, links, names below a directory): set last.
LOCKING_FLAGS = 0x00000010 | 0x00000020

ACL_XATTRS = frozenset({"system.posix_acl_access", "system.posix_acl_default"})
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)


def proc_path(dir_fd: int, name: str) -> str:
    """A path naming ``name`` inside the open directory ``dir_fd`` (for calls without a ``dir_fd``).

    The kernel resolves ``/proc/self/fd/N`` to the open directory itself,
    so a directory renamed or swapped since it was opened is not followed.
    """
    return f"/proc/self/fd/{dir_fd}/{name}"


def read_xattrs(target: int | str, acls: bool = True) -> dict[str, str] | None:
    """The extended attributes of an open file (or a path, not followed), base64-encoded; None if there are none."""
    try:
        names = os.listxattr(target, follow_symlinks=False) if isinstance(target, str) else os.listxattr(target)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return None
        raise
    found: dict[str, str] = {}
    for name in sorted(names):
        if not acls and name in ACL_XATTRS:
            continue
        try:
            if isinstance(target, str):
                value = os.getxattr(target, name, follow_symlinks=False)
            else:
                value = os.getxattr(target, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue  # removed between the listing and the read
            raise
        found[name] = base64.b64encode(value).decode("ascii")
    return found or None


def read_flags(fd: int) -> int:
    """The settable inode flags of an open file or directory (0 where the file system has none)."""
    buf = array.array("l", [0])
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return 0
        raise
    return int(buf[0]) & SETTABLE_FLAGS


def set_flags(fd: int, flags: int) -> None:
    """Add ``flags`` to an open file's inode flags (those the file system keeps for itself stay)."""
    buf = array.array("l", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    buf[0] = (int(buf[0]) & ~SETTABLE_FLAGS) | (flags & SETTABLE_FLAGS)
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, buf, True)


def is_sparse(st: os.stat_result) -> bool:
    """Whether a regular file uses fewer bytes than its size (holes; compression looks the same)."""
    return st.st_blocks * 512 < st.st_size


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """(offset, length) of each data region of an open file, or None where holes cannot be found.

    Only asked of files that :func:`is_sparse` calls sparse: a file system
    without ``SEEK_DATA`` reports the whole file as data, which is stored
    as a whole (correct, only not sparse).
    """
    extents: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole remains
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if start >= size:
                break
            extents.append((start, end - start))
            offset = end
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return None
        raise
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return extents


@functools.lru_cache(maxsize=4096)
def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def user_id(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
