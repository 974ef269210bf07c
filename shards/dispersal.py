"""Spreading a pack's shards over peers, and gathering any k of them back.

Writing (:func:`put_pack`): the pack is erasure-coded, each shard gets its
header and hash, and the shards are stored in parallel on distinct peers
(:mod:`.placement`).  A peer that fails is marked down for the run and its
shard is offered to a spare peer that holds none of this pack; the pack
counts as written only if at least ``quorum`` shards were acknowledged
(invariant 4 builds on this).

Reading (:func:`get_pack`): shards are fetched from the fastest peers first,
k at a time in parallel; every shard is checked against its own hash and the
index's record before use; a bad or missing one is reported and replaced by
the next candidate until k good shards are in hand or none are left.

This module is the one place that builds shards (:func:`build_shards`), reads
and verifies one (:func:`read_shard`), and names what is wrong with one
(:func:`classify`): check, scrub, repair, rebalance and restore all go through
these, so they cannot disagree about the same failure.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shardvault.errors import NotEnoughPeersError, NotEnoughShardsError, ObjectNotFoundError, PeerError

from . import erasure
from .format import ShardFormatError, ShardHeader, build_shard, verify_shard
from .peers import Peer, PeerSet
from .placement import place


@dataclass(frozen=True)
class ShardRecord:
    """Where one shard of a pack lives, and the hash it must have."""

    num: int
    peer: str
    hash: bytes
    size: int


class ShardProblemKind(StrEnum):
    """What is wrong with a shard; the values are the words of reports, JSON and the state."""

    MISSING = "missing"  # the peer answered: the object is not there
    CORRUPT = "corrupt"  # there, but not the bytes the index expects (bit rot, truncation, swap, replay)
    UNREACHABLE = "unreachable"  # the peer did not answer (down, timeout, not configured)


def classify(exc: BaseException) -> ShardProblemKind:
    """The one verdict for an error met while reading a shard."""
    if isinstance(exc, ShardFormatError):
        return ShardProblemKind.CORRUPT
    if isinstance(exc, ObjectNotFoundError):
        return ShardProblemKind.MISSING
    return ShardProblemKind.UNREACHABLE


@dataclass(frozen=True)
class ShardProblem:
    """A shard that could not be used, and why."""

    pack_id: str
    num: int
    peer: str
    object: str
    kind: ShardProblemKind
    detail: str

    def to_doc(self) -> dict[str, Any]:
        return {
            "pack": self.pack_id,
            "shard": self.num,
            "peer": self.peer,
            "object": self.object,
            "problem": self.kind,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class VerifiedShard:
    """A shard read from its peer and checked: the object's bytes and the zfec block inside."""

    raw: bytes
    payload: memoryview


def build_shards(pack_id: bytes, data: bytes, k: int, n: int, nums: list[int] | None = None) -> dict[int, bytes]:
    """Shard objects (header + block + hash) ``nums`` (default all n) of a pack.

    zfec makes any block on its own, so repair asks only for the numbers it
    lost; the bytes are exactly those written at backup time.
    """
    blocks = erasure.encode(data, k, n, wanted=nums)
    return {
        num: build_shard(ShardHeader(k, n, num, pack_id, len(data), len(block)), block) for num, block in blocks.items()
    }


def shard_objects(pack_id: bytes, data: bytes, k: int, n: int) -> dict[int, bytes]:
    """The n shard objects of a pack (the golden vectors' name for :func:`build_shards`)."""
    return build_shards(pack_id, data, k, n)


def read_shard(peers: PeerSet, record: ShardRecord, name: str, *, pack_id: bytes, k: int, n: int) -> VerifiedShard:
    """Load one shard from its recorded peer and verify it against its own hash and the index's.

    Raises :class:`PeerError` or :class:`ShardFormatError`; :func:`classify`
    names either.  The peer's speed estimate is updated on the way.
    """
    peer = peers.get(record.peer)
    if peer is None:
        raise PeerError(record.peer, "not in the configuration")
    raw = peers.timed(peer, len, lambda: peer.store.load(name))
    payload = verify_shard(raw, pack_id=pack_id, num=record.num, k=k, n=n, expected_hash=record.hash)
    return VerifiedShard(raw, payload)


