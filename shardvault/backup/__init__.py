"""Backups: one run skeleton (:mod:`.run`) and a module per source kind.

:mod:`.files` (directory trees), :mod:`.postgres` (base backups, logical
dumps, WAL points), :mod:`.bucket` (S3/MinIO buckets), :mod:`.wal`
(``wal-push``).  Backup sits above the repository and the sources; restore
and verify never import it.
"""

from .files import run_backup
from .run import BackupResult, BackupStats

__all__ = ["BackupResult", "BackupStats", "run_backup"]
