"""Which peer gets which shard of a pack.

Shards of one pack go to distinct peers, spreading over distinct zones first:
zones are taken round-robin, so losing a whole zone loses as few shards of
each pack as the layout allows.  The starting point rotates with the pack id,
so when there are more peers than shards the load evens out, and so that the
primary (cheap-to-read) shards do not all land on the same peers.

Redundancy is counted in failures survived, not in shards: a pack whose six
shards sit on five peers survives one peer failure less than its shard count
suggests.  :func:`failures_survived` measures a placement (by peer or by
zone), :func:`best_failures_survived` what the best placement over a given
layout could achieve, so verification can call a pack degraded when it falls
short of what the configured peers and zones allow.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from itertools import combinations
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


EXACT_UNITS = 12  # up to this many failure units, failures survived are found by trying every subset


def failures_survived(holdings: Mapping[str, Collection[int]], k: int) -> int:
    """The largest f such that losing ANY f units (peers or zones) leaves >= k distinct shard numbers.

    ``holdings`` maps each unit to the shard numbers it holds.  Returns -1 when
    fewer than k distinct numbers are held at all (the pack is already lost).
    Exact when no number is held by two units (the normal case) or when there
    are at most :data:`EXACT_UNITS` units; otherwise a lower bound.
    """
    units = {unit: frozenset(nums) for unit, nums in holdings.items() if nums}
    distinct = frozenset().union(*units.values()) if units else frozenset()
    spare = len(distinct) - k
    if spare < 0:
        return -1
    sizes = sorted((len(nums) for nums in units.values()), reverse=True)
    if sum(sizes) == len(distinct) or len(units) > EXACT_UNITS:
        # Disjoint holdings: the worst f failures are the f largest holders (exact).
        # Overlapping ones: losing f units costs at most their f largest sizes (a lower bound).
        return _within(sizes, spare)
    names = list(units)
    for f in range(1, len(names) + 1):
        for failed in combinations(names, f):
            left = frozenset().union(*(units[u] for u in names if u not in failed))
            if len(left) < k:
                return f - 1
    return len(names)


def best_failures_survived(capacities: Sequence[int], n: int, k: int) -> int:
    """The failures survived by the best placement of n shards over units holding at most ``capacities`` each.

    The best placement fills the units evenly (water-filling), which makes the
    shards on the f fullest units as few as possible for every f at once.
    Shards that do not fit (fewer peers than n) are spread evenly on top.
    """
    if not capacities:
        return -1
    counts = [0] * len(capacities)
    for _ in range(n):
        open_units = [i for i, cap in enumerate(capacities) if counts[i] < cap] or list(range(len(counts)))
        counts[min(open_units, key=lambda i: counts[i])] += 1
    return _within(sorted(counts, reverse=True), n - k)


def _within(sizes_desc: list[int], spare: int) -> int:
    """How many of the largest sizes fit together within ``spare``."""
    total = f = 0
    for size in sizes_desc:
        if total + size > spare:
            break
        total += size
        f += 1
    return f
