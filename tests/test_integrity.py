"""Scrub with memory, repair, drain/remove/add, and the verification state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import Vault, assert_same_tree, flip_bit, local_peers, make_vault, write_config

from shardvault.errors import PeerUnavailableError
from shardvault.shards.stores import LocalStore


def _json(vault: Vault, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    result = vault.cli(*args, "--json")
    assert result.stdout.strip(), f"{args}: exit {result.exit_code}: {result.output}"
    return result.exit_code, json.loads(result.stdout)


def _restore_matches(vault: Vault, target: Path) -> None:
    result = vault.cli("restore", "latest", "--source", "src", "--target", str(target))
    assert result.exit_code == 0, result.output
    assert_same_tree(vault.source, target)


def _all_healthy(vault: Vault) -> dict:  # type: ignore[type-arg]
    code, report = _json(vault, "check", "--read-data")
    assert code == 0, report
    assert report["packs"]["healthy"] > 0 and not report["shard_issues"], report
    return report


def _state_db(vault: Vault) -> sqlite3.Connection:
    (db,) = (vault.root / "state").glob("*/state.db")
    return sqlite3.connect(db)


def test_scrub_names_bad_shards_and_repair_brings_every_pack_back(backed_up: Vault, tmp_path: Path) -> None:
    flipped, truncated, deleted = backed_up.shards(0)[0], backed_up.shards(1)[1], backed_up.shards(2)[2]
    flip_bit(flipped)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    deleted.unlink()
    code, report = _json(backed_up, "scrub")
    assert code == 6
    found = {(i["peer"], i["object"], i["problem"]) for i in report["issues"]}
    rel = lambda p, i: str(p.relative_to(backed_up.peer(i)))  # noqa: E731
    assert found == {
        ("p0", rel(flipped, 0), "corrupt"),
        ("p1", rel(truncated, 1), "corrupt"),
        ("p2", rel(deleted, 2), "missing"),
    }
    code, repaired = _json(backed_up, "repair")
    assert code == 0, repaired
    assert repaired["shards_rebuilt"] == 3 and repaired["shards_relocated"] == 0 and repaired["complete"]
    code, again = _json(backed_up, "scrub")
    assert code == 0 and not again["issues"] and again["coverage"] == 1.0
    _all_healthy(backed_up)
    _restore_matches(backed_up, tmp_path / "out")


def test_a_second_repair_has_nothing_to_do(backed_up: Vault) -> None:
    backed_up.shards(3)[0].unlink()
    assert _json(backed_up, "repair")[1]["shards_rebuilt"] == 1
    assert _json(backed_up, "repair")[1]["shards_rebuilt"] == 0


def test_scrub_budget_reads_oldest_first_until_every_shard_is_covered(backed_up: Vault) -> None:
    total = sum(len(backed_up.shards(i)) for i in range(6))
    budget = str(sum(p.stat().st_size for p in backed_up.shards(0)))  # about a sixth of the bytes per run
    seen: list[set[tuple[str, int, str]]] = []
    for _ in range(12):
        before = dict(_read_times(backed_up))
        code, report = _json(backed_up, "scrub", "--budget", budget)
        assert code == 0 and report["stopped_by"] in ("budget", "")
        after = _read_times(backed_up)
        seen.append({k for k, t in after.items() if t != before.get(k)})
        if report["complete"]:
            break
    assert report["complete"] and report["coverage"] == 1.0
    assert len(seen) >= 4  # the budget did split the work
    # Oldest first: no shard was read twice before every shard was read once (the last run
    # may go on with the oldest once the never-read ones are done).
    assert sum(len(s) for s in seen[:-1]) == len(set().union(*seen[:-1]))
    assert len(set().union(*seen)) == total
    # Once everything is covered, each run goes on with the least recently read.
    before = _read_times(backed_up)
    _json(backed_up, "scrub", "--budget", budget)
    read = {k for k, t in _read_times(backed_up).items() if t != before[k]}
    assert read and max(before[k] for k in read) <= min(before[k] for k in before if k not in read)


def _read_times(vault: Vault) -> dict[tuple[str, int, str], float]:
    with _state_db(vault) as db:
        rows = db.execute("SELECT pack, num, peer, last_read FROM shards WHERE last_read IS NOT NULL").fetchall()
    return {(r[0], r[1], r[2]): r[3] for r in rows}


def test_killed_scrub_resumes_where_it_stopped(backed_up: Vault) -> None:
    sizes = {}
    for i in range(6):
        for p in backed_up.shards(i):
            pack, num = p.name.split(".")
            sizes[(pack, int(num), f"p{i}")] = p.stat().st_size
    proc = backed_up.popen("scrub", "--rate", "1")  # slow: about a second per MiB
    deadline = time.time() + 60
    while time.time() < deadline and len(_read_times(backed_up) if _has_state(backed_up) else {}) < 2:
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _read_times(backed_up)
    assert 2 <= len(done_before) < len(sizes)
    rest = sum(size for key, size in sizes.items() if key not in done_before)
    code, report = _json(backed_up, "scrub", "--budget", str(rest))
    assert code == 0 and report["complete"], report
    after = _read_times(backed_up)
    assert {k for k in after if after[k] != done_before.get(k)} == set(sizes) - set(done_before)


def _has_state(vault: Vault) -> bool:
    return bool(list((vault.root / "state").glob("*/state.db")))


def test_window_decides_what_is_due(backed_up: Vault) -> None:
    code, report = _json(backed_up, "scrub")
    assert code == 0 and report["shards_due"] == report["shards_total"]
    code, report = _json(backed_up, "scrub", "--budget", "1")
    assert report["shards_due"] == 0 and report["complete"]


# --- peers: drain, remove, add ----------------------------------------------------------


def test_drain_moves_everything_and_never_weakens_a_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vault = make_vault(tmp_path, n=5)  # 6 peers, 5 shards per pack: a drained peer's shards have somewhere to go
    assert vault.cli("backup", "src").exit_code == 0
    from shardvault.repository import Repository

    real_delete = LocalStore.delete
    checked: list[str] = []

    def guarded_delete(self: LocalStore, name: str) -> None:
        # Before any copy is deleted, the committed placement must give its pack n shards elsewhere.
        if self.peer == "p0" and name.startswith("data/"):
            pack_id = name.split("/")[-1].split(".")[0]
            with vault.repo() as repo:
                record = repo.index.packs[pack_id]
            assert "p0" not in {s.peer for s in record.shards}
            assert len({s.num for s in record.shards}) == record.n
            for s in record.shards:
                assert (vault.peer(int(s.peer[1:])) / f"data/{pack_id[:2]}/{pack_id}.{s.num:02d}").exists()
            checked.append(name)
        real_delete(self, name)

    monkeypatch.setattr(LocalStore, "delete", guarded_delete)
    held = len(vault.shards(0))
    assert held > 0
    code, report = _json(vault, "peers", "drain", "p0")
    assert code == 0, report
    assert report["shards_moved"] == held and len(checked) == held
    assert vault.shards(0) == []
    with vault.repo() as repo:
        assert isinstance(repo, Repository)
        for record in repo.index.packs.values():
            assert "p0" not in {s.peer for s in record.shards}
            assert len({s.peer for s in record.shards}) == record.n  # still one shard per peer
    _all_healthy(vault)
    _restore_matches(vault, tmp_path / "out")


def test_remove_a_dead_peer_and_repair_onto_the_others(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, n=5)
    assert vault.cli("backup", "src").exit_code == 0
    shutil.rmtree(vault.peer(0))
    code, report = _json(vault, "peers", "remove", "p0")
    assert code == 0, report
    assert report["repair"]["complete"] and report["shards_moved"] > 0
    # The operator takes p0 out of the configuration; nothing is missing.
    write_config(
        vault.config,
        local_peers(vault.peers_dir)[1:],
        {"src": vault.source},
        k=4,
        n=5,
        state_dir=str(tmp_path / "state"),
        pack_size_mib=1,
        chunk_min_kib=64,
        chunk_avg_kib=256,
        chunk_max_kib=1024,
    )
    _all_healthy(vault)
    _restore_matches(vault, tmp_path / "out")


def test_add_a_peer_copies_metadata_and_takes_a_share(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, n=5)
    assert vault.cli("backup", "src").exit_code == 0
    peers = local_peers(vault.peers_dir, count=7)
    # A new peer in a new zone, so that any pack can move a shard onto it without crowding a zone
    # (in an existing zone only packs with few shards there may, which can be none of a small repo).
    peers[6]["zone"] = "z-new"
    settings = {"k": 4, "n": 5, "state_dir": str(tmp_path / "state"), "pack_size_mib": 1}
    settings |= {"chunk_min_kib": 64, "chunk_avg_kib": 256, "chunk_max_kib": 1024}
    write_config(vault.config, peers, {"src": vault.source}, **settings)
    vault.peer(6).mkdir()
    code, report = _json(vault, "peers", "add", "p6")
    assert code == 0, report
    assert report["metadata_copied"] > 0 and report["shards_moved"] > 0
    assert (vault.peer(6) / "config").exists()
    _all_healthy(vault)
    zone = {p["name"]: p["zone"] for p in peers}
    with vault.repo() as repo:
        for record in repo.index.packs.values():  # 5 shards over 4 zones: never 3 in one zone
            assert max(Counter(zone[s.peer] for s in record.shards).values()) <= 2
    _restore_matches(vault, tmp_path / "out")


def _failing_p0(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Peer p0's disk fails after ``after`` shard writes."""
    real_store = LocalStore.store
    writes = {"n": 0}

    def failing_store(self: LocalStore, name: str, data: bytes | memoryview) -> None:
        if self.peer == "p0":
            writes["n"] += 1
            if writes["n"] > after:
                raise PeerUnavailableError("p0", "disk failed")
        real_store(self, name, data)

    monkeypatch.setattr("shardvault.verify.repair.BACKOFF", 0.01)
    monkeypatch.setattr(LocalStore, "store", failing_store)


