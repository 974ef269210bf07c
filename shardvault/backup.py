"""Backups of directory trees: the write side of the data path.

The pipeline, with every stage bounded (invariant 5)::

    walk (main thread) --> read + FastCDC --> [chunk pool: id, dedup, zstd, AES-GCM]
        --> in order --> pack writer --> [pack pool: zfec, shards to peers in parallel]
        --> index checkpoints --> tree --> final index --> snapshot (commit)

* The main thread walks the source, merges it with the parent snapshot's
  tree and reads only files whose size, mtime, ctime or inode changed (all of
  them with ``full``).
* Chunks go to a small thread pool that names them (keyed BLAKE3), claims
  new ids (so a chunk seen twice is stored once) and compresses and encrypts
  them; at most ``WINDOW`` chunks are in flight.
* Results are taken back in submission order, so tree entries keep walk
  order, and appended to the open pack; a full pack goes to the pack pool,
  at most ``PACKS_IN_FLIGHT`` at a time, where it is erasure-coded and its
  shards are written to the peers in parallel.
* Finished packs are indexed every ``CHECKPOINT_PACKS`` packs (a killed run
  leaves them usable, so a rerun resumes); the snapshot is written last.

The C extensions (BLAKE3, zstd, AES, zfec) release the GIL on large buffers,
so threads keep both cores busy.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from shardvault.chunker import Chunker, Readable
from shardvault.config import SourceConfig
from shardvault.crypto import new_content_hasher
from shardvault.index import PackRecord
from shardvault.metadata import new_id
from shardvault.packs import KIND_DATA, KIND_TREE, PackWriter, seal_blob
from shardvault.repository import Repository, random_pack_id
from shardvault.snapshot import Snapshot, latest
from shardvault.sources.files import open_file, walk
from shardvault.tree import DIR, FILE, Entry, path_key

WINDOW = 8
PACKS_IN_FLIGHT = 2
CHECKPOINT_PACKS = 16


@dataclass
class BackupStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    files_read: int = 0
    files_unchanged: int = 0
    bytes_total: int = 0
    bytes_read: int = 0
    chunks_new: int = 0
    bytes_new: int = 0
    packs_new: int = 0
    bytes_stored: int = 0
    shard_bytes_stored: int = 0
    duration_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass
class BackupResult:
    snapshot: Snapshot
    stats: BackupStats

    def to_doc(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot.summary(), "stats": asdict(self.stats)}


ProgressFn = Callable[[BackupStats, str], None]


class _Pipeline:
    """The chunk and pack stages of one backup run."""

    def __init__(self, repo: Repository, stats: BackupStats) -> None:
        self.repo = repo
        self.stats = stats
        self.level = repo.config.repository.compression_level
        self.pack_size = repo.config.repository.pack_size
        self.known = repo.index.blobs
        self.claimed: set[bytes] = set()
        self.claim_lock = threading.Lock()
        self.chunk_pool = ThreadPoolExecutor(2, thread_name_prefix="sv-chunk")
        self.pack_pool = ThreadPoolExecutor(PACKS_IN_FLIGHT, thread_name_prefix="sv-pack")
        self.slots = threading.BoundedSemaphore(PACKS_IN_FLIGHT)
        # FIFO of ("chunk", future, id list) and ("entry", entry) items.
        self.queue: deque[tuple[Any, ...]] = deque()
        self.in_flight = 0
        self.writers = {KIND_DATA: PackWriter(), KIND_TREE: PackWriter()}
        self.pack_futures: list[Future[PackRecord]] = []
        self.finished_packs: list[PackRecord] = []
        self.emit: Callable[[Entry], None] = lambda entry: None

    def tree_spool(self) -> IO[bytes]:
        """A spooled file receiving the tree's lines as entries complete (in order); the caller closes it."""
        spool = tempfile.SpooledTemporaryFile(max_size=16 << 20)  # noqa: SIM115 - the caller closes it

        def emit(entry: Entry) -> None:
            spool.write(entry.to_line())

        self.emit = emit
        return spool

    # -- chunk stage ---------------------------------------------------------------

    def _prepare(self, data: bytes) -> tuple[bytes, bytearray | None, int]:
        cid = self.repo.chunk_id(data)
        with self.claim_lock:
            if cid in self.known or cid in self.claimed:
                return cid, None, len(data)
            self.claimed.add(cid)
        return cid, seal_blob(self.repo.cipher, cid, data, self.level), len(data)

    def submit_chunk(self, data: bytes, ids: list[str], kind: int = KIND_DATA) -> None:
        future = self.chunk_pool.submit(self._prepare, data)
        self.queue.append(("chunk", future, ids, kind))
        self.in_flight += 1
        self.drain(WINDOW)

    def submit_stream(self, chunks: Iterable[bytes], ids: list[str]) -> str:
        """Submit every chunk of one file or stream; return the hash of its content."""
        hasher = new_content_hasher()
        for data in chunks:
            hasher.update(data)
            self.stats.bytes_read += len(data)
            self.submit_chunk(data, ids)
        return hasher.hexdigest()

    def submit_entry(self, entry: Entry) -> None:
        self.queue.append(("entry", entry))
        self.drain(WINDOW)

    def drain(self, limit: int) -> None:
        """Take results back in order until at most ``limit`` chunks are in flight."""
        while self.queue:
            item = self.queue[0]
            if item[0] == "entry":
                self.queue.popleft()
                if not item[1].skip:
                    self.emit(item[1])
                continue
            future = item[1]
            if self.in_flight <= limit and not future.done():
                return
            self.queue.popleft()
            self.in_flight -= 1
            cid, sealed, raw_length = future.result()
            item[2].append(cid.hex())
            if sealed is not None:
                if item[3] == KIND_DATA:
                    self.stats.chunks_new += 1
                    self.stats.bytes_new += raw_length
                self._append(item[3], cid, sealed, raw_length)

    # -- pack stage ----------------------------------------------------------------

    def _append(self, kind: int, cid: bytes, sealed: bytearray, raw_length: int) -> None:
        writer = self.writers[kind]
        writer.add(cid, kind, sealed, raw_length)
        if len(writer) >= self.pack_size:
            self.seal_pack(kind)

    def seal_pack(self, kind: int) -> None:
        writer = self.writers[kind]
        if not writer.entries:
            return
        self.writers[kind] = PackWriter()
        pack_id = random_pack_id()

        def store() -> PackRecord:
            data = writer.finish(self.repo.cipher, pack_id)
            return self.repo.store_pack(pack_id, kind, data, writer.entries)

        self.collect()
        self.slots.acquire()  # bounds the packs in memory
        future = self.pack_pool.submit(store)
        future.add_done_callback(lambda _: self.slots.release())
        self.pack_futures.append(future)

    def collect(self, wait: bool = False) -> None:
        """Account finished packs; write an index checkpoint every few packs."""
        pending = []
        for future in self.pack_futures:
            if wait or future.done():
                record = future.result()  # a failed pack aborts the run here
                self.finished_packs.append(record)
                self.stats.packs_new += 1
                self.stats.bytes_stored += record.length
                self.stats.shard_bytes_stored += sum(s.size for s in record.shards)
            else:
                pending.append(future)
        self.pack_futures = pending
        if len(self.finished_packs) >= CHECKPOINT_PACKS:
            self.checkpoint()

    def checkpoint(self) -> None:
        if self.finished_packs:
            self.repo.write_index(self.finished_packs)
            self.finished_packs = []

    def finish(self) -> None:
        self.drain(0)
        self.seal_pack(KIND_DATA)
        self.seal_pack(KIND_TREE)
        self.collect(wait=True)
        self.checkpoint()

    def close(self) -> None:
        self.chunk_pool.shutdown(wait=True, cancel_futures=True)
        self.pack_pool.shutdown(wait=True, cancel_futures=True)


