"""The write side of the data path: one pipeline and one run skeleton for every source kind.

The pipeline, with every stage bounded (invariant 5)::

    walk (main thread) --> read + FastCDC --> [chunk pool: id, dedup, zstd, AES-GCM]
        --> in order --> pack writer --> [pack pool: zfec, shards to peers in parallel]
        --> index checkpoints --> tree --> final index --> snapshot (commit)

* The main thread walks the source, merges it with the parent snapshot's
  tree and reads only files whose size, mtime, ctime or inode changed (all of
  them with ``full``).
* Chunks go to a small thread pool that names them (keyed BLAKE3), claims
  new ids (so a chunk seen twice is stored once) and compresses and encrypts
  them in batches, one task each: a batch closes at ``BATCH_CHUNKS``
  chunks, ``BATCH_BYTES`` bytes or a chunk of ``SMALL_CHUNK`` or more, and at
  most ``WINDOW`` batches are in flight.
* Results are taken back in submission order, so tree entries keep walk
  order, and appended to the open pack; a full pack goes to the pack pool,
  at most ``PACKS_IN_FLIGHT`` at a time, where it is erasure-coded and its
  shards are written to the peers in parallel.
* Finished packs are indexed every ``CHECKPOINT_PACKS`` packs or every
  ``CHECKPOINT_SECONDS`` seconds, whichever comes first (a killed run leaves
  them usable, so a rerun resumes: after SIGKILL at most the packs since the
  last checkpoint are sent again); the snapshot is written last.

Interruptions (Ctrl-C's KeyboardInterrupt, which the CLI also raises for
SIGTERM, or any other non-``Exception`` such as Prefect's cancellation): the
run writes a final checkpoint instead of a snapshot.  Queued chunk work is
dropped, the open pack is sealed and stored, the packs already being stored
(at most ``PACKS_IN_FLIGHT``) are waited for, and one index file names every
stored pack not yet indexed; then :class:`BackupInterruptedError` says how
much was kept (a KeyboardInterrupt), or the original exception goes on.  No
snapshot is committed.  A second interruption during this aborts it (the
CLI exits at once), leaving what a SIGKILL would.

Several writers (other processes, other hosts) may write at once: every
object a run writes has a fresh random name, so nothing is overwritten, and
a run leans only on the index files it read when it started plus its own
packs.  Two writers may therefore store the same chunk twice (the index
keeps both copies; prune can drop one) but never lose one.  A snapshot
records the host it was taken on (``[repository] hostname``, default the
machine's name), and an incremental run's parent is the newest snapshot of
the source *from the same host*, as restic and Kopia choose it: another
host's files under the same source name are not this host's previous
version.

A chunk counts as already stored only when its pack is recoverable with
margin (:class:`StoredPacks`): a backup never leans on a lost pack, it
stores the chunk again (invariant 4).  Every source kind runs through one
skeleton, :class:`BackupRun` (quorum, pipeline, tree, commit).

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
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, Any

from shardvault.backup_warnings import INCOMPLETE, BackupWarning, WarningKind
from shardvault.chunker import Chunker, Readable
from shardvault.crypto import new_content_hasher
from shardvault.errors import BackupInterruptedError, ConfigError, PeerError, ShardvaultError
from shardvault.progress import Totals
from shardvault.repository import Repository, random_pack_id
from shardvault.repository.index import PackRecord, intact_shard_nums
from shardvault.repository.metadata import new_id, pack_name
from shardvault.repository.packs import KIND_DATA, KIND_TREE, PackWriter, seal_blob
from shardvault.repository.sessions import SessionKind
from shardvault.repository.snapshot import Snapshot, latest
from shardvault.shards.dispersal import ShardRecord
from shardvault.tree import FILE, Entry

WINDOW = 8
# Small chunks (whole small files, mostly) go to the chunk pool in batches: one task, one future and
# one GIL hand-off per batch instead of per chunk, which is where a tree of many small files spent
# its time (issue 11: a thread switch costs more than naming and sealing a 4 KiB chunk).
SMALL_CHUNK = 128 << 10
BATCH_BYTES = 1 << 20
BATCH_CHUNKS = 256
PACKS_IN_FLIGHT = 2
CHECKPOINT_PACKS = 16
# A slow backup (slow peers, a slow source) must not risk much to a SIGKILL either: index what
# is stored at least this often (restic's checkpoint interval), whatever the pack count.
CHECKPOINT_SECONDS = 60.0
CHECKPOINT_SECONDS_ENV = "SHARDVAULT_CHECKPOINT_SECONDS"
MIB = 1 << 20
# Packs a run checks one by one before it lists every peer once instead (see StoredPacks).
PROBED_PACKS = 4
# The shard status a check or scrub records for a shard whose bytes are bad (shardvault.state).


@dataclass
class BackupStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    special_files: int = 0  # FIFOs and device nodes (recorded, not read)
    files_read: int = 0
    files_unchanged: int = 0
    bytes_total: int = 0
    bytes_unchanged: int = 0  # content of unchanged files, not read again
    bytes_sparse: int = 0  # holes of sparse files, not read (progress counts them as done)
    bytes_read: int = 0
    chunks_new: int = 0
    bytes_new: int = 0
    packs_new: int = 0
    bytes_stored: int = 0
    shard_bytes_stored: int = 0
    duration_seconds: float = 0.0
    # Packs stored with fewer than n shards (committed: the write quorum was met).
    packs_degraded: int = 0
    # Committed with less than full redundancy: a pack short of shards, or a peer that took nothing.
    degraded: bool = False
    failed_peers: list[str] = field(default_factory=list)
    changed_while_read: list[str] = field(default_factory=list)
    warnings: list[BackupWarning] = field(default_factory=list)
    # What the run has to do in all, for progress (filled by a scanner when progress is shown).
    totals: Totals = field(default_factory=Totals)

    def warn(self, warning: BackupWarning) -> None:
        self.warnings.append(warning)

    @property
    def incomplete(self) -> list[BackupWarning]:
        """Warnings that left source data out of the snapshot (the CLI's exit 11)."""
        return [w for w in self.warnings if w.kind in INCOMPLETE]

    def to_doc(self) -> dict[str, Any]:
        """The JSON form: ``warnings`` stays a list of messages; ``warning_details`` has the kinds."""
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("warnings", "totals")}
        doc["failed_peers"] = list(self.failed_peers)
        doc["changed_while_read"] = list(self.changed_while_read)
        return doc | {
            "warnings": [str(w) for w in self.warnings],
            "warning_details": [w.to_doc() for w in self.warnings],
        }

    def snapshot_doc(self) -> dict[str, Any]:
        """What the snapshot keeps: counts, not lists that grow with the source."""
        doc = self.to_doc()
        del doc["warning_details"], doc["changed_while_read"]
        return doc | {"warnings": len(self.warnings), "files_changed_while_read": len(self.changed_while_read)}


