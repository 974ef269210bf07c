"""Restores of PostgreSQL snapshots: a data directory ready to start, or a database from a dump.

Physical: the base backup's tar is streamed out of the repository and
unpacked with tarfile's ``data`` filter (no absolute paths, no ``..``, no
links out of the target: invariant 6), its hash checked, and recovery set up
in ``postgresql.auto.conf``: ``restore_command`` runs ``shardvault
wal-fetch``, the target (a time, an LSN, or the end of an incremental
snapshot) and ``recovery_target_action = 'promote'``.  Archiving is switched
off in the copy, so a restored cluster never writes WAL into the archive of
the one it was restored from.

Logical: the dump is streamed into ``pg_restore`` for a new database.

Neither ever overwrites: the data directory must be empty (or missing, with
an existing parent) and the database new, or the restore stops with a
:class:`RestoreTargetError` (exit 12) before writing; a target that fails
while written (full, read-only) is one too, never "data lost".
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from shardvault import walspool
from shardvault.config import PostgresSource
from shardvault.errors import RestoreRefusedError, RestoreTargetError, SourceError, UnsafePathError
from shardvault.repository import Repository
from shardvault.repository.snapshot import Snapshot
from shardvault.restore.safepath import SafeTarget, safe_parts, target_error
from shardvault.restore.streams import ChunkStream
from shardvault.sources import postgres as pg
from shardvault.tree import FILE, Entry
from shardvault.walnames import segment_number

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _the_file(repo: Repository, snap: Snapshot) -> Entry:
    entries = [e for e in repo.iter_tree(snap) if e.type == FILE]
    if len(entries) != 1:
        raise RestoreRefusedError(snap.short_id, "not a PostgreSQL snapshot (expected one stream)")
    return entries[0]


def restore_physical(
    repo: Repository,
    snap: Snapshot,
    source: PostgresSource,
    target: Path,
    *,
    config_path: Path,
    password_file: Path | None,
    to_time: str | None = None,
    to_lsn: str | None = None,
    prefetch_wal: bool = False,
) -> dict[str, Any]:
    """Unpack ``snap``'s base backup into ``target`` and set up recovery (see the module's docstring).

    ``prefetch_wal``: the server starts right after (``restore --start``),
    so a prefetcher starts fetching the first WAL segments it will ask for
    while the base backup is unpacked.
    """
    base = snap
    facts = dict(snap.stats.get("postgres", {}))
    if snap.kind == "incremental":
        parents = [s for s in repo.snapshots() if s.id == snap.parent]
        if not parents:
            raise RestoreRefusedError(snap.short_id, f"its base backup {snap.parent} is not in the repository")
        base = parents[0]
        if not (to_time or to_lsn):
            to_lsn = str(facts.get("lsn"))
    if password_file is None:
        raise RestoreRefusedError(
            snap.short_id,
            "a physical restore needs --password-file: the restored server runs `shardvault wal-fetch` with it",
        )
    entry = _the_file(repo, base)
    prefetching = False
    with SafeTarget(target) as safe:
        if not safe.is_empty():
            raise RestoreTargetError(str(target), "not empty; a data directory is restored into an empty one")
        try:
            os.fchmod(safe.root_fd, 0o700)
            first = base.stats.get("postgres", {}).get("start_wal_file")
            if prefetch_wal and isinstance(first, str) and segment_number(first):
                _start_prefetcher(target, source, first, config_path, password_file)
                prefetching = True
        except OSError as exc:
            raise target_error(exc, target) from None
    with ChunkStream(repo, entry) as stream:
        _untar(stream, target)
        stream.verify()
    try:
        (target / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise target_error(exc, target / "pg_wal" / "archive_status") from None
    exe = Path(sys.executable).with_name("shardvault")
    fetch = (
        f"{exe if exe.exists() else 'shardvault'} --config {config_path} --password-file {password_file} "
        f"wal-fetch --source {source.name} %f %p"
    )
    if prefetching:
        fetch = walspool.prefetched_first(fetch)
    settings = {"restore_command": fetch, "archive_mode": "off", "recovery_target_action": "promote"}
    if to_time:
        settings["recovery_target_time"] = to_time
    elif to_lsn:
        settings["recovery_target_lsn"] = to_lsn
    conf_path = target / "postgresql.auto.conf"
    try:
        with open(conf_path, "a") as conf:
            conf.write("\n# Added by shardvault restore\n")
            for key, value in settings.items():
                conf.write(f"{key} = '{value.replace(chr(39), chr(39) * 2)}'\n")
        conf_path = target / "recovery.signal"
        conf_path.write_bytes(b"")
        give_to_postgres(target)
    except OSError as exc:
        raise target_error(exc, conf_path) from None
    return {"base": base.id, "target": str(target), "settings": settings, "postgres": base.stats.get("postgres", {})}


def _start_prefetcher(target: Path, source: PostgresSource, first: str, config_path: Path, password_file: Path) -> None:
    """Start ``wal-prefetcher`` on the restored ``pg_wal`` from ``first``, as the server's user (it moves the files)."""
    globals_ = ["--config", str(config_path), "--password-file", str(password_file)]
    user = _server_user()
    wal = target / "pg_wal"
    wal.mkdir()
    if user is not None:
        os.chown(target, user.pw_uid, user.pw_gid, follow_symlinks=False)
        os.chown(wal, user.pw_uid, user.pw_gid, follow_symlinks=False)
    spool = walspool.prefetch_dir(wal / first)
    walspool.start_worker(
        spool, globals_, "wal-prefetcher", "--source", source.name, first, str(wal / first), user=user and user.pw_name
    )


