"""Peers as the data path sees them: a store, a zone, and what we learned.

:class:`PeerSet` remembers, for one run, which peers failed (so a dead peer
costs one timeout, not one per pack) and how fast each answered (an
exponentially weighted mean of seconds per MiB), so readers can ask the
fastest peers first.

A peer marked down stays down for the run: ``probe_all`` is called by several
steps of one command, and probing a peer that already timed out again would
cost its timeout again each time (an unresponsive S3 peer once made
``snapshots`` take minutes).  A new run probes it afresh.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from shardvault.errors import PeerError, PeerUnavailableError

from .stores import PeerStore

T = TypeVar("T")
_ALPHA = 0.3


@dataclass(frozen=True)
class Peer:
    name: str
    zone: str
    store: PeerStore


class PeerSet:
    """The configured peers, in configuration order, with per-run health."""

    def __init__(self, peers: list[Peer], on_down: Callable[[str, str], None] | None = None) -> None:
        self.peers = list(peers)
        self.on_down = on_down  # told once per peer, when it is first marked down (the CLI says so at once)
        self._by_name = {p.name: p for p in self.peers}
        self._lock = threading.Lock()
        self._down: dict[str, str] = {}
        self._errors: dict[str, PeerError] = {}  # why each down peer is down, for probe_all's answer
        self._cost: dict[str, float] = {}

    def __iter__(self) -> Iterator[Peer]:
        return iter(self.peers)

    def __len__(self) -> int:
        return len(self.peers)

    def get(self, name: str) -> Peer | None:
        return self._by_name.get(name)

    def up(self) -> list[Peer]:
        with self._lock:
            return [p for p in self.peers if p.name not in self._down]

    def down(self) -> dict[str, str]:
        with self._lock:
            return dict(self._down)

    def mark_down(self, peer: Peer, reason: str | PeerError) -> None:
        """Record that ``peer`` failed; the first reason is kept (it is usually the cause)."""
        with self._lock:
            if peer.name in self._down:
                return
            self._down[peer.name] = str(reason)
            self._errors[peer.name] = (
                reason if isinstance(reason, PeerError) else PeerUnavailableError(peer.name, reason)
            )
        if self.on_down is not None:
            self.on_down(peer.name, str(reason))

    def revive(self, peer: Peer) -> None:
        """Count a peer in again (repair fixed what put it down, e.g. a copied identity)."""
        with self._lock:
            self._down.pop(peer.name, None)
            self._errors.pop(peer.name, None)

    def is_down(self, name: str) -> bool:
        with self._lock:
            return name in self._down

    def cost(self, name: str) -> float:
        """Seconds per MiB seen so far (0 for a peer not yet measured)."""
        with self._lock:
            return self._cost.get(name, 0.0)

    def timed(self, peer: Peer, nbytes: Callable[[T], int], call: Callable[[], T]) -> T:
        """Run ``call`` against ``peer``, updating its speed estimate."""
        start = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - start
        per_mib = elapsed / max(nbytes(result) / (1 << 20), 1 / 64)
        with self._lock:
            old = self._cost.get(peer.name)
            self._cost[peer.name] = per_mib if old is None else (1 - _ALPHA) * old + _ALPHA * per_mib
        return result

    def probe_all(self) -> dict[str, PeerError | None]:
        """Probe every peer not yet down; mark failures down.  Returns name -> error or None.

        A peer already down is not probed again (it answers with the error that
        put it down), so a dead peer costs one timeout per run.
        """

        def probe(peer: Peer) -> PeerError | None:
            with self._lock:
                known = self._errors.get(peer.name)
            if known is not None:
                return known
            try:
                peer.store.probe()
                return None
            except PeerError as exc:
                self.mark_down(peer, exc)
                return exc

        # In parallel: a silent peer costs one timeout, not one per peer behind it.
        with ThreadPoolExecutor(max_workers=max(1, len(self.peers)), thread_name_prefix="sv-probe") as pool:
            return dict(zip((p.name for p in self.peers), pool.map(probe, self.peers), strict=True))

    def close(self) -> None:
        for peer in self.peers:
            peer.store.close()