def _read_file(pipe: _Pipeline, chunker: Chunker, entry: Entry, path: str, stats: BackupStats) -> None:
    with open_file(path) as f:
        if entry.size < chunker.min_size:
            data = f.read()
            chunks: Iterator[bytes] = iter([data] if data else [])
        else:
            chunks = chunker.chunks(f)
        content_hash = pipe.submit_stream(chunks, entry.chunks)
        st = os.fstat(f.fileno())
    if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
        stats.warnings.append(f"{path}: changed while it was read")
        entry.size, entry.mtime_ns, entry.ctime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns
    entry.hash = content_hash


def run_backup(
    repo: Repository, source: SourceConfig, full: bool = False, progress: ProgressFn | None = None
) -> BackupResult:
    """Back up one files source and commit its snapshot."""
    start_wall = datetime.now(UTC)
    start = time.perf_counter()
    repo.require_quorum()
    rc = repo.config.repository
    chunker = Chunker(rc.chunk_min, rc.chunk_avg, rc.chunk_max)
    stats = BackupStats()
    warn = stats.warnings.append

    parent = latest(repo.snapshots(), source.name, "files")
    old_entries: Iterator[Entry] = iter(()) if full or parent is None else repo.iter_tree(parent)
    old = next(old_entries, None)

    pipe = _Pipeline(repo, stats)
    spool = pipe.tree_spool()
    last_report = 0.0
    try:
        for entry, path in walk(source.path, source.exclude, warn):
            key = path_key(entry.path)
            while old is not None and path_key(old.path) < key:
                old = next(old_entries, None)
            previous = old if old is not None and old.path == entry.path else None
            if entry.type == FILE:
                stats.files += 1
                stats.bytes_total += entry.size
                if (
                    previous is not None
                    and entry.unchanged_since(previous)
                    and all(bytes.fromhex(c) in repo.index.blobs for c in previous.chunks)
                ):
                    entry.chunks, entry.hash = list(previous.chunks), previous.hash
                    stats.files_unchanged += 1
                else:
                    try:
                        _read_file(pipe, chunker, entry, path, stats)
                        stats.files_read += 1
                    except OSError as exc:
                        warn(f"{path}: cannot read: {exc.strerror or exc}")
                        entry.skip = True
            elif entry.type == DIR:
                stats.dirs += 1
            else:
                stats.symlinks += 1
            pipe.submit_entry(entry)
            if progress and (now := time.perf_counter()) - last_report > 0.2:
                last_report = now
                progress(stats, entry.path)
        pipe.drain(0)
        tree_ids = _store_tree(pipe, chunker, spool)
    finally:
        pipe.close()
        spool.close()
    return commit_snapshot(
        repo,
        source.name,
        "files",
        str(source.path),
        "incremental" if parent is not None and not full else "full",
        parent.id if parent else None,
        tree_ids,
        stats,
        start,
        start_wall,
        progress,
    )


