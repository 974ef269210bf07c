"""The WAL archive as the repository holds it: one record per WAL file.

A record ``wal/<source>/<file name, lower case>`` names the file's chunks,
size and BLAKE3 hash; writing it is the commit of a ``wal-push``
(:mod:`shardvault.backup.wal`), and ``wal-fetch`` (:mod:`shardvault.restore.wal`)
reads it back.  Body (inside the sealed metadata envelope)::

    {"version": 1, "name": "000000010000000000000003", "size": bytes,
     "hash": hex, "chunks": [chunk id hex, ...], "pushed": iso8601}
"""

from __future__ import annotations

from shardvault.config import PostgresSource
from shardvault.walnames import gaps

from .core import Repository

WAL_VERSION = 1


def record_name(source: str, wal_file: str) -> str:
    return f"wal/{source}/{wal_file.lower()}"


def archived(repo: Repository, source: PostgresSource) -> list[str]:
    """Names of the archived WAL files (upper case, as PostgreSQL names them), sorted."""
    prefix = f"wal/{source.name}/"
    return sorted(postgres_name(n[len(prefix) :]) for n in repo.list_meta(prefix))


def postgres_name(lower: str) -> str:
    """Object names are lower case; PostgreSQL's hex parts are upper case (suffixes stay lower)."""
    parts = lower.split(".")
    parts[0] = parts[0].upper()
    if len(parts) == 3:  # <segment>.<offset>.backup
        parts[1] = parts[1].upper()
    return ".".join(parts)


def wal_gaps(repo: Repository, source: PostgresSource) -> list[str]:
    return gaps(archived(repo, source))
