"""Prune: free what no snapshot needs, without a lock server and without breaking a running backup.

One run does, in order (``docs/concurrency.md`` has the reasoning)::

    announce a prune session; refuse if another prune is live
    sessions:   which are live, which ended or are stale (by process, or observed)
    ready sets: condemned sets whose grace has passed and whose sessions all ended
    gather:     snapshots, the full index, one listing per peer, every chunk the
                snapshots and WAL records reference
    phase two:  for the ready sets, delete what is still unreferenced: first a
                compact index without it (old index files tombstoned, then
                deleted), then the shards, stray shards and leftovers, then the sets
    mark:       repack partly used packs (most garbage first, until unused space
                is at most --max-unused of used), then write one condemned set:
                unused, repacked and orphaned packs, stray shards, leftovers, and
                the sessions live once it exists
    at once:    with no grace and no other live session, gather again (new
                snapshots' references) and run phase two on the new set

A chunk's references are by chunk id, so a chunk is safe once *some*
recoverable, uncondemned pack holds it: a repacked chunk lets its old pack
go, and a pack a backup leaned on after it was condemned is kept (it is
"un-condemned" by leaving it out of the deletion).  Nothing is deleted that a
snapshot needs and no other intact copy holds, whatever the sets say.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shardvault.errors import (
    DeletionRefusedError,
    NotEnoughShardsError,
    PeerError,
    PruneRefusedError,
    RepositoryBusyError,
    ShardvaultError,
)
from shardvault.repository import Repository, random_pack_id
from shardvault.repository.condemned import CondemnedSet, read_condemned
from shardvault.repository.index import Index, PackRecord, index_doc, intact_shard_nums
from shardvault.repository.metadata import kind_of, new_id, pack_name
from shardvault.repository.packs import PackWriter
from shardvault.repository.sessions import Liveness, SessionInfo, SessionKind, list_sessions, liveness
from shardvault.repository.snapshot import Snapshot
from shardvault.repository.tombstones import write_tombstone
from shardvault.shards.stores.immutable import deletion_blockers

# Pack records per compact index file: a few MiB of JSON each, so opening reads few objects.
PACKS_PER_INDEX = 2000

ProgressFn = Callable[[str], None]
Sessions = dict[str, tuple[SessionInfo, Liveness, str]]


@dataclass
class PruneOptions:
    dry_run: bool = False
    max_unused_percent: float = 5.0
    grace_seconds: float = 86400.0


@dataclass
class PruneReport:
    dry_run: bool
    snapshots: int = 0
    packs_total: int = 0
    packs_used: int = 0
    packs_partly_used: int = 0
    packs_unused: int = 0
    packs_orphaned: int = 0
    bytes_used: int = 0
    bytes_unused: int = 0
    chunks_unrecoverable: int = 0
    repacked_packs: int = 0
    repacked_bytes: int = 0
    new_packs: int = 0
    condemned: dict[str, int] = field(default_factory=lambda: {"packs": 0, "stray_shards": 0, "leftovers": 0})
    deleted: dict[str, int] = field(
        default_factory=lambda: {
            "packs": 0,
            "shards": 0,
            "stray_shards": 0,
            "leftovers": 0,
            "index_files": 0,
            "condemned_sets": 0,
            "sessions": 0,
        }
    )
    kept_referenced: int = 0  # condemned packs a later snapshot turned out to need (kept)
    kept_unverified: int = 0  # condemned packs kept because the other copy of a chunk did not read back
    deleted_bytes: dict[str, int] = field(default_factory=dict)  # per peer: what was deleted
    written_bytes: dict[str, int] = field(default_factory=dict)  # per peer: the repacked packs' new shards
    waiting: list[dict[str, Any]] = field(default_factory=list)
    index_files_before: int = 0
    index_files_after: int = 0
    refused: list[str] = field(default_factory=list)  # deletions a peer refused (object lock): retried next run

    def free(self, peer: str, size: int) -> None:
        self.deleted_bytes[peer] = self.deleted_bytes.get(peer, 0) + size

    @property
    def freed_bytes(self) -> dict[str, int]:
        """Per peer, what the run gave back: deleted minus what repacking wrote."""
        peers = set(self.deleted_bytes) | set(self.written_bytes)
        return {p: self.deleted_bytes.get(p, 0) - self.written_bytes.get(p, 0) for p in sorted(peers)}

    def to_doc(self) -> dict[str, Any]:
        freed = self.freed_bytes
        return dict(self.__dict__) | {"freed_bytes": freed, "freed_total": sum(freed.values())}


@dataclass
class Gathered:
    """What one look at the repository found: the basis of every decision of a run."""

    snapshots: dict[str, Snapshot]
    index: Index  # every pack record, condemned ones included
    index_names: list[str]
    listing: dict[tuple[str, int], dict[str, int]]
    leftovers: set[tuple[str, str]]
    refs: set[bytes]


class Pruner:
    def __init__(self, repo: Repository, options: PruneOptions, progress: ProgressFn | None = None) -> None:
        self.repo = repo
        self.options = options
        self.progress = progress or (lambda message: None)
        self.report = PruneReport(dry_run=options.dry_run)
        self.stale_after = repo.config.prune.stale_after_seconds
        self._refs_by_snapshot: dict[str, set[bytes]] = {}
        self._wal_refs: dict[str, set[bytes]] = {}

    # -- sessions ------------------------------------------------------------------

    def _sessions(self) -> Sessions:
        answer = {}
        for info in list_sessions(self.repo):
            state, why = liveness(self.repo, info, self.stale_after)
            answer[info.id] = (info, state, why)
        return answer

    def _exclusive(self, sessions: Sessions) -> None:
        own = self.repo.session.id if self.repo.session else ""
        for sid, (info, state, why) in sessions.items():
            if sid != own and info.kind == SessionKind.PRUNE and state is Liveness.LIVE:
                raise RepositoryBusyError("the repository's prune", f"{info.describe()}: {why}")

    def _clean_sessions(self, sessions: Sessions) -> None:
        for info, state, _ in sessions.values():
            if state is Liveness.LIVE:
                continue
            self._delete_everywhere(list(info.names))
            self.report.deleted["sessions"] += 1

    # -- gathering -----------------------------------------------------------------

    def gather(self) -> Gathered:
        repo = self.repo
        self.progress("reading snapshots and the index")
        snapshots = {s.id: s for s in repo.snapshots()}
        repo._index = None
        index = repo.index  # read afresh: every index file (condemned packs are in it, flagged)
        wal = [n for n in repo.list_meta("wal/") if n not in self._wal_refs]
        for name, doc in repo._read_all(wal):  # WAL records are immutable: each read once per run
            self._wal_refs[name] = {bytes.fromhex(c) for c in doc.get("chunks", [])}
        # An object intact nowhere: what a snapshot or WAL record references is unknown, and an index
        # file's packs would look like orphans (a planted junk name is neither).
        lost = [p for p in repo.meta_problems if not p.peer and kind_of(p.name) in ("snapshot", "wal", "index")]
        if lost:
            raise PruneRefusedError(
                f"{lost[0].name} cannot be read ({lost[0].detail}), so what it references is unknown; "
                "run 'shardvault check' and 'shardvault repair' first"
            )
        self.progress("listing every peer")
        listing = repo.list_shards()
        leftovers: set[tuple[str, str]] = set()
        for peer in repo.peers.up():
            try:
                leftovers.update((peer.name, item.name) for item in peer.store.list_leftovers())
            except PeerError as exc:
                repo.peers.mark_down(peer, str(exc))
        self.progress(f"reading the trees of {len(snapshots)} snapshot(s)")
        refs: set[bytes] = set()
        for sid, snapshot in snapshots.items():
            if sid not in self._refs_by_snapshot:
                self._refs_by_snapshot[sid] = self._snapshot_refs(snapshot)
            refs |= self._refs_by_snapshot[sid]
        for name in repo.list_meta("wal/"):  # (forget may have expired some since: only the listed count)
            refs |= self._wal_refs.get(name, set())
        return Gathered(snapshots, index, sorted(index.files), listing, leftovers, refs)

    def _snapshot_refs(self, snapshot: Snapshot) -> set[bytes]:
        refs = {bytes.fromhex(c) for c in snapshot.tree}
        try:
            for entry in self.repo.iter_tree(snapshot):
                refs.update(bytes.fromhex(c) for c in entry.chunks)
        except ShardvaultError as exc:
            raise PruneRefusedError(
                f"the tree of snapshot {snapshot.short_id} cannot be read ({exc}), so what it references is "
                "unknown; run 'shardvault check' and 'shardvault repair' first"
            ) from None
        return refs

    def needed_packs(self, g: Gathered, condemned: set[str]) -> tuple[set[str], dict[str, int], dict[bytes, str]]:
        """The packs that keep each referenced chunk (one copy each), the bytes each keeps, and each chunk's keeper.

        A chunk keeps its copy in a recoverable, uncondemned pack if there is
        one, else in a recoverable condemned one (which is then kept); a
        chunk with no recoverable copy keeps every pack that holds it (prune
        never makes a loss worse; check and repair report it).
        """
        corrupt = self.repo.recorded_corrupt()
        recoverable: dict[str, bool] = {}

        def ok(pack_id: str) -> bool:
            if pack_id not in recoverable:
                record = g.index.packs[pack_id]
                recoverable[pack_id] = len(intact_shard_nums(record, g.listing, corrupt)) >= record.k
            return recoverable[pack_id]

        needed: set[str] = set()
        used: dict[str, int] = {}
        keepers: dict[bytes, str] = {}
        unrecoverable = 0
        for chunk in g.refs:
            locations = g.index.locations(chunk)
            if not locations:
                continue  # referenced but in no index: check reports it; nothing here to keep
            keeper = next((loc for loc in locations if loc.pack_id not in condemned and ok(loc.pack_id)), None)
            keeper = keeper or next((loc for loc in locations if ok(loc.pack_id)), None)
            if keeper is None:
                unrecoverable += 1
                needed.update(loc.pack_id for loc in locations)
                continue
            needed.add(keeper.pack_id)
            used[keeper.pack_id] = used.get(keeper.pack_id, 0) + keeper.length
            keepers[chunk] = keeper.pack_id
        self.report.chunks_unrecoverable = unrecoverable
        return needed, used, keepers

    # -- phase two -----------------------------------------------------------------

    def ready(self, sets: list[CondemnedSet], sessions: Sessions) -> list[CondemnedSet]:
        now = time.time()
        ready = []
        for cset in sets:
            # The grace runs from when *this host* first saw the set: the writing host's clock
            # ('marked') may be years off either way.
            age = now - self.repo.state.observe(cset.name, 0, now)
            blocking = [
                sessions[s][0].describe() for s in cset.sessions if s in sessions and sessions[s][1] is Liveness.LIVE
            ]
            if age < min(cset.grace_seconds, self.options.grace_seconds):
                wait = min(cset.grace_seconds, self.options.grace_seconds) - age
                self.report.waiting.append({"set": cset.id, "why": f"grace period: {wait:.0f} s to go"})
            elif blocking:
                self.report.waiting.append({"set": cset.id, "why": "waiting for " + "; ".join(blocking)})
            else:
                ready.append(cset)
        return ready

    def delete(self, g: Gathered, sets: list[CondemnedSet], condemned_elsewhere: set[str]) -> None:
        """Phase two for ``sets``: delete what is still unreferenced, index first, then shards, then the sets."""
        if not sets:
            return
        condemned = set().union(*(c.packs for c in sets))
        needed, _, keepers = self.needed_packs(g, condemned | condemned_elsewhere)
        keep = condemned & needed
        self.report.kept_referenced += len(keep)
        doomed = (condemned - needed) & (set(g.index.packs) | {pid for pid, _ in g.listing})
        doomed -= self._unverified_keepers(g, doomed, keepers)
        # 1. The index without the doomed packs, before any shard goes: a crash
        #    after this leaves orphans (the next prune takes them), never a pack
        #    the index names but the peers lack.
        self.compact(g, doomed)
        # 2. Shards of doomed packs, wherever they are.
        for (pack_id, num), where in g.listing.items():
            if pack_id in doomed:
                for peer, size in where.items():
                    if self._delete_on(peer, pack_name(pack_id, num), size):
                        self.report.deleted["shards"] += 1
        self.report.deleted["packs"] += len(doomed)
        # 3. Stray shards still outside their pack's placement, and leftovers still there.
        for cset in sets:
            for pack_id, num, peer in cset.stray_shards:
                record = g.index.packs.get(pack_id)
                placed = record is not None and any(s.num == num and s.peer == peer for s in record.shards)
                found = g.listing.get((pack_id, num), {}).get(peer)
                gone = not placed and found is not None and pack_id not in doomed
                if gone and self._delete_on(peer, pack_name(pack_id, num), found or 0):
                    self.report.deleted["stray_shards"] += 1
            for peer, name in cset.leftovers:
                if (peer, name) in g.leftovers and self._delete_leftover(peer, name):
                    self.report.deleted["leftovers"] += 1
        # 4. The sets themselves.
        write_tombstone(self.repo, [c.name for c in sets], "prune")
        self._delete_everywhere([c.name for c in sets])
        self.report.deleted["condemned_sets"] += len(sets)

    def _unverified_keepers(self, g: Gathered, doomed: set[str], keepers: dict[bytes, str]) -> set[str]:
        """Doomed packs that must stay: the copy kept instead of theirs does not read back.

        The keeper of a chunk is chosen by the listing (shards present with
        their sizes); before the last other copy goes, the keeper's blob is
        read, decrypted and hashed, so silent rot in the kept copy never
        costs the intact one.
        """
        holders: dict[bytes, set[str]] = {}
        wanted: dict[str, set[bytes]] = {}
        for pack_id in doomed:
            record = g.index.packs.get(pack_id)
            for entry in record.entries if record else ():
                keeper = keepers.get(entry.chunk_id)
                if keeper is not None and keeper not in doomed:
                    holders.setdefault(entry.chunk_id, set()).add(pack_id)
                    wanted.setdefault(keeper, set()).add(entry.chunk_id)
        saved: set[str] = set()
        for keeper, chunks in wanted.items():
            record = g.index.packs[keeper]
            bad = set(chunks)
            try:
                decoded = self.repo.fetch_pack(record)
                for entry in record.entries:
                    if entry.chunk_id in bad:
                        self.repo.open_blob(entry.chunk_id, decoded, entry.offset, entry.length, entry.raw_length)
                        bad.discard(entry.chunk_id)
            except ShardvaultError as exc:
                self.progress(f"pack {keeper[:16]} does not read back ({exc}): its duplicates are kept")
            for chunk in bad:
                saved |= holders[chunk]
        self.report.kept_unverified += len(saved)
        return saved

    def compact(self, g: Gathered, doomed: set[str]) -> None:
        """Rewrite the index as few files without ``doomed``; the old files are tombstoned, then deleted."""
        records = [r for r in g.index.packs.values() if r.id not in doomed]
        old = list(g.index_names)
        self.report.index_files_before = len(old)
        if len(old) <= 1 and not doomed:
            self.report.index_files_after = len(old)
            return
        new_names = []
        for start in range(0, len(records), PACKS_PER_INDEX):
            name = f"index/{new_id()}"
            self.repo.write_meta(name, index_doc(records[start : start + PACKS_PER_INDEX]))
            new_names.append(name)
        # Readers that listed the old files and read them after this find them
        # gone and tombstoned, and list the index again (Repository.load_index).
        write_tombstone(self.repo, old, "prune")
        self._delete_everywhere(old)
        self.report.deleted["index_files"] += len(old)
        g.index_names = new_names
        self.report.index_files_after = len(new_names)

    # -- mark ----------------------------------------------------------------------

    def mark(self, g: Gathered, condemned: set[str]) -> CondemnedSet | None:
        """Phase one: repack, then condemn what no snapshot needs.  Returns the set written (None if nothing)."""
        needed, used, keepers = self.needed_packs(g, condemned)
        report = self.report
        report.snapshots = len(g.snapshots)
        live = {pid: r for pid, r in g.index.packs.items()}
        report.packs_total = len(live)
        unused = {pid for pid in live if pid not in needed}
        partly = {pid for pid in needed if pid in live and used.get(pid, 0) < _payload(live[pid])}
        report.packs_unused = len(unused)
        report.packs_partly_used = len(partly)
        report.packs_used = len(needed & set(live)) - len(partly)
        report.bytes_used = sum(used.values())
        report.bytes_unused = sum(_payload(live[p]) for p in unused) + sum(
            _payload(live[p]) - used.get(p, 0) for p in partly
        )
        repacked = self.repack(g, partly, used, needed, keepers)
        orphans = {pid for pid, _ in g.listing} - set(g.index.packs)
        report.packs_orphaned = len(orphans)
        strays = {
            (pack_id, num, peer)
            for (pack_id, num), where in g.listing.items()
            if pack_id in live
            for peer in where
            if not any(s.num == num and s.peer == peer for s in live[pack_id].shards)
        }
        cset = CondemnedSet(
            id=new_id(),
            marked=datetime.now(UTC).isoformat(),
            hostname=socket.gethostname(),
            grace_seconds=self.options.grace_seconds,
            packs=(unused | repacked | orphans) - condemned,
            stray_shards=strays,
            leftovers=set(g.leftovers),
            snapshots=sorted(g.snapshots),
        )
        report.condemned = {
            "packs": len(cset.packs),
            "stray_shards": len(cset.stray_shards),
            "leftovers": len(cset.leftovers),
        }
        if cset.empty() or self.options.dry_run:
            return None
        # Written before the sessions are listed: a session that is not in the
        # list announced itself after the set existed, so it read the set.
        pending = CondemnedSet(**(cset.__dict__ | {"id": new_id(), "sessions": ["*"]}))
        self.repo.write_meta(pending.name, pending.to_doc())
        sessions = self._sessions()
        own = self.repo.session.id if self.repo.session else ""
        cset.sessions = sorted(sid for sid, (_, state, _) in sessions.items() if state is Liveness.LIVE and sid != own)
        self.repo.write_meta(cset.name, cset.to_doc())
        self.repo.state.observe(cset.name, 0, time.time())  # its grace starts now, by this host's clock
        write_tombstone(self.repo, [pending.name], "prune")
        self._delete_everywhere([pending.name])
        return cset

    def repack(
        self, g: Gathered, partly: set[str], used: dict[str, int], needed: set[str], keepers: dict[bytes, str]
    ) -> set[str]:
        """Copy the used blobs of the most wasteful packs into new packs; returns the packs emptied."""
        limit = self.options.max_unused_percent / 100 * max(self.report.bytes_used, 1)
        unused_total = self.report.bytes_unused - sum(
            _payload(g.index.packs[p]) for p in g.index.packs if p not in needed
        )
        order = sorted(partly, key=lambda p: used.get(p, 0) / max(_payload(g.index.packs[p]), 1))
        chosen = []
        for pack_id in order:
            if unused_total <= limit:
                break
            chosen.append(pack_id)
            unused_total -= _payload(g.index.packs[pack_id]) - used.get(pack_id, 0)
        if not chosen:
            return set()
        self.progress(f"repacking {len(chosen)} pack(s)")
        if self.options.dry_run:
            self.report.repacked_packs = len(chosen)
            self.report.repacked_bytes = sum(used.get(p, 0) for p in chosen)
            return set(chosen)
        wanted_in: dict[str, set[bytes]] = {}
        for chunk, pack_id in keepers.items():
            wanted_in.setdefault(pack_id, set()).add(chunk)
        writers: dict[int, PackWriter] = {}
        new_records: list[PackRecord] = []
        emptied: set[str] = set()
        size = self.repo.config.repository.pack_size

        def seal(kind: int) -> None:
            writer = writers.pop(kind, None)
            if writer is None or not writer.entries:
                return
            pack_id = random_pack_id()
            data = writer.finish(self.repo.cipher, pack_id)
            new_records.append(self.repo.store_pack(pack_id, kind, data, writer.entries))

        for pack_id in chosen:
            record = g.index.packs[pack_id]
            wanted = set(wanted_in.get(pack_id, ()))
            try:
                decoded = self.repo.fetch_pack(record)
                blobs = []
                for entry in record.entries:
                    if entry.chunk_id in wanted:
                        # Verify before copying: a bad blob is never spread into a new pack.
                        self.repo.open_blob(entry.chunk_id, decoded, entry.offset, entry.length, entry.raw_length)
                        sealed = bytes(decoded.view(entry.offset, entry.length))
                        blobs.append((entry.chunk_id, sealed, entry.raw_length))
                        wanted.discard(entry.chunk_id)
            except (NotEnoughShardsError, ShardvaultError) as exc:
                self.progress(f"pack {pack_id[:16]} not repacked: {exc}")
                continue
            writer = writers.setdefault(record.kind, PackWriter())
            for chunk, sealed, raw in blobs:
                writer.add(chunk, record.kind, sealed, raw)
                if len(writer) >= size:
                    seal(record.kind)
                    writer = writers.setdefault(record.kind, PackWriter())
            emptied.add(pack_id)
            self.report.repacked_bytes += sum(len(b[1]) for b in blobs)
        for kind in list(writers):
            seal(kind)
        for record in new_records:
            for shard in record.shards:
                self.report.written_bytes[shard.peer] = self.report.written_bytes.get(shard.peer, 0) + shard.size
        if new_records:
            self.repo.write_index(new_records)
            for record in new_records:
                g.index.add(record)
                for shard in record.shards:
                    g.listing.setdefault((record.id, shard.num), {})[shard.peer] = shard.size
        self.report.repacked_packs = len(emptied)
        self.report.new_packs = len(new_records)
        return emptied

    # -- deleting ------------------------------------------------------------------

    def _delete_on(self, peer_name: str, name: str, size: int) -> bool:
        self.repo.check_session()  # frozen past stale_after: another prune may have acted on a newer view
        peer = self.repo.peers.get(peer_name)
        if peer is None or self.repo.peers.is_down(peer_name):
            return False
        try:
            peer.store.delete(name)
        except DeletionRefusedError as exc:
            self.report.refused.append(str(exc))
            return False
        except PeerError as exc:
            self.repo.peers.mark_down(peer, str(exc))
            return False
        self.report.free(peer_name, size)
        return True

    def _delete_leftover(self, peer_name: str, name: str) -> bool:
        peer = self.repo.peers.get(peer_name)
        if peer is None or self.repo.peers.is_down(peer_name):
            return False
        try:
            size = next((i.size for i in peer.store.list_leftovers() if i.name == name), 0)
            peer.store.delete_leftover(name)
        except PeerError:
            return False
        self.report.free(peer_name, size)
        return True

    def _delete_everywhere(self, names: list[str]) -> None:
        """Metadata objects on every peer (a peer that is down or failing keeps strays a later run removes)."""
        outcome = self.repo.delete_everywhere(names, measure=True)
        for peer, size in outcome.freed.items():
            self.report.free(peer, size)
        for refused in outcome.refused.values():
            self.report.refused.extend(refused)

    # -- the run -------------------------------------------------------------------

    def run(self) -> PruneReport:
        repo, options = self.repo, self.options
        started = time.time()
        if options.dry_run:
            repo.announce_sessions = False
        else:
            blockers = deletion_blockers(repo.peers)
            if blockers:
                peer, why = blockers[0]
                raise DeletionRefusedError(peer, why, "prune deletes nothing; run it where the peers allow deletion")
            repo.require_quorum()
            repo.announce(SessionKind.PRUNE)
        sessions = self._sessions()
        if not options.dry_run:
            self._exclusive(sessions)
        existing = read_condemned(repo)
        # A set still marked "*" was left by a prune killed between its two writes:
        # its packs are condemned again in this run's set (when still unreferenced).
        pending = [c for c in existing if c.sessions == ["*"]]
        finished = [c for c in existing if c.sessions != ["*"]]
        ready = [] if options.dry_run else self.ready(finished, sessions)
        held: set[str] = set().union(*(c.packs for c in finished if c not in ready))  # not ours to touch yet
        g = self.gather()
        if ready:
            self.progress(f"deleting what {len(ready)} condemned set(s) name")
            self.delete(g, ready, held)
            g = self.gather()
        new = self.mark(g, held)
        if not options.dry_run and pending:
            write_tombstone(repo, [c.name for c in pending], "prune")
            self._delete_everywhere([c.name for c in pending])
        condemned = held
        if new is not None and options.grace_seconds == 0 and not new.sessions:
            # Nobody else is here: what the new set names can go now.  Look
            # again first: a writer that ended since the first look may have
            # committed a snapshot that references a condemned chunk.
            self.progress("nothing else is running: deleting at once")
            g = self.gather()
            self.delete(g, [new], condemned)
        elif new is not None and new.sessions:
            blocking = [sessions[s][0].describe() for s in new.sessions if s in sessions]
            self.report.waiting.append({"set": new.id, "why": "waiting for " + "; ".join(blocking or new.sessions)})
        elif new is not None:
            self.report.waiting.append({"set": new.id, "why": f"grace period: {options.grace_seconds:.0f} s to go"})
        if not options.dry_run:
            if not self.report.index_files_before:
                self.compact(g, set())
            self._clean_sessions(sessions)
            self._record([c for c in [*finished, *([new] if new else [])] if c not in ready], started)
        return self.report

    def _record(self, waiting: list[CondemnedSet], started: float) -> None:
        """The run and the facts metrics read (a condemned set waiting for days means a session blocks it)."""
        state = self.repo.state
        waiting = [c for c in waiting if any(w["set"] == c.id for w in self.report.waiting)]
        state.record_run("prune", "ok", started, details=self.report.to_doc())
        state.set_fact("prune_freed_bytes", float(sum(self.report.freed_bytes.values())))
        state.set_fact("prune_sets_waiting", float(len(waiting)))
        now = time.time()
        oldest = min((state.observe(c.name, 0, now) for c in waiting), default=0.0)
        state.set_fact("prune_oldest_waiting_timestamp", oldest)


def _payload(record: PackRecord) -> int:
    """The bytes of a pack's blobs (what used and unused are counted in)."""
    return sum(e.length for e in record.entries)


def prune(repo: Repository, options: PruneOptions, progress: ProgressFn | None = None) -> PruneReport:
    return Pruner(repo, options, progress).run()
