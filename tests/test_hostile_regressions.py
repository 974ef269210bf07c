"""Hostile-peer findings that once failed: each comment says what was wrong and where.

Found by the hostile pass of issue 7 (tests/test_hostile_peers.py holds the
cases that passed from the start); each test failed before its fix.
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
from conftest import Vault, assert_same_tree, make_vault

from shardvault.errors import PeerReadOnlyError
from shardvault.shards.stores.local import LocalStore


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
    shutil.rmtree(vault.root / "state", ignore_errors=True)


def _meta_objects(vault: Vault, peer: int, sub: str) -> list[Path]:
    return sorted(p for p in (vault.peer(peer) / sub).iterdir() if p.is_file())


def _second_snapshot(vault: Vault) -> tuple[str, str]:
    first = json.loads(vault.cli("snapshots", "--json").stdout)[0]["id"]
    (vault.source / "second.bin").write_bytes(os.urandom(200_000))
    result = vault.cli("backup", "src", "--json")
    assert result.exit_code == 0, result.output
    return first, json.loads(result.stdout)["snapshot"]["id"]


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


# Was: a garbled or zero-length identity object on one peer is reported by `check` (exit 6,
# "identity corrupt") but `repair` exits 0 without rewriting it, so check stays at 6 forever
# (only a DELETED identity is healed).  Root cause: verify/metadata.py heal() skips every
# issue whose object is IDENTITY_NAME and writes identities only for report.peers_empty; a
# peer with keys/config but an unparsable identity never gets a new one.
@pytest.mark.parametrize("damage", ["garbage", "zero-length"])
def test_identity_damaged_on_one_peer_is_reported_and_repaired(backed_up: Vault, damage: str) -> None:
    identity = backed_up.peer(3) / "identity"
    if damage == "garbage":
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


def _wait_for(proc: Any, condition: Any, what: str) -> None:
    deadline = time.time() + 120
    while not condition():
        assert proc.poll() is None, f"finished before {what}: {proc.communicate()}"
        assert time.time() < deadline, what
        time.sleep(0.005)


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
