"""Backups of object-store buckets (see sources/bucket.py for the snapshot's shape)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from shardvault.backup import (
    BackupResult,
    BackupStats,
    ProgressFn,
    _Pipeline,
    _store_tree,
    commit_snapshot,
)
from shardvault.chunker import Chunker
from shardvault.config import SourceConfig
from shardvault.repository import Repository
from shardvault.snapshot import latest
from shardvault.sources import bucket as b
from shardvault.tree import FILE, Entry, path_key


def backup_bucket(
    repo: Repository, source: SourceConfig, full: bool, progress: ProgressFn | None = None
) -> BackupResult:
    start_wall, start = datetime.now(UTC), time.perf_counter()
    repo.require_quorum()
    client = b.client_for(source)
    objects = sorted(b.iter_keys(b.list_objects(source, client), source.prefix), key=lambda ro: path_key(ro[0]))
    parent = latest(repo.snapshots(), source.name, "bucket")
    old = {} if full or parent is None else {e.path: e for e in repo.iter_tree(parent)}
    rc = repo.config.repository
    chunker = Chunker(rc.chunk_min, rc.chunk_avg, rc.chunk_max)
    stats = BackupStats()
    pipe = _Pipeline(repo, stats)
    spool = pipe.tree_spool()
    try:
        for rel, obj in objects:
            entry = Entry(rel, FILE, 0o644, 0, 0, obj.mtime_ns, size=obj.size)
            stats.files += 1
            stats.bytes_total += obj.size
            previous = old.get(rel)
            if (
                previous is not None
                and previous.meta is not None
                and previous.meta.get("etag") == obj.etag
                and (previous.size, previous.mtime_ns) == (obj.size, obj.mtime_ns)
                and all(bytes.fromhex(c) in repo.index.blobs for c in previous.chunks)
            ):
                entry.chunks, entry.hash, entry.meta = list(previous.chunks), previous.hash, previous.meta
                stats.files_unchanged += 1
            else:
                body, meta = b.open_object(source, client, obj.key)
                entry.hash = pipe.submit_stream(chunker.chunks(body), entry.chunks)
                entry.meta = {"etag": obj.etag} | meta
                stats.files_read += 1
            pipe.submit_entry(entry)
            if progress:
                progress(stats, rel)
        pipe.drain(0)
        tree_ids = _store_tree(pipe, chunker, spool)
    finally:
        pipe.close()
        spool.close()
    deleted = len(old.keys() - {rel for rel, _ in objects}) if old else 0
    return commit_snapshot(
        repo,
        source.name,
        "bucket",
        f"s3://{source.bucket}/{source.prefix}",
        "incremental" if parent is not None and not full else "full",
        parent.id if parent else None,
        tree_ids,
        stats,
        start,
        start_wall,
        progress,
        extra={"bucket": {"objects": len(objects), "deleted_since_parent": deleted}},
    )
