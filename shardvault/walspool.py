"""The spools beside ``pg_wal``: what ``wal-push`` archived ahead and what ``wal-fetch`` read ahead.

PostgreSQL runs ``archive_command`` and ``restore_command`` once per WAL
file, in order, and waits for each.  A process per 16 MiB segment would pay
its start-up (the interpreter, the command line, the passphrase's scrypt,
the index, a session on every peer) every time, so both directions work
ahead of PostgreSQL and leave their results in a directory next to
``pg_wal``'s files that PostgreSQL ignores:

``.shardvault-pushed/<segment>``
    a *marker*: the BLAKE3 hash of a segment that was committed to the
    archive before PostgreSQL asked for it.  The call for that segment
    checks the file still has that hash and returns at once.

``.shardvault-prefetch/<segment>``
    a segment fetched and verified before recovery asked for it; the call
    moves it into place.  The prefetcher also lists the timeline history
    files the archive has, so that recovery's questions for the next
    timeline's history ("is 00000002.history archived?") are answered "no"
    without the repository, as pgBackRest's asynchronous archive-get
    answers from its queue.

Either spool may have a *worker*, a long-lived process that fills it
(``wal-pusher`` for ``wal-push --async``, ``wal-prefetcher`` for
``wal-fetch``), holding ``.worker.lock`` (an flock, so a killed worker never
leaves a stale lock) while it runs.  A worker that fails leaves one line and
an exit code in ``.worker.error`` for the call waiting on it to report.

This module imports nothing heavy: the console script (:mod:`shardvault.entry`)
serves both spools before the command line and the library are loaded.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3

from shardvault.walnames import WAL_NAME

PUSHED_DIR = ".shardvault-pushed"
PREFETCH_DIR = ".shardvault-prefetch"
LOCK = ".worker.lock"
ERROR = ".worker.error"
CURRENT = ".worker.current"  # the WAL file a prefetcher is fetching now
HISTORY = ".worker.history"  # the timeline history files archived, as the prefetcher last listed them
LOG = ".worker.log"  # a worker's stderr (a traceback, should one ever crash)
POLL = 0.01  # seconds between looks at a spool while waiting on its worker
TIMEOUT = 60.0  # seconds a call waits on a spool's worker (pgBackRest's archive-timeout); wal-push --timeout


def pushed_dir(path: str | os.PathLike[str]) -> Path:
    """Where markers of segments pushed ahead wait: beside ``pg_wal``'s files, in a directory PostgreSQL ignores."""
    return Path(path).parent / PUSHED_DIR


def prefetch_dir(dest: str | os.PathLike[str]) -> Path:
    """Where segments fetched ahead wait: beside ``dest`` (a file in pg_wal), in a directory PostgreSQL ignores."""
    return Path(dest).parent / PREFETCH_DIR


def prefetched_first(command: str) -> str:
    """A ``restore_command`` that moves a prefetched segment into place by itself, and runs ``command`` otherwise.

    Recovery starts one restore_command per segment and waits for it; with
    every segment already in the spool, Python's start and imports (~25 ms
    a call, over 40 segments ~1 s of a 7 s point-in-time restore) were the
    slowest part of the call.  ``mv`` inside ``pg_wal`` is a rename, as
    atomic as :func:`take_prefetched`'s (the prefetcher renames a file into
    the spool only once it is whole and verified).  The spool is found
    beside ``%p``, as :func:`prefetch_dir` finds it (``%%`` is PostgreSQL's
    ``%``).  On a miss (not fetched yet, a history file, no spool) ``mv``
    fails quietly and ``command`` does the rest: it waits for the
    prefetcher, tidies the spool, fetches the file itself, or says why not.
    """
    return f'p=%p; mv -f "${{p%%/*}}/{PREFETCH_DIR}/%f" "$p" 2>/dev/null || {command}'


def wal_files(spool: Path) -> list[str]:
    """The WAL files (markers or segments) in a spool, in order; its worker's files are not among them."""
    try:
        return sorted(name for name in os.listdir(spool) if WAL_NAME.match(name))
    except OSError:
        return []


def take_pushed(path: str | os.PathLike[str]) -> bool:
    """Whether an earlier call or the pusher archived this segment ahead (its marker names the file's current hash).

    The marker is used up either way: a file whose content is not the one
    committed (a re-created cluster) goes the whole way, where the archive
    refuses a different content under a committed name.
    """
    marker = pushed_dir(path) / os.path.basename(path)
    try:
        recorded = marker.read_text().strip()
        data = Path(path).read_bytes()
    except OSError:
        return False
    marker.unlink(missing_ok=True)
    return bool(WAL_NAME.match(marker.name)) and blake3.blake3(data).hexdigest() == recorded


def take_prefetched(name: str, dest: str | os.PathLike[str]) -> bool:
    """Move ``name`` from the prefetch spool to ``dest`` if it was fetched ahead.

    Segments before it on its timeline are dropped: recovery has moved past
    them, and the prefetcher fills the room they leave.  Files in the spool
    were written whole and verified against their hash first.
    """
    if not WAL_NAME.match(name):
        return False
    spool = prefetch_dir(dest)
    for old in wal_files(spool):
        if old < name and old[:8] == name[:8]:
            (spool / old).unlink(missing_ok=True)
    try:
        os.replace(spool / name, dest)
    except FileNotFoundError:
        return False
    return True


