"""Giving a restored file back what it was besides its bytes (the other half of :mod:`shardvault.sources.inode`).

The order matters, and is the same for every kind of entry:

1. **owner** (as root only): by the recorded user and group names when this
   machine knows them, else by the numbers (``--numeric-owner``: always by
   the numbers, as tar and Borg do).  First, because ``chown`` clears the
   setuid and setgid bits and the ``security.capability`` attribute;
2. **extended attributes**, ACLs among them (``--no-xattrs``, ``--no-acls``
   leave them out);
3. **mode**, after the ACL (which carries the group bits as its mask);
4. **times**: atime and mtime in nanoseconds; a directory's last, after
   everything inside it is written;
5. **inode flags** very last, once nothing more is written, linked or
   changed below the entry (an immutable file refuses even a new link).

What the target refuses (an attribute namespace only root may write, a file
system without attributes or flags, a device node without root) is noted,
not fatal: the content is restored and the note says what is missing.
"""

from __future__ import annotations

import base64
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from shardvault.sources.inode import ACL_XATTRS, LOCKING_FLAGS, group_id, read_flags, set_flags, user_id
from shardvault.tree import SYMLINK, Entry

Note = Callable[[str], None]
# What a target may refuse besides content: a note, not a failed restore (a value too big for this
# file system, a namespace only root may write, a file system without attributes or flags).
_REFUSED = frozenset(
    {
        errno.EPERM,
        errno.EACCES,
        errno.ENOTSUP,
        errno.EOPNOTSUPP,
        errno.EINVAL,
        errno.ENOTTY,
        errno.ENOSPC,
        errno.E2BIG,
        errno.ERANGE,
    }
)


@dataclass(frozen=True)
class MetadataOptions:
    """What a restore gives back besides content (the CLI's --no-xattrs, --no-acls, --numeric-owner)."""

    xattrs: bool = True
    acls: bool = True
    numeric_owner: bool = False
    # Whether a new entry may inherit a default ACL it must lose.  A restore into an empty target
    # without one knows none can (directories get theirs last), and saves a syscall per file.
    inherited_acls: bool = True


def owner(entry: Entry, numeric: bool) -> tuple[int, int]:
    """The uid and gid to give ``entry``: by name where this machine has the name, else the recorded number."""
    uid = None if numeric or entry.user is None else user_id(entry.user)
    gid = None if numeric or entry.group is None else group_id(entry.group)
    return (entry.uid if uid is None else uid), (entry.gid if gid is None else gid)


def apply(
    entry: Entry,
    target: int | str,
    options: MetadataOptions,
    is_root: bool,
    note: Note,
) -> None:
    """Owner, attributes, mode and times of ``entry`` onto ``target`` (a descriptor, or a path not followed).

    Paths come from :func:`shardvault.sources.inode.proc_path` and name
    the entry itself (a symlink is never followed).
    """
    if is_root:
        uid, gid = owner(entry, options.numeric_owner)
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            os.chown(target, uid, gid, follow_symlinks=False)
    if options.xattrs and options.acls and options.inherited_acls and isinstance(target, int):
        _drop_inherited_acls(entry, target)
    if options.xattrs and entry.xattrs:
        _set_xattrs(entry, target, options, note)
    if entry.type != SYMLINK:  # a symlink's mode means nothing on Linux (and lchmod does not exist)
        if isinstance(target, int):
            os.fchmod(target, entry.mode)
        else:
            os.chmod(target, entry.mode)  # the node itself: a FIFO or device under its temporary name
    times = (entry.atime_ns or entry.mtime_ns, entry.mtime_ns)
    if isinstance(target, int):
        os.utime(target, ns=times)
    else:
        os.utime(target, ns=times, follow_symlinks=False)


def _drop_inherited_acls(entry: Entry, fd: int) -> None:
    """Remove ACLs the snapshot does not record: a new file inherits its directory's default ACL."""
    try:
        present = ACL_XATTRS.intersection(os.listxattr(fd))
    except OSError as exc:
        if exc.errno in _REFUSED:
            return
        raise
    for name in present.difference(entry.xattrs or ()):
        os.removexattr(fd, name)


def unlock(fd: int) -> None:
    """Clear the immutable and append-only flags of an entry already in the target (set again at the end)."""
    try:
        flags = read_flags(fd)
        if flags & LOCKING_FLAGS:
            set_flags(fd, flags & ~LOCKING_FLAGS)
    except OSError as exc:
        if exc.errno not in _REFUSED:
            raise


def _set_xattrs(entry: Entry, target: int | str, options: MetadataOptions, note: Note) -> None:
    refused: list[str] = []
    for name, value in entry.xattrs.items() if entry.xattrs else ():
        if not options.acls and name in ACL_XATTRS:
            continue
        try:
            data = base64.b64decode(value)
            if isinstance(target, int):
                os.setxattr(target, name, data)
            else:
                os.setxattr(target, name, data, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            refused.append(f"{name} ({errno.errorcode.get(exc.errno or 0, exc.errno)})")
    if refused:
        note(f"{entry.path}: extended attribute(s) not set: {', '.join(refused)}")


def apply_flags(entry: Entry, fd: int, note: Note) -> None:
    """Set the entry's inode flags on an open file or directory (last: see the module docstring)."""
    if not entry.flags:
        return
    try:
        set_flags(fd, entry.flags)
    except OSError as exc:
        if exc.errno not in _REFUSED:
            raise
        why = "needs root" if exc.errno == errno.EPERM and entry.flags & LOCKING_FLAGS else exc.strerror
        note(f"{entry.path}: inode flags {entry.flags:#x} not set ({why})")
