"""S3-compatible peer (AWS S3, MinIO, SeaweedFS, Ceph RGW) through boto3.

A peer is ``s3://bucket/prefix`` plus an optional ``endpoint``; credentials
come from the usual AWS variables or profile.  Path-style addressing works
with every server we target.  PUT is atomic in S3, so ``store`` needs no
temporary object.  Transport failures map to PeerUnavailableError, a denied
write to PeerReadOnlyError and an unparsable answer to PeerProtocolError, so
callers handle every peer type alike.

Every request is bounded: ``connect_timeout`` to get a connection,
``read_timeout`` without a byte of answer, ``max_attempts`` tries in all
(botocore's standard retry mode), so a peer that accepts connections and
never answers costs at most about ``max_attempts * (connect + read)``
seconds, once per run (the peer set marks it down and does not ask again).

Deletion refused: an AccessDenied answer to a delete (credentials whose
policy lacks ``s3:DeleteObject``) raises PeerRefusesDeletionError, not
PeerReadOnlyError, so prune keeps the object for a later run instead of
taking the peer for broken.

S3 Object Lock (``object_lock = "governance"|"compliance"``,
``object_lock_days = N``): ``create`` makes the bucket with object lock
enabled (and refuses an existing bucket without it, ObjectLockNotEnabledError);
every ``store`` sends ``ObjectLockMode`` and ``ObjectLockRetainUntilDate =
now + N days`` with a Content-MD5 (S3 requires one on such puts), except for
names under :data:`~.base.UNRETAINED_PREFIXES` (session heartbeats).  On such
a bucket (always versioned) a plain DELETE only adds a delete marker: the
object is hidden, its bytes stay and keep costing.  ``delete`` therefore
removes the key's versions by version id, older ones first and the current
one last, so a refusal (retention still running: AccessDenied) leaves the
object readable as it was, and raises PeerRefusesDeletionError naming the
object and its retain-until date.  ``retention(name)`` reads the date back
(HEAD; GetObjectRetention is not needed) and ``extend_retention(name,
until)`` moves it later (PutObjectRetention on the current version), which
``repair`` does for everything still in use (:mod:`shardvault.verify.locks`).

Leftovers: ``put_object`` is atomic and single-part, so a killed write leaves
nothing; only ``create``'s ``.probe`` object can be left by a killed ``init``.
``list_leftovers`` yields the hidden temporaries under the prefix.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.parsers import ResponseParserError

from shardvault.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_ATTEMPTS, DEFAULT_READ_TIMEOUT, ObjectLockMode
from shardvault.errors import (
    ObjectLockNotEnabledError,
    ObjectNotFoundError,
    PeerError,
    PeerProtocolError,
    PeerReadOnlyError,
    PeerRefusesDeletionError,
    PeerUnavailableError,
)

from .base import (
    UNRETAINED_PREFIXES,
    ItemInfo,
    PeerStore,
    is_leftover_name,
    validate_leftover_name,
    validate_name,
    validate_prefix,
)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def make_client(
    endpoint: str | None,
    region: str | None,
    profile: str | None,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Any:
    """A boto3 S3 client that works with AWS, MinIO, SeaweedFS and Ceph (path-style addressing).

    ``max_attempts`` counts every try, the first included.
    """
    session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region or "us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=32,
        ),
    )


class S3Store(PeerStore):
    """A peer kept under a prefix of an S3 bucket."""

    def __init__(
        self,
        peer: str,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        client: Any = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        object_lock: ObjectLockMode | None = None,
        object_lock_days: int = 0,
    ) -> None:
        super().__init__(peer)
        if object_lock is not None and object_lock_days < 1:
            raise ValueError(f"object_lock_days must be at least 1 with object_lock, got {object_lock_days}")
        self.object_lock = object_lock
        self.object_lock_days = object_lock_days
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.client = (
            client
            if client is not None
            else make_client(
                endpoint,
                region,
                profile,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_attempts=max_attempts,
            )
        )

    def _where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint}" if self.endpoint else "")

    def _raise(self, exc: Exception, name: str, writing: bool = False, deleting: bool = False) -> NoReturn:
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if deleting and code in _DENIED:
                raise PeerRefusesDeletionError(
                    self.peer,
                    "access denied",
                    f"{name} kept: the server answered {code} at {self._where()} "
                    "(credentials without s3:DeleteObject, or a lock)",
                ) from exc
            if code in _NOT_FOUND:
                raise ObjectNotFoundError(self.peer, name) from exc
            if code == "NoSuchBucket":
                raise PeerUnavailableError(
                    self.peer, f"bucket {self.bucket!r} does not exist at {self._where()}"
                ) from exc
            if code in _DENIED:
                if writing:
                    raise PeerReadOnlyError(self.peer, f"write of {name} denied ({code}) at {self._where()}") from exc
                raise PeerUnavailableError(self.peer, f"access denied ({code}) at {self._where()}") from exc
            raise PeerError(self.peer, f"{name}: {code or exc}") from exc
        if isinstance(exc, NoCredentialsError):
            raise PeerUnavailableError(
                self.peer, "no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
            ) from exc
        if isinstance(exc, ResponseParserError):
            raise PeerProtocolError(self.peer, f"unparsable answer from {self._where()}") from exc
        if isinstance(exc, ConnectTimeoutError):
            raise PeerUnavailableError(
                self.peer, f"no connection to {self._where()} within {self.connect_timeout:g}s"
            ) from exc
        if isinstance(exc, ReadTimeoutError):
            raise PeerUnavailableError(
                self.peer, f"no answer from {self._where()} within {self.read_timeout:g}s"
            ) from exc
        if isinstance(exc, EndpointConnectionError):
            raise PeerUnavailableError(self.peer, f"cannot connect to {self._where()}") from exc
        if isinstance(exc, BotoCoreError):
            raise PeerUnavailableError(self.peer, f"{type(exc).__name__} at {self._where()}: {exc}") from exc
        raise exc

    def create(self) -> None:
        created = False
        try:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in {"404", "NoSuchBucket", "NotFound"}:
                    raise
                if self.object_lock is not None:
                    # Object lock is best switched on when the bucket is made (it turns versioning on, for good).
                    self.client.create_bucket(Bucket=self.bucket, ObjectLockEnabledForBucket=True)
                else:
                    self.client.create_bucket(Bucket=self.bucket)
                created = True
        except Exception as exc:  # noqa: BLE001 - mapped to peer errors
            self._raise(exc, "", writing=True)
        if self.object_lock is not None and not created and not self.lock_enabled():
            raise ObjectLockNotEnabledError(self.peer, self.bucket, self.object_lock.value)
        probe = ".probe"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + probe, Body=b"")
            if self.object_lock is not None:
                self._delete_versions(self.prefix + probe, probe)
            else:
                self.client.delete_object(Bucket=self.bucket, Key=self.prefix + probe)
        except PeerError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, probe, writing=True)

    def lock_enabled(self) -> bool:
        """Whether the bucket has S3 Object Lock enabled."""
        try:
            answer = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) == "ObjectLockConfigurationNotFoundError":
                return False
            self._raise(exc, "")
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, "")
        return bool(answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    def probe(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in {"404", "NoSuchBucket", "NotFound"}:
                raise PeerUnavailableError(
                    self.peer, f"bucket {self.bucket!r} does not exist at {self._where()}"
                ) from exc
            self._raise(exc, "")
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, "")

    def load(self, name: str) -> bytes:
        key = self.prefix + validate_name(name)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            return bytes(response["Body"].read())
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, name)

    def store(self, name: str, data: bytes | memoryview) -> None:
        key = self.prefix + validate_name(name)
        body = bytes(data)
        lock: dict[str, Any] = {}
        if self.object_lock is not None and not name.startswith(UNRETAINED_PREFIXES):
            lock = {
                "ObjectLockMode": self.object_lock.value.upper(),
                "ObjectLockRetainUntilDate": datetime.now(UTC) + timedelta(days=self.object_lock_days),
                "ContentMD5": base64.b64encode(hashlib.md5(body).digest()).decode(),  # S3 asks for one
            }
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **lock)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if lock and str(error.get("Code")) == "InvalidRequest" and "lock" in str(error.get("Message", "")).lower():
                raise ObjectLockNotEnabledError(self.peer, self.bucket, self.object_lock) from exc
            self._raise(exc, name, writing=True)
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, name, writing=True)

    def delete(self, name: str) -> None:
        self.info(name)  # S3 deletes of absent keys succeed silently; the interface says otherwise
        key = self.prefix + validate_name(name)
        if self.object_lock is not None:
            self._delete_versions(key, name)
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, name, deleting=True)

    def _delete_versions(self, key: str, name: str) -> None:
        """Delete every version of ``key`` (and its delete markers): older ones first, the current one last.

        A refused version stops the walk before the current one is touched, so
        a refusal always leaves the object readable with the bytes it had.
        """
        older: list[str] = []
        current: list[str] = []
        try:
            paginator = self.client.get_paginator("list_object_versions")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key):
                for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                    if item.get("Key") == key:
                        (current if item.get("IsLatest") else older).append(str(item["VersionId"]))
        except PeerError:
            raise
        except (KeyError, TypeError, AttributeError) as exc:
            raise PeerProtocolError(self.peer, f"malformed version listing from {self._where()}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, name)
        for version in older + current:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key, VersionId=version)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in _DENIED:
                    why = self._retained(key, name, version)
                    raise PeerRefusesDeletionError(self.peer, "object lock", why) from exc
                self._raise(exc, name, deleting=True)
            except Exception as exc:  # noqa: BLE001
                self._raise(exc, name, deleting=True)

    def _retained(self, key: str, name: str, version: str) -> str:
        """Why one version of ``key`` may not be deleted yet, for the refusal's message."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key, VersionId=version)
        except Exception:  # noqa: BLE001 - only the message is at stake
            return f"{name} kept: the server refused to delete version {version}"
        until = head.get("ObjectLockRetainUntilDate")
        if head.get("ObjectLockLegalHold") == "ON" or head.get("ObjectLockLegalHoldStatus") == "ON":
            return f"{name} kept: version {version} is under a legal hold"
        if isinstance(until, datetime):
            mode = str(head.get("ObjectLockMode", "")).lower()
            return f"{name} is retained until {until.astimezone(UTC).isoformat(timespec='seconds')} ({mode} mode)"
        return f"{name} kept: the server refused to delete version {version}"

    def retention(self, name: str) -> datetime | None:
        key = self.prefix + validate_name(name)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, name)
        until = head.get("ObjectLockRetainUntilDate")
        if not head.get("ObjectLockMode") or not isinstance(until, datetime):
            return None
        return until if until.tzinfo else until.replace(tzinfo=UTC)

    def extend_retention(self, name: str, until: datetime) -> None:
        key = self.prefix + validate_name(name)
        if self.object_lock is None:
            return super().extend_retention(name, until)  # raises: nothing to extend
        retention = {"Mode": self.object_lock.value.upper(), "RetainUntilDate": until}
        try:
            self.client.put_object_retention(Bucket=self.bucket, Key=key, Retention=retention)
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, name, writing=True)

    def _listing(self, prefix: str) -> Iterator[ItemInfo]:
        """Every key under the store's prefix + ``prefix``, as names relative to the store."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                if not isinstance(page, dict):
                    raise PeerProtocolError(self.peer, f"unparsable listing from {self._where()}")
                for item in page.get("Contents", []):
                    yield ItemInfo(str(item["Key"])[len(self.prefix) :], int(item["Size"]))
        except PeerError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PeerProtocolError(self.peer, f"malformed listing from {self._where()}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, prefix)

    def list(self, prefix: str = "") -> Iterator[ItemInfo]:
        validate_prefix(prefix)
        for item in self._listing(prefix):
            if item.name and not item.name.startswith(".") and "/." not in item.name:
                yield item

    def info(self, name: str) -> ItemInfo:
        key = self.prefix + validate_name(name)
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, name)
        return ItemInfo(name, int(response["ContentLength"]))

    def list_leftovers(self) -> Iterator[ItemInfo]:
        return (item for item in self._listing("") if is_leftover_name(item.name))

    def delete_leftover(self, name: str) -> None:
        key = self.prefix + validate_leftover_name(name)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)  # S3 deletes of absent keys succeed silently
            if self.object_lock is not None:
                self._delete_versions(key, name)
            else:
                self.client.delete_object(Bucket=self.bucket, Key=key)
        except PeerError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, name, deleting=True)

    def close(self) -> None:
        self.client.close()
