"""Issue 7, verification: one verdict per failure, redundancy in failures survived, drains that tell the truth.

Each test here fails without its fix:

* the same read failure is classified the same by ``check --read-data`` and ``scrub``;
* a pack with two shards on one peer, or crowded into one zone, is not "healthy", and
  repair (or ``peers add``) spreads it back out;
* ``peers drain`` under a concurrent backup does not call the peer removable while
  a fresh index still names shards on it;
* ``check`` counts leftovers (temporary objects of killed runs, unreferenced shards).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import SMALL, Vault, local_peers, make_vault, write_config

from shardvault.errors import ObjectNotFoundError, PeerError, PeerUnavailableError
from shardvault.repository.index import PackRecord
from shardvault.shards.dispersal import ShardProblemKind, ShardRecord, classify
from shardvault.shards.format import ShardFormatError
from shardvault.shards.placement import best_failures_survived, failures_survived
from shardvault.shards.stores import LocalStore
from shardvault.verify import rebalance


def _json(vault: Vault, *args: str) -> tuple[int, Any]:
    result = vault.cli(*args, "--json")
    assert result.stdout.strip(), f"{args}: exit {result.exit_code}: {result.output}"
    return result.exit_code, json.loads(result.stdout)


def _healthy(vault: Vault) -> dict[str, Any]:
    code, report = _json(vault, "check", "--read-data")
    assert code == 0, report
    assert not report["damaged_packs"] and not report["shard_issues"], report
    return dict(report)


def _shard_path(vault: Vault, peer: str, pack_id: str, num: int) -> Path:
    return vault.peer(int(peer[1:])) / "data" / pack_id[:2] / f"{pack_id}.{num:02d}"


# --- one classification ------------------------------------------------------------------


def test_classify_is_the_one_verdict() -> None:
    assert classify(ObjectNotFoundError("p0", "data/x")) is ShardProblemKind.MISSING
    assert classify(PeerUnavailableError("p0", "timed out")) is ShardProblemKind.UNREACHABLE
    assert classify(PeerError("p0", "not in the configuration")) is ShardProblemKind.UNREACHABLE
    assert classify(ShardFormatError("hash mismatch")) is ShardProblemKind.CORRUPT
    assert [k.value for k in ShardProblemKind] == ["missing", "corrupt", "unreachable"]  # the JSON words


@pytest.mark.parametrize(
    ("error", "expected"),
    [(ObjectNotFoundError, "missing"), (PeerUnavailableError, "unreachable")],
)
def test_check_and_scrub_name_the_same_read_failure_alike(
    backed_up: Vault, monkeypatch: pytest.MonkeyPatch, error: type[PeerError], expected: str
) -> None:
    victim = backed_up.shards(1)[0]
    name = str(victim.relative_to(backed_up.peer(1)))
    real_load = LocalStore.load

    def failing_load(self: LocalStore, obj: str, *args: Any, **kwargs: Any) -> bytes:
        # Listed (so presence sees it), but reading it fails: a timeout or a vanished object.
        if self.peer == "p1" and obj == name:
            raise error("p1", "timed out" if error is PeerUnavailableError else obj)
        return real_load(self, obj, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "load", failing_load)
    code, checked = _json(backed_up, "check", "--read-data")
    assert code == 6
    code, scrubbed = _json(backed_up, "scrub")
    assert code == 6
    from_check = {(i["peer"], i["object"], i["problem"]) for i in checked["shard_issues"]}
    from_scrub = {(i["peer"], i["object"], i["problem"]) for i in scrubbed["issues"]}
    assert from_check == from_scrub == {("p1", name, expected)}


# --- failures survived -------------------------------------------------------------------


def test_failures_survived_counts_peers_and_zones_not_shards() -> None:
    one_each = {f"p{i}": {i} for i in range(6)}
    assert failures_survived(one_each, 4) == 2
    doubled = {"p0": {0, 3}, "p1": {1}, "p2": {2}, "p4": {4}, "p5": {5}}
    assert failures_survived(doubled, 4) == 1  # six shards, but losing p0 and one more leaves 3
    assert failures_survived({"z0": {0, 1, 2}, "z1": {3}}, 2) == 0
    assert failures_survived({"p0": {0, 1}, "p1": {1, 2}, "p2": {2, 3}, "p3": {3, 0}}, 3) == 2  # overlapping copies
    assert failures_survived({"p0": {0}}, 2) == -1
    assert best_failures_survived([2, 2, 2], 6, 4) == 1  # 2+2+2 over three zones: one zone may fail
    assert best_failures_survived([1] * 6, 6, 4) == 2
    assert best_failures_survived([1] * 5, 6, 4) == 1  # five peers for six shards: one peer holds two
    assert best_failures_survived([3, 3], 4, 2) == 1


def _move_shard(vault: Vault, pack: PackRecord, num: int, to: str) -> PackRecord:
    """Put shard ``num`` of ``pack`` on peer ``to`` (copy the object, commit a new record)."""
    (old,) = [s for s in pack.shards if s.num == num]
    target = _shard_path(vault, to, pack.id, num)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_shard_path(vault, old.peer, pack.id, num), target)
    shards = [s for s in pack.shards if s.num != num] + [ShardRecord(num, to, old.hash, old.size)]
    record = pack.with_shards(shards)
    with vault.repo() as repo:
        repo.write_index([record])
    return record


def test_two_shards_on_one_peer_are_not_healthy_and_repair_spreads_them(backed_up: Vault) -> None:
    with backed_up.repo() as repo:
        pack = sorted(repo.index.packs.values(), key=lambda p: p.id)[0]
    by_num = {s.num: s.peer for s in pack.shards}
    _move_shard(backed_up, pack, 3, by_num[0])  # the peer of shard 0 now holds shard 3 too
    code, report = _json(backed_up, "check", "--read-data")
    assert code == 6, report
    assert not report["shard_issues"]  # every shard is there and intact ...
    (damaged,) = report["damaged_packs"]  # ... but one peer failure costs two of them
    assert damaged["pack"] == pack.id and damaged["good"] == 6 and damaged["state"] == "degraded"
    assert damaged["peer_failures_survived"] == 1
    assert report["peer_failures_survived"] == {"1": 1, "2": report["packs"]["healthy"]}
    human = backed_up.cli("check")
    assert "survives 1 peer failure(s) (of 2)" in human.output

    code, repaired = _json(backed_up, "repair")
    assert code == 0 and repaired["shards_spread"] == 1 and repaired["shards_rebuilt"] == 0, repaired
    with backed_up.repo() as repo:
        spread = repo.index.packs[pack.id]
    assert len({s.peer for s in spread.shards}) == 6
    # The crowded copy was deleted once the new placement was committed.
    assert not _shard_path(backed_up, by_num[0], pack.id, 3).exists()
    _healthy(backed_up)


def test_a_zone_holding_more_than_the_layout_needs_is_not_healthy(tmp_path: Path) -> None:
    # Two zones of three peers, k=2 of n=4: two shards per zone survive one zone failure.
    vault = make_vault(tmp_path, init=False)
    settings = {"k": 2, "n": 4, "state_dir": str(tmp_path / "state")} | SMALL
    write_config(vault.config, local_peers(vault.peers_dir, zones=2), {"src": vault.source}, **settings)
    assert vault.cli("init").exit_code == 0
    assert vault.cli("backup", "src").exit_code == 0
    zone = {f"p{i}": f"z{i % 2}" for i in range(6)}
    with vault.repo() as repo:
        pack = sorted(repo.index.packs.values(), key=lambda p: p.id)[0]
    assert sorted(Counter(zone[s.peer] for s in pack.shards).values()) == [2, 2]
    used = {s.peer for s in pack.shards}
    z1_shard = next(s for s in pack.shards if zone[s.peer] == "z1")
    free_z0 = next(p for p in sorted(zone) if zone[p] == "z0" and p not in used)
    _move_shard(vault, pack, z1_shard.num, free_z0)  # now three in z0: losing z0 loses the pack

    code, report = _json(vault, "check")
    assert code == 6
    (damaged,) = report["damaged_packs"]
    assert damaged["peer_failures_survived"] == 2  # four distinct peers: as many as n-k
    assert (damaged["zone_failures_survived"], damaged["zone_failures_possible"]) == (0, 1)
    assert damaged["state"] == "degraded"

    code, repaired = _json(vault, "repair")
    assert code == 0 and repaired["shards_spread"] == 1, repaired
    with vault.repo() as repo:
        spread = repo.index.packs[pack.id]
    assert sorted(Counter(zone[s.peer] for s in spread.shards).values()) == [2, 2]
    _healthy(vault)


def test_peers_add_spreads_packs_that_a_removal_crowded(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)  # 6 peers, 4-of-6: no spare peer
    assert vault.cli("backup", "src").exit_code == 0
    shutil.rmtree(vault.peer(5))  # p5's disk died; it stays configured until its replacement comes
    code, removed = _json(vault, "peers", "remove", "p5")
    assert code == 0 and removed["removable"], removed
    # p5's shards were rebuilt, but with five peers for six shards one peer holds two of each pack.
    code, crowded = _json(vault, "check")
    assert code == 6 and crowded["packs"]["lost"] == 0 and not crowded["shard_issues"], crowded
    assert {p["peer_failures_survived"] for p in crowded["damaged_packs"]} == {1}

    settings = {"k": 4, "n": 6, "state_dir": str(tmp_path / "state")} | SMALL
    peers = local_peers(vault.peers_dir)
    new = {"name": "p6", "url": f"file://{vault.peers_dir / 'p6'}", "zone": "z-new"}
    write_config(vault.config, [*peers[:5], new], {"src": vault.source}, **settings)
    vault.peer(6).mkdir()
    code, added = _json(vault, "peers", "add", "p6")
    assert code == 0, added
    assert added["repair"] is None or added["repair"]["complete"]
    report = _healthy(vault)
    assert report["peer_failures_survived"] == {"2": report["packs"]["healthy"]}


# --- drain under a concurrent backup --------------------------------------------------------


def _backup_during_drain(monkeypatch: pytest.MonkeyPatch, vault: Vault, seen: list[int]) -> None:
    """After drain's first commit, a backup (another process) commits packs with shards on p0."""
    real_commit = rebalance._Mover.commit

    def commit_then_backup(self: rebalance._Mover) -> None:
        real_commit(self)
        if seen:
            return
        (vault.source / "new.bin").write_bytes(os.urandom(6 << 20))
        result = vault.run("backup", "src")
        assert result.returncode == 0, result.stderr
        with vault.repo() as repo:
            seen.append(sum(1 for p in repo.index.packs.values() for s in p.shards if s.peer == "p0"))

    monkeypatch.setattr(rebalance._Mover, "commit", commit_then_backup)