def _store_tree(pipe: _Pipeline, chunker: Chunker, spool: IO[bytes]) -> list[str]:
    """Store the tree (JSON lines, already in ``spool``) like file data, in its own packs; flush everything."""
    tree_ids: list[str] = []
    spool.seek(0)
    for data in chunker.chunks(spool):  # type: ignore[arg-type]  # SpooledTemporaryFile has readinto
        pipe.submit_chunk(data, tree_ids, KIND_TREE)
    pipe.finish()
    return tree_ids


def commit_snapshot(
    repo: Repository,
    source: str,
    source_type: str,
    path: str,
    kind: str,
    parent: str | None,
    tree_ids: list[str],
    stats: BackupStats,
    start: float,
    start_wall: datetime,
    progress: ProgressFn | None = None,
    extra: dict[str, Any] | None = None,
) -> BackupResult:
    """Write the snapshot (the commit: everything it names is stored and indexed) and record the run."""
    stats.duration_seconds = round(time.perf_counter() - start, 3)
    snapshot = Snapshot(
        id=new_id(),
        source=source,
        source_type=source_type,
        path=path,
        kind=kind,
        parent=parent,
        started=start_wall.isoformat(),
        finished=datetime.now(UTC).isoformat(),
        hostname=socket.gethostname(),
        tree=tuple(tree_ids),
        stats={k: v for k, v in asdict(stats).items() if k != "warnings"}
        | {"warnings": len(stats.warnings)}
        | (extra or {}),
    )
    repo.write_snapshot(snapshot)
    if progress:
        progress(stats, "")
    repo.state.record_run(
        "backup",
        "ok" if not stats.warnings else "warning",
        start_wall.timestamp(),
        source=source,
        snapshot=snapshot.id,
        details=asdict(stats) | {"kind": snapshot.kind},
    )
    return BackupResult(snapshot, stats)


def backup_stream(
    repo: Repository,
    stream: Readable,
    *,
    source: str,
    source_type: str,
    name: str,
    kind: str,
    parent: str | None = None,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> BackupResult:
    """Back up one byte stream (a base backup, a dump) as a snapshot holding one file, ``name``.

    The stream is chunked and deduplicated like any file, so a nightly dump
    of a mostly unchanged database stores only what changed.  ``extra`` is
    called after the stream ends (a producer's final facts, such as LSNs) and
    its result is kept in the snapshot's stats.
    """
    start_wall = datetime.now(UTC)
    start = time.perf_counter()
    repo.require_quorum()
    rc = repo.config.repository
    chunker = Chunker(rc.chunk_min, rc.chunk_avg, rc.chunk_max)
    stats = BackupStats()
    entry = Entry(name, FILE, 0o600, 0, 0, time.time_ns())
    pipe = _Pipeline(repo, stats)
    spool = pipe.tree_spool()
    try:
        entry.hash = pipe.submit_stream(chunker.chunks(stream), entry.chunks)
        entry.size = stats.bytes_total = stats.bytes_read
        stats.files = stats.files_read = 1
        pipe.submit_entry(entry)
        facts = extra() if extra else {}  # before the commit: a failed producer commits nothing
        pipe.drain(0)
        tree_ids = _store_tree(pipe, chunker, spool)
    finally:
        pipe.close()
        spool.close()
    return commit_snapshot(
        repo, source, source_type, name, kind, parent, tree_ids, stats, start, start_wall, None, facts
    )
