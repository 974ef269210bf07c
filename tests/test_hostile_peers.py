"""Hostile peers and careless operators, in the spirit of issue 7.

Peers lie (replay, swap, truncate, plant junk, refuse writes half-way) and
operators err (init twice, restore over the source, swap two mounts).  Each
test checks one promise of DESIGN.md / README: a true verdict from ``check``,
``scrub`` and ``repair``, the README's exit codes, one-line errors, one JSON
document with ``--json``, data restorable while at most n-k shards of any pack
are bad, and nothing lost silently.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Vault, assert_same_tree, make_vault, peer_snapshot, tree_state

from shardvault.errors import PeerReadOnlyError
from shardvault.repository.metadata import pack_name
from shardvault.shards.stores.local import LocalStore

# --- helpers ------------------------------------------------------------------------------------


def _json(vault: Vault, *args: str) -> tuple[int, Any]:
    result = vault.cli(*args, "--json")
    assert result.stdout.strip(), f"{args}: exit {result.exit_code}: {result.output}"
    return result.exit_code, json.loads(result.stdout)


def _restore_latest(vault: Vault, target: Path) -> None:
    result = vault.cli("restore", "latest", "--source", "src", "--target", str(target))
    assert result.exit_code == 0, result.output
    assert_same_tree(vault.source, target)


def _healthy(vault: Vault) -> dict[str, Any]:
    code, report = _json(vault, "check", "--read-data")
    assert code == 0, report
    assert not report["damaged"] and not report["shard_issues"], report
    return dict(report)


def _forget_local_state(vault: Vault) -> None:
    """A new machine: no cached metadata, no key hint (only passphrase and peers)."""
    shutil.rmtree(vault.root / "state", ignore_errors=True)


def _meta_objects(vault: Vault, peer: int, sub: str) -> list[Path]:
    return sorted(p for p in (vault.peer(peer) / sub).iterdir() if p.is_file())


def _one_error_line(stderr: str) -> None:
    """One error line, the last; warnings naming bad copies may come before it."""
    lines = stderr.splitlines()
    assert lines and lines[-1].startswith("shardvault: error: "), stderr
    assert sum(1 for line in lines if line.startswith("shardvault: error: ")) == 1, stderr
    assert all(line.startswith("shardvault: ") for line in lines) and "Traceback" not in stderr, stderr


def _second_snapshot(vault: Vault) -> tuple[str, str]:
    """Make a second snapshot; return (first id, second id)."""
    first = json.loads(vault.cli("snapshots", "--json").stdout)[0]["id"]
    (vault.source / "second.bin").write_bytes(os.urandom(200_000))
    result = vault.cli("backup", "src", "--json")
    assert result.exit_code == 0, result.output
    return first, json.loads(result.stdout)["snapshot"]["id"]


# --- metadata copies that lie -------------------------------------------------------------------


def test_snapshot_bytes_swapped_between_names_on_one_peer_are_caught_and_healed(backed_up: Vault) -> None:
    """A peer serves snapshot A's bytes under B's name and B's under A's (the name is the AEAD's data)."""
    a, b = _second_snapshot(backed_up)
    pa, pb = backed_up.peer(0) / "snapshots" / a, backed_up.peer(0) / "snapshots" / b
    da, db = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(db)
    pb.write_bytes(da)
    _forget_local_state(backed_up)
    code, listing = _json(backed_up, "snapshots")
    assert code == 0
    assert sorted(s["id"] for s in listing) == sorted([a, b])
    code, scrubbed = _json(backed_up, "scrub")
    assert code == 6, scrubbed
    named = {(i["peer"], i["object"]) for i in scrubbed["metadata"]["issues"] if i["problem"] == "corrupt"}
    assert {("p0", f"snapshots/{a}"), ("p0", f"snapshots/{b}")} <= named
    assert not scrubbed["metadata"]["lost"]
    code, repaired = _json(backed_up, "repair")
    assert code == 0, repaired
    assert pa.read_bytes() == da and pb.read_bytes() == db
    _healthy(backed_up)


# A garbled or empty identity was once reported by check but never rewritten by repair (only a
# deleted one was): heal now rewrites every unreadable identity of ours.
@pytest.mark.parametrize("damage", ["deleted", "garbage", "zero-length"])
def test_identity_damaged_on_one_peer_is_reported_and_repaired(backed_up: Vault, damage: str) -> None:
    identity = backed_up.peer(3) / "identity"
    if damage == "deleted":
        identity.unlink()
    elif damage == "garbage":
        identity.write_bytes(b'{"format": "shardvault-peer", "version": 1, "repository": "xx"}')
    else:
        identity.write_bytes(b"")
    listing = backed_up.cli("snapshots", "--json")
    assert listing.exit_code == 0, listing.output  # one bad identity copy is not fatal
    code, report = _json(backed_up, "check")
    assert code == 6, report
    assert any(i["object"] == "identity" and i["peer"] == "p3" for i in report["metadata"]["issues"])
    code, repaired = _json(backed_up, "repair")
    assert code == 0, repaired
    assert backed_up.cli("check").exit_code == 0, backed_up.cli("check").output


def test_every_copy_of_one_snapshot_corrupt_names_exactly_that_one(backed_up: Vault, tmp_path: Path) -> None:
    a, b = _second_snapshot(backed_up)
    for i in range(6):
        path = backed_up.peer(i) / "snapshots" / a
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    _forget_local_state(backed_up)
    listing = backed_up.cli("snapshots", "--json")
    assert listing.exit_code == 0, listing.output
    assert [s["id"] for s in json.loads(listing.stdout)] == [b]
    assert a[:16] in listing.stderr  # named, not hidden
    restored = backed_up.cli("restore", b[:12], "--target", str(tmp_path / "b"))
    assert restored.exit_code == 0, restored.output
    assert_same_tree(backed_up.source, tmp_path / "b")
    code, report = _json(backed_up, "check", "--read-data")
    assert code == 6
    assert report["metadata"]["lost"] == [f"snapshots/{a}"]
    assert not report["damaged_packs"] and not report["shard_issues"]
    assert not any(b[:8] in e for e in report["snapshot_errors"])
    repair = backed_up.run("repair")
    assert repair.returncode == 7, repair.stderr  # a metadata object intact nowhere
    _one_error_line(repair.stderr)
    (backed_up.source / "third").write_bytes(b"still backing up")
    assert backed_up.cli("backup", "src").exit_code == 0
    _restore_latest(backed_up, tmp_path / "latest")


def test_junk_names_in_a_peers_listing_are_named_and_harmless(backed_up: Vault, tmp_path: Path) -> None:
    p1 = backed_up.peer(1)
    planted = [
        "snapshots/UPPERCASE",
        "snapshots/" + "ab" * 32 + ".bak",
        "index/deep/er/and/deeper/" + "cd" * 32,
        "keys/not-a-key",
        "config.old",
        "data/zz/junk.01",
    ]
    for name in planted:
        (p1 / name).parent.mkdir(parents=True, exist_ok=True)
        (p1 / name).write_bytes(b"junk")
    before = peer_snapshot(backed_up.peers_dir)
    listing = backed_up.cli("snapshots", "--json")
    assert listing.exit_code == 0, listing.output
    assert len(json.loads(listing.stdout)) == 1
    _restore_latest(backed_up, tmp_path / "out")
    code, report = _json(backed_up, "check")
    assert code == 6, report  # foreign objects on a peer are reported ...
    named = {i["object"] for i in report["metadata"]["issues"] if i["peer"] == "p1"}
    assert {"snapshots/UPPERCASE", "keys/not-a-key"} <= named, named
    assert not report["damaged_packs"] and not report["shard_issues"]
    # ... and nothing of ours was touched by reading them.
    assert peer_snapshot(backed_up.peers_dir) == before
    (backed_up.source / "more").write_bytes(os.urandom(50_000))
    assert backed_up.cli("backup", "src").exit_code == 0
    assert all((p1 / name).exists() for name in planted)  # never deleted as if it were ours


# --- shards that lie ----------------------------------------------------------------------------


def _data_packs(vault: Vault) -> list[Any]:
    with vault.repo() as repo:
        return sorted((p for p in repo.index.packs.values()), key=lambda p: p.id)


def test_every_shard_of_two_peers_swapped_with_each_other_is_survived_and_repaired(
    backed_up: Vault, tmp_path: Path
) -> None:
    """p1 and p2 exchange the bytes of every shard they hold of each pack (names kept): n-k bad shards per pack."""
    packs = _data_packs(backed_up)
    swapped = 0
    for pack in packs:
        by_peer = {s.peer: s.num for s in pack.shards}
        a = backed_up.peer(1) / pack_name(pack.id, by_peer["p1"])
        b = backed_up.peer(2) / pack_name(pack.id, by_peer["p2"])
        da, db = a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)
        swapped += 2
    assert backed_up.cli("check").exit_code in (0, 6)  # sizes may agree: a listing cannot always see it
    code, report = _json(backed_up, "check", "--read-data")
    assert code == 6
    bad = {(i["peer"], i["object"]) for i in report["shard_issues"] if i["problem"] == "corrupt"}
    assert len(bad) == swapped and {p for p, _ in bad} == {"p1", "p2"}
    assert report["packs"]["lost"] == 0
    _restore_latest(backed_up, tmp_path / "out")
    code, repaired = _json(backed_up, "repair")
    assert code == 0 and repaired["shards_rebuilt"] == swapped, repaired
    _healthy(backed_up)


