"""Backups of directory trees.

The walk (by directory handles, :mod:`shardvault.sources.files`) is merged
with the parent snapshot's tree in one pass; a file whose size, mtime, ctime
and inode match its previous version, and whose chunks are all still stored
recoverably, is not read again (restic's rule).  Everything else is read
through its handle into the run's pipeline (:mod:`.run`); a sparse file
extent by extent, so its holes cost neither reading nor storage.  Hard links
need nothing here: the second name of an inode is an unchanged file with
the same content (deduplicated), and its ``(dv, i)`` tells a restore to link
it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import blake3

from shardvault.backup_warnings import BackupWarning, WarningKind
from shardvault.config import FilesSource
from shardvault.crypto import new_content_hasher
from shardvault.repository import Repository
from shardvault.repository.snapshot import Snapshot
from shardvault.sources.files import ReplacedError, SourceItem, WalkOptions, count, open_file, walk
from shardvault.sources.inode import ACL_XATTRS, data_extents, is_sparse, proc_path, read_flags, read_xattrs
from shardvault.tree import DIR, FILE, SYMLINK, Entry, path_key, zeros

from .run import BackupResult, BackupRun, ProgressFn


def _same_content_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns, b.st_ino)


class _Range:
    """One data extent of an open file, readable from its start (the chunker's input for a sparse file)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.start, self.offset, self.left = fd, offset, offset, length

    def readinto(self, buffer: memoryview, /) -> int:
        n = os.preadv(self.fd, [buffer[: min(len(buffer), self.left)]], self.offset) if self.left else 0
        self.offset += n
        self.left -= n
        return n


def _sparse_chunks(
    fd: int,
    size: int,
    extents: list[tuple[int, int]],
    run: BackupRun,
    hasher: blake3.blake3,
    read: list[tuple[int, int]],
) -> Iterator[bytes]:
    """The chunks of each data extent (cut extent by extent); ``hasher`` sees the content, holes as zeros.

    ``read`` receives the extents as actually read: a file that shrinks
    while it is read ends its data early, and the snapshot records what it
    holds (the rest reads as zeros up to the size), so the file restores as
    it was read.
    """
    position = 0
    for offset, length in extents:
        extent = _Range(fd, offset, length)
        for chunk in run.chunker.chunks(extent):
            if extent.start > position:
                for block in zeros(extent.start - position):
                    hasher.update(block)
                position = extent.start
            hasher.update(chunk)
            position += len(chunk)
            yield chunk
        if extent.offset > extent.start:
            read.append((extent.start, extent.offset - extent.start))
        run.stats.bytes_sparse += length - (extent.offset - extent.start)
    for block in zeros(size - position):
        hasher.update(block)
    run.stats.bytes_sparse += size - sum(n for _, n in extents)


def _read_file(run: BackupRun, item: SourceItem, options: WalkOptions) -> None:
    """Read one file through its handle; a file that changed while read is stored, marked and named.

    The entry keeps the stat taken when the file was opened (not the one
    after the read) and carries the ``changed`` mark, so the next
    incremental run reads it again instead of trusting a torn copy forever.
    A sparse file is read extent by extent: its holes are recorded, not read.
    """
    entry, stats, chunker = item.entry, run.stats, run.chunker
    with open_file(item) as f:
        fd = f.fileno()
        before = f.stat
        entry.flags = read_flags(fd)
        entry.xattrs = read_xattrs(fd, options.acls) if options.xattrs else None
        extents = data_extents(fd, before.st_size) if is_sparse(before) else None
        if extents == [(0, before.st_size)]:
            extents = None  # few blocks for another reason (inline data, compression): not sparse
        read_before = stats.bytes_read
        entry.chunks = []
        if extents is not None:
            hasher = new_content_hasher()
            read: list[tuple[int, int]] = []
            run.pipe.submit_stream(_sparse_chunks(fd, before.st_size, extents, run, hasher, read), entry.chunks)
            content_hash = hasher.hexdigest()
            expected, extents = sum(n for _, n in extents), read
        else:
            if before.st_size < chunker.min_size:
                data = f.read_small(before.st_size)
                chunks: Iterator[bytes] = iter([data] if data else [])
            else:
                chunks = chunker.chunks(f, before.st_size)
            content_hash = run.pipe.submit_stream(chunks, entry.chunks)
        after = os.fstat(fd)
    length = stats.bytes_read - read_before
    if extents is None:
        expected = before.st_size
    entry.hash, entry.extents = content_hash, extents
    entry.mtime_ns, entry.ctime_ns, entry.inode = before.st_mtime_ns, before.st_ctime_ns, before.st_ino
    entry.size = length if extents is None else before.st_size  # what the snapshot holds
    # Timestamps can be coarser than the writes: a length that disagrees with either stat is a change too.
    if not _same_content_stat(before, after) or length != expected or before.st_size != after.st_size:
        entry.changed = True
        stats.changed_while_read.append(item.path)
        stats.warn(
            BackupWarning(
                item.path,
                WarningKind.CHANGED_WHILE_READ,
                "changed while it was read (stored as read; the next backup reads it again)",
            )
        )


def _back_up_file(run: BackupRun, item: SourceItem, previous: Entry | None, options: WalkOptions, reuse: bool) -> None:
    """Reuse the previous version of an unchanged file, or read it; what cannot be read is skipped and named.

    What only the open file tells (holes, flags, extended attributes) is
    the previous version's for an unchanged file: changing any of them
    changes the ctime too.  Attributes are taken from it only when the
    parent snapshot recorded them as this run does (``reuse``); otherwise
    they are read by path.
    """
    entry, stats = item.entry, run.stats
    stats.files += 1
    if previous is not None and entry.unchanged_since(previous) and run.all_stored(previous.chunks):
        entry.chunks, entry.hash = list(previous.chunks), previous.hash
        entry.extents, entry.flags = previous.extents, previous.flags
        if reuse:
            entry.xattrs = _without_acls(previous.xattrs) if not options.acls else previous.xattrs
        elif options.xattrs:
            try:
                entry.xattrs = (
                    read_xattrs(proc_path(item.dir_fd, item.name), options.acls) if item.dir_fd is not None else None
                )
            except OSError as exc:
                why = f"cannot read its attributes: {exc.strerror}"
                stats.warn(BackupWarning(item.path, WarningKind.UNREADABLE_METADATA, why))
        if entry == previous:  # every recorded field as before (an atime moved, say, is not): its line again
            entry.line = previous.line
        stats.files_unchanged += 1
        stats.bytes_unchanged += entry.size
    else:
        try:
            _read_file(run, item, options)
            stats.files_read += 1
        except ReplacedError as exc:
            stats.warn(BackupWarning(item.path, WarningKind.REPLACED, str(exc)))
            entry.skip = True
        except FileNotFoundError:
            stats.warn(BackupWarning(item.path, WarningKind.VANISHED, "vanished while the backup ran"))
            entry.skip = True
        except OSError as exc:
            stats.warn(BackupWarning(item.path, WarningKind.UNREADABLE_FILE, f"cannot read: {exc.strerror or exc}"))
            entry.skip = True
    if not entry.skip:
        stats.bytes_total += entry.size


def _without_acls(xattrs: dict[str, str] | None) -> dict[str, str] | None:
    kept = {name: value for name, value in (xattrs or {}).items() if name not in ACL_XATTRS}
    return kept or None


def _recorded(options: WalkOptions) -> dict[str, Any]:
    """What a snapshot says about the attributes it holds (its ``metadata`` stat), for the next run's reuse."""
    return {"metadata": {"xattrs": options.xattrs, "acls": options.xattrs and options.acls}}


def _may_reuse(parent: Snapshot | None, options: WalkOptions) -> bool:
    """Whether unchanged files may keep the parent's attributes: it recorded at least what this run records."""
    recorded = parent.stats.get("metadata", {}) if parent is not None else {}
    return options.xattrs and bool(recorded.get("xattrs")) and (bool(recorded.get("acls")) or not options.acls)


# A parent with this many entries makes the walk list ahead in a lister process: a large tree gains
# the other core, a small one would pay more for the process than it saves.
LIST_AHEAD_FROM = 2000


def _list_ahead(parent: Snapshot | None) -> bool:
    return parent is not None and parent.stats.get("files", 0) + parent.stats.get("dirs", 0) >= LIST_AHEAD_FROM


def run_backup(
    repo: Repository, source: FilesSource, full: bool = False, progress: ProgressFn | None = None
) -> BackupResult:
    """Back up one files source and commit its snapshot."""
    options = WalkOptions(source.exclude, source.xattrs, source.acls)
    stop_scan = threading.Event()
    try:
        with BackupRun(repo, progress) as run:
            stats = run.stats
            if progress is not None:  # totals for the progress display, counted ahead of the walk
                args = (source.path, source.exclude, stats.totals, stop_scan)
                threading.Thread(target=count, args=args, daemon=True).start()
            parent = run.parent(source.name, "files")
            reuse = _may_reuse(parent, options)
            old_entries: Iterator[Entry] = iter(()) if full else run.previous_entries(parent)
            old = next(old_entries, None)
            old_key = path_key(old.path) if old is not None else ()
            last_report = 0.0
            for item in walk(source.path, options, stats.warn, ahead=_list_ahead(parent)):
                entry = item.entry
                key = path_key(entry.path)
                while old is not None and old_key < key:
                    old = next(old_entries, None)
                    old_key = path_key(old.path) if old is not None else ()
                if entry.type == FILE:
                    previous = old if old is not None and old.path == entry.path else None
                    _back_up_file(run, item, previous, options, reuse)
                elif entry.type == DIR:
                    stats.dirs += 1
                elif entry.type == SYMLINK:
                    stats.symlinks += 1
                else:
                    stats.special_files += 1
                run.pipe.submit_entry(entry)
                if progress and (now := time.perf_counter()) - last_report > 0.2:
                    last_report = now
                    progress(stats, entry.path)
            return run.commit(
                source=source.name,
                source_type="files",
                path=str(source.path),
                kind="incremental" if parent is not None and not full else "full",
                parent=parent.id if parent else None,
                extra=_recorded(options),
            )
    finally:
        stop_scan.set()
