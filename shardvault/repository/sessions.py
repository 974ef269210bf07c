"""Sessions: how a process that uses the index tells a pruning host that it is there.

Prune deletes in two phases (``docs/concurrency.md``): it first writes a
*condemned set* naming what it means to delete, together with the sessions
that were live at that moment, and deletes only once every one of those
sessions has ended.  A process that reads the index *after* a condemned set
exists sees it and leans on nothing in it; a process that read the index
*before* is one of the sessions the set names, so nothing is deleted under
it.  For that to hold, a session is announced before the index is read, and
the condemned sets are read after (:meth:`Repository.announce`).

A session is a series of small sealed metadata objects, one per heartbeat::

    sessions/<16 hex>/<seq, 10 digits>      body: {"version": 1, "id", "kind",
        "hostname", "pid", "boot_id", "process_start", "started", "heartbeat", "seq"}
    sessions/<16 hex>/end                   written only where deletion is refused

Each heartbeat writes a *new* object (seq + 1) and then deletes the previous
one, so a session never overwrites anything and works on append-only peers
too (there the old heartbeats stay, and an ``end`` object marks the end, for
the pruning host to clean up).  A session that ends normally deletes its
objects.

Whether a session is still alive is decided without trusting clocks:

* on the same host (same boot), by its process: gone, or a different
  process under the same pid, means stale;
* elsewhere, by observation: the pruning host records when it first saw a
  session's latest heartbeat (in its local state) and calls the session
  stale once that heartbeat has not changed for ``stale_after`` *by the
  pruning host's own clock*.  A writer's clock is shown, never relied on.

A writer whose heartbeats keep failing for half of ``stale_after`` could be
taken for dead: it is marked *lost*, and its commit refuses
(:class:`~shardvault.errors.SessionLostError`), so it never commits a
snapshot leaning on something a prune may have deleted.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from shardvault.errors import PeerError, RepositoryCorruptError, UnsupportedFormatError

if TYPE_CHECKING:
    from .core import Repository

SESSION_VERSION = 1
PREFIX = "sessions/"
# Seconds between heartbeats; tests shorten it.
HEARTBEAT_SECONDS = float(os.environ.get("SHARDVAULT_HEARTBEAT_SECONDS", "60"))


class SessionKind(StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"
    VERIFY = "verify"  # check, scrub
    REPAIR = "repair"  # repair, peers add/drain/remove
    PRUNE = "prune"
    READ = "read"  # anything else that reads the index


# Kinds that may run without a session when the peers do not take one (they delete and commit nothing).
UNANNOUNCED_OK = frozenset({SessionKind.READ, SessionKind.RESTORE, SessionKind.VERIFY})


class Liveness(StrEnum):
    LIVE = "live"
    STALE = "stale"
    ENDED = "ended"


def _boot_id() -> str:
    """This boot of this machine, and the pid namespace: a pid means the same process only where both match.

    (Two containers on one machine share the boot id and may share a
    hostname, but not their pids.)
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def session_name(sid: str, seq: int) -> str:
    return f"{PREFIX}{sid}/{seq:010d}"


@dataclass(frozen=True)
class SessionInfo:
    """What the repository shows of one session."""

    id: str
    kind: str
    hostname: str
    pid: int
    boot_id: str
    process_start: int | None
    started: str
    heartbeat: str
    seq: int
    ended: bool
    names: tuple[str, ...]  # its objects (heartbeats, end marker)

    def describe(self) -> str:
        return f"{self.kind} session {self.id} on host {self.hostname} (pid {self.pid}, started {self.started})"

    def to_doc(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "hostname": self.hostname,
            "pid": self.pid,
            "started": self.started,
            "heartbeat": self.heartbeat,
            "seq": self.seq,
        }


class Session:
    """This process's session: announced once, kept alive by a heartbeat thread, ended at close."""

    def __init__(self, repo: Repository, kind: SessionKind, stale_after: float) -> None:
        self.repo = repo
        self.kind = kind
        self.id = secrets.token_hex(8)
        self.seq = 0
        self.started = datetime.now(UTC).isoformat()
        self.stale_after = stale_after
        self.lost = False
        self._last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: list[str] = []
        self._lock = threading.Lock()

    def _doc(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "version": SESSION_VERSION,
            "id": self.id,
            "kind": str(self.kind),
            "hostname": socket.gethostname(),
            "pid": pid,
            "boot_id": _boot_id(),
            "process_start": process_start(pid),
            "started": self.started,
            "heartbeat": datetime.now(UTC).isoformat(),
            "seq": self.seq,
        }

    def start(self) -> None:
        """Write the first heartbeat (raises if the write quorum does not take it) and start beating."""
        self._beat()
        self._thread = threading.Thread(target=self._run, name="sv-session", daemon=True)
        self._thread.start()

    def expired(self) -> bool:
        """Whether a pruning host may have taken this session for dead (then nothing may be committed or deleted).

        Also true after the whole process was frozen (SIGSTOP, a paused VM) for
        half of ``stale_after``: its heartbeat thread was frozen too.
        """
        if not self.lost and time.monotonic() - self._last_ok > self.stale_after / 2:
            self.lost = True  # sticky: a later heartbeat cannot undo what a prune may have done meanwhile
        return self.lost

    def _beat(self) -> None:
        self.expired()  # a gap since the last heartbeat is judged before this one hides it
        if self._written and not self.repo.meta_exists(self._written[0]):
            # Someone removed our heartbeat (`unlock --remove-all`, or a prune that took us for
            # dead): what we lean on may be deleted, so commit nothing, as restic does when its lock goes.
            self.lost = True
        if self.lost:
            return  # and stop beating: the removal stands
        with self._lock:
            self.seq += 1
            name = session_name(self.id, self.seq)
            self.repo.write_meta(name, self._doc(), cache=False, mark_down=False)
            previous, self._written = self._written, [name]
        self._last_ok = time.monotonic()
        self._delete(previous)

    def _run(self) -> None:
        # At least four heartbeats per stale_after, so a live session never looks silent for half of it.
        while not self._stop.wait(min(HEARTBEAT_SECONDS, self.stale_after / 4)):
            try:
                self._beat()
            except PeerError:
                self.expired()  # half of stale_after without a heartbeat: a pruning host may take us for dead

    def _delete(self, names: list[str]) -> bool:
        """Whether every peer that answered let them go (a heartbeat left behind is cleaned by prune)."""
        return not self.repo.delete_everywhere(names, mark_down=False).refused

    def end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            names, self._written = self._written, []
        if not self._delete(names):
            try:  # append-only: say we are done, the pruning host cleans up
                end = {"version": SESSION_VERSION, "id": self.id}
                self.repo.write_meta(f"{PREFIX}{self.id}/end", end, cache=False, mark_down=False)
            except PeerError:
                pass


