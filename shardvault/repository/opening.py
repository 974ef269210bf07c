"""Opening a repository: what each peer says about itself, and the key that opens.

Opening a repository starts by asking every reachable peer, in parallel, for
its identity object and the names of its key objects (one GET and one LIST
per peer).  From those answers alone we can tell, by name:

* two configured peers that are the same storage, or one a copy of the
  other's disk (they show the same identity token, which ``init`` made
  unique per peer): the later one is left out of the run and reported;
* a peer that belongs to another repository (its identity names another
  repository id than the key that opened ours): left out and reported, and
  refused only when too few peers of ours remain to read anything;
* a peer that is empty or was replaced (no identity, no keys): it is not a
  healthy member, and ``repair`` refills it;
* where a repository exists at all, so "no repository here" is only said
  when no peer shows a trace of one.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field

from shardvault.config import Config
from shardvault.crypto import MasterKeys, OpenFailed, content_hash
from shardvault.errors import (
    ObjectNotFoundError,
    PeerError,
    RepositoryCorruptError,
    RepositoryError,
    RepositoryNotFoundError,
    RepositoryNotReachableError,
    WrongPassphraseError,
)
from shardvault.shards.peers import Peer, PeerSet

from .metadata import IDENTITY_NAME, MalformedObject, MetaProblem, open_key_object, parse_identity


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


def find_aliases(answers: dict[str, PeerSurvey]) -> dict[str, str]:
    """Peers that show the identity token of a peer configured before them: later -> earlier.

    The same storage under two names (or a copy of another peer's disk): the
    later one is left out of the run and reported, never counted twice.
    """
    holders: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for name, answer in answers.items():
        if answer.identity is None:
            continue
        token = answer.identity["peer"]
        if token in holders:
            aliases[name] = holders[token]
        else:
            holders[token] = name
    return aliases


def majority_repository(answers: dict[str, PeerSurvey]) -> str | None:
    """The repository id most peers' identities name (None when no peer has one)."""
    counts = Counter(a.identity["repository"] for a in answers.values() if a.identity is not None)
    return counts.most_common(1)[0][0] if counts else None


_HINT_FILE = "last-key"


def not_found(config: Config, peers: PeerSet, answers: dict[str, PeerSurvey]) -> RepositoryError:
    """No key object anywhere: say what is known instead of advising init when a repository exists."""
    traces = [name for name, a in answers.items() if not a.empty]
    down = peers.down()
    state_dir = config.repository.state_dir
    known_here = state_dir.is_dir() and any((d / "state.db").exists() for d in state_dir.iterdir() if d.is_dir())
    if traces:
        return RepositoryCorruptError(
            "keys/*", f"peers {', '.join(traces)} hold a repository but no key object; do NOT run init"
        )
    if down:
        return RepositoryNotReachableError(", ".join(answers) or "none", unreachable(peers))
    if known_here:
        return RepositoryNotReachableError(
            ", ".join(answers), f"but the state in {state_dir} knows a repository: are these the right peers?"
        )
    return RepositoryNotFoundError(", ".join(answers) or "none")


@dataclass(frozen=True)
class OpenedKey:
    """The key object that opened the repository: the copy check and repair hold others against."""

    keys: MasterKeys
    repo_id: str
    name: str
    copy: bytes


def open_key(
    config: Config, password: str, key_names: dict[str, list[Peer]], majority: str | None
) -> tuple[OpenedKey, list[MetaProblem]]:
    """Find the key object our passphrase opens, trying every distinct copy.

    The key that opened the repository last is tried first.  Each copy of a
    key object is loaded until one opens: a bit flipped in one peer's copy
    costs one more scrypt, never "wrong passphrase" while a good copy exists
    (finding 4 of issue 7); copies with identical bytes are tried once.  A
    key whose repository is not the one the peers' identities name is
    foreign and skipped.
    """
    problems: list[MetaProblem] = []
    try:
        hint = (config.repository.state_dir / _HINT_FILE).read_text().strip()
    except OSError:
        hint = ""
    order = sorted(key_names, key=lambda name: (name != hint, name))
    wrong = False
    for name in order:
        tried: set[bytes] = set()
        refused: list[str] = []  # peers whose copy of this key did not open
        for peer in key_names[name]:
            try:
                data = peer.store.load(name)
            except PeerError as exc:
                problems.append(MetaProblem(name, peer.name, str(exc)))
                continue
            digest = content_hash(data)
            if digest in tried:
                continue
            tried.add(digest)
            try:
                keys, repo_id = open_key_object(password, data)
            except MalformedObject as exc:
                problems.append(MetaProblem(name, peer.name, f"bad key object: {exc}"))
                continue
            except OpenFailed:
                wrong = True
                refused.append(peer.name)
                continue  # another peer's copy may differ (a flipped bit); try it
            if majority is not None and repo_id != majority:
                problems.append(MetaProblem(name, peer.name, f"key of another repository ({repo_id[:8]})"))
                continue
            # Another copy of this very key opened: the ones that did not are damaged.
            problems += [MetaProblem(name, p, "bad copy: does not open, another peer's does") for p in refused]
            if name != hint:
                write_hint(config, name)
            return OpenedKey(keys, repo_id, name, data), problems
    if wrong or not problems:
        raise WrongPassphraseError()
    raise RepositoryCorruptError("keys/*", "; ".join(f"{p.peer}:{p.name}: {p.detail}" for p in problems))


def write_hint(config: Config, name: str) -> None:
    """Remember which key object opened this repository: tried first next time (one scrypt, not several)."""
    hint = config.repository.state_dir / _HINT_FILE
    try:
        hint.parent.mkdir(parents=True, exist_ok=True)
        hint.write_text(name)
    except OSError:
        pass  # a hint that cannot be written only costs time


def unreachable(peers: PeerSet) -> str:
    """The down peers and why, for a message."""
    return "; ".join(f"{name}: {why}" for name, why in peers.down().items())
