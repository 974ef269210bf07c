"""The repository: keys, config, index, snapshots and packs, kept on the peers.

Small objects (keys, config, index files, snapshots; see
:mod:`shardvault.repository.metadata`) are replicated to every peer and read from any
peer whose copy authenticates, so the passphrase and the peer list are enough
to open the repository anywhere (invariant 1).  Packs are erasure-coded into
shards over the peers (:mod:`shardvault.shards.dispersal`).

Writes follow invariant 4, "commit last": packs first, then the index files
naming them, then the snapshot.  Every object name is random and written
once, so two writers never overwrite each other's objects (append-only, as in
restic and Kopia), and a killed writer leaves only unreferenced objects
behind.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shardvault.config import Config
from shardvault.crypto import Cipher, MasterKeys, chunk_id
from shardvault.errors import (
    AliasedPeersError,
    BlobNotFoundError,
    DataLossError,
    DeletionRefusedError,
    ForeignRepositoryError,
    NotEnoughPeersError,
    NotEnoughShardsError,
    ObjectNotFoundError,
    OverwriteRefusedError,
    PeerError,
    PeerUnavailableError,
    RepositoryCorruptError,
    RepositoryExistsError,
    RepositoryMismatchError,
    SessionLostError,
    SnapshotNotFoundError,
    UnsupportedFormatError,
)
from shardvault.failpoints import failpoint
from shardvault.shards.dispersal import ShardProblem, get_pack, put_pack
from shardvault.shards.erasure import DecodedPack
from shardvault.shards.peers import Peer, PeerSet
from shardvault.shards.stores import deletion_blockers, open_peer_store
from shardvault.state import State
from shardvault.tree import Entry, parse_lines

from . import sessions
from .condemned import CondemnedSet, condemned_packs, read_condemned
from .index import Index, PackRecord, index_doc, intact_shard_nums
from .keys import KeyInfo, make_key, new_key_name, refuse_removed_key
from .metadata import (
    CONFIG_NAME,
    FORMAT_VERSION,
    IDENTITY_NAME,
    MalformedObject,
    MetaProblem,
    check_version,
    kind_of,
    make_identity,
    new_id,
    open_object,
    pack_name,
    parse_identity,
    parse_shard_name,
    seal_object,
)
from .opening import (
    PeerSurvey,
    find_aliases,
    majority_repository,
    not_found,
    open_key,
    survey,
    unreachable,
    write_hint,
)
from .packs import PackEntry, PackFormatError, open_blob
from .snapshot import Snapshot, resolve
from .tombstones import PREFIX as TOMBSTONE_PREFIX
from .tombstones import load_deleted


def open_peers(config: Config, on_down: Callable[[str, str], None] | None = None) -> PeerSet:
    stores = [Peer(p.name, p.zone, open_peer_store(p, fsync=config.repository.fsync)) for p in config.peers]
    return PeerSet(stores, on_down)


def _configured(peers: PeerSet, name: str) -> Peer:
    peer = peers.get(name)
    assert peer is not None, name  # answers only come from configured peers
    return peer


class Repository:
    """An opened repository.  Use :meth:`init` or :meth:`open`; close when done."""

    def __init__(self, config: Config, peers: PeerSet, keys: MasterKeys, repo_id: str, doc: dict[str, Any]) -> None:
        self.config = config
        self.peers = peers
        self.keys = keys
        self.id = repo_id
        self.doc = doc
        self.cipher = Cipher(keys.encryption)
        self.state = State(config.repository.state_dir, repo_id)
        self.io = ThreadPoolExecutor(max_workers=max(8, 2 * len(peers)), thread_name_prefix="sv-io")
        self._index: Index | None = None
        self._problems: list[ShardProblem] = []
        self._lock = threading.Lock()
        self.meta_problems: list[MetaProblem] = []  # bad copies and unreadable objects met this run
        self._deleted: set[str] | None = None  # names tombstones list (see tombstones.py), loaded once
        self._deleted_reloaded = False
        self._deleted_lock = threading.RLock()
        self.survey: dict[str, PeerSurvey] = {}
        self.config_copy = b""  # the sealed config this run opened (the highest revision)
        self.aliased: dict[str, str] = {}  # peer -> the earlier peer whose identity it shows (left out)
        self.foreign: dict[str, str] = {}  # peer -> the other repository its identity names (left out)
        self.key_name = ""  # the key object our passphrase opened, and its bytes
        self.key_copy = b""
        # The deletion protocol (docs/concurrency.md): this process's session, announced
        # before the index is first read, and the condemned sets read right after it.
        self.session: sessions.Session | None = None
        self.purpose = sessions.SessionKind.READ
        self.announce_sessions = True
        self._announced = False
        self.condemned_sets: list[CondemnedSet] = []

    # -- opening -------------------------------------------------------------------

    @classmethod
    def init(cls, config: Config, password: str) -> Repository:
        """Create the repository on every configured peer, or change nothing."""
        peers = open_peers(config)
        for peer in peers:
            peer.store.create()  # raises on the first unreachable or read-only peer
        for peer in peers:
            if any(True for _ in peer.store.list("keys/")) or any(
                item.name in (CONFIG_NAME, IDENTITY_NAME) for item in peer.store.list("") if "/" not in item.name
            ):
                raise RepositoryExistsError(peer.name)
        keys = MasterKeys.generate()
        repo_id = new_id()
        rc = config.repository
        doc = {
            "format": "shardvault",
            "version": FORMAT_VERSION,
            "id": repo_id,
            "k": rc.k,
            "n": rc.n,
            "chunker": {"algorithm": "fastcdc", "min": rc.chunk_min, "avg": rc.chunk_avg, "max": rc.chunk_max},
            "pack_size": rc.pack_size,
            "cipher": "aes-256-gcm",
            "compression": "zstd",
            "chunk_id": "blake3-keyed",
        }
        repo = cls(config, peers, keys, repo_id, doc)
        written: list[tuple[Peer, str]] = []
        try:
            # Identities first, one write each, then read back: a peer that
            # shows another's token is the same storage, refused before any key
            # or config is written (invariant 1: every peer an independent copy).
            identities = {peer.name: make_identity(repo_id, peer.name) for peer in peers}
            for peer in peers:
                peer.store.store(IDENTITY_NAME, identities[peer.name])
                written.append((peer, IDENTITY_NAME))
            token_of = {parse_identity(data)["peer"]: name for name, data in identities.items()}
            for peer in peers:
                seen = parse_identity(peer.store.load(IDENTITY_NAME))["peer"]
                if token_of.get(seen) != peer.name:
                    other = token_of.get(seen, "(unknown)")
                    raise AliasedPeersError(peer.name, other, f"writing {other}'s identity replaced {peer.name}'s")
            key_name = new_key_name()
            objects = {
                key_name: make_key(password, keys, repo_id, key_name, KeyInfo.here()),
                CONFIG_NAME: seal_object(repo.cipher, CONFIG_NAME, doc),
            }
            repo.config_copy = objects[CONFIG_NAME]
            for name, data in objects.items():
                for peer in peers:
                    peer.store.store(name, data)
                    written.append((peer, name))
        except (PeerError, AliasedPeersError, MalformedObject) as exc:
            for peer, name in written:  # leave every peer as it was
                try:
                    peer.store.delete(name)
                except PeerError:
                    pass
            repo.close()
            if isinstance(exc, MalformedObject):
                raise RepositoryCorruptError(IDENTITY_NAME, str(exc)) from None
            raise
        repo.key_name, repo.key_copy = key_name, objects[key_name]
        write_hint(config, key_name)
        return repo

    @classmethod
    def open(
        cls,
        config: Config,
        password: str,
        on_peer_down: Callable[[str, str], None] | None = None,
        check_parameters: bool = True,
    ) -> Repository:
        """Open the repository; ``on_peer_down(name, reason)`` hears of each peer given up for this run.

        ``check_parameters=False`` is for :meth:`reconfigure` only: every other
        command refuses a TOML whose k, n or chunker differ from the repository's.
        """
        peers = open_peers(config, on_peer_down)
        peers.probe_all()
        if not peers.up():
            raise PeerUnavailableError("(all)", f"no peer is reachable: {unreachable(peers)}")
        with ThreadPoolExecutor(max_workers=max(4, len(peers)), thread_name_prefix="sv-open") as pool:
            answers = survey(peers, pool)
        aliases = find_aliases(answers)
        for later, earlier in aliases.items():
            why = AliasedPeersError(earlier, later, "it shows the identity of the other (one disk, or a copy)")
            peers.mark_down(_configured(peers, later), str(why))
        key_names: dict[str, list[Peer]] = {}
        for name, answer in answers.items():
            peer = _configured(peers, name)
            if name in aliases:
                continue
            for key in answer.keys:
                key_names.setdefault(key, []).append(peer)
        if not key_names:
            raise not_found(config, peers, answers)
        majority = majority_repository(answers)
        opened, problems = open_key(config, password, key_names, majority)
        repo_id = opened.repo_id
        repo = cls(config, peers, opened.keys, repo_id, {})
        repo.key_name, repo.key_copy = opened.name, opened.copy
        repo.survey = answers
        repo.meta_problems.extend(problems)
        try:
            repo.aliased = aliases
            repo.foreign = {
                name: a.identity["repository"]
                for name, a in answers.items()
                if a.identity is not None and a.identity["repository"] != repo_id and name not in aliases
            }
            for name, other in repo.foreign.items():
                peers.mark_down(_configured(peers, name), str(ForeignRepositoryError(name, other[:8], repo_id[:8])))
            if repo.foreign and len(peers.up()) < config.repository.k:
                # Too few of our own peers to read anything: the configuration mixes repositories.
                name, other = next(iter(repo.foreign.items()))
                raise ForeignRepositoryError(name, other[:8], repo_id[:8])
            repo._read_config()
            if repo.doc.get("id") != repo_id:
                raise RepositoryCorruptError(CONFIG_NAME, "belongs to another repository")
            refuse_removed_key(repo, password, key_names, majority)  # a copy a peer kept after `key remove`
            if check_parameters:
                repo._check_parameters()
        except BaseException:
            repo.close()
            raise
        return repo

    def _read_config(self) -> None:
        """The config copy with the highest revision any peer holds intact.

        The config is the one metadata object that is rewritten (by
        :meth:`reconfigure`), so copies may differ while a change spreads or
        after an old image is put back: the highest revision wins, and
        check/repair treat every other copy as stale.
        """
        best: tuple[int, dict[str, Any], bytes] | None = None
        failures: list[str] = []
        for peer, future in [(p, self.io.submit(p.store.load, CONFIG_NAME)) for p in self.peers.up()]:
            try:
                data = future.result()
                doc = open_object(self.cipher, CONFIG_NAME, data)
                check_version("config", doc, CONFIG_NAME)
            except ObjectNotFoundError:
                continue  # an empty or replaced peer: check reports it, repair refills it
            except PeerError as exc:
                failures.append(str(exc))
                continue
            except (MalformedObject, UnsupportedFormatError) as exc:
                failures.append(f"peer {peer.name}: {exc}")
                self._meta_problem(MetaProblem(CONFIG_NAME, peer.name, f"bad copy: {exc}"))
                continue
            revision = int(doc.get("revision", 0))
            if best is None or revision > best[0]:
                best = (revision, doc, data)
        if best is None:
            raise RepositoryCorruptError(CONFIG_NAME, "; ".join(failures) or "no peer holds it")
        _, self.doc, self.config_copy = best

    def reconfigure(self) -> dict[str, Any]:
        """Record the TOML's k, n and chunker settings as the repository's: an explicit, recorded change.

        Packs already stored keep the k and n they were written with (each
        index record carries its own); new packs use the new ones.  The new
        config (revision + 1, with the history of changes) is written to
        every reachable peer; the highest revision wins when copies differ,
        and repair copies it to a peer that missed it.
        """
        rc = self.config.repository
        wanted = {
            "k": rc.k,
            "n": rc.n,
            "chunker": {"algorithm": "fastcdc", "min": rc.chunk_min, "avg": rc.chunk_avg, "max": rc.chunk_max},
        }
        before = {key: self.doc.get(key) for key in wanted}
        revision = int(self.doc.get("revision", 0))
        if before == wanted:
            return {"changed": False, "revision": revision, "parameters": wanted, "peers_written": []}
        change = before | {
            "revision": revision,
            "until": datetime.now(UTC).isoformat(),
            "hostname": socket.gethostname(),
        }
        doc = self.doc | wanted | {"revision": revision + 1, "history": [*self.doc.get("history", []), change]}
        blockers = deletion_blockers(self.peers)  # append-only peers: refused before any peer is rewritten
        if blockers:
            peer_name, why = blockers[0]
            raise OverwriteRefusedError(peer_name, CONFIG_NAME, f"{why}; run reconfigure on a trusted host")
        data = seal_object(self.cipher, CONFIG_NAME, doc)
        written: list[str] = []
        errors: list[str] = []
        for peer in self.peers.up():
            try:
                peer.store.store(CONFIG_NAME, data)
                written.append(peer.name)
            except PeerError as exc:
                self.peers.mark_down(peer, exc)
                errors.append(str(exc))
        if not written:
            raise NotEnoughPeersError(0, 1, "; ".join(errors) or unreachable(self.peers))
        self.doc, self.config_copy = doc, data
        missed = sorted(set(p.name for p in self.peers) - set(written))
        return {
            "changed": True,
            "revision": revision + 1,
            "previous": before,
            "parameters": wanted,
            "peers_written": written,
            "peers_missed": missed,  # repair copies the new config to them
        }

    def _check_parameters(self) -> None:
        """The parameters recorded at init are authoritative; a TOML that disagrees is refused."""
        rc, doc = self.config.repository, self.doc
        chunker = doc.get("chunker", {})
        recorded = {
            "repository.k": (rc.k, doc.get("k")),
            "repository.n": (rc.n, doc.get("n")),
            "repository.chunk_min_kib": (rc.chunk_min // 1024, int(chunker.get("min", 0)) // 1024),
            "repository.chunk_avg_kib": (rc.chunk_avg // 1024, int(chunker.get("avg", 0)) // 1024),
            "repository.chunk_max_kib": (rc.chunk_max // 1024, int(chunker.get("max", 0)) // 1024),
        }
        for key, (configured, actual) in recorded.items():
            if configured != actual:
                raise RepositoryMismatchError(self.config.path, key, configured, actual)

    def close(self) -> None:
        if self.session is not None:
            self.session.end()
            self.session = None
        self.io.shutdown(wait=True)
        self.peers.close()
        self.state.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata objects ----------------------------------------------------------

    def list_meta(self, prefix: str) -> list[str]:
        """Names under ``prefix`` on any reachable peer (the union); junk names are reported, not returned."""
        names: set[str] = set()
        for peer in self.peers.up():
            try:
                names.update(item.name for item in peer.store.list(prefix))
            except PeerError as exc:
                self.peers.mark_down(peer, str(exc))
        if not self.peers.up():
            raise PeerUnavailableError("(all)", f"no peer is reachable: {unreachable(self.peers)}")
        if not prefix.startswith(TOMBSTONE_PREFIX) and names:
            names -= self.deleted_names  # deleted on purpose: a copy left on some peer is a stray, not an object
        good = []
        for name in sorted(names):
            if kind_of(name) is None:
                self._meta_problem(MetaProblem(name, "", "not a shardvault object name (planted or foreign)"))
            else:
                good.append(name)
        return good

    @property
    def deleted_names(self) -> set[str]:
        """Names a tombstone lists as deleted on purpose (:mod:`.tombstones`), loaded once per run."""
        with self._deleted_lock:
            if self._deleted is None:
                self._deleted = load_deleted(self)
            return self._deleted

    def is_deleted(self, name: str) -> bool:
        """Whether a tombstone lists ``name``; tombstones are read again once per run, on the first miss.

        For an object that was listed but is now missing everywhere: another
        process may have forgotten it since, and then it is gone, not lost.
        """
        with self._deleted_lock:
            if name in self.deleted_names:
                return True
            if not self._deleted_reloaded:
                self._deleted_reloaded = True
                self._deleted = self.deleted_names | load_deleted(self)
            return name in self.deleted_names

    def _meta_problem(self, problem: MetaProblem) -> None:
        with self._lock:
            if problem not in self.meta_problems:
                self.meta_problems.append(problem)

    def read_meta(self, name: str, cache: bool = True) -> dict[str, Any]:
        """The object from the local cache or the first peer whose copy authenticates.

        Bad copies are skipped and remembered in :attr:`meta_problems` (one bad
        copy is never fatal while a good one exists); RepositoryCorruptError
        names an object no peer holds intact.
        """
        failures: list[str] = []
        unsupported: UnsupportedFormatError | None = None
        kind = kind_of(name)

        def opened(data: bytes) -> dict[str, Any]:
            doc = open_object(self.cipher, name, data)
            if kind is not None:  # every body's version is looked up in the table of known ones
                check_version(kind, doc, name)
            return doc

        if cache and (data := self.state.cached(name)) is not None:
            try:
                return opened(data)
            except (MalformedObject, UnsupportedFormatError):
                self.state.forget(name)
        for peer in sorted(self.peers.up(), key=lambda p: self.peers.cost(p.name)):
            try:
                data = self.peers.timed(peer, len, lambda p=peer: p.store.load(name))  # type: ignore[misc]
                doc = opened(data)
            except ObjectNotFoundError:
                failures.append(f"peer {peer.name}: missing")
                continue
            except PeerError as exc:
                failures.append(str(exc))
                continue
            except UnsupportedFormatError as exc:
                unsupported = exc
                failures.append(f"peer {peer.name}: {exc}")
                self._meta_problem(MetaProblem(name, peer.name, str(exc)))
                continue
            except MalformedObject as exc:
                failures.append(f"peer {peer.name}: {exc}")
                self._meta_problem(MetaProblem(name, peer.name, f"bad copy: {exc}"))
                continue
            if cache:
                self.state.cache(name, data)
            return doc
        if unsupported is not None and all("missing" in f or "format version" in f for f in failures):
            raise unsupported
        self._meta_problem(MetaProblem(name, "", "no peer holds an intact copy: " + "; ".join(failures)))
        raise RepositoryCorruptError(name, "; ".join(failures) or "no peer reachable")

    def check_session(self) -> None:
        """Before a commit or a deletion: refuse if a pruning host may have taken this process for dead."""
        if self.session is not None and self.session.expired():
            raise SessionLostError(self.session.stale_after / 2)

    def delete_everywhere(self, names: list[str], measure: bool = False, mark_down: bool = True) -> Deletion:
        """Delete ``names`` on every reachable peer, in parallel: the one deletion path of forget, prune and sessions.

        A peer that is down or fails keeps its copies (a tombstone, written
        first by the caller, makes them strays that repair deletes); a peer
        that refuses (append-only, object lock) keeps them for now.  With
        ``measure`` each object's size is looked up first, to report the bytes freed.
        """
        if not all(name.startswith(sessions.PREFIX) for name in names):
            self.check_session()
        outcome = Deletion()

        def on(peer: Peer) -> None:
            for name in names:
                try:
                    size = peer.store.info(name).size if measure else 0
                    peer.store.delete(name)
                except ObjectNotFoundError:
                    continue  # never reached this peer, or deleted already
                except DeletionRefusedError as exc:
                    outcome.refused.setdefault(peer.name, []).append(str(exc))
                    continue
                with self._lock:
                    outcome.deleted[peer.name] = outcome.deleted.get(peer.name, 0) + 1
                    outcome.freed[peer.name] = outcome.freed.get(peer.name, 0) + size

        outcome.missed.update(self.peers.down())
        for peer, future in [(p, self.io.submit(on, p)) for p in self.peers.up()]:
            try:
                future.result()
            except PeerError as exc:
                if mark_down:
                    self.peers.mark_down(peer, str(exc))
                outcome.missed[peer.name] = str(exc)
        for name in names:
            self.state.forget(name)
        return outcome

    def meta_exists(self, name: str) -> bool:
        """Whether any reachable peer holds the object (without reading it)."""
        for peer in self.peers.up():
            try:
                peer.store.info(name)
                return not self.is_deleted(name)  # a stray copy of a deleted object is not the object
            except ObjectNotFoundError:
                continue
            except PeerError as exc:
                self.peers.mark_down(peer, str(exc))
        return False

    def write_meta(self, name: str, doc: dict[str, Any], cache: bool = True, mark_down: bool = True) -> None:
        """Store a sealed object on every reachable peer: the commit step of every writer.

        Committed means visible, and visible means committed (finding 9 of
        issue 7): at least the write quorum must take it, or every copy that
        was written is deleted again and NotEnoughPeersError says nothing was
        committed.  Only if that undo itself fails is the object visible with
        fewer copies; then it *is* committed and the write returns normally
        (check reports the missing copies, repair re-replicates them).
        """
        if not name.startswith(sessions.PREFIX):
            self.check_session()
        data = seal_object(self.cipher, name, doc)
        self.replicate(name, data, mark_down)
        if cache:  # (sessions are not cached: they are rewritten, and beat on another thread)
            self.state.cache(name, data)

    def replicate(self, name: str, data: bytes, mark_down: bool = True) -> None:
        """Store ``data`` as ``name`` on every reachable peer, with :meth:`write_meta`'s quorum and undo.

        The one path for metadata writes: sealed objects through
        :meth:`write_meta`, key objects (clear JSON, see
        :mod:`shardvault.repository.keys`) directly.
        """
        up = self.peers.up()
        errors: list[str] = []
        futures = [(peer, self.io.submit(peer.store.store, name, data)) for peer in up]
        acked: list[Peer] = []
        for peer, future in futures:
            try:
                future.result()
                acked.append(peer)
            except PeerError as exc:
                if mark_down:  # (a session's heartbeat does not take a peer out of the run's work)
                    self.peers.mark_down(peer, str(exc))
                errors.append(str(exc))
        quorum = self.config.repository.write_quorum
        if len(acked) < quorum:
            undone: list[Peer] = []
            for peer in acked:
                try:
                    peer.store.delete(name)
                    undone.append(peer)
                except PeerError:
                    break  # it stays visible: then keep every copy that was written (below)
            if len(undone) == len(acked):
                raise NotEnoughPeersError(len(acked), quorum, "; ".join(errors) or unreachable(self.peers))
            for peer in undone:  # half an undo would leave fewer copies than were acknowledged
                try:
                    peer.store.store(name, data)
                except PeerError as exc:
                    self.peers.mark_down(peer, str(exc))

    def complete_copies(self, name: str) -> int:
        """Copy a committed object onto every reachable peer that lacks it; return how many peers hold it now.

        A writer killed in the middle of its commit (between the copies of
        :meth:`replicate`, when no undo runs) leaves the object on fewer peers
        than any commit would.  Whoever finds it again, and would vouch for it
        (a ``wal-push`` of the same file says "archived"), completes it
        first; the copy it spreads is one that authenticates.
        """
        up = self.peers.up()

        def holds(peer: Peer) -> bool | None:
            try:
                peer.store.info(name)
                return True
            except ObjectNotFoundError:
                return False
            except PeerError as exc:
                self.peers.mark_down(peer, str(exc))
                return None

        found = list(self.io.map(holds, up))
        holders = [peer for peer, held in zip(up, found, strict=True) if held]
        missing = [peer for peer, held in zip(up, found, strict=True) if held is False]
        data = self._authentic_copy(name, holders) if missing else None
        if data is not None:
            for peer, future in [(p, self.io.submit(p.store.store, name, data)) for p in missing]:
                try:
                    future.result()
                    holders.append(peer)
                except PeerError as exc:
                    self.peers.mark_down(peer, str(exc))
        return len(holders)

    def _authentic_copy(self, name: str, holders: list[Peer]) -> bytes | None:
        for peer in holders:
            try:
                data = peer.store.load(name)
                open_object(self.cipher, name, data)
                return data
            except (PeerError, MalformedObject):
                continue
        return None

    def require_quorum(self) -> None:
        """Before writing: enough peers must answer, or nothing is written."""
        errors = [e for e in self.peers.probe_all().values() if e is not None]
        if len(self.peers.up()) < self.config.repository.write_quorum:
            raise (
                errors[0]
                if errors
                else NotEnoughPeersError(
                    len(self.peers.up()), self.config.repository.write_quorum, unreachable(self.peers)
                )
            )

    def _read_all(self, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
        """Read many objects in parallel; an object no peer holds intact is reported and skipped.

        One junk or unauthenticated object must not stop every command
        (finding 4 of issue 7): unrelated snapshots still restore and backups
        still run; ``check`` names the unreadable object.
        """

        def read(name: str) -> dict[str, Any] | None:
            try:
                return self.read_meta(name)
            except (RepositoryCorruptError, UnsupportedFormatError) as exc:
                if self.is_deleted(name):  # forgotten or pruned since it was listed: gone, not a problem
                    with self._lock:
                        self.meta_problems[:] = [p for p in self.meta_problems if p.name != name]
                    return None
                self._meta_problem(MetaProblem(name, "", str(exc)))
                return None

        return [(n, d) for n, d in zip(names, self.io.map(read, names), strict=True) if d is not None]

    # -- index and snapshots -------------------------------------------------------

    @property
    def index(self) -> Index:
        if self._index is None:
            self.announce()
            self._index = self.load_index()
        return self._index

    def announce(self, kind: sessions.SessionKind | None = None) -> None:
        """Tell pruning hosts this process is here, then read what they condemned (docs/concurrency.md).

        Writers (backup, repair, prune) must be announced: one that cannot
        announce itself could not commit either.  Readers and verifiers go on
        unannounced when too few peers take the session (a restore from
        read-only mounts, a check while peers are down).
        """
        kind = kind or self.purpose
        started = False
        if (
            self.session is None
            and self.announce_sessions
            and (not self._announced or kind not in sessions.UNANNOUNCED_OK)
        ):
            session = sessions.Session(self, kind, self.config.prune.stale_after_seconds)
            try:
                session.start()
                self.session, started = session, True
            except PeerError:
                if kind not in sessions.UNANNOUNCED_OK:
                    raise
        if started or not self._announced:
            # Once per run, or again when a session began only now: what was read before it is not covered.
            self._announced = True
            self.condemned_sets = read_condemned(self)
            self._index = None

    def load_index(self) -> Index:
        index = Index(condemned_packs(self.condemned_sets))
        seen: set[str] = set()
        for _ in range(5):
            names = [n for n in self.list_meta("index/") if n not in seen]
            seen.update(names)
            found = self._read_all(names)
            for name, doc in found:
                try:
                    index.add_doc(name, doc)
                except (KeyError, ValueError, TypeError, IndexError) as exc:  # authenticated but malformed
                    self._meta_problem(MetaProblem(name, "", f"unparsable index body: {exc!r}"))
            # A file listed but deleted before it was read was compacted by a prune,
            # which wrote its replacement first: list again to find the replacement.
            if not any(self.is_deleted(n) for n in set(names) - {n for n, _ in found}):
                break
        if index.condemned_ids:  # a copy outside condemned packs is read first
            index.prefer(lambda pack_id: pack_id not in index.condemned_ids)
        failpoint("index-loaded")
        return index

    def write_index(self, packs: list[PackRecord]) -> str:
        name = f"index/{new_id()}"
        self.write_meta(name, index_doc(packs))
        if self._index is not None:
            for pack in packs:
                self._index.add(pack)
        return name

    def snapshots(self) -> list[Snapshot]:
        snaps = []
        for name, doc in self._read_all(self.list_meta("snapshots/")):
            try:
                snap = Snapshot.from_doc(doc)
            except (KeyError, ValueError, TypeError) as exc:  # authenticated but malformed
                self._meta_problem(MetaProblem(name, "", f"unparsable snapshot body: {exc!r}"))
                continue
            if name != f"snapshots/{snap.id}":
                self._meta_problem(MetaProblem(name, "", f"names snapshot {snap.id[:16]}, not itself"))
                continue
            snaps.append(snap)
        return sorted(snaps, key=lambda s: (s.finished, s.id))

    def resolve_snapshot(self, spec: str, source: str | None = None) -> Snapshot:
        """An id, a unique id prefix or ``latest``; a snapshot that exists but is intact nowhere is data loss."""
        snaps = self.snapshots()
        try:
            return resolve(snaps, spec, source)
        except SnapshotNotFoundError:
            wanted = spec.lower()
            for problem in self.meta_problems:
                if not problem.peer and problem.name.startswith(f"snapshots/{wanted}") and spec != "latest":
                    raise DataLossError(f"{problem.name} is intact on no peer: {problem.detail}") from None
            raise

    def write_snapshot(self, snapshot: Snapshot) -> None:
        failpoint("commit")
        self.write_meta(f"snapshots/{snapshot.id}", snapshot.to_doc())

    # -- packs and blobs -----------------------------------------------------------

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        return chunk_id(self.keys.chunk_id, data)

    def store_pack(self, pack_id: bytes, kind: int, data: bytes, entries: list[PackEntry]) -> PackRecord:
        rc = self.config.repository
        pid = pack_id.hex()
        shards = put_pack(
            self.peers, self.io, pack_id, data, rc.k, rc.n, rc.write_quorum, lambda num: pack_name(pid, num)
        )
        return PackRecord(pid, kind, rc.k, rc.n, len(data), tuple(shards), tuple(entries))

    def fetch_pack(self, record: PackRecord) -> DecodedPack:
        return get_pack(
            self.peers,
            self.io,
            bytes.fromhex(record.id),
            record.k,
            record.n,
            record.length,
            list(record.shards),
            lambda num: pack_name(record.id, num),
            self._report,
        )

    def list_shards(self) -> dict[tuple[str, int], dict[str, int]]:
        """Every shard object on every reachable peer: (pack id, num) -> {peer: size}.

        One listing per peer (not a HEAD per shard), in parallel; peers that
        fail to list are marked down and simply contribute nothing.
        """

        def listing(peer: Peer) -> list[tuple[str, int]]:
            return [(item.name, item.size) for item in peer.store.list("data/")]

        found: dict[tuple[str, int], dict[str, int]] = {}
        up = self.peers.up()
        for peer, future in [(p, self.io.submit(listing, p)) for p in up]:
            try:
                items = future.result()
            except PeerError as exc:
                self.peers.mark_down(peer, str(exc))
                continue
            for name, size in items:
                parsed = parse_shard_name(name)
                if parsed is not None:
                    found.setdefault(parsed, {})[peer.name] = size
        return found

    def _report(self, problem: ShardProblem) -> None:
        with self._lock:
            self._problems.append(problem)

    def take_problems(self) -> list[ShardProblem]:
        """Bad shards met while reading since the last call (each once)."""
        with self._lock:
            problems, self._problems = self._problems, []
        seen: set[tuple[str, int, str]] = set()
        unique = []
        for p in problems:
            if (p.pack_id, p.num, p.peer) not in seen:
                seen.add((p.pack_id, p.num, p.peer))
                unique.append(p)
        return unique

    def open_blob(
        self, chunk: bytes, pack: DecodedPack, offset: int, length: int, raw_length: int, check_id: bool = True
    ) -> bytes | bytearray:
        """Decrypt one blob out of a decoded pack and check it is the chunk named.

        ``check_id=False`` leaves the id to the caller's own proof: a file
        restore hashes each whole file against the hash recorded at backup,
        which no wrong chunk passes (and AES-GCM already authenticated the
        blob under this id), so a second BLAKE3 pass per byte buys nothing.
        """
        try:
            data = open_blob(self.cipher, chunk, pack.view(offset, length), raw_length)
        except PackFormatError as exc:
            raise DataLossError(f"chunk {chunk.hex()[:16]}: {exc}") from None
        if check_id and self.chunk_id(data) != chunk:
            raise DataLossError(f"chunk {chunk.hex()[:16]}: content does not match its id")
        return data

    def blob_reader(self, max_packs: int = 4) -> BlobReader:
        return BlobReader(self, max_packs)

    def recorded_corrupt(self) -> set[tuple[str, int, str]]:
        """(pack, num, peer) of every shard a read found corrupt and no repair has replaced yet."""
        rows = self.state.query("SELECT pack, num, peer FROM shards WHERE status = 'corrupt'")
        return {(str(pack), int(num), str(peer)) for pack, num, peer in rows}

    def prefer_recoverable(self, present: dict[tuple[str, int], dict[str, int]] | None = None) -> set[str]:
        """Steer chunks stored more than once away from packs with fewer than k shards present.

        Returns the packs found unrecoverable (among those holding such chunks).
        """
        index = self.index
        if not index.alternatives:
            return set()
        listing = self.list_shards() if present is None else present
        corrupt = self.recorded_corrupt()
        cache: dict[str, bool] = {}

        def usable(pack_id: str) -> bool:
            if pack_id not in cache:
                record = index.packs[pack_id]
                cache[pack_id] = len(intact_shard_nums(record, listing, corrupt)) >= record.k
            return cache[pack_id]

        index.prefer(usable)
        return {pack_id for pack_id, ok in cache.items() if not ok}

    def iter_tree(self, snapshot: Snapshot, keep_lines: bool = False) -> Iterator[Entry]:
        """The entries of a snapshot's tree, streamed from the repository (``keep_lines``: see parse_lines)."""
        reader = self.blob_reader(max_packs=2)
        return parse_lines((reader.read(bytes.fromhex(c)) for c in snapshot.tree), keep_lines)