def test_drain_moves_what_a_concurrent_backup_put_on_the_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vault = make_vault(tmp_path, n=5)
    assert vault.cli("backup", "src").exit_code == 0
    seen: list[int] = []
    _backup_during_drain(monkeypatch, vault, seen)
    result = vault.cli("peers", "drain", "p0", "--json")
    assert seen and seen[0] > 0  # the backup did place shards on the draining peer
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["removable"] and report["shards_remaining"] == 0 and report["rounds"] >= 2
    with vault.repo() as repo:
        assert not [s for p in repo.index.packs.values() for s in p.shards if s.peer == "p0"]
    assert vault.shards(0) == []
    _healthy(vault)


def test_drain_does_not_call_a_peer_removable_while_the_index_names_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = make_vault(tmp_path, n=5)
    assert vault.cli("backup", "src").exit_code == 0
    seen: list[int] = []
    _backup_during_drain(monkeypatch, vault, seen)
    monkeypatch.setattr(rebalance, "DRAIN_ROUNDS", 1)  # no second round to catch up
    result = vault.cli("peers", "drain", "p0")
    assert seen and seen[0] > 0
    assert result.exit_code == 5, result.output
    assert "can be taken out" not in result.output
    assert f"Peer p0 still holds {seen[0]} shard(s)" in result.output
    # Running it again finishes the job.
    monkeypatch.undo()
    again = vault.cli("peers", "drain", "p0")
    assert again.exit_code == 0 and "can be taken out of the configuration" in again.output, again.output


# --- leftovers --------------------------------------------------------------------------------


def test_check_counts_leftovers_without_calling_them_damage(backed_up: Vault) -> None:
    shard = backed_up.shards(0)[0]
    temporary = shard.parent / ".tmp-0123abcd"
    temporary.write_bytes(b"x" * 1000)  # a write killed before its rename
    stray = backed_up.peer(1) / shard.relative_to(backed_up.peer(0))  # a shard the index puts elsewhere
    stray.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shard, stray)
    code, report = _json(backed_up, "check")
    assert code == 0 and not report["damaged"], report
    assert report["leftovers"]["p0"] == {"objects": 1, "bytes": 1000, "unreferenced_shards": 0, "temporary": 1}
    assert report["leftovers"]["p1"] == {
        "objects": 1,
        "bytes": stray.stat().st_size,
        "unreferenced_shards": 1,
        "temporary": 0,
    }
    assert report["unreferenced_shards"] == 1
    human = backed_up.cli("check")
    assert human.exit_code == 0
    assert "peer p0: 1 leftover object(s)" in human.output and "prune` removes them" in human.output