@pytest.mark.parametrize("quorum", [5, 6])
def test_repair_with_a_target_peer_failing_leaves_a_consistent_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quorum: int
) -> None:
    vault = make_vault(tmp_path, write_quorum=quorum)
    assert vault.cli("backup", "src").exit_code == 0
    for shard in vault.shards(0):
        shard.unlink()
    _, before = _json(vault, "check")
    _failing_p0(monkeypatch, after=2)
    result = vault.cli("repair", "--json")
    monkeypatch.undo()
    _, after = _json(vault, "check")
    if quorum == 5:
        # p0 took two shards and failed; the others went to other peers and were committed.
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["shards_relocated"] > 0
        # With p0 down, some packs got two shards on one peer: restorable, but one peer failure
        # short of n-k, so not healthy.  Once p0 is back, repair spreads them out again.
        code, crowded = _json(vault, "check")
        assert code == 6 and crowded["packs"]["lost"] == 0 and not crowded["shard_issues"], crowded
        assert all(p["peer_failures_survived"] < 2 for p in crowded["damaged_packs"])
        code, spread = _json(vault, "repair")
        assert code == 0 and spread["shards_spread"] == len(crowded["damaged_packs"]), spread
        _all_healthy(vault)
    else:
        # The new placement needs p0 to acknowledge the index, so repair reports failure; whatever
        # the peers hold of the index, it names no shard that is not on its peer.
        assert result.exit_code == 5, result.output
        assert "p0" in result.output
        assert after["packs"]["lost"] == 0
        assert {(i["peer"], i["object"]) for i in after["shard_issues"]} <= {
            (i["peer"], i["object"]) for i in before["shard_issues"]
        }
        # Once the disk is back, repair completes.
        assert vault.cli("repair").exit_code == 0
        _all_healthy(vault)
    _restore_matches(vault, tmp_path / "out")


