"""``wal-push``: PostgreSQL's WAL files stored in the repository, one record each.

``wal-push`` stores a file's bytes as chunks (dedup, compression, encryption
and erasure coding as for any file), writes the index, and only then its
record ``wal/<source>/<file name, lower case>``: the commit.  A record names
the file's chunks, size and BLAKE3 hash.  Pushing a file that is already
archived with the same hash succeeds (PostgreSQL retries after a crash);
with a different hash it is refused, as pgBackRest does, because silently
replacing WAL would corrupt every restore that replays it.

**Pushing ahead.**  A process per segment pays its start-up (the passphrase's
scrypt, the index, a session on every peer) for every 16 MiB, which caps
the WAL rate an archive keeps up with.  So one ``wal-push`` also archives
the next segments PostgreSQL has marked ready (``archive_status/*.ready``,
up to ``AHEAD`` of them, in order), each committed exactly as its own call
would, and leaves for each a marker holding its hash in a directory beside
``pg_wal`` that PostgreSQL ignores.  The calls that follow find their
segment's marker, check the file still has that hash, and return at once,
without opening the repository: pgBackRest's asynchronous archiving,
without a daemon, and never saying "archived" before the segment is
committed.  A segment that cannot be pushed ahead is left to its own call,
which reports why.

**Asynchronous archiving** (``wal-push --async``, pgBackRest's
``archive-async``).  The call hands its segment to one long-lived pusher
(``wal-pusher``, started by the first call that finds none) and waits for
its marker: the pusher opens the repository once and pushes every segment
PostgreSQL marks ready, in order, as soon as it appears, so the calls that
follow find their markers already there.  It stops after ``IDLE`` seconds
with nothing to push or ``LIFETIME`` seconds in all (the next call starts
another), and at the first error, which the waiting call reports
(:mod:`shardvault.walspool`).
"""

from __future__ import annotations

import io
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shardvault.chunker import Chunker
from shardvault.config import PostgresSource
from shardvault.crypto import content_hash
from shardvault.errors import ShardvaultError, SourceError, UnderReplicatedError, WalConflictError
from shardvault.repository import Repository
from shardvault.repository.sessions import SessionKind
from shardvault.repository.wal import WAL_VERSION, record_name
from shardvault.walnames import WAL_NAME
from shardvault.walspool import POLL, PUSHED_DIR, wal_files

from .run import BackupStats, Pipeline, note_degradation

AHEAD = 8  # ready segments a wal-push archives after its own (pgBackRest's archive-push-queue, in spirit)
# Seconds the pusher waits for PostgreSQL to mark another segment ready before it stops; tests shorten it.
IDLE = float(os.environ.get("SHARDVAULT_WAL_PUSHER_IDLE", "30"))
LIFETIME = 600.0  # seconds a pusher runs at most (it holds a session that a prune waits for)


def ready(wal_dir: Path) -> list[str]:
    """The WAL files PostgreSQL marked ready to archive, in order."""
    try:
        names = os.listdir(wal_dir / "archive_status")
    except OSError:
        return []
    return sorted(n[: -len(".ready")] for n in names if n.endswith(".ready") and WAL_NAME.match(n[: -len(".ready")]))


def _forget_stale_markers(wal_dir: Path) -> None:
    """Drop markers of files PostgreSQL no longer has ready: they were acknowledged, or archived another way."""
    spool = wal_dir / PUSHED_DIR
    waiting = set(ready(wal_dir))
    for name in wal_files(spool):
        if name not in waiting:
            (spool / name).unlink(missing_ok=True)


def _mark(wal_dir: Path, name: str, digest: str) -> None:
    """Leave the marker of a committed segment (after the commit: a marker never names what is not archived)."""
    spool = wal_dir / PUSHED_DIR
    spool.mkdir(exist_ok=True)
    tmp = spool / f".{name}.{os.getpid()}"
    tmp.write_text(digest + "\n")
    os.replace(tmp, spool / name)


def push_ready(
    repo: Repository, source: PostgresSource, wal_dir: Path, idle: float = IDLE, lifetime: float = LIFETIME
) -> int:
    """The pusher's loop: push every segment marked ready, as it appears, until idle; how many were pushed.

    What is ready is pushed ``AHEAD`` at a time through one pipeline (one
    index for them, then each one's record): fewer, fuller packs and one
    index write per batch, not per segment.  An error stops it (the caller
    records it for the call waiting on it): pushing on past a segment that
    failed would only fail again.
    """
    started = last = time.monotonic()
    pushed = 0
    while True:
        todo = [n for n in ready(wal_dir) if not (wal_dir / PUSHED_DIR / n).exists()][:AHEAD]
        marked, failed = _push_and_mark(repo, source, wal_dir, todo)
        pushed += marked
        # A file acknowledged (and recycled by PostgreSQL) since it was listed is not waited for.
        if failed and (
            not isinstance(failed.error, SourceError)
            or (wal_dir / "archive_status" / f"{failed.path.name}.ready").exists()
        ):
            raise failed.error from None
        _forget_stale_markers(wal_dir)
        now = time.monotonic()
        if todo:
            last = now
        elif now - last > idle or now - started > lifetime:
            return pushed
        else:
            time.sleep(POLL * 5)


