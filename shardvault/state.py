"""Local state: a cache of the repository's metadata and a record of runs.

Everything here can be rebuilt from the peers (invariant 1), so losing the
state directory costs time, never data.  Layout, under
``<state_dir>/<repository id>/``::

    cache/index/<id>, cache/snapshots/<id>   sealed metadata objects, as on the peers
    state.db                                 SQLite: one row per run

Cached objects are immutable on the peers (random names, written once), so a
cached copy is valid for as long as it authenticates; it is verified on every
read like a copy from a peer.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from shardvault.shards.stores import validate_name

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    source TEXT,
    snapshot TEXT,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    details TEXT NOT NULL
);
"""


class State:
    def __init__(self, root: Path, repo_id: str) -> None:
        self.dir = root / repo_id
        self.cache_dir = self.dir / "cache"
        self._db: sqlite3.Connection | None = None

    # -- metadata cache ------------------------------------------------------------

    def cached(self, name: str) -> bytes | None:
        try:
            return (self.cache_dir / validate_name(name)).read_bytes()
        except OSError:
            return None

    def cache(self, name: str, data: bytes) -> None:
        path = self.cache_dir / validate_name(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError:
            pass  # a cache that cannot be written only costs speed

    def forget(self, name: str) -> None:
        try:
            (self.cache_dir / validate_name(name)).unlink()
        except OSError:
            pass

    # -- runs ------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.dir / "state.db", timeout=30)
            self._db.executescript(_SCHEMA)
        return self._db

    def record_run(
        self,
        kind: str,
        status: str,
        started: float,
        *,
        source: str | None = None,
        snapshot: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        try:
            with self._conn() as db:
                db.execute(
                    "INSERT INTO runs (kind, source, snapshot, status, started, finished, details)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (kind, source, snapshot, status, started, time.time(), json.dumps(details or {})),
                )
        except (OSError, sqlite3.Error):
            pass  # the state is a cache; a run is still recorded on the peers

    def runs(self, kind: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT kind, source, snapshot, status, started, finished, details FROM runs"
        args: tuple[Any, ...] = ()
        if kind:
            query += " WHERE kind = ?"
            args = (kind,)
        rows = self._conn().execute(query + " ORDER BY id", args).fetchall()
        keys = ("kind", "source", "snapshot", "status", "started", "finished", "details")
        return [dict(zip(keys, row, strict=True)) | {"details": json.loads(row[6])} for row in rows]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
