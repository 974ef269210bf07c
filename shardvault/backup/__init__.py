"""Backups: one run skeleton (:mod:`.run`) and a module per source kind.

:mod:`.files` (directory trees), :mod:`.postgres` (base backups, logical
dumps, WAL points), :mod:`.bucket` (S3/MinIO buckets), :mod:`.wal`
(``wal-push``).  Backup sits above the repository and the sources; restore
and verify never import it.
"""

from shardvault.config import BucketSource, FilesSource, PostgresSource, SourceConfig
from shardvault.repository import Repository

from .files import run_backup
from .run import BackupResult, BackupStats, ProgressFn

__all__ = ["BackupResult", "BackupStats", "backup_source", "run_backup"]


def backup_source(
    repo: Repository, source: SourceConfig, full: bool = False, progress: ProgressFn | None = None
) -> BackupResult:
    """Back up any configured source: the one place that dispatches on its kind."""
    if isinstance(source, FilesSource):
        return run_backup(repo, source, full=full, progress=progress)
    if isinstance(source, PostgresSource):
        from .postgres import backup_postgres  # psycopg and the PostgreSQL tools only when needed

        return backup_postgres(repo, source, full)
    if isinstance(source, BucketSource):
        from .bucket import backup_bucket  # boto3 only when needed

        return backup_bucket(repo, source, full, progress=progress)
    raise TypeError(f"no backup for source kind {source.type}")  # the config reader knows every kind
