"""Restores of bucket snapshots into a bucket (the same or another, on any S3 server).

Every object of the snapshot is uploaded with its content type and user
metadata (multipart for large ones, by boto3's transfer manager) and its
content hash checked as it streams.  With ``delete``, objects under the
target prefix that the snapshot does not have are removed, so the bucket
ends up exactly as it was (as ``aws s3 sync --delete`` or ``rclone sync``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from shardvault.config import BucketSource
from shardvault.errors import SourceError
from shardvault.repository import Repository
from shardvault.repository.snapshot import Snapshot
from shardvault.restore.streams import ChunkStream
from shardvault.sources import bucket as b


@dataclass
class BucketRestoreStats:
    bucket: str
    prefix: str
    objects: int = 0
    bytes: int = 0
    deleted: list[str] = field(default_factory=list)


def restore_to_bucket(
    repo: Repository,
    snap: Snapshot,
    source: BucketSource,
    bucket: str,
    prefix: str = "",
    endpoint: str | None = None,
    delete: bool = False,
) -> BucketRestoreStats:
    client = b.client_for(source, endpoint)
    stats = BucketRestoreStats(bucket, prefix)
    try:
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError:
            client.create_bucket(Bucket=bucket)
        keep: set[str] = set()
        for entry in repo.iter_tree(snap):
            key = prefix + entry.path
            keep.add(key)
            meta: dict[str, Any] = entry.meta or {}
            extra: dict[str, Any] = {"Metadata": meta.get("metadata", {})}
            if meta.get("content_type"):
                extra["ContentType"] = meta["content_type"]
            with ChunkStream(repo, entry) as stream:
                client.upload_fileobj(stream, bucket, key, ExtraArgs=extra)
                stream.verify()
            stats.objects += 1
            stats.bytes += entry.size
        if delete:
            for obj in b.list_objects(source, client, bucket, prefix):
                if obj.key not in keep:
                    client.delete_object(Bucket=bucket, Key=obj.key)
                    stats.deleted.append(obj.key)
    except (ClientError, BotoCoreError) as exc:
        raise SourceError(source.name, f"restore into s3://{bucket}/{prefix} failed: {b.describe(exc)}") from None
    return stats