def test_lost_packs_are_named_with_their_snapshots_and_files(backed_up: Vault) -> None:
    for i in (0, 1, 2):
        shutil.rmtree(backed_up.peer(i))
        backed_up.peer(i).mkdir()
    result = backed_up.cli("repair")
    assert result.exit_code == 7
    assert "LOST pack" in result.output and "(src)" in result.output


def test_state_is_rebuilt_from_the_repository(backed_up: Vault) -> None:
    with _state_db(backed_up) as db:
        before = db.execute("SELECT source, snapshot, finished FROM runs WHERE kind = 'backup'").fetchall()
    shutil.rmtree(backed_up.root / "state")
    code, report = _json(backed_up, "scrub")
    assert code == 0 and report["coverage"] == 1.0
    assert os.path.exists(next((backed_up.root / "state").glob("*/state.db")))
    with _state_db(backed_up) as db:
        after = db.execute("SELECT source, snapshot, finished FROM runs WHERE kind = 'backup'").fetchall()
        packs = db.execute("SELECT COUNT(*) FROM packs WHERE state = 'healthy'").fetchone()[0]
    # The backup history (what RPO is computed from) came back from the snapshots.
    assert [(s, i) for s, i, _ in after] == [(s, i) for s, i, _ in before]
    assert abs(after[0][2] - before[0][2]) < 1.0
    with backed_up.repo() as repo:
        assert packs == len(repo.index.packs)


def test_bad_input_to_the_new_commands_is_one_clear_line(backed_up: Vault) -> None:
    result = backed_up.cli("peers", "drain", "nope")
    assert result.exit_code == 3 and "no peer named 'nope'" in result.output
    result = backed_up.cli("scrub", "--budget", "lots")
    assert result.exit_code == 2 and "is not a size" in result.output
    with open(backed_up.config, "a") as f:
        f.write('[scrub]\nwindow_days = "monthly"\n')
    result = backed_up.cli("scrub")
    assert result.exit_code == 3 and "scrub.window_days: must be float" in result.output