@dataclass
class BackupResult:
    snapshot: Snapshot
    stats: BackupStats

    def to_doc(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot.summary(), "stats": self.stats.to_doc()}


ProgressFn = Callable[[BackupStats, str], None]


class StoredPacks:
    """Which packs a run may lean on: dedup and the incremental skip ask here, not the index.

    A chunk in the index is "stored" only if its pack is recoverable with
    margin: its shards that are present on their recorded peer with their
    recorded size, and not marked corrupt by the last check or scrub, number
    at least ``write_quorum`` distinct shard numbers (never fewer than k).
    Otherwise the chunk is stored again, in a new pack, so a new backup of
    an intact source is always restorable whatever was lost before.

    The first few packs a run leans on are checked one by one (a HEAD per
    shard), so a ``wal-push`` that deduplicates a few chunks costs the same
    in a repository of any size; past ``PROBED_PACKS`` packs, one survey (one
    listing per peer) answers for all of them.  A run that deduplicates
    nothing pays nothing.  Packs written by this run count as stored: they
    were acknowledged by at least the write quorum moments ago.
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        # Read here, on the caller's thread: the state's SQLite connection belongs to the thread
        # that opened it, and the survey may run on a chunk worker.  Local and small (corrupt rows only).
        self._corrupt = repo.recorded_corrupt()
        self._good: set[str] | None = None
        self._probed: dict[str, bool] = {}
        self._fresh: set[str] = set()
        self._known_good: set[str] = set()  # fresh, or good by the survey: answers that stand for the run
        self._lock = threading.Lock()

    def has(self, chunk: bytes) -> bool:
        """Whether any copy of the chunk is in a pack this run may lean on (the preferred copy is the usual one)."""
        index = self.repo.index
        first = index.blobs.get(chunk)
        if first is None:
            return False
        # Asked once per chunk of every unchanged file: a pack known good is a set lookup, without the lock.
        if first.pack_id in self._known_good or self.pack_ok(first.pack_id):
            return True
        return any(self.pack_ok(loc.pack_id) for loc in index.alternatives.get(chunk, ()))

    def pack_ok(self, pack_id: str) -> bool:
        with self._lock:
            if pack_id in self._fresh:
                self._known_good.add(pack_id)
                return True
            if pack_id in self.repo.index.condemned_ids:
                return False  # a prune means to delete it: store the chunk again (docs/concurrency.md)
            if self._good is not None:
                if pack_id in self._good:
                    self._known_good.add(pack_id)
                    return True
                return False
            if pack_id not in self._probed:
                if len(self._probed) >= PROBED_PACKS:
                    self._good = self._survey()
                    return pack_id in self._good
                self._probed[pack_id] = self._probe(pack_id)
            return self._probed[pack_id]

    def add_fresh(self, pack_id: str) -> None:
        with self._lock:
            self._fresh.add(pack_id)

    def _enough(self, record: PackRecord, good_nums: set[int]) -> bool:
        return len(good_nums) >= max(self.repo.config.repository.write_quorum, record.k)

    def _survey(self) -> set[str]:
        present = self.repo.list_shards()
        return {
            record.id
            for record in self.repo.index.live_packs()
            if self._enough(record, intact_shard_nums(record, present, self._corrupt))
        }

    def _probe(self, pack_id: str) -> bool:
        """One pack, by a HEAD per shard (in parallel): the same rule as the survey."""
        record = self.repo.index.packs[pack_id]

        def present(shard: ShardRecord) -> bool:
            peer = self.repo.peers.get(shard.peer)
            if peer is None or self.repo.peers.is_down(shard.peer):
                return False
            try:
                return peer.store.info(pack_name(pack_id, shard.num)).size == shard.size
            except PeerError:  # missing, or a peer that fails now: not a shard to count on
                return False

        shards = [s for s in record.shards if (pack_id, s.num, s.peer) not in self._corrupt]
        found = self.repo.io.map(present, shards)
        return self._enough(record, {s.num for s, ok in zip(shards, found, strict=True) if ok})


class TreeSpool:
    """The tree's lines in a spooled file, written a thousand at a time: one write per line costs, at 100,000 files."""

    LINES = 1024

    def __init__(self) -> None:
        self.file = tempfile.SpooledTemporaryFile(max_size=16 << 20)  # noqa: SIM115 - closed by close()
        self._lines: list[bytes] = []

    def add(self, entry: Entry) -> None:
        self._lines.append(entry.to_line())
        if len(self._lines) >= self.LINES:
            self._flush()

    def _flush(self) -> None:
        self.file.write(b"".join(self._lines))
        self._lines.clear()

    def rewound(self) -> IO[bytes]:
        """Every line so far, to read from the start."""
        self._flush()
        self.file.seek(0)
        return self.file

    def close(self) -> None:
        self.file.close()


