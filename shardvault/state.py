"""Local state: a cache of the repository's metadata and a record of runs.

Everything here can be rebuilt from the peers (invariant 1), so losing the
state directory costs time, never data.  Layout, under
``<state_dir>/<repository id>/``::

    cache/index/<id>, cache/snapshots/<id>   sealed metadata objects, as on the peers
    state.db                                 SQLite: runs and verification results

The database holds what every report reads: one row per run (backup, check,
scrub, repair, drill), the last verification result of every shard (when
it was last read, and what was found), per-peer counters, and the last
known state of every pack and peer.  Metrics, alerts and the CLI all read
these rows.  ``shardvault state rebuild`` refills it from the repository.

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
CREATE TABLE IF NOT EXISTS shards (
    pack TEXT NOT NULL,
    num INTEGER NOT NULL,
    peer TEXT NOT NULL,
    last_read REAL,             -- when its bytes were last read and verified (NULL: never)
    status TEXT NOT NULL,       -- ok | present | missing | corrupt | unreachable
    detail TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (pack, num, peer)
);
CREATE TABLE IF NOT EXISTS counters (
    peer TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (peer, name)
);
CREATE TABLE IF NOT EXISTS packs (
    pack TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    good INTEGER NOT NULL,
    k INTEGER NOT NULL,
    n INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS peers (
    peer TEXT PRIMARY KEY,
    up INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    shards INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS observed (
    key TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS facts (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL
);
"""

ShardKey = tuple[str, int, str]  # (pack id, shard number, peer)
PROBLEMS = ("missing", "corrupt", "unreachable")


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
        finished: float | None = None,
    ) -> None:
        try:
            with self._conn() as db:
                db.execute(
                    "INSERT INTO runs (kind, source, snapshot, status, started, finished, details)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (kind, source, snapshot, status, started, finished or time.time(), json.dumps(details or {})),
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

    # -- verification results ------------------------------------------------------------

    def record_shards(self, results: list[tuple[ShardKey, str, str, bool]], now: float | None = None) -> None:
        """Store (key, status, detail, was_read) results and count them per peer.

        A shard that was read gets ``last_read = now``; a presence result keeps
        the shard's last read time, so coverage counts only real reads.
        """
        now = time.time() if now is None else now
        counts: dict[tuple[str, str], float] = {}
        for (_, _, peer), status, _, was_read in results:
            names = ["shards_checked"] + ([f"shards_{status}"] if status in PROBLEMS else [])
            for name in names:
                counts[(peer, name)] = counts.get((peer, name), 0) + 1
            if was_read:
                counts[(peer, "shards_read")] = counts.get((peer, "shards_read"), 0) + 1
        with self._conn() as db:
            db.executemany(
                "INSERT INTO shards (pack, num, peer, last_read, status, detail, updated) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (pack, num, peer) DO UPDATE SET status = excluded.status, detail = excluded.detail,"
                " updated = excluded.updated, last_read = COALESCE(excluded.last_read, shards.last_read)",
                [(*key, now if was_read else None, status, detail, now) for key, status, detail, was_read in results],
            )
            self._add_counters(db, counts)

    def add_counters(self, counts: dict[tuple[str, str], float]) -> None:
        with self._conn() as db:
            self._add_counters(db, counts)

    @staticmethod
    def _add_counters(db: sqlite3.Connection, counts: dict[tuple[str, str], float]) -> None:
        db.executemany(
            "INSERT INTO counters (peer, name, value) VALUES (?, ?, ?)"
            " ON CONFLICT (peer, name) DO UPDATE SET value = counters.value + excluded.value",
            [(peer, name, value) for (peer, name), value in counts.items()],
        )

    def shard_rows(self) -> dict[ShardKey, tuple[float | None, str, str]]:
        """(pack, num, peer) -> (last read, status, detail)."""
        rows = self._conn().execute("SELECT pack, num, peer, last_read, status, detail FROM shards")
        return {(r[0], r[1], r[2]): (r[3], r[4], r[5]) for r in rows}

    def forget_shards(self, keys: list[ShardKey]) -> None:
        with self._conn() as db:
            db.executemany("DELETE FROM shards WHERE pack = ? AND num = ? AND peer = ?", keys)

    def record_packs(self, states: dict[str, tuple[str, int, int, int]], now: float | None = None) -> None:
        """Replace the pack table: pack id -> (state, good, k, n)."""
        now = time.time() if now is None else now
        with self._conn() as db:
            db.execute("DELETE FROM packs")
            db.executemany(
                "INSERT INTO packs (pack, state, good, k, n, updated) VALUES (?, ?, ?, ?, ?, ?)",
                [(pack, *row, now) for pack, row in states.items()],
            )

    def record_peers(self, peers: dict[str, tuple[bool, str, int, int]], now: float | None = None) -> None:
        """peer -> (up, error, shards held, bytes held)."""
        now = time.time() if now is None else now
        with self._conn() as db:
            db.executemany(
                "INSERT OR REPLACE INTO peers (peer, up, error, shards, bytes, updated) VALUES (?, ?, ?, ?, ?, ?)",
                [(peer, int(up), error, shards, size, now) for peer, (up, error, shards, size) in peers.items()],
            )

    def set_fact(self, name: str, value: float) -> None:
        with self._conn() as db:
            db.execute("INSERT OR REPLACE INTO facts (name, value) VALUES (?, ?)", (name, value))

    def observe(self, key: str, version: int, now: float) -> float:
        """When this host first saw ``key`` at ``version`` (now, if it is news), by its own clock only.

        Prune judges other hosts' sessions (a heartbeat unchanged for too long)
        and condemned sets' grace this way, never by another host's clock.
        """
        with self._conn() as db:
            row = db.execute("SELECT version, first_seen FROM observed WHERE key = ?", (key,)).fetchone()
            if row is not None and int(row[0]) == version:
                return float(row[1])
            db.execute(
                "INSERT OR REPLACE INTO observed (key, version, first_seen) VALUES (?, ?, ?)", (key, version, now)
            )
            return now

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read-only access for reports and metrics."""
        return self._conn().execute(sql, args).fetchall()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