@dataclass
class Deletion:
    """What :meth:`Repository.delete_everywhere` did, per peer."""

    deleted: dict[str, int] = field(default_factory=dict)  # objects deleted
    freed: dict[str, int] = field(default_factory=dict)  # their bytes (when measured)
    refused: dict[str, list[str]] = field(default_factory=dict)  # the peer refuses (append-only, object lock)
    missed: dict[str, str] = field(default_factory=dict)  # down or failing: its copies stay (strays)


class BlobReader:
    """Reads chunks by id, keeping the last few decoded packs (LRU)."""

    def __init__(self, repo: Repository, max_packs: int) -> None:
        self.repo = repo
        self.max_packs = max_packs
        self.packs: OrderedDict[str, DecodedPack] = OrderedDict()

    def pack(self, pack_id: str) -> DecodedPack:
        if pack_id in self.packs:
            self.packs.move_to_end(pack_id)
            return self.packs[pack_id]
        data = self.repo.fetch_pack(self.repo.index.packs[pack_id])
        self.packs[pack_id] = data
        while len(self.packs) > self.max_packs:
            self.packs.popitem(last=False)
        return data

    def read(self, chunk: bytes, check_id: bool = True) -> bytes | bytearray:
        """The chunk's data (``check_id``: see :meth:`Repository.open_blob`)."""
        locations = self.repo.index.locations(chunk)
        if not locations:
            raise BlobNotFoundError(chunk.hex())
        for i, loc in enumerate(locations):
            try:
                pack = self.pack(loc.pack_id)
                return self.repo.open_blob(chunk, pack, loc.offset, loc.length, loc.raw_length, check_id)
            except (NotEnoughShardsError, DataLossError):
                if i == len(locations) - 1:
                    raise  # no other copy of the chunk: the loss is real
        raise BlobNotFoundError(chunk.hex())  # unreachable: the loop returns or raises


def random_pack_id() -> bytes:
    return os.urandom(32)