def list_sessions(repo: Repository) -> list[SessionInfo]:
    """Every session the peers show (the union over reachable peers), newest heartbeat of each."""
    by_id: dict[str, list[str]] = {}
    for name in repo.list_meta(PREFIX):
        by_id.setdefault(name.split("/")[1], []).append(name)
    sessions = []
    for sid, names in sorted(by_id.items()):
        doc: dict[str, Any] | None = None
        junk: set[str] = set()
        for _ in range(3):
            vanished = False
            for name in sorted((n for n in names if not n.endswith("/end")), reverse=True):  # newest first
                try:
                    doc = repo.read_meta(name, cache=False)
                    break
                except (RepositoryCorruptError, UnsupportedFormatError):
                    if repo.meta_exists(name):
                        junk.add(name)  # there, yet no copy authenticates: planted, never a heartbeat
                    else:
                        vanished = True  # replaced by the writer's next heartbeat since the listing
            if doc is not None or not vanished:
                break
            # A live writer replaced what was listed: list its objects again rather than
            # take it for ended (a session missed here would not hold deletion back).
            names = repo.list_meta(f"{PREFIX}{sid}/")
        if not names:
            continue  # its objects are gone: it ended
        # Only an end marker and junk left: nothing live (prune removes them).  A heartbeat
        # that kept vanishing under our reads: a live writer of an unknown host, judged by observation.
        ended = doc is None and not vanished
        ended = ended or any(n.endswith("/end") for n in names)
        doc = doc or {"seq": len(names)}
        sessions.append(
            SessionInfo(
                id=sid,
                kind=str(doc.get("kind", "?")),
                hostname=str(doc.get("hostname", "?")),
                pid=int(doc.get("pid", 0)),
                boot_id=str(doc.get("boot_id", "")),
                process_start=doc.get("process_start"),
                started=str(doc.get("started", "?")),
                heartbeat=str(doc.get("heartbeat", "?")),
                seq=int(doc.get("seq", 0)),
                ended=ended,
                names=tuple(sorted(names)),
            )
        )
    return sessions


def liveness(repo: Repository, info: SessionInfo, stale_after: float, now: float | None = None) -> tuple[Liveness, str]:
    """Whether a session is live, and why not: by its process on this host, else by observation."""
    if info.ended:
        return Liveness.ENDED, "ended"
    own = repo.session
    if own is not None and info.id == own.id:
        return Liveness.LIVE, "this process"
    if info.hostname == socket.gethostname() and info.boot_id and info.boot_id == _boot_id():
        started = process_start(info.pid)
        if started is None:
            return Liveness.STALE, f"process {info.pid} is gone"
        if info.process_start is not None and started != info.process_start:
            return Liveness.STALE, f"process {info.pid} is gone (the pid now belongs to another process)"
        return Liveness.LIVE, f"process {info.pid} is running"
    now = time.time() if now is None else now
    first_seen = repo.state.observe(f"{PREFIX}{info.id}", info.seq, now)
    quiet = now - first_seen
    if quiet >= stale_after:
        return Liveness.STALE, f"no heartbeat for {quiet:.0f} s (observed by this host)"
    return Liveness.LIVE, f"heartbeat {info.seq} first seen {quiet:.0f} s ago (stale after {stale_after:g} s)"


@dataclass
class UnlockReport:
    removed: list[dict[str, Any]]
    live: list[dict[str, Any]]

    def to_doc(self) -> dict[str, Any]:
        return {"removed": self.removed, "live": self.live}


def unlock(repo: Repository, stale_after: float, remove_all: bool = False) -> UnlockReport:
    """Remove the sessions of killed processes (all of them with ``remove_all``); name the live ones."""
    report = UnlockReport([], [])
    for info in list_sessions(repo):
        state, why = liveness(repo, info, stale_after)
        if state is Liveness.LIVE and not (remove_all and info.id != getattr(repo.session, "id", None)):
            if repo.session is None or info.id != repo.session.id:
                report.live.append(info.to_doc() | {"why": why})
            continue
        repo.delete_everywhere(list(info.names))
        report.removed.append(info.to_doc() | {"why": why if state is not Liveness.LIVE else "removed by --remove-all"})
    return report
