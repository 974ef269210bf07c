"""Backups of PostgreSQL sources into the repository (see sources/postgres.py for the forms)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from shardvault.config import PostgresSource
from shardvault.errors import SourceError
from shardvault.repository import Repository
from shardvault.repository.snapshot import Snapshot, latest
from shardvault.repository.wal import record_name
from shardvault.sources import postgres as pg

from .run import BackupResult, BackupStats, backup_stream, commit_snapshot

BASE_NAME = "base.tar"
DUMP_NAME = "dump.pgdump"


def backup_postgres(repo: Repository, source: PostgresSource, full: bool) -> BackupResult:
    facts = pg.server_facts(source)  # a wrong DSN or a server that is down fails here, clearly
    if source.mode == "logical":
        return _logical(repo, source, facts)
    if facts["archive_mode"] == "off" or "wal-push" not in facts["archive_command"]:
        raise SourceError(
            source.name,
            "WAL archiving into shardvault is not set up (archive_mode = on and "
            "archive_command = 'shardvault --config ... wal-push %p'): without it, backups cannot be restored",
        )
    parent = latest(repo.snapshots(), source.name, "postgres", kind="full")
    if full or parent is None:
        return _base(repo, source, facts)
    return _wal_checkpoint(repo, source, facts, parent)


def _base(repo: Repository, source: PostgresSource, facts: dict[str, object]) -> BackupResult:
    producer = pg.basebackup(source)
    label = pg.LabelSniffer(producer.stdout)

    def finished() -> dict[str, object]:
        producer.finish()  # raises if pg_basebackup failed: nothing is committed
        # The stop point is at most the current LSN once the backup has returned.
        return {"postgres": facts | {"mode": "physical", "stop_lsn_at_most": pg.current_lsn(source)} | label.facts()}

    try:
        return backup_stream(
            repo, label, source=source.name, source_type="postgres", name=BASE_NAME, kind="full", extra=finished
        )
    finally:
        producer.kill()


def _logical(repo: Repository, source: PostgresSource, facts: dict[str, object]) -> BackupResult:
    producer = pg.dump(source)
    try:
        return backup_stream(
            repo,
            producer.stdout,
            source=source.name,
            source_type="postgres",
            name=DUMP_NAME,
            kind="full",
            extra=lambda: {"postgres": facts | {"mode": "logical"} | _finished(producer)},
        )
    finally:
        producer.kill()


def _finished(producer: pg.Producer) -> dict[str, object]:
    producer.finish()  # raises if pg_dump failed: nothing is committed
    return {}


def _wal_checkpoint(
    repo: Repository, source: PostgresSource, facts: dict[str, object], parent: Snapshot
) -> BackupResult:
    """Incremental: the WAL since the parent is archived continuously; make sure it is current, and mark the point."""
    start_wall, start = datetime.now(UTC), time.perf_counter()
    switched = pg.switch_wal(source)
    if not repo.meta_exists(record_name(source.name, switched["segment"])):
        raise SourceError(
            source.name,
            f"the server archived {switched['segment']}, but it is not in this repository "
            "(is archive_command pointing at another configuration?)",
        )
    return commit_snapshot(
        repo,
        source.name,
        "postgres",
        "wal",
        "incremental",
        parent.id,
        [],
        BackupStats(),
        start,
        start_wall,
        extra={"postgres": facts | {"mode": "physical"} | switched},
    )
