"""Peer stores: one module per peer type behind :class:`PeerStore`.

:func:`open_store` turns a peer's URL into a store: ``file:///path`` (or a
plain path) for a local directory, ``s3://bucket/prefix`` for S3-compatible
servers.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from shardvault.errors import ConfigError

from .base import ItemInfo, PeerStore, validate_name
from .local import LocalStore

__all__ = ["ItemInfo", "LocalStore", "PeerStore", "open_store", "validate_name"]


def open_store(
    peer: str,
    url: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    fsync: bool = True,
) -> PeerStore:
    """Return the store for ``url``; ConfigError for an unknown scheme."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"peer {peer}: file URL must be file:///absolute/path, got {url!r}")
        path = unquote(parsed.path if parsed.scheme else url)
        if not path:
            raise ConfigError(f"peer {peer}: empty path in {url!r}")
        return LocalStore(peer, path, fsync=fsync)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"peer {peer}: S3 URL needs a bucket: s3://bucket/prefix, got {url!r}")
        from .s3 import S3Store  # boto3 is slow to import; only S3 peers pay for it

        return S3Store(peer, parsed.netloc, parsed.path, endpoint=endpoint, region=region, profile=profile)
    raise ConfigError(f"peer {peer}: unsupported URL scheme {parsed.scheme!r} in {url!r} (use file:// or s3://)")
