"""What each configured peer says about itself, before any key is derived.

Opening a repository starts by asking every reachable peer, in parallel, for
its identity object and the names of its key objects (one GET and one LIST
per peer).  From those answers alone we can tell, by name:

* two configured peers that are the same storage (they show the same
  identity token, which :meth:`Repository.init` made unique per peer);
* a peer that belongs to another repository (its identity names another
  repository id than the key that opened ours);
* a peer that is empty or was replaced (no identity, no keys): it is not a
  healthy member, and ``repair`` refills it;
* where a repository exists at all, so "no repository here" is only said
  when no peer shows a trace of one.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field

from shardvault.errors import AliasedPeersError, ObjectNotFoundError, PeerError
from shardvault.metadata import IDENTITY_NAME, MalformedObject, parse_identity
from shardvault.shards.peers import Peer, PeerSet


@dataclass
class PeerSurvey:
    """One peer's answers."""

    peer: str
    identity: dict[str, str] | None = None  # repository, peer token, name
    identity_problem: str = ""  # why the identity object is unusable ("" when absent or fine)
    keys: list[str] = field(default_factory=list)
    has_config: bool = False

    @property
    def empty(self) -> bool:
        return self.identity is None and not self.keys and not self.has_config


def survey(peers: PeerSet, pool: Executor) -> dict[str, PeerSurvey]:
    """Ask every peer that is up; peers that fail to answer are marked down."""

    def ask(peer: Peer) -> PeerSurvey:
        answer = PeerSurvey(peer.name)
        try:
            answer.identity = parse_identity(peer.store.load(IDENTITY_NAME))
        except ObjectNotFoundError:
            pass
        except MalformedObject as exc:
            answer.identity_problem = str(exc)
        answer.keys = sorted(item.name for item in peer.store.list("keys/"))
        if not answer.keys:
            answer.has_config = any(item.name == "config" for item in peer.store.list("config"))
        return answer

    results: dict[str, PeerSurvey] = {}
    futures = [(peer, pool.submit(ask, peer)) for peer in peers.up()]
    for peer, future in futures:
        try:
            results[peer.name] = future.result()
        except PeerError as exc:
            peers.mark_down(peer, str(exc))
    return results


def refuse_aliases(answers: dict[str, PeerSurvey]) -> None:
    """Two configured peers showing one identity token are one storage: refuse by name."""
    holders: dict[str, str] = {}
    for name, answer in answers.items():
        if answer.identity is None:
            continue
        token = answer.identity["peer"]
        if token in holders:
            raise AliasedPeersError(holders[token], name, f"both show peer identity {token[:12]}")
        holders[token] = name


def majority_repository(answers: dict[str, PeerSurvey]) -> str | None:
    """The repository id most peers' identities name (None when no peer has one)."""
    counts = Counter(a.identity["repository"] for a in answers.values() if a.identity is not None)
    return counts.most_common(1)[0][0] if counts else None