# --- workers -------------------------------------------------------------------


class Outcome(enum.Enum):
    """How waiting on a spool's worker ended."""

    DONE = "done"  # the file was archived (push) or is in place (fetch)
    FAILED = "failed"  # the worker stopped with an error (see take_error)
    GONE = "gone"  # no worker, or it stopped without doing it: the caller does the work itself
    TIMEOUT = "timeout"


def worker_alive(spool: Path) -> bool:
    """Whether a worker holds this spool's lock now."""
    try:
        fd = os.open(spool / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def worker_lock(spool: Path) -> Iterator[bool]:
    """Hold this spool's worker lock for the body; yields False (and holds nothing) if another worker has it."""
    spool.mkdir(exist_ok=True)
    fd = os.open(spool / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def start_worker(spool: Path, globals_: list[str], *argv: str, user: str | None = None) -> subprocess.Popen[bytes]:
    """Start a spool's worker (``shardvault GLOBALS wal-pusher|wal-prefetcher ...``) as its own process.

    It outlives the call that started it (its own session, no inherited
    output: PostgreSQL waits for the call only).  ``user``: run it as that
    user (root restoring for the ``postgres`` server), creating the spool as
    theirs.
    """
    exe = Path(sys.executable).with_name("shardvault")
    command = [str(exe) if exe.exists() else "shardvault", *globals_, *argv]
    spool.mkdir(exist_ok=True)
    if user is not None:
        import shutil

        shutil.chown(spool, user, user)
        command = ["runuser", "-u", user, "--", *command]
    with open(spool / LOG, "wb") as log:
        if user is not None:
            shutil.chown(spool / LOG, user, user)
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )


def write_error(spool: Path, message: str, code: int) -> None:
    """What a worker leaves when it stops on an error: one line and the exit code the waiting call returns."""
    with contextlib.suppress(OSError):  # a spool removed under it: nobody is waiting
        tmp = spool / f"{ERROR}.{os.getpid()}"
        tmp.write_text(json.dumps({"message": message, "exit": code}))
        os.replace(tmp, spool / ERROR)


def take_error(spool: Path) -> tuple[str, int] | None:
    """The error a worker left (used up), or None."""
    try:
        doc = json.loads((spool / ERROR).read_text())
        (spool / ERROR).unlink()
        return str(doc["message"]), int(doc["exit"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def await_worker(
    spool: Path, done: Callable[[], bool], timeout: float, alive: Callable[[], bool] | None = None
) -> Outcome:
    """Wait until ``done()`` while the spool's worker runs (``alive``: the caller's own view of a worker it started).

    ``done`` is asked once more after the worker stopped: it may have
    finished the file just before it exited.
    """
    deadline = time.monotonic() + timeout
    running = alive or (lambda: worker_alive(spool))
    while True:
        if done():
            return Outcome.DONE
        if not running():
            if done():
                return Outcome.DONE
            return Outcome.FAILED if (spool / ERROR).exists() else Outcome.GONE
        if time.monotonic() > deadline:
            return Outcome.TIMEOUT
        time.sleep(POLL)


def await_pushed(
    path: str | os.PathLike[str], timeout: float, alive: Callable[[], bool] | None = None
) -> tuple[Outcome, str, int]:
    """Wait for the pusher to archive ``path``: the outcome, and for FAILED and TIMEOUT the line and exit code.

    A worker that stopped without leaving an error is GONE (the caller pushes it itself).
    """
    spool = pushed_dir(path)
    outcome = await_worker(spool, lambda: take_pushed(path), timeout, alive)
    if outcome is Outcome.FAILED:
        error = take_error(spool)
        return (outcome, *error) if error else (Outcome.GONE, "", 0)
    if outcome is Outcome.TIMEOUT:
        from shardvault.errors import WalWorkerTimeoutError

        timed_out = WalWorkerTimeoutError(os.fspath(path), "the WAL pusher", timeout)
        return outcome, str(timed_out), timed_out.exit_code
    return outcome, "", 0


def fetching(spool: Path) -> str:
    """The WAL file the prefetcher is fetching now ('' if none)."""
    try:
        return (spool / CURRENT).read_text().strip()
    except OSError:
        return ""


def write_history(spool: Path, source: str, names: list[str]) -> None:
    """The prefetcher's listing of the archived timeline history files (for :func:`history_missing`)."""
    tmp = spool / f"{HISTORY}.{os.getpid()}"
    tmp.write_text(json.dumps({"source": source, "files": sorted(names)}))
    os.replace(tmp, spool / HISTORY)


def history_missing(name: str, dest: str | os.PathLike[str]) -> str | None:
    """The source's name if a running prefetcher lists ``name`` (a history file) as not archived; else None."""
    spool = prefetch_dir(dest)
    if not name.endswith(".history") or not WAL_NAME.match(name) or not worker_alive(spool):
        return None
    try:
        doc = json.loads((spool / HISTORY).read_text())
        return None if name in doc["files"] else str(doc["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