def put_pack(
    peers: PeerSet,
    executor: Executor,
    pack_id: bytes,
    data: bytes,
    k: int,
    n: int,
    quorum: int,
    object_name: Callable[[int], str],
) -> list[ShardRecord]:
    """Store the shards of one pack; return the acknowledged ones."""
    shards = build_shards(pack_id, data, k, n)
    del data
    targets = place(peers.up(), n, pack_id)
    used = {p.name for p in targets}
    records: list[ShardRecord] = []
    errors: list[str] = []

    def store(peer: Peer, num: int) -> ShardRecord:
        raw = shards[num]
        peer.store.store(object_name(num), raw)
        return ShardRecord(num, peer.name, raw[-32:], len(raw))

    pending: dict[Future[ShardRecord], tuple[Peer, int]] = {
        executor.submit(store, peer, num): (peer, num) for num, peer in enumerate(targets)
    }
    unplaced = list(range(len(targets), n))
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            peer, num = pending.pop(future)
            try:
                records.append(future.result())
                continue
            except PeerError as exc:
                peers.mark_down(peer, str(exc))
                errors.append(str(exc))
            unplaced.append(num)
        # Offer failed shards to spare peers that hold nothing of this pack.
        spares = [p for p in place(peers.up(), n, pack_id, exclude=frozenset(used)) if p.name not in used]
        while unplaced and spares:
            peer, num = spares.pop(0), unplaced.pop(0)
            used.add(peer.name)
            pending[executor.submit(store, peer, num)] = (peer, num)
    if len(records) < quorum:
        detail = "; ".join(errors) or f"only {len(targets)} peers are up"
        raise NotEnoughPeersError(len(records), quorum, detail)
    return sorted(records, key=lambda r: r.num)


def get_pack(
    peers: PeerSet,
    executor: Executor,
    pack_id: bytes,
    k: int,
    n: int,
    length: int,
    shards: list[ShardRecord],
    object_name: Callable[[int], str],
    report: Callable[[ShardProblem], None],
) -> erasure.DecodedPack:
    """Fetch and check any k good shards and decode the pack."""
    pack_hex = pack_id.hex()

    # Fastest peers first; among peers of about the same speed (within 4x of
    # the fastest), primary shards first, since decoding those is a copy.
    # Peers not measured yet (cost 0) are neither the yardstick nor slow.
    fastest = min((c for s in shards if (c := peers.cost(s.peer)) > 0), default=0.0)

    def by_speed(record: ShardRecord) -> tuple[bool, bool, bool, float]:
        cost = peers.cost(record.peer)
        return (peers.is_down(record.peer), cost > 4 * fastest + 0.005, record.num >= k, cost)

    candidates = sorted(shards, key=by_speed)
    good: dict[int, memoryview] = {}
    problems: list[str] = []

    def fetch(record: ShardRecord) -> memoryview:
        return read_shard(peers, record, object_name(record.num), pack_id=pack_id, k=k, n=n).payload

    def problem(record: ShardRecord, exc: Exception) -> None:
        kind = classify(exc)
        if kind is ShardProblemKind.UNREACHABLE:
            # One timeout per peer and run, not one per pack.
            peer = peers.get(record.peer)
            if peer is not None:
                peers.mark_down(peer, str(exc))
        name = object_name(record.num)
        problems.append(f"{record.peer}:{name} {kind}")
        report(ShardProblem(pack_hex, record.num, record.peer, name, kind, str(exc)))

    pending: dict[Future[memoryview], ShardRecord] = {}
    while len(good) < k:
        while candidates and len(pending) + len(good) < k:
            record = candidates.pop(0)
            pending[executor.submit(fetch, record)] = record
        if not pending:
            break
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            record = pending.pop(future)
            try:
                good[record.num] = future.result()
            except (PeerError, ShardFormatError) as exc:
                problem(record, exc)
    for future in pending:  # surplus fetches still in flight when k arrived
        future.cancel()
    if len(good) < k:
        raise NotEnoughShardsError(pack_hex, len(good), k, "; ".join(problems) or "no shard recorded")
    return erasure.decode(dict(good), k, n, length)