def push_ahead(repo: Repository, source: PostgresSource, path: str | os.PathLike[str], ahead: int = AHEAD) -> int:
    """Archive up to ``ahead`` segments PostgreSQL marked ready after ``path``; leave a marker for each; how many."""
    wal_dir = Path(path).parent
    name = os.path.basename(path)
    _forget_stale_markers(wal_dir)
    later = [n for n in ready(wal_dir) if n > name and not (wal_dir / PUSHED_DIR / n).exists()][:ahead]
    return _push_and_mark(repo, source, wal_dir, later)[0]  # one that fails is left to its own call, which says why


def push(repo: Repository, source: PostgresSource, path: str | os.PathLike[str]) -> bool:
    """Archive one WAL file; True if stored, False if it was already there (same content)."""
    try:
        return push_files(repo, source, [Path(path)])[0][1]
    except _Failed as failed:
        raise failed.error from None


def _push_and_mark(
    repo: Repository, source: PostgresSource, wal_dir: Path, names: list[str]
) -> tuple[int, _Failed | None]:
    """Push ``names`` as one batch and leave a marker for each committed; how many, and the failure if one."""
    try:
        done, failed = push_files(repo, source, [wal_dir / n for n in names]), None
    except _Failed as exc:
        done, failed = exc.done, exc
    for name, _, digest in done:
        _mark(wal_dir, name, digest)
    return len(done), failed


class _Failed(Exception):
    """A file of a batch could not be archived: ``error`` says why; ``done`` were committed before it."""

    def __init__(self, path: Path, error: ShardvaultError, done: list[tuple[str, bool, str]]) -> None:
        super().__init__(str(error))
        self.path, self.error, self.done = path, error, done


def push_files(repo: Repository, source: PostgresSource, paths: list[Path]) -> list[tuple[str, bool, str]]:
    """Archive WAL files through one pipeline; (name, stored, hash) of each: stored is False if already there.

    The chunks of all of them are stored and the index written before any
    record, so each record still commits only what is durable.  A file that
    cannot be archived (unreadable, a conflicting or expired name) stops
    the batch: the files before it are committed, then :class:`_Failed`
    carries its error.
    """
    done: list[tuple[str, bool, str]] = []
    new: list[dict[str, Any]] = []
    failure: tuple[Path, ShardvaultError] | None = None
    pipe: Pipeline | None = None
    started = time.time()
    stats = BackupStats()
    rc = repo.config.repository
    try:
        for path in paths:
            try:
                data, digest, archived = _examine(repo, source, path)
            except ShardvaultError as exc:
                failure = (path, exc)
                break
            if archived:
                done.append((path.name, False, digest))
                continue
            if pipe is None:
                repo.announce(SessionKind.BACKUP)  # before the index is read (docs/concurrency.md)
                pipe = Pipeline(repo, stats)
            chunks: list[str] = []
            pipe.submit_stream(Chunker(rc.chunk_min, rc.chunk_avg, rc.chunk_max).chunks(io.BytesIO(data)), chunks)
            new.append({"version": WAL_VERSION, "name": path.name, "size": len(data), "hash": digest, "chunks": chunks})
        if pipe is not None:
            pipe.finish()
    finally:
        if pipe is not None:
            pipe.close()
    for doc in new:
        repo.write_meta(record_name(source.name, doc["name"]), doc | {"pushed": datetime.now(UTC).isoformat()})
        done.append((doc["name"], True, doc["hash"]))
    if new:
        stats.bytes_total = stats.bytes_read
        note_degradation(repo, stats)
        names = [doc["name"] for doc in new]
        repo.state.record_run(
            "backup",
            "degraded" if stats.degraded else "ok",
            started,
            source=source.name,
            details={"kind": "wal", "wal": names[-1], "files": names} | stats.to_doc(),
        )
    if failure is not None:
        raise _Failed(*failure, done)
    return done


def _examine(repo: Repository, source: PostgresSource, path: Path) -> tuple[bytes, str, bool]:
    """A WAL file's bytes, hash, and whether it is archived already (with this content; another is refused)."""
    name = path.name
    if not WAL_NAME.match(name):
        raise SourceError(source.name, f"{name!r} is not a WAL file name")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(source.name, f"cannot read {path}: {exc.strerror}") from None
    digest = content_hash(data).hex()
    record = record_name(source.name, name)
    if record in repo.deleted_names:
        # Expired by forget, and a tombstone hides that name for good: a new record would be invisible
        # to wal-fetch.  PostgreSQL only repeats a name when a cluster is re-created under the same source.
        raise SourceError(
            source.name,
            f"WAL file {name} was archived before and expired by forget; "
            "a re-created cluster needs a new source name (its old archive's names are taken)",
        )
    if repo.meta_exists(record):
        if repo.read_meta(record, cache=False).get("hash") != digest:
            raise WalConflictError(source.name, name)
        # "Archived" lets PostgreSQL delete the segment: a record a killed writer left on too few peers
        # is completed first, and one that cannot be is not vouched for (PostgreSQL retries later).
        copies, quorum = repo.complete_copies(record), repo.config.repository.write_quorum
        if copies < quorum:
            raise UnderReplicatedError(f"WAL record {record}", copies, quorum)
        return data, digest, True
    return data, digest, False
