"""Backups of directory trees.

The walk (by directory handles, :mod:`shardvault.sources.files`) is merged
with the parent snapshot's tree in one pass; a file whose size, mtime, ctime
and inode match its previous version, and whose chunks are all still stored
recoverably, is not read again (restic's rule).  Everything else is read
through its handle into the run's pipeline (:mod:`.run`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from shardvault.backup_warnings import BackupWarning, WarningKind
from shardvault.config import FilesSource
from shardvault.repository import Repository
from shardvault.sources.files import ReplacedError, SourceItem, open_file, walk
from shardvault.tree import DIR, FILE, Entry, path_key

from .run import BackupResult, BackupRun, ProgressFn


def _same_content_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns, b.st_ino)


def _read_file(run: BackupRun, item: SourceItem) -> None:
    """Read one file through its handle; a file that changed while read is stored, marked and named.

    The entry keeps the stat taken when the file was opened (not the one
    after the read) and carries the ``changed`` mark, so the next
    incremental run reads it again instead of trusting a torn copy forever.
    """
    entry, stats, chunker = item.entry, run.stats, run.chunker
    with open_file(item) as f:
        before = os.fstat(f.fileno())
        read_before = stats.bytes_read
        if before.st_size < chunker.min_size:
            data = f.read()
            chunks: Iterator[bytes] = iter([data] if data else [])
        else:
            chunks = chunker.chunks(f)
        entry.chunks = []
        content_hash = run.pipe.submit_stream(chunks, entry.chunks)
        after = os.fstat(f.fileno())
    length = stats.bytes_read - read_before
    entry.hash = content_hash
    entry.mtime_ns, entry.ctime_ns, entry.inode = before.st_mtime_ns, before.st_ctime_ns, before.st_ino
    entry.size = length  # what the snapshot holds
    # Timestamps can be coarser than the writes: a length that disagrees with either stat is a change too.
    if not _same_content_stat(before, after) or length != before.st_size or length != after.st_size:
        entry.changed = True
        stats.changed_while_read.append(item.path)
        stats.warn(
            BackupWarning(
                item.path,
                WarningKind.CHANGED_WHILE_READ,
                "changed while it was read (stored as read; the next backup reads it again)",
            )
        )


def run_backup(
    repo: Repository, source: FilesSource, full: bool = False, progress: ProgressFn | None = None
) -> BackupResult:
    """Back up one files source and commit its snapshot."""
    with BackupRun(repo, progress) as run:
        stats = run.stats
        parent = run.parent(source.name, "files")
        old_entries: Iterator[Entry] = iter(()) if full else run.previous_entries(parent)
        old = next(old_entries, None)
        last_report = 0.0
        for item in walk(source.path, source.exclude, stats.warn):
            entry = item.entry
            key = path_key(entry.path)
            while old is not None and path_key(old.path) < key:
                old = next(old_entries, None)
            previous = old if old is not None and old.path == entry.path else None
            if entry.type == FILE:
                stats.files += 1
                if previous is not None and entry.unchanged_since(previous) and run.all_stored(previous.chunks):
                    entry.chunks, entry.hash = list(previous.chunks), previous.hash
                    stats.files_unchanged += 1
                else:
                    try:
                        _read_file(run, item)
                        stats.files_read += 1
                    except ReplacedError as exc:
                        stats.warn(BackupWarning(item.path, WarningKind.REPLACED, str(exc)))
                        entry.skip = True
                    except FileNotFoundError:
                        stats.warn(BackupWarning(item.path, WarningKind.VANISHED, "vanished while the backup ran"))
                        entry.skip = True
                    except OSError as exc:
                        stats.warn(
                            BackupWarning(item.path, WarningKind.UNREADABLE_FILE, f"cannot read: {exc.strerror or exc}")
                        )
                        entry.skip = True
                if not entry.skip:
                    stats.bytes_total += entry.size
            elif entry.type == DIR:
                stats.dirs += 1
            else:
                stats.symlinks += 1
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
        )