@dataclass
class _Batch:
    """Small chunks named and sealed by one task of the chunk pool."""

    items: list[tuple[bytes, list[str], int]] = field(default_factory=list)
    size: int = 0
    future: Future[list[tuple[bytes, bytearray | None, int]]] | None = None


class Pipeline:
    """The chunk and pack stages of one backup run."""

    def __init__(self, repo: Repository, stats: BackupStats, stored: StoredPacks | None = None) -> None:
        self.repo = repo
        self.stats = stats
        self.stored = stored or StoredPacks(repo)
        self.level = repo.config.repository.compression_level
        self.pack_size = repo.config.repository.pack_size
        self.claimed: set[bytes] = set()
        self.claim_lock = threading.Lock()
        self.chunk_pool = ThreadPoolExecutor(2, thread_name_prefix="sv-chunk")
        self.pack_pool = ThreadPoolExecutor(PACKS_IN_FLIGHT, thread_name_prefix="sv-pack")
        self.slots = threading.BoundedSemaphore(PACKS_IN_FLIGHT)
        # FIFO of ("batch", _Batch) and ("entry", Entry) items.
        self.queue: deque[tuple[Any, ...]] = deque()
        self.in_flight = 0
        self.batch: _Batch | None = None  # the batch small chunks are being added to
        self.writers = {KIND_DATA: PackWriter(), KIND_TREE: PackWriter()}
        self.pack_futures: list[Future[PackRecord]] = []
        # Packs stored but not yet named by an index file.  The pack workers append here themselves,
        # so an interruption of the main thread anywhere (even between two lines of its bookkeeping)
        # never loses track of a stored pack: the final checkpoint indexes whatever is here.
        self.unindexed: list[PackRecord] = []
        self.done_lock = threading.Lock()
        self.checkpointed_packs = 0  # indexed by this run so far: what a rerun will not send again
        self.checkpointed_bytes = 0
        self.checkpoint_every = checkpoint_seconds()
        self.last_checkpoint = time.monotonic()
        self.emit: Callable[[Entry], None] = lambda entry: None

    def tree_spool(self) -> TreeSpool:
        """A spool receiving the tree's lines as entries complete (in order); the caller closes it."""
        spool = TreeSpool()
        self.emit = spool.add
        return spool

    # -- chunk stage ---------------------------------------------------------------

    def _prepare(self, data: bytes) -> tuple[bytes, bytearray | None, int]:
        cid = self.repo.chunk_id(data)
        with self.claim_lock:
            if cid in self.claimed or self.stored.has(cid):
                return cid, None, len(data)
            self.claimed.add(cid)
        return cid, seal_blob(self.repo.cipher, cid, data, self.level), len(data)

    def _prepare_batch(self, items: list[tuple[bytes, list[str], int]]) -> list[tuple[bytes, bytearray | None, int]]:
        return [self._prepare(data) for data, _, _ in items]

    def submit_chunk(self, data: bytes, ids: list[str], kind: int = KIND_DATA) -> None:
        batch = self.batch
        if batch is None:
            batch = self.batch = _Batch()
            self.queue.append(("batch", batch))
            self.in_flight += 1
        batch.items.append((data, ids, kind))
        batch.size += len(data)
        # A large chunk closes its batch at once: the next one goes to the other worker.
        if len(data) >= SMALL_CHUNK or batch.size >= BATCH_BYTES or len(batch.items) >= BATCH_CHUNKS:
            self._send_batch()
        self.drain(WINDOW)

    def _send_batch(self) -> None:
        """Hand the open batch to the chunk pool (it stays in its place in the queue)."""
        if self.batch is not None:
            self.batch.future = self.chunk_pool.submit(self._prepare_batch, self.batch.items)
            self.batch = None

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
        """Take results back in order until at most ``limit`` batches are in flight."""
        while self.queue:
            item = self.queue[0]
            if item[0] == "entry":
                self.queue.popleft()
                if not item[1].skip:
                    self.emit(item[1])
                continue
            if not self._take_batch(item[1], limit):
                break
        self.maybe_checkpoint()

    def _take_batch(self, batch: _Batch, limit: int) -> bool:
        """Take back a batch at the head of the queue; False if it is to be waited for later."""
        if batch.future is None:  # still open: send it only when the window or the end needs it
            if self.in_flight <= limit:
                return False
            self._send_batch()
        assert batch.future is not None
        if self.in_flight <= limit and not batch.future.done():
            return False
        self.queue.popleft()
        self.in_flight -= 1
        for (_, ids, kind), (cid, sealed, raw_length) in zip(batch.items, batch.future.result(), strict=True):
            ids.append(cid.hex())
            if sealed is not None:
                if kind == KIND_DATA:
                    self.stats.chunks_new += 1
                    self.stats.bytes_new += raw_length
                self._append(kind, cid, sealed, raw_length)
        return True

    # -- pack stage ----------------------------------------------------------------

    def _append(self, kind: int, cid: bytes, sealed: bytearray, raw_length: int) -> None:
        writer = self.writers[kind]
        writer.add(cid, kind, sealed, raw_length)
        if len(writer) >= self.pack_size:
            self.seal_pack(kind)

    def _store_job(self, writer: PackWriter, kind: int) -> Callable[[], PackRecord]:
        pack_id = random_pack_id()

        def store() -> PackRecord:
            data = writer.finish(self.repo.cipher, pack_id)
            record = self.repo.store_pack(pack_id, kind, data, writer.entries)
            self.stored.add_fresh(record.id)  # before any index names it: dedup must never probe our own packs
            with self.done_lock:
                self.unindexed.append(record)
            return record

        return store

    def seal_pack(self, kind: int) -> None:
        writer = self.writers[kind]
        if not writer.entries:
            return
        self.writers[kind] = PackWriter()
        store = self._store_job(writer, kind)
        self.collect()
        self.slots.acquire()  # bounds the packs in memory
        future = self.pack_pool.submit(store)
        future.add_done_callback(lambda _: self.slots.release())
        self.pack_futures.append(future)

    def collect(self, wait: bool = False) -> None:
        """Account finished packs; write an index checkpoint when one is due."""
        pending = []
        for future in self.pack_futures:
            if wait or future.done():
                record = future.result()  # a failed pack aborts the run here
                self.stats.packs_new += 1
                self.stats.bytes_stored += record.length
                self.stats.shard_bytes_stored += sum(s.size for s in record.shards)
                if len({s.num for s in record.shards}) < record.n:
                    self.stats.packs_degraded += 1
            else:
                pending.append(future)
        self.pack_futures = pending
        self.maybe_checkpoint()

    def maybe_checkpoint(self) -> None:
        """Index the stored packs every ``CHECKPOINT_PACKS`` packs or ``checkpoint_every`` seconds."""
        with self.done_lock:
            waiting = len(self.unindexed)
        due = time.monotonic() - self.last_checkpoint >= self.checkpoint_every
        if waiting >= CHECKPOINT_PACKS or (waiting and due):
            self.checkpoint()

    def checkpoint(self) -> None:
        """One index file naming every stored pack not yet indexed (a rerun deduplicates against it)."""
        records: list[PackRecord] = []
        try:
            with self.done_lock:
                records, self.unindexed = self.unindexed, []
            if not records:
                return
            self.repo.write_index(records)
        except BaseException:
            # Interrupted or failed: index them again next time (a pack named twice is harmless, the
            # index keeps one record per pack), never forget them.
            with self.done_lock:
                self.unindexed[:0] = records
            raise
        self.checkpointed_packs += len(records)
        self.checkpointed_bytes += sum(r.length for r in records)
        self.last_checkpoint = time.monotonic()

    def finish(self) -> None:
        self.drain(0)
        self.seal_pack(KIND_DATA)
        self.seal_pack(KIND_TREE)
        self.collect(wait=True)
        self.checkpoint()

    def final_checkpoint(self) -> str:
        """After an interruption: keep what is stored, index it, commit nothing; return a note on a failure.

        The chunk window is dropped (at most ``WINDOW`` batches, which the
        rerun reads again).  The open data pack is sealed and stored too:
        that costs one pack write, bounded like any other, and it makes the
        rerun lose nothing it had already read and encrypted.  That is safe
        only if the interruption did not split :meth:`PackWriter.add` in
        half (a KeyboardInterrupt can land between any two bytecodes of the
        main thread), so the writer is checked first and dropped if its
        parts and entries disagree.  Tree packs are not kept: a tree is of
        no use without its snapshot.  Packs already being stored (at most
        ``PACKS_IN_FLIGHT``) are waited for; a pack that fails now is simply
        not indexed (its shards are orphans, as after SIGKILL).
        """
        self.chunk_pool.shutdown(wait=True, cancel_futures=True)  # running tasks are one batch each
        writer = self.writers[KIND_DATA]
        self.writers[KIND_DATA] = PackWriter()
        if writer.entries and _consistent(writer):
            self.pack_pool.submit(self._store_job(writer, KIND_DATA))
        self.pack_pool.shutdown(wait=True)  # the workers record each stored pack in self.unindexed
        try:
            self.checkpoint()
        except ShardvaultError as exc:
            return f" (the final checkpoint failed, the packs since the last one will be sent again: {exc})"
        return ""

    def close(self, wait: bool = True) -> None:
        self.chunk_pool.shutdown(wait=wait, cancel_futures=True)
        self.pack_pool.shutdown(wait=wait, cancel_futures=True)


