"""Object-store sources: an S3-compatible bucket (AWS, MinIO, SeaweedFS), under an optional prefix.

A snapshot is the bucket's complete listing at backup time: one tree entry
per object (key relative to the prefix, size, last-modified, ETag, content
type, user metadata) naming the chunks of its content.  An object absent
from a snapshot did not exist then, so deletions need no record of their
own, and restoring a snapshot reproduces exactly that state.  Incremental
backups re-read only objects whose ETag, size or last-modified changed since
the parent snapshot, as restic does with size, mtime and inode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from shardvault.config import BucketSource
from shardvault.errors import SourceError
from shardvault.shards.stores.s3 import make_client


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    mtime_ns: int


def client_for(source: BucketSource, endpoint: str | None = None) -> Any:
    return make_client(endpoint or source.endpoint, source.region, source.profile)


def describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '')} {error.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


def list_objects(
    source: BucketSource, client: Any, bucket: str | None = None, prefix: str | None = None
) -> list[ObjectInfo]:
    bucket = bucket or source.bucket
    prefix = source.prefix if prefix is None else prefix
    objects: list[ObjectInfo] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                mtime = item["LastModified"]
                objects.append(
                    ObjectInfo(
                        item["Key"], int(item["Size"]), str(item["ETag"]).strip('"'), int(mtime.timestamp() * 1e9)
                    )
                )
    except (ClientError, BotoCoreError) as exc:
        raise SourceError(source.name, f"cannot list s3://{bucket}/{prefix}: {describe(exc)}") from None
    return objects


class BodyReader:
    """An object's body as something the chunker can ``readinto``."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readinto(self, buffer: memoryview) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def open_object(source: BucketSource, client: Any, key: str) -> tuple[BodyReader, dict[str, Any]]:
    """The object's content stream and what a restore must give back: content type and user metadata."""
    try:
        response = client.get_object(Bucket=source.bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        raise SourceError(source.name, f"cannot read s3://{source.bucket}/{key}: {describe(exc)}") from None
    meta = {"content_type": response.get("ContentType", ""), "metadata": response.get("Metadata", {})}
    return BodyReader(response["Body"]), meta


def iter_keys(objects: list[ObjectInfo], prefix: str) -> Iterator[tuple[str, ObjectInfo]]:
    """(path relative to the prefix, object); folder markers (keys ending in '/') carry no data and are skipped."""
    for obj in objects:
        rel = obj.key[len(prefix) :]
        if rel and not rel.endswith("/"):
            yield rel, obj
