"""Restoring a files snapshot into a target directory.

1. **Plan.**  Stream the snapshot's tree once: check every path
   (:mod:`.safepath`), and note the packs it needs, in the order it needs
   them.  List the shards on the peers; if any needed pack has fewer than k
   shards left, stop before writing anything and name the lost packs and the
   files they hold.  Then open the target; if it is not empty, stream the
   tree once more and look at what is already there: with ``--overwrite
   never`` (the default) any file, symlink or non-directory the snapshot
   would replace stops the restore before anything is written.
2. **Restore.**  Stream the tree again.  The main thread creates directories
   and symlinks as they come and hands each file to a small pool of workers;
   packs are fetched (from the fastest k good shards) and decoded a little
   ahead of the files that need them, once each, and dropped when no file
   still to come needs them.  A worker writes a file under a temporary name
   and renames it into place only if its BLAKE3 hash matches the one recorded
   at backup, so a file that cannot be read completely never appears under
   its name.
3. **Finish.**  Hard links are made once every file is written (the second
   name of an inode is linked to the first one restored, within the
   restored set), then inode flags, then directory owners, permissions and
   times, deepest first (children change a directory's mtime), the target's
   own last.  Bad shards met on the way are reported.

Every entry gets back what :mod:`.inode` restores (owner by name, extended
attributes and ACLs, mode, atime and mtime in ns, flags); a sparse file is
written extent by extent and truncated to its size, so its holes stay holes.
FIFOs are recreated, device nodes as root (a note otherwise).

A failure of the target (full, read-only, not a directory) is a
:class:`RestoreTargetError` (exit 12) wherever it happens, main thread or
worker; only what cannot be read from the repository is "data lost" (exit 7).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import secrets
import stat
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from shardvault.crypto import new_content_hasher
from shardvault.errors import (
    BlobNotFoundError,
    DataLossError,
    NotEnoughShardsError,
    RestoreError,
    RestoreTargetError,
    ShardvaultError,
    TargetNotEmptyError,
    UnsafePathError,
)
from shardvault.progress import Totals
from shardvault.repository import Repository
from shardvault.repository.index import intact_shard_nums
from shardvault.repository.snapshot import Snapshot
from shardvault.shards.erasure import DecodedPack
from shardvault.sources.inode import proc_path
from shardvault.tree import BLOCK_DEVICE, DIR, FIFO, FILE, SPECIAL, SYMLINK, Entry, extents_in_order, link_key, zeros

from .inode import MetadataOptions, apply, apply_flags, unlock
from .safepath import Existing, SafeTarget, safe_parts, target_error
from .select import Selection

# Files written at once: one writer per core (two at least, four at most).  Writers spend their time in
# system calls, each a GIL hand-off, and more writers than cores turn the hand-offs into a futex storm
# (issue 11, 2 cores, alternating runs: 2 writers won every pair, 127k small files 13.2-16.6 s against
# 15.1-17.3 s, the mixed corpus 1.9-2.2 s against 1.9-2.9 s, with a third less memory).
WORKERS = min(4, max(2, os.cpu_count() or 2))
WINDOW = 64  # files handed out ahead of the slowest one
BATCH_FILES = 32  # small files of one directory handed to a writer as one task (one descriptor, one future)
BATCH_BYTES = 1 << 20  # ... up to this many bytes; a larger file is a task of its own
PREFETCH = 1  # packs fetched ahead of the newest one in use
PACK_CACHE = PREFETCH + 3  # decoded packs kept at most (a safety cap; see _PackCache)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Overwrite(StrEnum):
    """What a restore may do to paths already in the target (``--overwrite``)."""

    NEVER = "never"  # refuse before writing anything if the snapshot would replace a path
    IF_CHANGED = "if-changed"  # rewrite only files whose size or content differ
    ALWAYS = "always"  # replace every file and symlink


class _Outcome(Enum):
    WRITTEN = "written"
    OVERWRITTEN = "overwritten"
    UNCHANGED = "unchanged"


@dataclass
class RestoreStats:
    files: int = 0  # files in the target as in the snapshot, unchanged ones included
    files_skipped_unchanged: int = 0
    files_overwritten: int = 0  # files and symlinks that replaced something already there
    dirs: int = 0
    symlinks: int = 0
    special_files: int = 0  # FIFOs and device nodes
    hardlinks: int = 0  # files restored as another name of a file already restored (counted in files too)
    bytes: int = 0
    bytes_written: int = 0  # as the workers write, for progress (``bytes`` counts finished files)
    duration_seconds: float = 0.0
    # What the restore has to do in all (from its plan), for progress.
    totals: Totals = field(default_factory=Totals)
    failed_files: list[str] = field(default_factory=list)
    bad_shards: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the target refused besides content (see .inode)


ProgressFn = Callable[[RestoreStats, str], None]
_Result = tuple[int, "_Outcome"] | ShardvaultError  # a file's bytes written and outcome, or why it was not


class _PackCache:
    """Decoded packs shared by the workers, fetched a little ahead of use.

    Each pack is fetched once; the plan counted how many chunk reads will
    need it, and the pack is dropped after the last one.  Reading a chunk of
    the pack at position p of the plan's order starts fetching the packs up
    to p + PREFETCH, so decoding overlaps writing even inside one large file.
    An LRU cap bounds memory whatever the order (a pack dropped early is
    fetched again).
    """

    def __init__(self, repo: Repository, uses: Counter[str], order: list[str], pool: ThreadPoolExecutor) -> None:
        self.repo = repo
        self.uses = uses
        self.order = order
        self.position = {pack_id: i for i, pack_id in enumerate(order)}
        self.next_prefetch = 0
        self.pool = pool
        self.lock = threading.Lock()
        self.packs: OrderedDict[str, Future[DecodedPack]] = OrderedDict()

    def get(self, pack_id: str) -> Future[DecodedPack]:
        with self.lock:
            future = self._get(pack_id)
            ahead = min(self.position[pack_id] + PREFETCH, len(self.order) - 1)
            while self.next_prefetch <= ahead:
                self._get(self.order[self.next_prefetch])
                self.next_prefetch += 1
            return future

    def _get(self, pack_id: str) -> Future[DecodedPack]:
        future = self.packs.get(pack_id)
        if future is None:
            future = self.pool.submit(self.repo.fetch_pack, self.repo.index.packs[pack_id])
            self.packs[pack_id] = future
            while len(self.packs) > PACK_CACHE:
                self.packs.popitem(last=False)
        else:
            self.packs.move_to_end(pack_id)
        return future

    def used(self, pack_id: str) -> None:
        with self.lock:
            self.uses[pack_id] -= 1
            if self.uses[pack_id] <= 0:
                self.packs.pop(pack_id, None)


def _named_temp() -> str:
    return f".shardvault-{secrets.token_hex(6)}"


def _create_unnamed(dir_fd: int) -> tuple[int, str | None]:
    """An unnamed file in the directory, or a named temporary where O_TMPFILE is unsupported."""
    try:
        return os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd), None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    name = _named_temp()
    return os.open(name, _CREATE, 0o600, dir_fd=dir_fd), name


_KIND_NAMES = {DIR: "directory", FILE: "file", SYMLINK: "symlink", FIFO: "FIFO", "c": "device", "b": "device"}
_NODE_TYPES = {FIFO: stat.S_IFIFO, "c": stat.S_IFCHR, BLOCK_DEVICE: stat.S_IFBLK}
_OPEN_NODE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO opens without a writer


class _SparseWriter:
    """Writes a sparse file's chunks into its data extents, leaving the holes unwritten."""

    def __init__(self, fd: int, entry: Entry, hasher: Any) -> None:
        if not extents_in_order(entry):
            raise DataLossError(f"{entry.path}: its recorded extents are out of order or outside its size")
        self.fd, self.size, self.hasher = fd, entry.size, hasher
        self.extents = list(entry.extents or [])
        self.index = 0  # the extent being filled
        self.used = 0  # bytes of it written
        self.position = 0  # where the content hashed so far ends

    def write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            if self.index >= len(self.extents):
                raise DataLossError("more data than the file's recorded extents hold")
            offset, length = self.extents[self.index]
            if self.used == 0:
                for block in zeros(offset - self.position):
                    self.hasher.update(block)
            piece = view[: length - self.used]
            written = os.pwrite(self.fd, piece, offset + self.used)
            self.hasher.update(piece[:written])
            self.used += written
            self.position = offset + self.used
            view = view[written:]
            if self.used == length:
                self.index, self.used = self.index + 1, 0

    def finish(self) -> None:
        for block in zeros(self.size - self.position):
            self.hasher.update(block)
        os.ftruncate(self.fd, self.size)