def _consistent(writer: PackWriter) -> bool:
    """Whether a pack writer's parts and entries describe each other (no half-done ``add``)."""
    if len(writer.parts) != len(writer.entries) + 1 or writer.size != sum(len(p) for p in writer.parts):
        return False
    offset = len(writer.parts[0])
    for entry, part in zip(writer.entries, writer.parts[1:], strict=True):
        if entry.offset != offset or entry.length != len(part):
            return False
        offset += entry.length
    return True


def checkpoint_seconds() -> float:
    """The checkpoint interval: ``$SHARDVAULT_CHECKPOINT_SECONDS`` when set, else ``CHECKPOINT_SECONDS``."""
    raw = os.environ.get(CHECKPOINT_SECONDS_ENV, "").strip()
    if not raw:
        return CHECKPOINT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise ConfigError(f"${CHECKPOINT_SECONDS_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def is_interruption(exc: BaseException) -> bool:
    """Ctrl-C (and SIGTERM, which the CLI turns into it), or a scheduler's cancellation: not a failure."""
    return not isinstance(exc, Exception | GeneratorExit)


def host_name(repo: Repository) -> str:
    """The host a snapshot is recorded as taken on: ``[repository] hostname``, else the machine's name."""
    return repo.config.repository.hostname or socket.gethostname()


class BackupRun:
    """The one skeleton of every backup run, whatever the source kind.

    Quorum first (nothing is written without it), then the pipeline, the
    tree and the commit.  Use as a context manager; a source adds entries
    (reading content through :attr:`pipe`) and calls :meth:`commit` last.
    """

    def __init__(self, repo: Repository, progress: ProgressFn | None = None) -> None:
        self.start_wall = datetime.now(UTC)
        self.start = time.perf_counter()
        repo.require_quorum()
        repo.announce(SessionKind.BACKUP)  # before the index is read (docs/concurrency.md)
        self.repo = repo
        self.progress = progress
        rc = repo.config.repository
        self.chunker = Chunker(rc.chunk_min, rc.chunk_avg, rc.chunk_max)
        self.stats = BackupStats()
        self.stored = StoredPacks(repo)
        self.pipe = Pipeline(repo, self.stats, self.stored)
        self.spool = self.pipe.tree_spool()
        self.committing = False  # everything is stored and indexed; the snapshot is being written

    def __enter__(self) -> BackupRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        settled = False  # whether the pools may be waited for (not after a second interruption)
        try:
            if exc is not None and is_interruption(exc):
                note = self.pipe.final_checkpoint()
                settled = True
                if self.committing:  # its write may have reached the peers: say so rather than guess
                    note += ", but it came while the snapshot was written (`shardvault snapshots` shows if it was)"
                if isinstance(exc, KeyboardInterrupt):
                    size = f"{self.pipe.checkpointed_bytes / MIB:.1f} MiB"
                    raise BackupInterruptedError(self.pipe.checkpointed_packs, size, note) from exc
            settled = True
        finally:
            self.pipe.close(wait=settled)
            self.spool.close()

    def parent(self, source: str, source_type: str, kind: str | None = None) -> Snapshot | None:
        """The newest snapshot of the source taken on this host (of one kind, if given): this run's parent.

        Another host's snapshot of the same source name describes that
        host's files (their inodes and times mean nothing here), so it is
        never the parent; hosts that back up one shared tree can share a
        chain by setting the same ``[repository] hostname``.
        """
        host = host_name(self.repo)
        return latest([s for s in self.repo.snapshots() if s.hostname == host], source, source_type, kind=kind)

    def previous_entries(self, parent: Snapshot | None) -> Iterator[Entry]:
        """The parent's tree as far as it can be read.

        A parent whose tree is partly lost must not stop every later backup:
        what cannot be read is simply not skipped (those files are read
        again), and the run says so.
        """
        if parent is None:
            return
        try:
            yield from self.repo.iter_tree(parent, keep_lines=True)
        except ShardvaultError as exc:
            detail = f"the tree of parent snapshot {parent.short_id} is unreadable ({exc}); reading the files again"
            self.stats.warn(BackupWarning("", WarningKind.PARENT_UNREADABLE, detail))

    def all_stored(self, chunks: list[str]) -> bool:
        """Whether every chunk of a previous version is stored (recoverably): the incremental skip."""
        return all(self.stored.has(bytes.fromhex(c)) for c in chunks)

    def commit(
        self,
        *,
        source: str,
        source_type: str,
        path: str,
        kind: str,
        parent: str | None,
        extra: dict[str, Any] | None = None,
    ) -> BackupResult:
        """Store the tree, flush every pack and index, then write the snapshot (the commit)."""
        self.pipe.drain(0)
        tree_ids = _store_tree(self.pipe, self.chunker, self.spool)
        self.committing = True
        return commit_snapshot(
            self.repo,
            source,
            source_type,
            path,
            kind,
            parent,
            tree_ids,
            self.stats,
            self.start,
            self.start_wall,
            self.progress,
            extra,
        )


def _store_tree(pipe: Pipeline, chunker: Chunker, spool: TreeSpool) -> list[str]:
    """Store the tree (JSON lines, already in ``spool``) like file data, in its own packs; flush everything."""
    tree_ids: list[str] = []
    for data in chunker.chunks(spool.rewound()):  # type: ignore[arg-type]  # SpooledTemporaryFile has readinto
        pipe.submit_chunk(data, tree_ids, KIND_TREE)
    pipe.finish()
    return tree_ids


def note_degradation(repo: Repository, stats: BackupStats) -> None:
    """Mark the run degraded when a pack is short of shards or a peer took nothing, and say so at once."""
    down = repo.peers.down()
    stats.failed_peers = sorted(down)
    stats.degraded = stats.packs_degraded > 0 or bool(down)
    stats.warnings = [w for w in stats.warnings if w.kind is not WarningKind.DEGRADED_PACK]
    if not stats.degraded:
        return
    peers = "; ".join(f"{name} ({why})" for name, why in sorted(down.items())) or "none down"
    n = repo.config.repository.n
    stats.warn(
        BackupWarning(
            "",
            WarningKind.DEGRADED_PACK,
            f"DEGRADED: committed with reduced redundancy: {stats.packs_degraded} of {stats.packs_new} new pack(s) "
            f"have fewer than {n} shards; peers that took no shards or metadata: {peers}. "
            "Run 'shardvault repair' when the peers are back",
        )
    )


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
    note_degradation(repo, stats)
    snapshot = Snapshot(
        id=new_id(),
        source=source,
        source_type=source_type,
        path=path,
        kind=kind,
        parent=parent,
        started=start_wall.isoformat(),
        finished=datetime.now(UTC).isoformat(),
        hostname=host_name(repo),
        tree=tuple(tree_ids),
        stats=stats.snapshot_doc() | (extra or {}),
    )
    repo.write_snapshot(snapshot)
    note_degradation(repo, stats)  # a peer that failed the snapshot's own write counts too
    if progress:
        progress(stats, "")
    status = "degraded" if stats.degraded else "warning" if stats.warnings else "ok"
    repo.state.record_run(
        "backup",
        status,
        start_wall.timestamp(),
        source=source,
        snapshot=snapshot.id,
        details=stats.to_doc() | {"kind": snapshot.kind},
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
    with BackupRun(repo) as run:
        stats = run.stats
        entry = Entry(name, FILE, 0o600, 0, 0, time.time_ns())
        entry.hash = run.pipe.submit_stream(run.chunker.chunks(stream), entry.chunks)
        entry.size = stats.bytes_total = stats.bytes_read
        stats.files = stats.files_read = 1
        run.pipe.submit_entry(entry)
        facts = extra() if extra else {}  # before the commit: a failed producer commits nothing
        return run.commit(source=source, source_type=source_type, path=name, kind=kind, parent=parent, extra=facts)