def test_shard_of_another_repository_under_our_name_is_caught_and_repaired(tmp_path: Path) -> None:
    ours = make_vault(tmp_path / "ours")
    theirs = make_vault(tmp_path / "theirs")
    assert ours.cli("backup", "src").exit_code == 0
    assert theirs.cli("backup", "src").exit_code == 0
    pack = _data_packs(ours)[0]
    victim = next(s for s in pack.shards if s.peer == "p3")
    foreign = next(s for p in _data_packs(theirs) for s in p.shards if s.peer == "p3")
    target = ours.peer(3) / pack_name(pack.id, victim.num)
    source = theirs.shards(3)[0]
    assert foreign.peer == "p3"
    target.write_bytes(source.read_bytes())
    code, report = _json(ours, "check", "--read-data")
    assert code == 6
    assert [(i["peer"], i["object"], i["problem"]) for i in report["shard_issues"]] == [
        ("p3", pack_name(pack.id, victim.num), "corrupt")
    ]
    _restore_latest(ours, tmp_path / "out")
    code, repaired = _json(ours, "repair")
    assert code == 0 and repaired["shards_rebuilt"] == 1, repaired
    _healthy(ours)


def test_zero_length_shards_and_metadata_copies_on_one_peer(backed_up: Vault, tmp_path: Path) -> None:
    for shard in backed_up.shards(0):
        shard.write_bytes(b"")
    for sub in ("snapshots", "index"):
        for obj in _meta_objects(backed_up, 0, sub):
            obj.write_bytes(b"")
    _forget_local_state(backed_up)
    listing = backed_up.cli("snapshots", "--json")
    assert listing.exit_code == 0 and len(json.loads(listing.stdout)) == 1, listing.output
    code, report = _json(backed_up, "check")
    assert code == 6
    assert {i["peer"] for i in report["shard_issues"]} == {"p0"}
    assert report["packs"]["lost"] == 0 and not report["metadata"]["lost"]
    assert {i["peer"] for i in report["metadata"]["issues"]} == {"p0"}
    _restore_latest(backed_up, tmp_path / "out")
    code, repaired = _json(backed_up, "repair")
    assert code == 0, repaired
    _healthy(backed_up)


