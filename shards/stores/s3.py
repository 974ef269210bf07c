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

Leftovers: ``put_object`` is atomic and single-part, so a killed write leaves
nothing; only ``create``'s ``.probe`` object can be left by a killed ``init``.
``list_leftovers`` yields the hidden temporaries under the prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
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

from shardvault.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_ATTEMPTS, DEFAULT_READ_TIMEOUT
from shardvault.errors import (
    ObjectNotFoundError,
    PeerError,
    PeerProtocolError,
    PeerReadOnlyError,
    PeerUnavailableError,
)

from .base import ItemInfo, PeerStore, is_leftover_name, validate_leftover_name, validate_name, validate_prefix

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
    ) -> None:
        super().__init__(peer)
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

    def _raise(self, exc: Exception, name: str, writing: bool = False) -> NoReturn:
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
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
        try:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in {"404", "NoSuchBucket", "NotFound"}:
                    raise
                self.client.create_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - mapped to peer errors
            self._raise(exc, "", writing=True)
        probe = ".probe"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + probe, Body=b"")
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + probe)
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, probe, writing=True)

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
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, name, writing=True)

    def delete(self, name: str) -> None:
        self.info(name)  # S3 deletes of absent keys succeed silently; the interface says otherwise
        key = self.prefix + validate_name(name)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
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
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, name, writing=True)

    def close(self) -> None:
        self.client.close()