def _has_default_acl(fd: int) -> bool:
    try:
        return "system.posix_acl_default" in os.listxattr(fd)
    except OSError:
        return False


def entry_parts(entry: Entry, root_seen: bool) -> list[str]:
    """The checked components of a tree entry's path.

    Only the root may be ``.``, once, and only as a directory: a file or
    symlink named ``.`` would have to replace the target itself.
    """
    if entry.path == "." and (entry.type != DIR or root_seen):
        what = "a second root" if entry.type == DIR else f"a {_KIND_NAMES.get(entry.type, entry.type)} named '.'"
        raise UnsafePathError(entry.path, f"{what}; only the root directory may be '.'")
    return safe_parts(entry.path)


class FileRestorer:
    def __init__(
        self,
        repo: Repository,
        snapshot: Snapshot,
        target: Path,
        progress: ProgressFn | None = None,
        overwrite: Overwrite = Overwrite.NEVER,
        selection: Selection | None = None,
        metadata: MetadataOptions | None = None,
    ) -> None:
        self.repo = repo
        self.metadata = metadata or MetadataOptions()
        self.snapshot = snapshot
        self.selection = selection or Selection()
        self.target = target
        self.overwrite = overwrite
        self.progress = progress
        self.stats = RestoreStats()
        self.is_root = os.geteuid() == 0
        self.lost: dict[str, str] = {}
        self.pack_order: list[str] = []
        self.pack_uses: Counter[str] = Counter()
        self.dir_parts: list[list[str]] = []  # the directories to create, in order (for _make_dirs)
        self.first_names: dict[tuple[int, int, str | None], Entry] = {}  # hard links: the inode's first restored name
        self.links: list[tuple[Entry, Entry]] = []  # (a later name, the first name) to link at the end
        self.flagged: list[Entry] = []  # entries whose inode flags are set at the end
        self.first_failure = ""  # why the first file that failed failed

    def _entries(self) -> Iterator[Entry]:
        """The snapshot's tree as this restore writes it (selected and re-rooted, see restore.select)."""
        tree = self.repo.iter_tree(self.snapshot)
        return tree if self.selection.everything else self.selection.apply(tree, self.snapshot.short_id)

    # -- 1. plan -------------------------------------------------------------------

    def plan(self) -> None:
        index = self.repo.index
        present = self.repo.list_shards()
        self.repo.prefer_recoverable(present)  # a chunk stored again after a loss is read from its good copy

        def check_packs(pack_ids: set[str]) -> None:
            for pack_id in sorted(pack_ids):
                record = index.packs[pack_id]
                # Presence only: verdicts in this machine's state may be stale, and the reader
                # skips a bad shard anyway; a false "lost" would refuse a restore that works.
                have = len(intact_shard_nums(record, present, set()))
                if have < record.k:
                    self.lost[pack_id] = f"{have} of {record.n} shards left, {record.k} needed"

        check_packs({self._pack_of(c) for c in self.snapshot.tree})
        if self.lost:
            packs = ", ".join(f"pack {p[:16]} ({why})" for p, why in sorted(self.lost.items()))
            raise DataLossError(
                f"the tree of snapshot {self.snapshot.short_id} is in lost {packs}; nothing can be restored"
            )
        order: dict[str, int] = {}  # packs in the order the restore first needs them
        root_seen = False
        linked: set[tuple[int, int, str | None]] = set()
        for entry in self._entries():
            parts = entry_parts(entry, root_seen)
            root_seen = root_seen or entry.path == "."
            if entry.type == DIR and parts:
                self.dir_parts.append(parts)
            key = link_key(entry)
            if key in linked:
                continue  # a later name of an inode: linked, not read
            if key is not None:
                linked.add(key)
            if entry.type == FILE:
                self.stats.totals.files += 1
                self.stats.totals.bytes += entry.size
            for c in entry.chunks:
                pack_id = self._pack_of(c)
                order.setdefault(pack_id, len(order))
                self.pack_uses[pack_id] += 1
        self.pack_order = list(order)
        self.stats.totals.complete = True
        check_packs(set(order))
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
            failed = [e.path for e in self._entries() if any(self._pack_of(c) in self.lost for c in e.chunks)]
        if not self.lost:  # no pack is lost, yet files failed: their own errors say why
            return f"{len(failed)} file(s) could not be restored; first: {self.first_failure or failed[0]}"
        first = f"; first: {failed[0]}" if failed else ""
        return f"{len(self.lost)} pack(s) lost: {packs}; {len(failed)} file(s) cannot be restored{first}"

    def check_target(self, target: SafeTarget) -> None:
        """Refuse, before anything is written, what the overwrite mode does not allow.

        A symlink where a directory goes is never followed nor replaced (it
        may have been planted: invariant 6), and a directory where a file
        goes is never deleted; with ``never``, anything but a directory
        already at a path of the snapshot stops the restore.
        """
        if target.is_empty():
            return  # the common case costs no second pass over the tree
        conflicts: set[tuple[str, ...]] = set()
        first = ""
        for entry in self._entries():
            parts = safe_parts(entry.path)
            found = target.existing(parts)
            if found is None:
                continue
            where, kind = found
            shown = "/".join(where)
            on_the_way = len(where) < len(parts) or entry.type == DIR
            if kind is Existing.DIRECTORY and entry.type == DIR:
                continue
            if kind is Existing.SYMLINK and on_the_way:
                raise UnsafePathError(entry.path, f"{self.target / shown} is a symlink; not following it")
            if kind is Existing.DIRECTORY and self.overwrite is not Overwrite.NEVER:
                raise RestoreTargetError(
                    str(self.target / shown),
                    f"a directory is where the snapshot has a {_KIND_NAMES.get(entry.type, entry.type)}; "
                    "not deleting it",
                )
            if self.overwrite is Overwrite.NEVER and tuple(where) not in conflicts:
                conflicts.add(tuple(where))
                first = first or f"{shown} is {kind.value}"
        if conflicts:
            raise TargetNotEmptyError(
                str(self.target), f"{len(conflicts)} path(s) the snapshot would write already exist; first: {first}"
            )

    # -- 2. restore ------------------------------------------------------------------

    def _read_chunk(self, cache: _PackCache, chunk: str) -> bytes | bytearray:
        cid = bytes.fromhex(chunk)
        loc = self.repo.index.blobs[cid]
        try:
            pack = cache.get(loc.pack_id).result()
        except NotEnoughShardsError as exc:
            _, good, k, _ = exc.args_
            self.lost[loc.pack_id] = f"{good} good shards read, {k} needed"
            raise
        except OSError as exc:  # not the target's: keep it apart from the writes' errors
            raise RestoreError(f"reading pack {loc.pack_id[:16]}: {exc}") from None
        try:
            # The whole file's hash is checked before it gets its name: it proves every chunk.
            return self.repo.open_blob(cid, pack, loc.offset, loc.length, loc.raw_length, check_id=False)
        finally:
            cache.used(loc.pack_id)

    def _unchanged(self, entry: Entry, name: str, dir_fd: int) -> int | None:
        """A descriptor of the regular file already at ``name`` if it has the entry's size and content hash.

        A file with other names is never "unchanged": one of them may be
        outside the target, and giving it the snapshot's owner and mode
        would change that file too.  It is written again instead (the
        rename replaces this name only).
        """
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size or st.st_nlink != 1:
            return None
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            hasher = new_content_hasher()
            while block := os.read(fd, 1 << 20):
                hasher.update(block)
            if hasher.hexdigest() == entry.hash and os.fstat(fd).st_nlink == 1:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def _restore_files(self, cache: _PackCache, batch: list[tuple[Entry, str]], dir_fd: int) -> list[_Result]:
        """Write a batch of files of one directory (in a worker), each as :meth:`_restore_file`.  Owns ``dir_fd``.

        A file that cannot be restored (its data lost) is its own result; a
        target that fails (:class:`UnsafePathError`, :class:`RestoreTargetError`)
        stops the restore: every file after it would fail the same way.
        """
        results: list[_Result] = []
        try:
            for entry, name in batch:
                try:
                    results.append(self._restore_file(cache, entry, name, dir_fd))
                except (UnsafePathError, RestoreTargetError):
                    raise
                except ShardvaultError as exc:
                    results.append(exc)
            return results
        finally:
            os.close(dir_fd)

    def _restore_file(self, cache: _PackCache, entry: Entry, name: str, dir_fd: int) -> tuple[int, _Outcome]:
        """Write one file (in a worker); return the bytes written and what became of it."""
        try:
            existing = self._unchanged(entry, name, dir_fd) if self.overwrite is Overwrite.IF_CHANGED else None
            if existing is not None:
                for chunk in entry.chunks:  # the plan counted these reads: release their packs
                    cache.used(self.repo.index.blobs[bytes.fromhex(chunk)].pack_id)
                self.stats.bytes_written += entry.size  # done, for progress
                try:  # the content is right; its owner, mode, times and attributes become the snapshot's
                    unlock(existing)
                    apply(entry, existing, self.metadata, self.is_root, self.stats.notes.append)
                finally:
                    os.close(existing)
                return 0, _Outcome.UNCHANGED
            return self._write_file(cache, entry, name, dir_fd)
        except OSError as exc:  # reads raise ShardvaultErrors only: this is the target failing
            raise target_error(exc, self.target / entry.path) from None

    def _write_file(self, cache: _PackCache, entry: Entry, name: str, dir_fd: int) -> tuple[int, _Outcome]:
        """Write one file, replacing what is at ``name`` if the overwrite mode allows.

        The file is written as an unnamed inode (O_TMPFILE) and linked under
        its name only once complete and verified: a reader, or a restore
        killed half-way, never sees a partial file under a snapshot's name.
        One directory operation per file, instead of create + rename, also
        halves the contention on the directory's lock.
        """
        fd, tmp = _create_unnamed(dir_fd)
        try:
            hasher = new_content_hasher()
            sparse = _SparseWriter(fd, entry, hasher) if entry.extents is not None else None
            size = 0
            for chunk in entry.chunks:
                data = self._read_chunk(cache, chunk)
                if sparse is not None:
                    sparse.write(data)
                else:
                    hasher.update(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                size += len(data)
                self.stats.bytes_written += len(data)
            if sparse is not None:
                sparse.finish()
                self.stats.bytes_written += entry.size - size  # the holes: done too, for progress
                size = entry.size
            if hasher.hexdigest() != entry.hash:
                raise DataLossError(f"{entry.path}: content hash differs from the one recorded at backup")
            apply(entry, fd, self.metadata, self.is_root, self.stats.notes.append)
            if tmp is None:
                try:
                    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
                    return size, _Outcome.WRITTEN
                except FileExistsError:  # replacing a file already in the target: via a named temporary
                    tmp = _named_temp()
                    os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=dir_fd, follow_symlinks=True)
            outcome = self._replacing(dir_fd, name, entry)
            self._rename_into_place(dir_fd, tmp, name, entry.path)
            tmp = None
            return size, outcome
        finally:
            os.close(fd)
            if tmp is not None:
                try:
                    os.unlink(tmp, dir_fd=dir_fd)
                except OSError:
                    pass

    def _replacing(self, dir_fd: int, name: str, entry: Entry) -> _Outcome:
        """Whether a rename to ``name`` replaces something, refused with ``never`` (it appeared after the check)."""
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return _Outcome.WRITTEN
        if self.overwrite is Overwrite.NEVER:
            raise TargetNotEmptyError(str(self.target), f"{entry.path} appeared in it during the restore")
        return _Outcome.OVERWRITTEN

    def run(self) -> RestoreStats:
        start = time.perf_counter()
        self.plan()
        dirs: list[Entry] = []
        fetchers = ThreadPoolExecutor(3, thread_name_prefix="sv-fetch")
        workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="sv-write")
        cache = _PackCache(self.repo, self.pack_uses, self.pack_order, fetchers)
        pending: deque[tuple[list[Entry], Future[list[_Result]]]] = deque()
        batch: list[tuple[Entry, str]] = []
        batch_dir: list[str] = []
        batch_bytes = 0

        def hand_out() -> None:
            """Give the open batch to a writer, with its own descriptor (the target's cache may close its copy)."""
            nonlocal batch, batch_bytes
            if batch:
                dir_fd = os.dup(target.dir_fd(batch_dir, create=True, shown=batch[0][0].path))
                pending.append(([e for e, _ in batch], workers.submit(self._restore_files, cache, batch, dir_fd)))
                batch, batch_bytes = [], 0

        last_report = 0.0
        stop = threading.Event()
        dirs_ahead = threading.Thread(target=self._make_dirs, args=(stop,), name="sv-mkdir", daemon=True)
        try:
            with SafeTarget(self.target, replace_files=self.overwrite is not Overwrite.NEVER) as target:
                self.check_target(target)
                if target.is_empty() and not _has_default_acl(target.root_fd):
                    self.metadata = dataclasses.replace(self.metadata, inherited_acls=False)
                dirs_ahead.start()
                for entry in self._entries():
                    parts = safe_parts(entry.path)
                    try:
                        if entry.type == DIR:
                            target.dir_fd(parts, create=True, shown=entry.path)
                            dirs.append(entry)
                            self.stats.dirs += 1
                        elif entry.type == SYMLINK:
                            self._symlink(target, entry, parts)
                        elif entry.type in SPECIAL:
                            self._node(target, entry, parts)
                        elif entry.type == FILE and self._later_link(entry):
                            pass  # linked once every file is written
                        elif entry.type == FILE:
                            if batch and (parts[:-1] != batch_dir or len(batch) >= BATCH_FILES
                                          or batch_bytes + entry.size > BATCH_BYTES):  # fmt: skip
                                hand_out()
                            batch.append((entry, parts[-1]))
                            batch_dir, batch_bytes = parts[:-1], batch_bytes + entry.size
                            if entry.size >= BATCH_BYTES:
                                hand_out()
                        if entry.type != FILE and batch:
                            hand_out()  # in order: what follows may need the batch's files (links, flags)
                    except OSError as exc:
                        raise target_error(exc, self.target / entry.path) from None
                    while pending and (len(pending) > WINDOW or pending[0][1].done()):
                        self._account(*pending.popleft())
                    if self.progress and (now := time.perf_counter()) - last_report > 0.2:
                        last_report = now
                        self.progress(self.stats, entry.path)
                try:
                    hand_out()
                except OSError as exc:
                    raise target_error(exc, self.target / batch[0][0].path) from None
                while pending:
                    self._account(*pending.popleft())
                for entry, first in self.links:
                    self._link(target, entry, first)
                for entry in self.flagged:
                    self._file_flags(target, entry)
                for entry in reversed(dirs):
                    try:
                        self._dir_metadata(target, entry)
                    except OSError as exc:
                        raise target_error(exc, self.target / entry.path) from None
        finally:
            stop.set()
            if dirs_ahead.is_alive():
                dirs_ahead.join()
            workers.shutdown(wait=True, cancel_futures=True)
            fetchers.shutdown(wait=True, cancel_futures=True)
        self.stats.duration_seconds = round(time.perf_counter() - start, 3)
        self.stats.bad_shards = [p.to_doc() for p in self.repo.take_problems()]
        if self.progress:
            self.progress(self.stats, "")
        if self.stats.failed_files:
            raise DataLossError(self._lost_message(self.stats.failed_files))
        return self.stats

    def _make_dirs(self, stop: threading.Event) -> None:
        """Create the restore's directories ahead of the main loop, which then finds them there.

        A mkdir costs a few hundred microseconds on ext4 (a new inode placed
        in another block group), up to milliseconds beside the writers: made
        by the loop, one at a time between handing out files, it kept the
        writers waiting.  This thread goes through the same checked paths
        with its own handles (no symlink followed, nothing outside the
        target); whichever of the two comes first creates a directory.  Any
        failure just ends it: the loop meets the same and reports it.
        """
        try:
            with SafeTarget(self.target, replace_files=self.overwrite is not Overwrite.NEVER) as target:
                for parts in self.dir_parts:
                    if stop.is_set():
                        return
                    target.dir_fd(parts, create=True)
        except (OSError, ShardvaultError):
            return

    def _account(self, entries: list[Entry], future: Future[list[_Result]]) -> None:
        for entry, result in zip(entries, future.result(), strict=True):
            self._account_file(entry, result)

    def _account_file(self, entry: Entry, result: _Result) -> None:
        if isinstance(result, ShardvaultError):
            self.stats.failed_files.append(entry.path)
            self.first_failure = self.first_failure or str(result)
            return
        size, outcome = result
        self.stats.bytes += size
        self.stats.files += 1
        if entry.flags:
            self.flagged.append(entry)
        if outcome is _Outcome.UNCHANGED:
            self.stats.files_skipped_unchanged += 1
        elif outcome is _Outcome.OVERWRITTEN:
            self.stats.files_overwritten += 1

    def _rename_into_place(self, dir_fd: int, tmp: str, name: str, shown: str) -> None:
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            raise target_error(exc, self.target / shown) from None

    def _symlink(self, target: SafeTarget, entry: Entry, parts: list[str]) -> None:
        fd = target.dir_fd(parts[:-1], create=True, shown=entry.path)
        if self.overwrite is Overwrite.IF_CHANGED:
            try:
                if os.readlink(parts[-1], dir_fd=fd) == (entry.target or ""):
                    # The same link: left in place, with the snapshot's owner and times (never followed).
                    apply(entry, proc_path(fd, parts[-1]), self.metadata, self.is_root, self.stats.notes.append)
                    self.stats.symlinks += 1
                    return
            except OSError:
                pass  # nothing there, or not a symlink: written below
        tmp = _named_temp()
        # The link is created, never followed: its target may point anywhere.
        os.symlink(entry.target or "", tmp, dir_fd=fd)
        self._place(fd, tmp, parts[-1], entry, lambda: apply(entry, proc_path(fd, tmp), *self._how()))
        self.stats.symlinks += 1

    def _how(self) -> tuple[MetadataOptions, bool, Callable[[str], None]]:
        return self.metadata, self.is_root, self.stats.notes.append

    def _place(self, fd: int, tmp: str, name: str, entry: Entry, describe: Callable[[], None]) -> None:
        """Give the entry made at ``tmp`` its metadata, then rename it to ``name`` (removed if anything fails)."""
        try:
            describe()
            replaced = self._replacing(fd, name, entry) is _Outcome.OVERWRITTEN
            self._rename_into_place(fd, tmp, name, entry.path)
        except BaseException:
            os.unlink(tmp, dir_fd=fd)
            raise
        self.stats.files_overwritten += replaced

    def _node(self, target: SafeTarget, entry: Entry, parts: list[str]) -> None:
        """Recreate a FIFO, or a device node as root, under a temporary name renamed into place."""
        if entry.type != FIFO and not self.is_root:
            self.stats.notes.append(f"{entry.path}: device node not created (needs root)")
            return
        fd = target.dir_fd(parts[:-1], create=True, shown=entry.path)
        tmp = _named_temp()
        os.mknod(tmp, 0o600 | _NODE_TYPES[entry.type], entry.rdev, dir_fd=fd)

        def describe() -> None:
            if entry.type != FIFO:  # a device is not opened (opening one can act): by its path
                apply(entry, proc_path(fd, tmp), *self._how())
                return
            node = os.open(tmp, _OPEN_NODE, dir_fd=fd)
            try:
                apply(entry, node, *self._how())
            finally:
                os.close(node)

        self._place(fd, tmp, parts[-1], entry, describe)
        self.stats.special_files += 1
        if entry.flags and entry.type == FIFO:
            self.flagged.append(entry)

    def _later_link(self, entry: Entry) -> bool:
        """Whether ``entry`` is another name of an inode already restored (then noted for linking)."""
        key = link_key(entry)
        if key is None:
            return False
        first = self.first_names.setdefault(key, entry)
        if first is entry:
            return False
        self.links.append((entry, first))
        return True

    def _link(self, target: SafeTarget, entry: Entry, first: Entry) -> None:
        """Make ``entry`` another name of the file restored as ``first`` (a temporary name, renamed into place)."""
        if first.path in self.stats.failed_files:
            self.stats.failed_files.append(entry.path)
            return
        parts, first_parts = safe_parts(entry.path), safe_parts(first.path)
        try:
            src = os.dup(target.dir_fd(first_parts[:-1], shown=first.path))
            try:
                dst = target.dir_fd(parts[:-1], create=True, shown=entry.path)
                tmp = _named_temp()
                os.link(first_parts[-1], tmp, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
                try:
                    replaced = self._replacing(dst, parts[-1], entry) is _Outcome.OVERWRITTEN
                    self._rename_into_place(dst, tmp, parts[-1], entry.path)
                finally:  # a rename onto another name of the same inode does nothing: the temporary stays
                    try:
                        os.unlink(tmp, dir_fd=dst)
                    except FileNotFoundError:
                        pass
            finally:
                os.close(src)
        except OSError as exc:
            raise target_error(exc, self.target / entry.path) from None
        self.stats.files += 1
        self.stats.hardlinks += 1
        self.stats.files_overwritten += replaced

    def _file_flags(self, target: SafeTarget, entry: Entry) -> None:
        parts = safe_parts(entry.path)
        try:
            fd = os.open(parts[-1], _OPEN_NODE, dir_fd=target.dir_fd(parts[:-1], shown=entry.path))
            try:
                apply_flags(entry, fd, self.stats.notes.append)
            finally:
                os.close(fd)
        except OSError as exc:
            raise target_error(exc, self.target / entry.path) from None

    def _dir_metadata(self, target: SafeTarget, entry: Entry) -> None:
        parts = safe_parts(entry.path)
        # The target's own too (restic's way): a restore of "/" gives it the root's mode and times.
        fd = target.dir_fd(parts, shown=entry.path) if parts else target.root_fd
        unlock(fd)  # a directory already there may be immutable (an earlier restore): its flags are set again below
        apply(entry, fd, self.metadata, self.is_root, self.stats.notes.append)
        apply_flags(entry, fd, self.stats.notes.append)


def restore_files(
    repo: Repository,
    snapshot: Snapshot,
    target: Path,
    progress: ProgressFn | None = None,
    overwrite: Overwrite = Overwrite.NEVER,
    selection: Selection | None = None,
    metadata: MetadataOptions | None = None,
) -> RestoreStats:
    """Restore a files snapshot (or the ``selection`` of it) under ``target``; existing paths per ``overwrite``."""
    return FileRestorer(repo, snapshot, target, progress, overwrite, selection, metadata).run()


def plan_restore(repo: Repository, snapshot: Snapshot, selection: Selection | None = None) -> dict[str, Any]:
    """What a restore would write and fetch (``--dry-run``): counts, bytes, and the packs' shards to read."""
    restorer = FileRestorer(repo, snapshot, Path("."), selection=selection)
    restorer.plan()
    kinds = {FILE: "files", DIR: "dirs", SYMLINK: "symlinks"}
    doc: dict[str, Any] = {"files": 0, "dirs": 0, "symlinks": 0, "special_files": 0, "bytes": 0, "paths": []}
    for entry in restorer._entries():
        if entry.path == ".":
            continue
        doc[kinds.get(entry.type, "special_files")] += 1
        doc["bytes"] += entry.size if entry.type == FILE else 0
        doc["paths"].append(entry.path)
    records = [repo.index.packs[p] for p in restorer.pack_order]
    doc["packs"] = len(records)
    # k shards of each pack are read, the fastest peers first: about k/n of what the pack's shards hold.
    doc["fetch_bytes"] = sum(sum(s.size for s in r.shards) * r.k // max(len(r.shards), 1) for r in records)
    return doc