# --- peers that fill up or turn read-only half-way ----------------------------------------------


def _peers_fill_up_after(monkeypatch: pytest.MonkeyPatch, peers: set[str], after: int) -> list[str]:
    """``peers`` accept ``after`` shard writes each, then refuse every write (disk full)."""
    real = LocalStore.store
    taken: dict[str, int] = {}
    refused: list[str] = []

    def store(self: LocalStore, name: str, data: bytes | memoryview) -> None:
        if self.peer in peers:
            taken[self.peer] = taken.get(self.peer, 0) + 1
            if taken[self.peer] > after:
                refused.append(f"{self.peer}:{name}")
                raise PeerReadOnlyError(self.peer, "no space left on device")
        real(self, name, data)

    monkeypatch.setattr(LocalStore, "store", store)
    return refused


def test_two_peers_full_mid_backup_commit_nothing_and_a_rerun_is_whole(
    backed_up: Vault, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Default quorum n-1: two peers filling up mid-run leave too few; nothing may become visible."""
    before = json.loads(backed_up.cli("snapshots", "--json").stdout)
    (backed_up.source / "new").mkdir()
    for i in range(4):
        (backed_up.source / "new" / f"f{i}").write_bytes(os.urandom(1 << 20))
    refused = _peers_fill_up_after(monkeypatch, {"p1", "p4"}, after=2)
    result = backed_up.cli("backup", "src", "--json")
    assert refused, "the peers did fill up during the run"
    assert result.exit_code == 5, result.output
    assert json.loads(result.stdout)["error"]["code"] == 5
    assert "p1" in result.stderr or "p4" in result.stderr
    monkeypatch.undo()
    assert json.loads(backed_up.cli("snapshots", "--json").stdout) == before
    for i in range(6):  # no snapshot object of the failed run on any peer
        assert {p.name for p in (backed_up.peer(i) / "snapshots").iterdir()} == {s["id"] for s in before}
    code, report = _json(backed_up, "check")
    assert report["packs"]["lost"] == 0 and not report["metadata"]["lost"], report
    if code:
        assert _json(backed_up, "repair")[0] == 0
    assert backed_up.cli("backup", "src").exit_code == 0
    _healthy(backed_up)
    _restore_latest(backed_up, tmp_path / "out")


def test_one_peer_full_mid_backup_commits_degraded_and_says_so(
    backed_up: Vault, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (backed_up.source / "new.bin").write_bytes(os.urandom(3 << 20))
    refused = _peers_fill_up_after(monkeypatch, {"p3"}, after=1)
    code, doc = _json(backed_up, "backup", "src")
    assert refused
    assert code == 0, doc
    assert doc["stats"]["degraded"] is True and "p3" in doc["stats"]["failed_peers"]
    monkeypatch.undo()
    code, report = _json(backed_up, "check")
    assert code == 6 and report["packs"]["degraded"] > 0 and report["packs"]["lost"] == 0, report
    _restore_latest(backed_up, tmp_path / "out")
    assert _json(backed_up, "repair")[0] == 0
    _healthy(backed_up)


# --- careless operators -------------------------------------------------------------------------


def test_init_again_after_a_disk_was_replaced_changes_nothing(backed_up: Vault) -> None:
    shutil.rmtree(backed_up.peer(2))
    backed_up.peer(2).mkdir()  # the new, empty disk
    before = peer_snapshot(backed_up.peers_dir)
    result = backed_up.run("init")
    assert result.returncode == 8, result.stderr
    _one_error_line(result.stderr)
    assert peer_snapshot(backed_up.peers_dir) == before
    assert not any(backed_up.peer(2).iterdir())
    assert backed_up.cli("repair").exit_code == 0  # the right remedy works
    assert backed_up.cli("check").exit_code == 0


def test_restore_into_the_source_itself_never_damages_it(backed_up: Vault) -> None:
    (backed_up.source / "dir0" / "file0.txt").write_bytes(b"edited after the backup")
    (backed_up.source / "only-now").write_bytes(b"created after the backup")
    before = tree_state(backed_up.source)
    result = backed_up.run("restore", "latest", "--source", "src", "--target", str(backed_up.source))
    assert result.returncode == 12, result.stderr  # not empty under --overwrite never
    _one_error_line(result.stderr)
    assert tree_state(backed_up.source) == before
    assert not [p for p in backed_up.source.rglob(".shardvault-*")]


def test_restore_into_the_source_if_changed_restores_only_what_changed(backed_up: Vault) -> None:
    snapshot_state = tree_state(backed_up.source)
    (backed_up.source / "dir0" / "file0.txt").write_bytes(b"edited after the backup")
    (backed_up.source / "only-now").write_bytes(b"created after the backup")
    result = backed_up.run(
        "restore", "latest", "--source", "src", "--target", str(backed_up.source), "--overwrite", "if-changed"
    )
    assert result.returncode == 0, result.stderr
    after = tree_state(backed_up.source)
    assert after.pop("only-now")[3] == b"created after the backup"  # not in the snapshot: kept
    assert after == snapshot_state
    assert not [p for p in backed_up.source.rglob(".shardvault-*")]


@pytest.mark.parametrize(
    "args",
    [
        ("backup", "src"),
        ("check",),
        ("scrub",),
        ("repair",),
        ("restore", "latest", "--source", "src", "--target", "out"),
        ("peers", "list"),
        ("peers", "drain", "p0"),
    ],
)
def test_wrong_passphrase_with_json_is_one_json_error_document(backed_up: Vault, args: tuple[str, ...]) -> None:
    before = peer_snapshot(backed_up.peers_dir)
    result = backed_up.run(*args, "--json", password="not the passphrase")
    assert result.returncode == 4, result.stderr
    doc = json.loads(result.stdout)  # exactly one document, nothing else on stdout
    assert doc["error"]["code"] == 4 and "passphrase" in doc["error"]["message"].lower()
    _one_error_line(result.stderr)
    assert peer_snapshot(backed_up.peers_dir) == before
    assert not (backed_up.root / "out").exists()


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("restore", "deadbeef", "--target", "out"), 8),
        (("backup", "no-such-source"), 3),
        (("peers", "drain", "no-such-peer"), 3),
    ],
)
def test_other_failures_with_json_are_one_json_error_document(
    backed_up: Vault, args: tuple[str, ...], code: int
) -> None:
    result = backed_up.run(*args, "--json")
    assert result.returncode == code, result.stderr
    doc = json.loads(result.stdout)
    assert doc["error"]["code"] == code
    _one_error_line(result.stderr)


def test_two_peer_mounts_swapped_in_the_config_is_not_healthy_and_loses_nothing(
    backed_up: Vault, tmp_path: Path
) -> None:
    """The operator swaps the URLs of p0 and p3 after init (two mounts exchanged)."""
    text = backed_up.config.read_text()
    a, b = f'"file://{backed_up.peer(0)}"', f'"file://{backed_up.peer(3)}"'
    backed_up.config.write_text(text.replace(a, "@A@").replace(b, a).replace("@A@", b))
    code, report = _json(backed_up, "check")
    assert code != 0, "every shard of p0 and p3 is on the other peer: not 'no errors found'"
    assert report.get("packs", {}).get("lost", 0) == 0
    _restore_latest(backed_up, tmp_path / "out")


# --- killed and concurrent maintenance ----------------------------------------------------------


def _bigger_vault(tmp_path: Path, mib: int, **repository: Any) -> Vault:
    vault = make_vault(tmp_path, **repository)
    big = vault.source / "big"
    big.mkdir()
    for i in range(mib // 4):
        (big / f"blob{i}").write_bytes(os.urandom(4 << 20))
    result = vault.cli("backup", "src")
    assert result.exit_code == 0, result.output
    return vault


def _wait_for(proc: Any, condition: Any, what: str) -> None:
    deadline = time.time() + 120
    while not condition():
        assert proc.poll() is None, f"finished before {what}: {proc.communicate()}"
        assert time.time() < deadline, what
        time.sleep(0.005)


def test_repair_killed_mid_way_then_repaired_again_loses_nothing(tmp_path: Path) -> None:
    vault = _bigger_vault(tmp_path, 32)
    lost = vault.shards(1)
    for shard in lost:
        shard.unlink()
    proc = vault.popen("repair")
    _wait_for(proc, lambda: len(vault.shards(1)) >= 3, "repair rebuilt a few shards")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(vault.shards(1)) < len(lost), "killed before it finished"
    code, report = _json(vault, "check")
    assert code == 6 and report["packs"]["lost"] == 0 and not report["metadata"]["lost"], report
    assert report["packs"]["degraded"] > 0  # what the killed repair did not reach is still said
    code, repaired = _json(vault, "repair")
    assert code == 0 and repaired["complete"], repaired
    _healthy(vault)
    _restore_latest(vault, tmp_path / "out")


def test_drain_killed_mid_way_never_weakens_a_pack_and_a_rerun_finishes(tmp_path: Path) -> None:
    vault = _bigger_vault(tmp_path, 48, n=5)  # five shards over six peers: room to move
    held = len(vault.shards(0))
    assert held > 32  # more than one commit's worth
    proc = vault.popen("peers", "drain", "p0")
    _wait_for(proc, lambda: len(vault.shards(0)) < held, "drain committed and began deleting")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert vault.shards(0), "killed before it finished"
    code, report = _json(vault, "check", "--read-data")
    # Copy, commit, then delete: whatever the kill interrupted, every pack keeps its n good shards.
    assert not report["damaged_packs"] and not report["shard_issues"], report
    assert code == 0, report
    code, drained = _json(vault, "peers", "drain", "p0")
    assert code == 0 and drained["removable"], drained
    report = _healthy(vault)
    with vault.repo() as repo:
        assert not [s for p in repo.index.packs.values() for s in p.shards if s.peer == "p0"]
    # Copies the killed run committed elsewhere but had not deleted yet are leftovers, and said so.
    left = len(vault.shards(0))
    assert report["leftovers"].get("p0", {}).get("unreferenced_shards", 0) == left
    _restore_latest(vault, tmp_path / "out")


def test_backup_while_repair_runs(tmp_path: Path) -> None:
    vault = _bigger_vault(tmp_path, 32)
    for shard in vault.shards(2):
        shard.unlink()
    (vault.source / "during").mkdir()
    for i in range(3):
        (vault.source / "during" / f"f{i}").write_bytes(os.urandom(2 << 20))
    proc = vault.popen("repair")
    _wait_for(proc, lambda: len(vault.shards(2)) >= 1, "repair started writing")
    backup = vault.run("backup", "src")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert backup.returncode == 0, backup.stderr
    code, report = _json(vault, "check", "--read-data")
    assert report["packs"]["lost"] == 0 and not report["metadata"]["lost"] and not report["snapshot_errors"], report
    if code:
        assert _json(vault, "repair")[0] == 0
    _healthy(vault)
    assert len(json.loads(vault.cli("snapshots", "--json").stdout)) == 2
    _restore_latest(vault, tmp_path / "out")


def test_peer_that_acknowledges_writes_it_never_keeps_is_found_by_check(
    backed_up: Vault, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """p5 says "stored" and drops everything: the backup cannot know, but check must not call it healthy."""
    real = LocalStore.store

    def store(self: LocalStore, name: str, data: bytes | memoryview) -> None:
        if self.peer != "p5":
            real(self, name, data)

    monkeypatch.setattr(LocalStore, "store", store)
    (backed_up.source / "new.bin").write_bytes(os.urandom(2 << 20))
    code, doc = _json(backed_up, "backup", "src")
    assert code == 0, doc
    snap = doc["snapshot"]["id"]
    monkeypatch.undo()
    assert not (backed_up.peer(5) / "snapshots" / snap).exists()
    code, report = _json(backed_up, "check")
    assert code == 6, report
    assert report["packs"]["degraded"] > 0 and report["packs"]["lost"] == 0
    assert {i["peer"] for i in report["shard_issues"]} == {"p5"}
    assert report["metadata"]["peers_behind"].get("p5", 0) >= 2  # the new index and snapshot
    _restore_latest(backed_up, tmp_path / "out")
    assert _json(backed_up, "repair")[0] == 0
    assert (backed_up.peer(5) / "snapshots" / snap).exists()
    _healthy(backed_up)


# === Findings of the hostile pass and of the review (issue 7): each test failed before its fix ===


# --- helpers for repair's verdict ---------------------------------------------------------------------------


def _refuse_metadata_writes_on(monkeypatch: pytest.MonkeyPatch, peer: str) -> None:
    real = LocalStore.store

    def store(self: LocalStore, name: str, data: bytes | memoryview) -> None:
        if self.peer == peer and not name.startswith("data/"):
            raise PeerReadOnlyError(self.peer, "no space left on device")
        real(self, name, data)

    monkeypatch.setattr(LocalStore, "store", store)


# Was: `check --read-data` calls an object LOST (exit 6, metadata.lost) while three peers hold
# intact, authenticating copies; it names the intact peers as "truncated or replaced".
# Root cause: verify/metadata.py `_check_object` judges every copy against the most common
# listed size (a tie goes to the first peer) BEFORE reading, even when read=True, so copies of
# the right bytes but the "wrong" size are never read and the majority's bad copies count 0.
def test_truncated_copies_on_half_the_peers_do_not_make_an_intact_object_lost(backed_up: Vault) -> None:
    """Three peers hold the same truncated copy, three the intact one: reading tells which is which."""
    snap = _meta_objects(backed_up, 0, "snapshots")[0]
    name = f"snapshots/{snap.name}"
    good = snap.read_bytes()
    for i in (0, 1, 2):
        (backed_up.peer(i) / name).write_bytes(good[: len(good) // 2])
    _forget_local_state(backed_up)
    code, report = _json(backed_up, "check", "--read-data")
    assert code == 6, report
    meta = report["metadata"]
    assert name not in meta["lost"], "three intact copies exist: the object is not lost"
    bad = {i["peer"] for i in meta["issues"] if i["object"] == name and i["problem"] == "corrupt"}
    assert bad == {"p0", "p1", "p2"}, meta["issues"]
    code, repaired = _json(backed_up, "repair")
    assert code == 0, repaired
    assert all((backed_up.peer(i) / name).read_bytes() == good for i in range(6))
    _healthy(backed_up)


# Was (data loss): three peers hold a well-formed key copy with one character changed;
# `repair` exits 0 after overwriting the three GOOD copies with the bad one, and from then
# on every command says "Wrong passphrase" (the repository can never be opened again).
# Root cause: verify/metadata.py `_good_copy` (and `_reference` in `_check_object`) takes the
# most common key copy that merely PARSES (Counter tie -> first peer's), not the copy that
# opens; heal() then writes it over copies flagged "differs from the copy the others agree on".
# The repository knows which key bytes opened it (repository._open_key): use those.
def test_key_copies_bad_on_half_the_peers_are_never_spread_by_repair(backed_up: Vault, tmp_path: Path) -> None:
    """Three peers hold one well-formed but wrong key copy: repair must copy the copy that opens, not the other."""
    key = next((backed_up.peer(0) / "keys").iterdir())
    name = f"keys/{key.name}"
    good = key.read_bytes()
    doc = json.loads(good)
    data = doc["data"]
    i = len(data) // 2
    doc["data"] = data[:i] + ("A" if data[i] != "A" else "B") + data[i + 1 :]
    bad = json.dumps(doc, indent=1).encode()
    assert len(bad) == len(good)
    for p in (0, 1, 2):
        (backed_up.peer(p) / name).write_bytes(bad)
    assert backed_up.cli("snapshots").exit_code == 0  # three good copies: it opens
    backed_up.cli("repair")
    assert [(backed_up.peer(p) / name).read_bytes() == good for p in range(6)] == [True] * 6
    _forget_local_state(backed_up)
    _restore_latest(backed_up, tmp_path / "out")


# Was (verdict): restoring a snapshot whose object is intact on no peer exits 8 with
# "No snapshot matches '<full id>'" (false: it exists, every copy is corrupt); README says 7
# "data lost ... a metadata object intact nowhere".  Root cause: cli.restore resolves against
# repo.snapshots(), which drops unreadable objects; snapshot.resolve raises SnapshotNotFoundError
# without consulting repo.meta_problems (an unreadable snapshots/<id> that matches).
def test_restore_of_a_snapshot_intact_on_no_peer_is_data_loss(backed_up: Vault, tmp_path: Path) -> None:
    """README: exit 7 when 'a metadata object [is] intact nowhere'; the snapshot is named."""
    a, _ = _second_snapshot(backed_up)
    for i in range(6):
        (backed_up.peer(i) / "snapshots" / a).write_bytes(b"SVMD\x01" + b"\x00" * 80)
    _forget_local_state(backed_up)
    result = backed_up.run("restore", a, "--target", str(tmp_path / "out"))
    assert result.returncode == 7, result.stderr
    assert a[:8] in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# Was (verdict): repair cannot write a metadata copy (peer full/read-only); its JSON says
# "complete": false and "failed": [...], yet it exits 0.  Root cause: cli.repair_cmd raises
# only for report.lost, metadata_after.lost and report.unplaced, never for
# report.metadata.failed (RepairReport.complete is False but ignored for the exit code).
def test_repair_that_cannot_heal_metadata_does_not_exit_0(backed_up: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full peer refuses the copy repair writes: the report says incomplete, so must the exit code."""
    snap = _meta_objects(backed_up, 2, "snapshots")[0]
    snap.unlink()
    _refuse_metadata_writes_on(monkeypatch, "p2")
    result = backed_up.cli("repair", "--json")
    doc = json.loads(result.stdout)
    assert doc["complete"] is False
    assert result.exit_code == 5, result.output  # README: peer read-only or full
    assert "p2" in result.stderr
    assert backed_up.cli("check").exit_code == 6  # still true: the copy is missing
    monkeypatch.undo()
    assert backed_up.cli("repair").exit_code == 0
    assert snap.exists()
    assert backed_up.cli("check").exit_code == 0


# Was (verdict): same root cause as above (cli.repair_cmd ignores report.metadata.failed),
# reached by a peer that shows a directory where the `config` object should be.
def test_repair_that_cannot_replace_a_directory_planted_as_an_object_does_not_exit_0(backed_up: Vault) -> None:
    """A peer shows a directory where the config object should be: repair cannot write over it."""
    config = backed_up.peer(4) / "config"
    good = config.read_bytes()
    config.unlink()
    config.mkdir()
    (config / "x").write_bytes(b"junk")
    assert backed_up.cli("snapshots").exit_code == 0
    code, report = _json(backed_up, "check")
    assert code == 6, report
    assert any(i["object"] == "config" and i["peer"] == "p4" for i in report["metadata"]["issues"])
    result = backed_up.cli("repair", "--json")
    doc = json.loads(result.stdout)
    assert doc["complete"] is False, doc
    assert result.exit_code != 0, result.output
    shutil.rmtree(config)
    config.write_bytes(good)
    assert backed_up.cli("check").exit_code == 0


# Was (leftovers on a decommissioned peer): `peers drain p0` killed between its commit and its
# deletes, then run again, reports "removable" but leaves every shard copy the killed run had
# committed elsewhere on p0 (unreferenced now).  A drained peer is about to leave the config, after
# which nothing (no prune, no check) will ever see those objects.  Root cause: verify/rebalance.py
# drain() only moves shards a fresh index names on the peer (_held_by); it never deletes the
# peer's unreferenced shard objects (or its leftovers) before calling it removable.
def test_drain_rerun_after_a_kill_leaves_the_drained_peer_empty_of_shards(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, n=5)
    big = vault.source / "big"
    big.mkdir()
    for i in range(12):
        (big / f"blob{i}").write_bytes(os.urandom(4 << 20))
    assert vault.cli("backup", "src").exit_code == 0
    held = len(vault.shards(0))
    assert held > 32
    proc = vault.popen("peers", "drain", "p0")
    _wait_for(proc, lambda: len(vault.shards(0)) < held, "drain committed and began deleting")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, drained = _json(vault, "peers", "drain", "p0")
    assert code == 0 and drained["removable"], drained
    assert vault.shards(0) == []  # as after a drain that was never interrupted


# Was (--json contract, issue 7 finding 16): a usage error found inside a command that was given
# --json (here `restore ... --json` without --target) exits 2 with NOTHING on stdout and click's
# multi-line usage text on stderr, not one JSON error document.  Root cause: shardvault/cli.py
# handle_errors() catches only ShardvaultError; click.UsageError raised in the command body
# (restore: "--target is required", "--to-bucket restores bucket snapshots only";
# _restore_postgres, _postgres_source) bypasses the JSON error path (use LatestNeedsSourceError-
# style ShardvaultError subclasses with exit_code 2, or catch click.UsageError there too).
def test_usage_error_inside_a_json_command_is_one_json_error_document(backed_up: Vault) -> None:
    result = backed_up.run("restore", "latest", "--source", "src", "--json")
    assert result.returncode == 2, result.stderr
    doc = json.loads(result.stdout)
    assert doc["error"]["code"] == 2 and "--target" in doc["error"]["message"]


# --- found by the review of issue 7 ------------------------------------------------------------------------


def test_check_after_scrub_found_a_corrupt_shard_is_not_healthy(backed_up: Vault) -> None:
    """Was: scrub found bit rot (exit 6), then a plain check said "no errors found" (a listing cannot see it)."""
    shard = backed_up.shards(1)[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert backed_up.cli("scrub").exit_code == 6
    code, report = _json(backed_up, "check")
    assert code == 6 and report["packs"]["healthy"] < sum(report["packs"].values())
    assert any(i["problem"] == "corrupt" and i["peer"] == "p1" for i in report["shard_issues"])
    assert backed_up.cli("repair").exit_code == 0
    assert backed_up.cli("check").exit_code == 0


def test_a_half_undone_metadata_write_keeps_every_copy(backed_up: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: below the quorum, the undo deleted some copies and failed on one: one copy left, and "committed"."""
    real_store, real_delete = LocalStore.store, LocalStore.delete

    def store(self: LocalStore, name: str, data: bytes | memoryview) -> None:
        if name.startswith("snapshots/") and self.peer in ("p4", "p5"):
            raise PeerReadOnlyError(self.peer, "no space left on device")
        real_store(self, name, data)

    def delete(self: LocalStore, name: str) -> None:
        if name.startswith("snapshots/") and self.peer == "p1":
            raise PeerReadOnlyError(self.peer, "read-only file system")
        real_delete(self, name)

    monkeypatch.setattr(LocalStore, "store", store)
    monkeypatch.setattr(LocalStore, "delete", delete)
    (backed_up.source / "new").write_bytes(os.urandom(10_000))
    result = backed_up.cli("backup", "src", "--json")
    monkeypatch.undo()
    snaps = json.loads(backed_up.cli("snapshots", "--json").stdout)
    if result.exit_code != 0:  # nothing committed: nothing visible
        assert len(snaps) == 1
        return
    new = json.loads(result.stdout)["snapshot"]["id"]
    holders = [i for i in range(6) if (backed_up.peer(i) / "snapshots" / new).exists()]
    assert holders == [0, 1, 2, 3]  # every acknowledged copy kept, not just the one that resisted the undo


def test_backups_after_a_loss_store_the_lost_chunks_once(backed_up: Vault) -> None:
    """Was: the dedup looked only at a chunk's first location, so each later backup stored it again."""
    for i in (0, 1, 2):
        shutil.rmtree(backed_up.peer(i) / "data")
        (backed_up.peer(i) / "data").mkdir()
    first = json.loads(backed_up.cli("backup", "src", "--json").stdout)["stats"]
    assert first["bytes_new"] > 0  # the lost data stored again
    for _ in range(3):
        again = json.loads(backed_up.cli("backup", "src", "--json").stdout)["stats"]
        assert again["bytes_new"] == 0 and again["files_read"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["restore", "latest", "--overwrite", "bogus", "--json"],
        ["scrub", "--budget", "0", "--json"],
        ["peers", "drain", "--json", "--bogus"],
    ],
)
def test_usage_errors_click_finds_are_one_json_document(backed_up: Vault, args: list[str]) -> None:
    result = backed_up.run(*args)
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["code"] == 2


def test_drain_of_an_unknown_peer_is_a_configuration_error(backed_up: Vault) -> None:
    result = backed_up.cli("peers", "drain", "nosuch")
    assert result.exit_code == 3 and "nosuch" in result.stderr
