"""The repository: keys, config, index, snapshots and packs, kept on the peers.

Small objects (keys, config, index files, snapshots; see
:mod:`shardvault.metadata`) are replicated to every peer and read from any
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
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shardvault.config import Config
from shardvault.crypto import Cipher, MasterKeys, OpenFailed, chunk_id
from shardvault.errors import (
    BlobNotFoundError,
    DataLossError,
    NotEnoughPeersError,
    ObjectNotFoundError,
    PeerError,
    PeerUnavailableError,
    RepositoryCorruptError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    WrongPassphraseError,
)
from shardvault.index import Index, PackRecord, index_doc
from shardvault.metadata import (
    FORMAT_VERSION,
    MalformedObject,
    make_key_object,
    new_id,
    open_key_object,
    open_object,
    pack_name,
    parse_shard_name,
    seal_object,
)
from shardvault.packs import PackEntry, PackFormatError, open_blob
from shardvault.shards.dispersal import ShardProblem, get_pack, put_pack
from shardvault.shards.erasure import DecodedPack
from shardvault.shards.peers import Peer, PeerSet
from shardvault.shards.stores import open_store
from shardvault.snapshot import Snapshot
from shardvault.state import State
from shardvault.tree import Entry, parse_lines

CONFIG_NAME = "config"


def open_peers(config: Config) -> PeerSet:
    return PeerSet(
        [
            Peer(
                p.name,
                p.zone,
                open_store(
                    p.name,
                    p.url,
                    endpoint=p.endpoint,
                    region=p.region,
                    profile=p.profile,
                    fsync=config.repository.fsync,
                ),
            )
            for p in config.peers
        ]
    )


def _unreachable(peers: PeerSet) -> str:
    return "; ".join(f"{name}: {why}" for name, why in peers.down().items())


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

    # -- opening -------------------------------------------------------------------

    @classmethod
    def init(cls, config: Config, password: str) -> Repository:
        """Create the repository on every configured peer, or change nothing."""
        peers = open_peers(config)
        for peer in peers:
            peer.store.create()  # raises on the first unreachable or read-only peer
        for peer in peers:
            if any(True for _ in peer.store.list("keys/")) or any(True for _ in peer.store.list(CONFIG_NAME)):
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
        objects = {
            f"keys/{secrets.token_hex(8)}": make_key_object(password, keys, repo_id),
            CONFIG_NAME: seal_object(repo.cipher, CONFIG_NAME, doc),
        }
        written: list[tuple[Peer, str]] = []
        try:
            for name, data in objects.items():
                for peer in peers:
                    peer.store.store(name, data)
                    written.append((peer, name))
        except PeerError:
            for peer, name in written:  # leave every peer as it was
                try:
                    peer.store.delete(name)
                except PeerError:
                    pass
            repo.close()
            raise
        return repo

    @classmethod
    def open(cls, config: Config, password: str) -> Repository:
        peers = open_peers(config)
        peers.probe_all()
        up = peers.up()
        if not up:
            raise PeerUnavailableError("(all)", f"no peer is reachable: {_unreachable(peers)}")
        key_names: dict[str, list[Peer]] = {}
        for peer in up:
            try:
                for item in peer.store.list("keys/"):
                    key_names.setdefault(item.name, []).append(peer)
            except PeerError as exc:
                peers.mark_down(peer, str(exc))
        if not key_names:
            where = ", ".join(p.name for p in peers.up()) or "none"
            raise RepositoryNotFoundError(where)
        for name, holders in sorted(key_names.items()):
            for peer in holders:
                try:
                    keys, repo_id = open_key_object(password, peer.store.load(name))
                except (PeerError, MalformedObject):
                    continue  # a damaged copy; another peer may have a good one
                except OpenFailed:
                    break  # authenticated encryption: this key is not ours
                repo = cls(config, peers, keys, repo_id, {})
                repo.doc = repo.read_meta(CONFIG_NAME, cache=False)
                if repo.doc.get("id") != repo_id:
                    raise RepositoryCorruptError(CONFIG_NAME, "belongs to another repository")
                return repo
        raise WrongPassphraseError()

    def close(self) -> None:
        self.io.shutdown(wait=True)
        self.peers.close()
        self.state.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata objects ----------------------------------------------------------

    def list_meta(self, prefix: str) -> list[str]:
        """Names under ``prefix`` on any reachable peer (the union)."""
        names: set[str] = set()
        for peer in self.peers.up():
            try:
                names.update(item.name for item in peer.store.list(prefix))
            except PeerError as exc:
                self.peers.mark_down(peer, str(exc))
        if not self.peers.up():
            raise PeerUnavailableError("(all)", f"no peer is reachable: {_unreachable(self.peers)}")
        return sorted(names)

    def read_meta(self, name: str, cache: bool = True) -> dict[str, Any]:
        """The object from the local cache or the first peer whose copy authenticates."""
        failures: list[str] = []
        if cache and (data := self.state.cached(name)) is not None:
            try:
                return open_object(self.cipher, name, data)
            except MalformedObject:
                self.state.forget(name)
        for peer in sorted(self.peers.up(), key=lambda p: self.peers.cost(p.name)):
            try:
                data = self.peers.timed(peer, len, lambda p=peer: p.store.load(name))  # type: ignore[misc]
                doc = open_object(self.cipher, name, data)
            except PeerError as exc:
                failures.append(str(exc))
                continue
            except MalformedObject as exc:
                failures.append(f"peer {peer.name}: {exc}")
                continue
            if cache:
                self.state.cache(name, data)
            return doc
        raise RepositoryCorruptError(name, "; ".join(failures) or "no peer reachable")

    def meta_exists(self, name: str) -> bool:
        """Whether any reachable peer holds the object (without reading it)."""
        for peer in self.peers.up():
            try:
                peer.store.info(name)
                return True
            except ObjectNotFoundError:
                continue
            except PeerError as exc:
                self.peers.mark_down(peer, str(exc))
        return False

    def write_meta(self, name: str, doc: dict[str, Any]) -> None:
        """Store a sealed object on every reachable peer; at least the write quorum must take it."""
        data = seal_object(self.cipher, name, doc)
        up = self.peers.up()
        errors: list[str] = []

        def put(peer: Peer) -> None:
            peer.store.store(name, data)

        futures = [(peer, self.io.submit(put, peer)) for peer in up]
        acked = 0
        for peer, future in futures:
            try:
                future.result()
                acked += 1
            except PeerError as exc:
                self.peers.mark_down(peer, str(exc))
                errors.append(str(exc))
        quorum = self.config.repository.write_quorum
        if acked < quorum:
            raise NotEnoughPeersError(acked, quorum, "; ".join(errors) or _unreachable(self.peers))
        self.state.cache(name, data)

    def require_quorum(self) -> None:
        """Before writing: enough peers must answer, or nothing is written."""
        errors = [e for e in self.peers.probe_all().values() if e is not None]
        if len(self.peers.up()) < self.config.repository.write_quorum:
            raise errors[0]

    # -- index and snapshots -------------------------------------------------------

    @property
    def index(self) -> Index:
        if self._index is None:
            self._index = self.load_index()
        return self._index

    def load_index(self) -> Index:
        index = Index()
        names = self.list_meta("index/")
        for name, doc in zip(names, self.io.map(self.read_meta, names), strict=True):
            index.add_doc(name, doc)
        return index

    def write_index(self, packs: list[PackRecord]) -> str:
        name = f"index/{new_id()}"
        self.write_meta(name, index_doc(packs))
        if self._index is not None:
            for pack in packs:
                self._index.add(pack)
        return name

    def snapshots(self) -> list[Snapshot]:
        names = self.list_meta("snapshots/")
        snaps = [Snapshot.from_doc(doc) for doc in self.io.map(self.read_meta, names)]
        return sorted(snaps, key=lambda s: (s.finished, s.id))

    def write_snapshot(self, snapshot: Snapshot) -> None:
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
        self, chunk: bytes, pack: DecodedPack, offset: int, length: int, raw_length: int
    ) -> bytes | bytearray:
        """Decrypt one blob out of a decoded pack and check it is the chunk named."""
        try:
            data = open_blob(self.cipher, chunk, pack.view(offset, length), raw_length)
        except PackFormatError as exc:
            raise DataLossError(f"chunk {chunk.hex()[:16]}: {exc}") from None
        if self.chunk_id(data) != chunk:
            raise DataLossError(f"chunk {chunk.hex()[:16]}: content does not match its id")
        return data

    def blob_reader(self, max_packs: int = 4) -> BlobReader:
        return BlobReader(self, max_packs)

    def iter_tree(self, snapshot: Snapshot) -> Iterator[Entry]:
        """The entries of a snapshot's tree, streamed from the repository."""
        reader = self.blob_reader(max_packs=2)
        return parse_lines(reader.read(bytes.fromhex(c)) for c in snapshot.tree)


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

    def read(self, chunk: bytes) -> bytes | bytearray:
        loc = self.repo.index.blobs.get(chunk)
        if loc is None:
            raise BlobNotFoundError(chunk.hex())
        return self.repo.open_blob(chunk, self.pack(loc.pack_id), loc.offset, loc.length, loc.raw_length)


def random_pack_id() -> bytes:
    return os.urandom(32)