def _server_user() -> pwd.struct_passwd | None:
    """The user the server runs as when this runs as root (`postgres`); None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


class _Syncer:
    """The base backup's files fsynced and closed on a thread while the next ones are unpacked.

    A restore that says it succeeded has its data on disk, as pgBackRest's
    has: a disk that takes a write and refuses it only at writeback (a full
    filesystem with delayed allocation) fails the restore here, as the
    target, instead of the server later.  On a thread, so the writeback
    overlaps the unpacking; PostgreSQL's own sync of the data directory at
    start then finds nothing to write (point-in-time restore: 6.68–6.91 s
    without, 6.66–7.06 s with, within the spread).  At most ``PENDING``
    files wait, open, at a time.
    """

    PENDING = 32

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sv-fsync")
        self._slots = threading.BoundedSemaphore(self.PENDING)
        self._pending: list[tuple[Future[None], Path]] = []

    def add(self, fd: int, path: Path) -> None:
        """Sync and close ``fd`` (the file ``path``), soon; the caller no longer owns it."""
        self._slots.acquire()
        try:
            future = self._pool.submit(_sync_and_close, fd)
        except BaseException:
            self._slots.release()
            os.close(fd)
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._pending.append((future, path))

    def finish(self) -> None:
        """Wait for every file; the first that failed to sync is the target failing."""
        for future, path in self._pending:
            try:
                future.result()
            except OSError as exc:
                raise target_error(exc, path) from None

    def close(self) -> None:
        self._pool.shutdown(wait=True)  # every descriptor handed over is closed, whatever happened


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _untar(stream: ChunkStream, target: Path) -> None:
    """Unpack a base backup's tar inside ``target`` only (invariant 6), every file synced.

    Names go through the same checks as file restores (no absolute paths, no
    ``..``), directories are opened without following symlinks, and only
    directories and regular files are accepted: a data directory streamed to
    one tar has no links (pg_basebackup refuses tablespaces in that mode).
    """
    syncer = _Syncer()
    try:
        _unpack(stream, target, syncer)
        syncer.finish()
    finally:
        syncer.close()


def _unpack(stream: ChunkStream, target: Path, syncer: _Syncer) -> None:
    with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as tar, SafeTarget(target) as safe:  # type: ignore[call-overload]
        for member in tar:
            name = member.name.rstrip("/")
            while name.startswith("./"):  # pg_basebackup writes ./pg_wal/... for some entries
                name = name[2:]
            if name in ("", "."):
                continue
            parts = safe_parts(name)
            if not (member.isdir() or member.isfile()):
                raise UnsafePathError(name, "not a regular file or directory (links are not accepted in a base backup)")
            try:
                if member.isdir():
                    fd = safe.dir_fd(parts, create=True, shown=name)
                    os.fchmod(fd, member.mode & 0o700 or 0o700)
                else:
                    parent = safe.dir_fd(parts[:-1], create=True, shown=name)
                    source = tar.extractfile(member)
                    assert source is not None
                    fd = os.open(parts[-1], _CREATE, member.mode & 0o600 or 0o600, dir_fd=parent)
                    try:
                        with os.fdopen(fd, "wb", closefd=False) as out:
                            shutil.copyfileobj(source, out, 1 << 20)
                    except BaseException:
                        os.close(fd)
                        raise
                    syncer.add(fd, safe.root / name)
            except OSError as exc:  # the stream raises ShardvaultErrors only: this is the target failing
                raise target_error(exc, safe.root / name) from None


def give_to_postgres(target: Path, include_root: bool = False) -> None:
    """Hand what a restore wrote to the `postgres` user (the server runs as it); a no-op unless root."""
    user = _server_user()
    if user is None:
        return
    if include_root:
        os.lchown(target, user.pw_uid, user.pw_gid)
    for root, dirs, files in os.walk(target):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)
    os.chown(target, user.pw_uid, user.pw_gid)


def start(source: PostgresSource, target: Path, port: int, timeout: float = 600.0) -> None:
    """Start the restored cluster on 127.0.0.1:port and wait until recovery is done."""
    argv = [
        pg.tool(source, "pg_ctl"),
        "-D",
        str(target),
        "-l",
        str(target / "startup.log"),
        "-w",
        "-t",
        "300",
        "-o",
        f"-p {port} -c listen_addresses=127.0.0.1 -k {target}",
        "start",
    ]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    # The server never needs the passphrase in its environment: its restore_command names a password
    # file (restore) or copies WAL fetched beforehand (drill).
    env = {k: v for k, v in os.environ.items() if k != "SHARDVAULT_PASSWORD"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SourceError(source.name, f"the restored cluster did not start: {_last_log(target) or result.stderr}")
    # Connections are accepted during recovery (hot standby): wait for the promotion at the target.
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row is not None and not row[0]:
                return
        except psycopg.OperationalError:
            if not (target / "postmaster.pid").exists():
                raise SourceError(source.name, f"the restored cluster stopped: {_last_log(target)}") from None
        time.sleep(0.2)
    raise SourceError(source.name, f"recovery did not finish within {timeout:.0f} s: {_last_log(target)}")


def _last_log(target: Path, lines: int = 3) -> str:
    log = target / "startup.log"
    text = log.read_text(errors="replace").strip().splitlines()[-lines:] if log.exists() else []
    return " | ".join(text)


def restore_logical(repo: Repository, snap: Snapshot, source: PostgresSource, database: str) -> dict[str, Any]:
    with pg.connect(source) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if exists:
            raise RestoreTargetError(f"database {database!r}", "the database already exists; restore into a new name")
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    with ChunkStream(repo, _the_file(repo, snap)) as stream, tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            [
                pg.tool(source, "pg_restore"),
                "--no-owner",
                "--exit-on-error",
                "--dbname",
                make_conninfo(source.dsn, dbname=database),
            ],
            stdin=subprocess.PIPE,
            stderr=errors,
        )
        assert proc.stdin is not None
        try:
            with proc.stdin:
                shutil.copyfileobj(stream, proc.stdin, 1 << 20)
        except BrokenPipeError:
            pass  # pg_restore stopped early; its exit status says why
        code = proc.wait()
        errors.seek(0)
        err = errors.read().decode(errors="replace")
        stream.verify()
    if code != 0:
        lines = err.strip().splitlines()
        raise SourceError(source.name, f"pg_restore failed: {lines[-1] if lines else code}")
    return {"database": database, "bytes": stream.entry.size}
