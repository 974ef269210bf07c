"""Backups of object-store buckets (see sources/bucket.py for the snapshot's shape)."""

from __future__ import annotations

from shardvault.config import BucketSource
from shardvault.repository import Repository
from shardvault.sources import bucket as b
from shardvault.tree import FILE, Entry, path_key

from .run import BackupResult, BackupRun, ProgressFn


def backup_bucket(
    repo: Repository, source: BucketSource, full: bool, progress: ProgressFn | None = None
) -> BackupResult:
    with BackupRun(repo, progress) as run:
        stats = run.stats
        client = b.client_for(source)
        objects = sorted(b.iter_keys(b.list_objects(source, client), source.prefix), key=lambda ro: path_key(ro[0]))
        parent = run.parent(source.name, "bucket")
        old = {} if full else {e.path: e for e in run.previous_entries(parent)}
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
                and run.all_stored(previous.chunks)
            ):
                entry.chunks, entry.hash, entry.meta = list(previous.chunks), previous.hash, previous.meta
                stats.files_unchanged += 1
            else:
                body, meta = b.open_object(source, client, obj.key)
                entry.hash = run.pipe.submit_stream(run.chunker.chunks(body), entry.chunks)
                entry.meta = {"etag": obj.etag} | meta
                stats.files_read += 1
            run.pipe.submit_entry(entry)
            if progress:
                progress(stats, rel)
        deleted = len(old.keys() - {rel for rel, _ in objects}) if old else 0
        return run.commit(
            source=source.name,
            source_type="bucket",
            path=f"s3://{source.bucket}/{source.prefix}",
            kind="incremental" if parent is not None and not full else "full",
            parent=parent.id if parent else None,
            extra={"bucket": {"objects": len(objects), "deleted_since_parent": deleted}},
        )
