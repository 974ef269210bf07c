"""``wal-fetch``: PostgreSQL's restore_command, with read-ahead.

Each call writes one WAL file whole, checks it against the hash in its
record, and renames it into place.  The first call that had to open the
repository also starts a *prefetcher* (``wal-prefetcher``): one process
that opens the repository once and keeps the next ``PREFETCH`` segments of
the timeline fetched and verified in a spool beside ``pg_wal``
(:mod:`shardvault.walspool`), while PostgreSQL replays.  The calls that
follow move their segment out of the spool, or wait for the one the
prefetcher is fetching, without opening the repository (no scrypt, no
peer): pgBackRest's asynchronous archive-get.  ``restore --start`` starts
the prefetcher itself, from the base backup's first segment, while it
unpacks the base backup.

The prefetcher also lists the archived timeline history files, so that
recovery's questions for the next timeline's history need no repository
either.  It stops, removing the spool, ``LINGER`` seconds after the server
has promoted (``recovery.signal`` gone: the promotion itself still asks for
a history file) or after ``IDLE`` seconds in which recovery took nothing.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from shardvault.config import PostgresSource
from shardvault.crypto import new_content_hasher
from shardvault.errors import ShardvaultError, WalMissingError
from shardvault.repository import BlobReader, Repository
from shardvault.repository.wal import archived, record_name
from shardvault.walnames import WAL_NAME, segment_name, segment_number
from shardvault.walspool import CURRENT, POLL, prefetch_dir, wal_files, write_history

PREFETCH = 8  # WAL segments kept fetched ahead of recovery, as pgBackRest's archive-get queue (128 MiB)
IDLE = 60.0  # seconds the prefetcher waits for recovery to take a segment before it stops
# Seconds the prefetcher stays once the server left recovery.  PostgreSQL removes recovery.signal
# before it asks for the old timeline's history file (XLogInitNewTimeline, then
# writeTimeLineHistory); a prefetcher gone by then left that question to a whole command
# (~0.3 s of every point-in-time restore) instead of its listing.
LINGER = 3.0


def fetch(repo: Repository, source: PostgresSource, name: str, dest: str | os.PathLike[str]) -> None:
    """Restore one WAL file to ``dest`` (written whole, verified, then renamed into place)."""
    record = record_name(source.name, name)
    if not WAL_NAME.match(name) or not repo.meta_exists(record):
        later = ""
        if segment_number(name) is None:
            pass  # a history file (a timeline not taken yet) or another name: no gap to speak of
        elif gaps_before := [n for n in archived(repo, source) if n > name.upper() and n[:8] == name.upper()[:8]]:
            later = f", but later ones are (first: {gaps_before[0]}): a gap in the archive"
        raise WalMissingError(source.name, name, later)
    _write_verified(repo, repo.blob_reader(), source, name, Path(dest))


def prefetch(
    repo: Repository,
    source: PostgresSource,
    first: str,
    dest: str | os.PathLike[str],
    depth: int = PREFETCH,
    idle: float = IDLE,
) -> int:
    """The prefetcher's loop: keep ``depth`` segments from ``first`` on in the spool; how many it fetched.

    Read-ahead is best effort: a segment it cannot fetch (not archived, or
    archived after this process loaded the index) ends the fetching, and
    that segment's own call fetches it, or says why not.  It then stays, to
    answer for history files, until recovery is over (the server promoted;
    then ``LINGER`` seconds more, for the promotion's own questions) or took
    nothing for ``idle`` seconds, and removes the spool.
    """
    number = segment_number(first)
    spool = prefetch_dir(dest)
    if number is None or not spool.is_dir():
        return 0
    tli, seg = number[0], number[1] - 1
    reader = repo.blob_reader()
    have = set(archived(repo, source))
    fetched, seen, last, fetching = 0, wal_files(spool), time.monotonic(), True
    try:
        write_history(spool, source.name, [n for n in have if n.endswith(".history")])
        while not (over := _recovery_over(spool)):
            files = wal_files(spool)
            if files != seen:
                seen, last = files, time.monotonic()
            following = segment_name(tli, seg + 1)
            if not fetching or len(files) >= depth or following not in have:
                # Full, or at the end of what it can fetch (staying to answer for history files):
                # fetching nothing now, so no call waits on it.
                (spool / CURRENT).unlink(missing_ok=True)
                if time.monotonic() - last > idle:
                    break
                time.sleep(POLL * 5)
                continue
            seg += 1
            if following in files:
                continue
            (spool / CURRENT).write_text(following)
            try:
                _write_verified(repo, reader, source, following, spool / following)
                fetched += 1
            except ShardvaultError:
                fetching = False  # best effort: its own call fetches it, and says what is wrong
        if over and spool.is_dir():
            (spool / CURRENT).unlink(missing_ok=True)
            time.sleep(LINGER)
    except OSError:
        return fetched  # the spool was removed under it
    finally:
        (spool / CURRENT).unlink(missing_ok=True)
    shutil.rmtree(spool, ignore_errors=True)  # recovery is over, or took nothing for `idle` s
    return fetched


def _recovery_over(spool: Path) -> bool:
    """Whether the server whose pg_wal holds ``spool`` has finished archive recovery (promoted), or it is gone."""
    data = spool.parent.parent
    if not spool.is_dir():
        return True
    running = (data / "postmaster.pid").exists()
    return running and not (data / "recovery.signal").exists() and not (data / "standby.signal").exists()


def _write_verified(repo: Repository, reader: BlobReader, source: PostgresSource, name: str, target: Path) -> None:
    doc = repo.read_meta(record_name(source.name, name))
    tmp = target.with_name(f".{target.name}.shardvault-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            hasher = new_content_hasher()
            for chunk in doc["chunks"]:
                data = reader.read(bytes.fromhex(chunk))
                f.write(data)
                hasher.update(data)
            if hasher.hexdigest() != doc["hash"]:
                raise WalMissingError(source.name, name, " intact: its content does not match its hash")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
