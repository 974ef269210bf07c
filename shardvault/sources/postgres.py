"""PostgreSQL sources: base backups, WAL archiving and logical dumps.

* **physical, full**: ``pg_basebackup -Ft -D - -X none`` streams the cluster
  as one tar through the ordinary chunker (so unchanged relation files
  deduplicate between full backups); the start LSN, WAL file and timeline
  from its backup_label (sent first in the tar) are kept in the snapshot.  ``-X none`` is safe
  because the server waits for the WAL it needs to be archived, which
  ``wal-push`` does.
* **physical, incremental**: the WAL is already continuous, so an
  incremental backup forces a WAL switch, waits until that segment is in the
  archive, and records the snapshot (its LSN bounds what a restore of it
  replays).
* **WAL**: ``shardvault wal-push %p`` (archive_command) stores each segment
  like a file, then its record ``wal/<source>/<segment>`` — the commit.
  Pushing the same content again succeeds; different content is refused,
  as pgBackRest does.  ``wal-fetch %f %p`` (restore_command) reads it back.
* **logical**: ``pg_dump -Fc -Z0`` (uncompressed, so dumps of a mostly
  unchanged database deduplicate), restored with ``pg_restore``.
"""

from __future__ import annotations

import glob
import io
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

from shardvault.config import PostgresSource
from shardvault.errors import SourceError


def tool(source: PostgresSource, name: str) -> str:
    """Path of a PostgreSQL client program: bin_dir, else the newest Debian install, else PATH."""
    candidates = [os.path.join(source.bin_dir, name)] if source.bin_dir else []
    candidates += sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key, reverse=True)
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found:
        return found
    raise SourceError(source.name, f"{name} not found (install PostgreSQL's client programs or set bin_dir)")


def _version_key(path: str) -> int:
    match = re.search(r"/postgresql/(\d+)/", path)
    return int(match.group(1)) if match else 0


def safe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    return re.sub(r"password\s*=\s*\S+", "password=***", dsn)


@contextmanager
def connect(source: PostgresSource, **params: Any) -> Iterator[psycopg.Connection[Any]]:
    import psycopg  # here, not at the top: wal-push and wal-fetch run once per WAL file and never connect

    try:
        # An explicit client encoding: a SQL_ASCII cluster would otherwise give bytes, not text.
        conn = psycopg.connect(source.dsn, connect_timeout=10, autocommit=True, client_encoding="utf8", **params)
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(source.name, f"cannot connect to PostgreSQL ({safe_dsn(source.dsn)}): {first}") from None
    try:
        yield conn
    finally:
        conn.close()


def server_facts(source: PostgresSource) -> dict[str, Any]:
    with connect(source) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version_num')::int, (pg_control_system()).system_identifier::text,"
            " current_setting('archive_mode'), current_setting('archive_command'), current_database()"
        ).fetchone()
    assert row is not None
    return {
        "server_version_num": row[0],
        "system_identifier": row[1],
        "archive_mode": row[2],
        "archive_command": row[3],
        "database": row[4],
    }


class Producer:
    """A child process whose stdout is the stream to back up; stderr is kept for facts and errors."""

    def __init__(self, source: PostgresSource, argv: list[str]) -> None:
        self.source = source
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    @property
    def stdout(self) -> io.BufferedReader:
        assert isinstance(self.proc.stdout, io.BufferedReader)  # Popen's default: a buffered pipe
        return self.proc.stdout

    def finish(self) -> str:
        """Wait for the program; raise SourceError with its last message if it failed."""
        code = self.proc.wait()
        self._reader.join()
        text = b"".join(self.stderr).decode(errors="replace")
        if code != 0:
            lines = [line for line in text.splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit status {code}"
            raise SourceError(self.source.name, f"{os.path.basename(self.argv[0])} failed: {last}")
        return text

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def basebackup(source: PostgresSource) -> Producer:
    return Producer(
        source,
        [
            tool(source, "pg_basebackup"),
            "--dbname",
            source.dsn,
            "--pgdata=-",
            "--format=tar",
            "--wal-method=none",
            "--checkpoint=fast",
            "--no-manifest",
            "--label=shardvault",
        ],
    )


class LabelSniffer:
    """Passes a base backup's tar through, noting its backup_label (sent first) on the way."""

    _START = re.compile(rb"START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+) \(file ([0-9A-F]{24})\)")
    _TIMELINE = re.compile(rb"START TIMELINE: (\d+)")
    _KEEP = 1 << 20

    def __init__(self, stream: io.BufferedReader) -> None:
        self.stream = stream
        self.head = bytearray()

    def readinto(self, buffer: memoryview) -> int:
        # Straight into the chunker's window: the base backup is not copied once more.
        n = self.stream.readinto(buffer) or 0
        if len(self.head) < self._KEEP:
            self.head += buffer[: min(n, self._KEEP - len(self.head))]
        return n

    def facts(self) -> dict[str, Any]:
        start, timeline = self._START.search(self.head), self._TIMELINE.search(self.head)
        if start is None:
            return {}
        facts: dict[str, Any] = {"start_lsn": start.group(1).decode(), "start_wal_file": start.group(2).decode()}
        if timeline:
            facts["timeline"] = int(timeline.group(1))
        return facts


def current_lsn(source: PostgresSource) -> str:
    with connect(source) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    return str(row[0]) if row else ""


def dump(source: PostgresSource) -> Producer:
    return Producer(source, [tool(source, "pg_dump"), "--format=custom", "--compress=0", "--dbname", source.dsn])


def switch_wal(source: PostgresSource, timeout: float = 120.0) -> dict[str, Any]:
    """Force a WAL switch and wait until the server reports the segment archived."""
    with connect(source) as conn:
        # The insert position before the switch: every commit so far ends at or before it, and
        # the switch record itself starts there, so recovery can reach it from archived WAL alone.
        before = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        assert row is not None and before is not None
        segment, lsn = row[0], before[0]
        deadline = time.monotonic() + timeout
        while True:
            archived = conn.execute("SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver").fetchone()
            assert archived is not None
            if archived[0] is not None and archived[0] >= segment:
                break
            if time.monotonic() > deadline:
                failed = f" (last failure: {archived[1]})" if archived[1] else ""
                raise SourceError(source.name, f"WAL segment {segment} not archived after {timeout:.0f} s{failed}")
            time.sleep(0.2)
        timeline = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
    return {"segment": segment, "lsn": lsn, "timeline": timeline[0] if timeline else None}
