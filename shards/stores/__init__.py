"""Peer stores: one module per peer type behind :class:`PeerStore`.

:func:`open_store` turns a peer's URL into a store: ``file:///path`` (or a
plain path) for a local directory, ``s3://bucket/prefix`` for S3-compatible
servers.  :func:`open_peer_store` does the same for a configured peer,
passing on every per-peer setting (endpoint, timeouts, S3 Object Lock) and
wrapping an ``append_only`` peer in :class:`~.immutable.AppendOnlyStore`.  URLs are
percent-decoded here as in :mod:`shardvault.config`, which canonicalised
them, so the store works on exactly the place the aliasing check compared.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from shardvault.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_READ_TIMEOUT,
    ObjectLockMode,
    PeerConfig,
)
from shardvault.errors import ConfigError

from .base import ItemInfo, PeerStore, is_leftover_name, validate_leftover_name, validate_name
from .immutable import AppendOnlyStore, deletion_blockers
from .local import LocalStore

__all__ = [
    "AppendOnlyStore",
    "ItemInfo",
    "LocalStore",
    "PeerStore",
    "deletion_blockers",
    "is_leftover_name",
    "open_peer_store",
    "open_store",
    "validate_leftover_name",
    "validate_name",
]


def open_store(
    peer: str,
    url: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    fsync: bool = True,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    append_only: bool = False,
    object_lock: ObjectLockMode | None = None,
    object_lock_days: int = 0,
) -> PeerStore:
    """Return the store for ``url``; ConfigError for an unknown scheme.

    The timeouts, ``max_attempts`` and the object lock apply to S3 peers only;
    ``append_only`` wraps the store of any peer.
    """
    store = _open(
        peer,
        url,
        endpoint=endpoint,
        region=region,
        profile=profile,
        fsync=fsync,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_attempts=max_attempts,
        object_lock=object_lock,
        object_lock_days=object_lock_days,
    )
    return AppendOnlyStore(store) if append_only else store


def _open(
    peer: str,
    url: str,
    *,
    endpoint: str | None,
    region: str | None,
    profile: str | None,
    fsync: bool,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int,
    object_lock: ObjectLockMode | None,
    object_lock_days: int,
) -> PeerStore:
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and parsed.netloc.lower() not in ("", "localhost"):
            raise ConfigError(f"peer {peer}: file URL must be file:///absolute/path, got {url!r}")
        path = unquote(parsed.path) if parsed.scheme else url
        if not path:
            raise ConfigError(f"peer {peer}: empty path in {url!r}")
        if object_lock is not None:
            raise ConfigError(f"peer {peer}: object_lock needs an S3 peer, not the local directory {path}")
        return LocalStore(peer, path, fsync=fsync)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"peer {peer}: S3 URL needs a bucket: s3://bucket/prefix, got {url!r}")
        from .s3 import S3Store  # boto3 is slow to import; only S3 peers pay for it

        return S3Store(
            peer,
            parsed.netloc,
            unquote(parsed.path),
            endpoint=endpoint,
            region=region,
            profile=profile,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            object_lock=object_lock,
            object_lock_days=object_lock_days,
        )
    raise ConfigError(f"peer {peer}: unsupported URL scheme {parsed.scheme!r} in {url!r} (use file:// or s3://)")


def open_peer_store(peer: PeerConfig, *, fsync: bool = True) -> PeerStore:
    """The store of a configured peer, with every per-peer setting of the configuration."""
    return open_store(
        peer.name,
        peer.url,
        endpoint=peer.endpoint,
        region=peer.region,
        profile=peer.profile,
        fsync=fsync,
        connect_timeout=peer.connect_timeout,
        read_timeout=peer.read_timeout,
        max_attempts=peer.max_attempts,
        append_only=peer.append_only,
        object_lock=peer.object_lock,
        object_lock_days=peer.object_lock_days,
    )
