"""Which peer gets which shard of a pack.

Shards of one pack go to distinct peers, spreading over distinct zones first:
zones are taken round-robin, so losing a whole zone loses as few shards of
each pack as the layout allows.  The starting point rotates with the pack id,
so when there are more peers than shards the load evens out, and so that the
primary (cheap-to-read) shards do not all land on the same peers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from .peers import Peer

T = TypeVar("T")


def place(peers: Sequence[Peer], count: int, pack_id: bytes, exclude: frozenset[str] = frozenset()) -> list[Peer]:
    """Choose up to ``count`` distinct peers for one pack's shards, in shard order."""
    candidates = [p for p in peers if p.name not in exclude]
    if not candidates:
        return []
    zones: dict[str, list[Peer]] = {}
    for peer in candidates:
        zones.setdefault(peer.zone, []).append(peer)
    seed = int.from_bytes(pack_id[:4], "little")
    # Rotate the zone order and each zone's members by the pack id, then
    # interleave: z1[0], z2[0], z3[0], z1[1], ... so consecutive picks differ
    # in zone whenever possible, and the load moves around between packs.
    groups = [_rotate(g, seed) for g in _rotate(list(zones.values()), seed)]
    order: list[Peer] = []
    for i in range(max(len(g) for g in groups)):
        order.extend(g[i] for g in groups if i < len(g))
    return order[:count]


def _rotate(items: list[T], seed: int) -> list[T]:
    start = seed % len(items)
    return items[start:] + items[:start]
