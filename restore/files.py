"""Restoring a files snapshot into a target directory.

1. **Plan.**  Stream the snapshot's tree once: check every path
   (:mod:`.safepath`), and collect the packs it needs.  List the shards on the
   peers; if any needed pack has fewer than k shards left, stop before
   writing anything and name the lost packs and the files they hold.
2. **Restore.**  Stream the tree again.  Directories are created as they
   come; each file's chunks are read through a small pool (a pack is fetched
   and decoded once, from its fastest k good shards, while the previous one is
   still being decrypted) and written in order to a temporary file, whose
   BLAKE3 hash must match the one recorded at backup before it is renamed into
   place.  A file that cannot be read completely never appears under its name.
3. **Finish.**  Directory permissions and times are applied last (children
   change a directory's mtime).  Bad shards met on the way are reported.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardvault.backup import iter_tree
from shardvault.crypto import new_content_hasher
from shardvault.errors import (
    BlobNotFoundError,
    DataLossError,
    NotEnoughShardsError,
    ShardvaultError,
    UnsafePathError,
)
from shardvault.repository import Repository
from shardvault.snapshot import Snapshot
from shardvault.tree import DIR, FILE, SYMLINK, Entry

from .safepath import SafeTarget, safe_parts

WINDOW = 16
PACK_CACHE = 6


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    duration_seconds: float = 0.0
    failed_files: list[str] = field(default_factory=list)
    bad_shards: list[dict[str, Any]] = field(default_factory=list)


ProgressFn = Callable[[RestoreStats, str], None]


class _PackCache:
    """Decoded packs shared by the reader threads: each fetched once, LRU-bounded."""

    def __init__(self, repo: Repository, size: int, pool: ThreadPoolExecutor) -> None:
        self.repo = repo
        self.size = size
        self.pool = pool
        self.lock = threading.Lock()
        self.packs: OrderedDict[str, Future[bytes]] = OrderedDict()

    def get(self, pack_id: str) -> Future[bytes]:
        with self.lock:
            future = self.packs.get(pack_id)
            if future is None:
                future = self.pool.submit(self.repo.fetch_pack, self.repo.index.packs[pack_id])
                self.packs[pack_id] = future
                while len(self.packs) > self.size:
                    self.packs.popitem(last=False)
            else:
                self.packs.move_to_end(pack_id)
            return future


class _OpenFile:
    """A file being restored under a temporary name."""

    def __init__(self, entry: Entry, parts: list[str], dir_fd: int) -> None:
        self.entry = entry
        self.parts = parts
        self.dir_fd = dir_fd
        self.tmp = f".shardvault-{secrets.token_hex(6)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.tmp, flags, 0o600, dir_fd=dir_fd)
        self.hasher = new_content_hasher()
        self.error: str | None = None

    def write(self, data: bytes) -> None:
        self.hasher.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def discard(self) -> None:
        os.close(self.fd)
        try:
            os.unlink(self.tmp, dir_fd=self.dir_fd)
        except OSError:
            pass


class FileRestorer:
    def __init__(self, repo: Repository, snapshot: Snapshot, target: Path, progress: ProgressFn | None = None) -> None:
        self.repo = repo
        self.snapshot = snapshot
        self.target = target
        self.progress = progress
        self.stats = RestoreStats()
        self.is_root = os.geteuid() == 0
        self.lost: dict[str, str] = {}

    # -- 1. plan -------------------------------------------------------------------

    def plan(self) -> None:
        index = self.repo.index
        present = self.repo.list_shards()

        def check_packs(pack_ids: set[str]) -> None:
            for pack_id in sorted(pack_ids):
                record = index.packs[pack_id]
                have = sum(1 for s in record.shards if present.get((pack_id, s.num), {}).get(s.peer) == s.size)
                if have < record.k:
                    self.lost[pack_id] = f"{have} of {record.n} shards left, {record.k} needed"

        check_packs({self._pack_of(c) for c in self.snapshot.tree})
        if self.lost:
            packs = ", ".join(f"pack {p[:16]} ({why})" for p, why in sorted(self.lost.items()))
            raise DataLossError(
                f"the tree of snapshot {self.snapshot.short_id} is in lost {packs}; nothing can be restored"
            )
        needed: set[str] = set()
        for entry in iter_tree(self.repo, self.snapshot):
            safe_parts(entry.path)
            needed.update(self._pack_of(c) for c in entry.chunks)
        check_packs(needed)
        if self.lost:
            raise DataLossError(self._lost_message())

    def _pack_of(self, chunk: str) -> str:
        loc = self.repo.index.blobs.get(bytes.fromhex(chunk))
        if loc is None:
            raise BlobNotFoundError(chunk)
        return loc.pack_id

    def _lost_message(self, failed: list[str] | None = None) -> str:
        packs = ", ".join(f"pack {p[:16]} ({why})" for p, why in sorted(self.lost.items()))
        if failed is None:
            index = self.repo.index
            failed = [
                e.path
                for e in iter_tree(self.repo, self.snapshot)
                if any(index.blobs[bytes.fromhex(c)].pack_id in self.lost for c in e.chunks)
            ]
        first = f"; first: {failed[0]}" if failed else ""
        return f"{len(self.lost)} pack(s) lost: {packs}; {len(failed)} file(s) cannot be restored{first}"

    # -- 2. restore ------------------------------------------------------------------

    def _read_chunk(self, cache: _PackCache, chunk: str) -> bytes:
        cid = bytes.fromhex(chunk)
        loc = self.repo.index.blobs.get(cid)
        if loc is None:
            raise BlobNotFoundError(chunk)
        try:
            pack = cache.get(loc.pack_id).result()
        except NotEnoughShardsError as exc:
            _, good, k, _ = exc.args_
            self.lost[loc.pack_id] = f"{good} good shards read, {k} needed"
            raise
        return self.repo.open_blob(cid, pack, loc.offset, loc.length, loc.raw_length)

    def run(self) -> RestoreStats:
        start = time.perf_counter()
        self.plan()
        dirs: list[Entry] = []
        pool = ThreadPoolExecutor(3, thread_name_prefix="sv-restore")
        cache = _PackCache(self.repo, PACK_CACHE, pool)
        reader = ThreadPoolExecutor(2, thread_name_prefix="sv-blob")
        queue: deque[tuple[_OpenFile, Future[bytes] | None]] = deque()
        last_report = 0.0
        try:
            with SafeTarget(self.target) as target:
                for entry in iter_tree(self.repo, self.snapshot):
                    parts = safe_parts(entry.path)
                    if entry.type == DIR:
                        target.dir_fd(parts, create=True, shown=entry.path)
                        dirs.append(entry)
                        self.stats.dirs += 1
                    elif entry.type == SYMLINK:
                        self._symlink(target, entry, parts)
                    elif entry.type == FILE:
                        fd = target.dir_fd(parts[:-1], create=True, shown=entry.path)
                        handle = _OpenFile(entry, parts, fd)
                        for chunk in entry.chunks:
                            queue.append((handle, reader.submit(self._read_chunk, cache, chunk)))
                            while len(queue) > WINDOW:
                                self._take(target, queue.popleft())
                        queue.append((handle, None))
                    while queue and (queue[0][1] is None or queue[0][1].done()):
                        self._take(target, queue.popleft())
                    if self.progress and (now := time.perf_counter()) - last_report > 0.2:
                        last_report = now
                        self.progress(self.stats, entry.path)
                while queue:
                    self._take(target, queue.popleft())
                for entry in reversed(dirs):
                    self._dir_metadata(target, entry)
        finally:
            for handle, _ in queue:
                if handle.fd >= 0:
                    handle.discard()
                    handle.fd = -1
            reader.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)
        self.stats.duration_seconds = round(time.perf_counter() - start, 3)
        self.stats.bad_shards = [p.to_doc() for p in self.repo.take_problems()]
        if self.progress:
            self.progress(self.stats, "")
        if self.stats.failed_files:
            raise DataLossError(self._lost_message(self.stats.failed_files))
        return self.stats

    def _take(self, target: SafeTarget, item: tuple[_OpenFile, Future[bytes] | None]) -> None:
        handle, future = item
        if future is not None:
            try:
                data = future.result()
            except (ShardvaultError, OSError) as exc:
                handle.error = handle.error or str(exc)
                return
            if handle.error is None:
                handle.write(data)
                self.stats.bytes += len(data)
            return
        self._close_file(handle)

    def _close_file(self, handle: _OpenFile) -> None:
        entry = handle.entry
        if handle.error is None and handle.hasher.hexdigest() != entry.hash:
            handle.error = "content hash differs from the one recorded at backup"
        if handle.error is not None:
            handle.discard()
            handle.fd = -1
            self.stats.failed_files.append(entry.path)
            return
        fd = handle.fd
        if self.is_root:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        os.close(fd)
        handle.fd = -1
        self._rename_into_place(handle.dir_fd, handle.tmp, handle.parts[-1], entry.path)
        self.stats.files += 1

    def _rename_into_place(self, dir_fd: int, tmp: str, name: str, shown: str) -> None:
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            os.unlink(tmp, dir_fd=dir_fd)
            raise UnsafePathError(shown, f"cannot put it in place: {exc.strerror}") from None

    def _symlink(self, target: SafeTarget, entry: Entry, parts: list[str]) -> None:
        fd = target.dir_fd(parts[:-1], create=True, shown=entry.path)
        tmp = f".shardvault-{secrets.token_hex(6)}"
        # The link is created, never followed: its target may point anywhere.
        os.symlink(entry.target or "", tmp, dir_fd=fd)
        if self.is_root:
            os.chown(tmp, entry.uid, entry.gid, dir_fd=fd, follow_symlinks=False)
        os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=fd, follow_symlinks=False)
        self._rename_into_place(fd, tmp, parts[-1], entry.path)
        self.stats.symlinks += 1

    def _dir_metadata(self, target: SafeTarget, entry: Entry) -> None:
        parts = safe_parts(entry.path)
        if not parts:
            return  # the target's own mode and owner are the operator's choice
        fd = target.dir_fd(parts, shown=entry.path)
        if self.is_root:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


def restore_files(
    repo: Repository, snapshot: Snapshot, target: Path, progress: ProgressFn | None = None
) -> RestoreStats:
    """Restore a files snapshot under ``target``."""
    return FileRestorer(repo, snapshot, target, progress).run()
