"""Append-only peers: a wrapper that lets this client add objects, never delete or overwrite them.

A peer configured ``append_only = true`` (or every peer, with ``[repository]
append_only = true``) is opened as ``AppendOnlyStore(inner)``, a wrapper
around any store in the manner of Kopia's storage wrappers:

* ``store(name, data)`` of a *new* name is passed on; of a name that already
  exists it raises :class:`~shardvault.errors.OverwriteRefusedError`, unless
  the existing object holds exactly ``data`` (a retried write after a lost
  answer is then a no-op, not an error);
* ``delete(name)`` and ``delete_leftover(name)`` raise
  :class:`~shardvault.errors.PeerRefusesDeletionError` naming the peer, and
  change nothing;
* reads, listings, ``create``, ``probe`` and the retention calls are the
  inner store's (extending an S3 Object Lock only makes deletion harder).

Every repository object has a random name written once (packs' shards, index
files, snapshots, WAL records, keys), so backups work unchanged.  What cannot
work is what deletes or rewrites: ``prune`` refuses to start
(:func:`deletion_blockers`), ``forget`` leaves snapshots it cannot tombstone
away, ``reconfigure`` cannot rewrite the config, ``repair`` cannot replace a
corrupt copy in place.  Run those on a trusted host whose configuration does
not say ``append_only``.

Sessions: a writer announces itself with ``sessions/<id>/<seq>`` heartbeats,
each a *new* object (so creating them is allowed), and normally deletes the
previous one.  Here the delete is refused, so an append-only writer leaves its
heartbeats and an ``end`` marker behind, and the (trusted) pruning host removes
them (``shardvault unlock`` or ``prune``).

What this protects against: mistakes and buggy clients.  It is enforced by the
client itself, so a *compromised* client with the same credentials simply
deletes through the S3 API.  Protection against that needs the server to
refuse: credentials whose policy lacks ``s3:DeleteObject`` (the
:class:`~shardvault.shards.stores.s3.S3Store` turns the server's AccessDenied
into the same PeerRefusesDeletionError), or S3 Object Lock (``object_lock``).

The existence check before each write costs one ``info`` (a HEAD on S3) per
object; two writers racing on one name cannot happen with random names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Protocol

from shardvault.errors import ObjectNotFoundError, OverwriteRefusedError, PeerRefusesDeletionError

from .base import ItemInfo, PeerStore, validate_leftover_name, validate_name

APPEND_ONLY = "append-only"


class AppendOnlyStore(PeerStore):
    """Any store, with deletes and overwrites refused on the client side."""

    def __init__(self, inner: PeerStore) -> None:
        super().__init__(inner.peer)
        self.inner = inner

    def create(self) -> None:
        self.inner.create()

    def probe(self) -> None:
        self.inner.probe()

    def load(self, name: str) -> bytes:
        return self.inner.load(name)

    def store(self, name: str, data: bytes | memoryview) -> None:
        validate_name(name)
        try:
            self.inner.info(name)
        except ObjectNotFoundError:
            self.inner.store(name, data)
            return
        # Present already: a retry of a write whose answer was lost is the same bytes.
        if self.inner.load(name) != bytes(data):
            raise OverwriteRefusedError(self.peer, name, "this client is configured append_only")

    def delete(self, name: str) -> None:
        validate_name(name)
        raise PeerRefusesDeletionError(
            self.peer, APPEND_ONLY, f"{name} kept: this client is configured append_only (delete from a trusted host)"
        )

    def delete_leftover(self, name: str) -> None:
        validate_leftover_name(name)
        raise PeerRefusesDeletionError(
            self.peer, APPEND_ONLY, f"{name} kept: this client is configured append_only (delete from a trusted host)"
        )

    def list(self, prefix: str = "") -> Iterator[ItemInfo]:
        return self.inner.list(prefix)

    def info(self, name: str) -> ItemInfo:
        return self.inner.info(name)

    def list_leftovers(self) -> Iterator[ItemInfo]:
        return self.inner.list_leftovers()

    def retention(self, name: str) -> datetime | None:
        return self.inner.retention(name)

    def extend_retention(self, name: str, until: datetime) -> None:
        self.inner.extend_retention(name, until)  # lengthens a lock: neither a delete nor an overwrite

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"AppendOnlyStore({self.inner!r})"


class _NamedStore(Protocol):
    """What :func:`deletion_blockers` needs of a peer (``shardvault.shards.peers.Peer`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def store(self) -> PeerStore: ...


def deletion_blockers(peers: Iterable[_NamedStore]) -> list[tuple[str, str]]:
    """``(peer name, reason)`` for every peer on which this client can never delete.

    For ``prune`` (and anything else that exists to delete): if the list is
    not empty, refuse to start, naming the first peer and its reason; a run
    that deleted on some peers and not others would only leave them apart.

    Only client-side append-only peers block.  S3 Object Lock peers do not:
    deletion works there once an object's retention has passed, and a delete
    refused while it runs raises :class:`~shardvault.errors.PeerRefusesDeletionError`
    (also a ``DeletionRefusedError``), which prune treats as "kept for now,
    retried at the next run".  Nor does a server whose policy denies deletes:
    the client cannot know that before trying, and the same error says so
    then.
    """
    return [
        (peer.name, f"{APPEND_ONLY} in this client's configuration")
        for peer in peers
        if isinstance(peer.store, AppendOnlyStore)
    ]
