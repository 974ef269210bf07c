"""One test (or more) per invariant of DESIGN.md, each failing without it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from itertools import combinations
from pathlib import Path

import pytest
from conftest import (
    PASSWORD,
    Vault,
    assert_same_tree,
    deny_reading,
    flip_bit,
    make_vault,
    peer_snapshot,
    tree_state,
)

from shardvault.backup import run_backup
from shardvault.config import load_config
from shardvault.errors import ConfigError, DataLossError, UnsafePathError
from shardvault.repository.metadata import pack_name
from shardvault.repository.snapshot import resolve
from shardvault.shards.format import build_shard, parse_shard
from shardvault.sources import files as files_source
from shardvault.tree import DIR, FILE, SYMLINK, Entry

# --- 1. recoverable from nothing -----------------------------------------------------


def test_1_recoverable_from_passphrase_and_peer_list_alone(backed_up: Vault, tmp_path: Path) -> None:
    shutil.rmtree(tmp_path / "state")
    # A new machine: a fresh config naming the same peers, another state dir, another cwd.
    config = backed_up.config.read_text().replace(str(tmp_path / "state"), str(tmp_path / "new-state"))
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "shardvault.toml").write_text(config)
    fresh = Vault(other, other / "shardvault.toml", backed_up.peers_dir, backed_up.source)
    listing = fresh.cli("snapshots", "--json")
    assert listing.exit_code == 0, listing.output
    snaps = json.loads(listing.stdout)
    assert len(snaps) == 1 and snaps[0]["source"] == "src"
    result = fresh.cli("restore", "latest", "--source", "src", "--target", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert_same_tree(backed_up.source, tmp_path / "out")
    assert not (tmp_path / "state").exists()


def test_1_metadata_is_on_every_peer(backed_up: Vault) -> None:
    for i in range(6):
        names = {p.parent.name for p in backed_up.peer(i).rglob("*") if p.is_file() and "data" not in p.parts}
        assert {"keys", "index", "snapshots"} <= names
        assert (backed_up.peer(i) / "config").is_file()


# --- 2. any k of n --------------------------------------------------------------------


def _restore(vault: Vault, target: Path) -> tuple[int, str]:
    result = vault.cli("restore", "latest", "--source", "src", "--target", str(target))
    return result.exit_code, result.stdout + result.stderr


@pytest.mark.parametrize("lost", list(combinations(range(6), 2)))
def test_2_any_two_peers_lost(backed_up: Vault, tmp_path: Path, lost: tuple[int, int]) -> None:
    for i in lost:
        shutil.rmtree(backed_up.peer(i))
    code, output = _restore(backed_up, tmp_path / "out")
    assert code == 0, output
    assert_same_tree(backed_up.source, tmp_path / "out")


@pytest.mark.parametrize(("truncated", "flipped"), [(0, 1), (2, 5), (3, 4)])
def test_2_shards_of_two_peers_truncated_or_bit_flipped(
    backed_up: Vault, tmp_path: Path, truncated: int, flipped: int
) -> None:
    for shard in backed_up.shards(truncated):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for shard in backed_up.shards(flipped):
        flip_bit(shard, 777)
    code, output = _restore(backed_up, tmp_path / "out")
    assert code == 0, output
    assert_same_tree(backed_up.source, tmp_path / "out")


def test_2_three_peers_lost_fails_naming_packs_and_writes_nothing(backed_up: Vault, tmp_path: Path) -> None:
    for i in (0, 2, 4):
        shutil.rmtree(backed_up.peer(i))
    result = backed_up.run("restore", "latest", "--source", "src", "--target", str(tmp_path / "out"))
    assert result.returncode == 7, result.stderr
    assert "Data lost: the tree of snapshot" in result.stderr and "lost pack " in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_2_three_shards_of_data_packs_lost_names_packs_and_files(backed_up: Vault, tmp_path: Path) -> None:
    with backed_up.repo() as repo:
        data_packs = {p.id for p in repo.index.packs.values() if p.kind == 0}
    for i in (1, 3, 5):
        for shard in backed_up.shards(i):
            if shard.name.split(".")[0] in data_packs:
                shard.unlink()
    result = backed_up.run("restore", "latest", "--source", "src", "--target", str(tmp_path / "out"))
    assert result.returncode == 7, result.stderr
    assert f"{len(data_packs)} pack(s) lost: pack " in result.stderr and "file(s) cannot be restored" in result.stderr
    assert all(p[:16] in result.stderr for p in data_packs)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_2_damage_found_only_while_reading_leaves_no_wrong_file(backed_up: Vault, tmp_path: Path) -> None:
    """Two peers gone and a third's shards corrupted: the presence plan passes, reads fail."""
    for i in (0, 1):
        shutil.rmtree(backed_up.peer(i))
    with backed_up.repo() as repo:
        data_packs = [p for p in repo.index.packs.values() if p.kind == 0]
        victim = data_packs[0]
        shard = next(s for s in victim.shards if s.peer == "p2")
    flip_bit(backed_up.peer(2) / pack_name(victim.id, shard.num))
    out = tmp_path / "out"
    result = backed_up.run("restore", "latest", "--source", "src", "--target", str(out))
    assert result.returncode == 7
    assert victim.id[:16] in result.stderr
    source = tree_state(backed_up.source)
    restored = tree_state(out)
    assert restored, "files in intact packs are restored"
    for path, state in restored.items():
        if state[0] == "f":
            assert state == source[path], f"{path} restored with wrong content"
    assert len([p for p in restored if restored[p][0] == "f"]) < len([p for p in source if source[p][0] == "f"])
    assert not list(out.rglob(".shardvault-*")), "temporary files left behind"


# --- 3. peers are untrusted -------------------------------------------------------------


def _two_packs(vault: Vault) -> tuple[str, str, int]:
    with vault.repo() as repo:
        packs = sorted(p.id for p in repo.index.packs.values() if p.kind == 0)
        num = next(s.num for s in repo.index.packs[packs[0]].shards if s.peer == "p3")
    return packs[0], packs[1], num


def test_3_swapped_shard_is_named(backed_up: Vault, tmp_path: Path) -> None:
    a, b, num = _two_packs(backed_up)
    peer = backed_up.peer(3)
    victim = peer / pack_name(a, num)
    other = next(p for p in backed_up.shards(3) if b in p.name)
    victim.write_bytes(other.read_bytes())
    result = backed_up.cli("check", "--read-data", "--json")
    assert result.exit_code == 6
    report = json.loads(result.stdout)
    [issue] = report["shard_issues"]
    assert issue["object"] == pack_name(a, num) and issue["peer"] == "p3" and issue["problem"] == "corrupt"
    code, output = _restore(backed_up, tmp_path / "out")
    assert code == 0, output
    assert_same_tree(backed_up.source, tmp_path / "out")


def test_3_replayed_shard_is_named(backed_up: Vault, tmp_path: Path) -> None:
    """A well-formed shard for the right pack and number, but not the bytes the index recorded."""
    a, _, num = _two_packs(backed_up)
    victim = backed_up.peer(3) / pack_name(a, num)
    header, payload, _ = parse_shard(victim.read_bytes())
    forged = bytearray(payload)
    forged[0] ^= 0xFF
    victim.write_bytes(build_shard(header, bytes(forged)))
    report = json.loads(backed_up.cli("check", "--read-data", "--json").stdout)
    [issue] = report["shard_issues"]
    assert issue["object"] == pack_name(a, num) and "replayed" in issue["detail"]
    code, _ = _restore(backed_up, tmp_path / "out")
    assert code == 0
    assert_same_tree(backed_up.source, tmp_path / "out")


def test_3_bad_shard_met_while_reading_is_skipped_and_named(backed_up: Vault, tmp_path: Path) -> None:
    """The reader asks the fastest peers first; make the corrupt one the fastest, so it must be read."""
    from shardvault.restore.files import restore_files

    a, _, num = _two_packs(backed_up)
    flip_bit(backed_up.peer(3) / pack_name(a, num), 999)
    with backed_up.repo() as repo:
        for peer in repo.peers:
            repo.peers._cost[peer.name] = 0.0 if peer.name == "p3" else 1.0
        snap = resolve(repo.snapshots(), "latest", "src")
        stats = restore_files(repo, snap, tmp_path / "out")
    assert [(b["object"], b["peer"], b["problem"]) for b in stats.bad_shards] == [(pack_name(a, num), "p3", "corrupt")]
    assert "hash mismatch" in stats.bad_shards[0]["detail"]
    assert_same_tree(backed_up.source, tmp_path / "out")


def test_3_peers_see_only_ciphertext_and_opaque_names(backed_up: Vault) -> None:
    needle = (backed_up.source / "dir1" / "private").read_bytes() + b"text text"
    text = (backed_up.source / "dir0" / "file0.txt").read_bytes()[:64]
    for name, data in peer_snapshot(backed_up.peers_dir).items():
        assert "file0" not in name and "dir1" not in name
        # (needles long enough that random ciphertext does not contain them by chance: 4 bytes did, 1 run in 200)
        assert b"file0.txt" not in data and b"dir1/private" not in data
        assert needle not in data and (not text or text not in data)
        assert PASSWORD.encode() not in data


def test_3_garbage_metadata_on_one_peer_is_survived(backed_up: Vault) -> None:
    for f in (backed_up.peer(0) / "snapshots").iterdir():
        f.write_bytes(b"garbage")
    (backed_up.peer(0) / "config").write_bytes(b"\x00" * 10)
    result = backed_up.cli("snapshots", "--json")
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 1


# --- 4. commit last, concurrent writers -------------------------------------------------------


def _big_source(vault: Vault, mib: int) -> None:
    big = vault.source / "big"
    big.mkdir()
    for i in range(mib // 8):
        (big / f"blob{i}").write_bytes(os.urandom(8 << 20))


def test_4_sigkill_mid_backup_leaves_repository_consistent_and_rerun_resumes(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    _big_source(vault, 160)
    proc = vault.popen("backup", "src")
    deadline = time.time() + 120
    # A checkpoint index on every peer (not a temporary file, nor one still being replicated: a kill
    # between its copies leaves it on fewer peers than the quorum, which check rightly reports).
    while not set.intersection(*({p.name for p in (vault.peer(i) / "index").glob("[!.]*")} for i in range(6))):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((vault.peer(0) / "snapshots").glob("*")), "no snapshot may be visible"
    check = vault.cli("check", "--read-data", "--json")
    assert check.exit_code == 0, check.output
    report = json.loads(check.stdout)
    assert report["snapshots"] == 0 and report["packs"]["healthy"] > 0
    rerun = vault.cli("backup", "src", "--json")
    assert rerun.exit_code == 0, rerun.output
    stats = json.loads(rerun.stdout)["stats"]
    assert stats["bytes_new"] < stats["bytes_read"], "the rerun reused the packs of the killed run"
    assert vault.cli("check", "--read-data").exit_code == 0
    code, output = _restore(vault, tmp_path / "out")
    assert code == 0, output
    assert_same_tree(vault.source, tmp_path / "out")


def test_4_two_writers_at_once(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    _big_source(vault, 48)
    procs = [vault.popen("backup", "src"), vault.popen("backup", "src", "--full")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    check = vault.cli("check", "--read-data", "--json")
    assert check.exit_code == 0, check.output
    snaps = json.loads(vault.cli("snapshots", "--json").stdout)
    assert len(snaps) == 2
    for snap in snaps:
        result = vault.cli("restore", snap["id"][:10], "--target", str(tmp_path / snap["id"]))
        assert result.exit_code == 0, result.output
        assert_same_tree(vault.source, tmp_path / snap["id"])


def _backup_losing_peer_5(vault: Vault) -> tuple[subprocess.Popen[str], str]:
    """Start a backup and take peer 5 away once its first shard has landed."""
    proc = vault.popen("backup", "src")
    while not list((vault.peer(5) / "data").rglob("*.*")):
        time.sleep(0.02)
    vault.peer(5).rename(vault.peers_dir / "p5-away")  # atomic: the disk is gone at once
    _, err = proc.communicate(timeout=300)
    return proc, err


def test_4_peer_lost_mid_backup_with_full_quorum_commits_nothing(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, write_quorum=6)
    _big_source(vault, 64)
    before = json.loads(vault.cli("snapshots", "--json").stdout)
    proc, err = _backup_losing_peer_5(vault)
    assert proc.returncode == 5, err
    assert "p5" in err and "Traceback" not in err
    vault.peer(5).mkdir()  # the disk comes back, empty
    assert json.loads(vault.cli("snapshots", "--json").stdout) == before


def test_4_peer_lost_mid_backup_with_lower_quorum_commits_degraded(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, write_quorum=5)
    _big_source(vault, 64)
    proc, err = _backup_losing_peer_5(vault)
    assert proc.returncode == 0, err
    report = json.loads(vault.cli("check", "--json").stdout)
    assert report["packs"]["degraded"] > 0 and report["packs"]["lost"] == 0
    code, output = _restore(vault, tmp_path / "out")
    assert code == 0, output
    assert_same_tree(vault.source, tmp_path / "out")


# --- 5. bounded memory ------------------------------------------------------------------


def _peak_rss_mib(vault: Vault, *args: str) -> float:
    """Run the console script; return its peak resident set size in MiB."""
    proc = vault.popen(*args)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return usage.ru_maxrss / 1024  # Linux reports KiB


def test_5_memory_does_not_grow_with_the_source(tmp_path: Path) -> None:
    """Peak RSS of backup and restore: 16 MiB source versus a 256 MiB single file (16x)."""
    vault = make_vault(tmp_path, pack_size_mib=4)
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    large.mkdir()
    (small / "f").write_bytes(os.urandom(16 << 20))
    with open(large / "f", "wb") as f:  # one file: a reader that slurps whole files would show
        for _ in range(32):
            f.write(os.urandom(8 << 20))
    with open(vault.config, "a") as cfg:
        for name, path in (("small", small), ("large", large)):
            cfg.write(f'[[sources]]\nname = "{name}"\ntype = "files"\npath = "{path}"\n')
    peaks = {}
    for name in ("small", "large"):
        backup = _peak_rss_mib(vault, "backup", name)
        restore = _peak_rss_mib(vault, "restore", "latest", "--source", name, "--target", str(tmp_path / f"r-{name}"))
        peaks[name] = (backup, restore)
    assert (tmp_path / "r-large" / "f").stat().st_size == 256 << 20
    # 240 MiB more source may cost a little (the chunk index), never the source itself.
    assert peaks["large"][0] < peaks["small"][0] + 32, peaks
    assert peaks["large"][1] < peaks["small"][1] + 32, peaks


# --- 6. restore writes only inside its target ------------------------------------------------


def _crafted_snapshot(vault: Vault, monkeypatch: pytest.MonkeyPatch, entries: list[tuple[Entry, str]]) -> str:
    """A snapshot whose tree holds the given entries, as a malicious writer with the key could make."""
    items = [files_source.SourceItem(entry, path) for entry, path in entries]  # opened by path, as crafted
    monkeypatch.setattr("shardvault.backup.files.walk", lambda *a, **k: iter(items))
    config = load_config(vault.config)
    with vault.repo() as repo:
        result = run_backup(repo, config.source("src"), full=True)
    monkeypatch.undo()
    return result.snapshot.id


def _entry(path: str, kind: str, source: Path | None = None, target: str | None = None) -> tuple[Entry, str]:
    st = os.lstat(source) if source else os.lstat("/")
    entry = Entry(
        path,
        kind,
        0o644 if kind == FILE else 0o755,
        0,
        0,
        st.st_mtime_ns,
        size=st.st_size if kind == FILE else 0,
        target=target,
    )
    return entry, str(source or "/")


@pytest.mark.parametrize("bad", ["../escaped", "/tmp/abs-escaped", "dir/../../escaped", "a//b", "./x"])
def test_6_crafted_paths_are_refused(vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    payload = vault.source / "empty"
    snap = _crafted_snapshot(vault, monkeypatch, [_entry(".", DIR), _entry("dir", DIR), _entry(bad, FILE, payload)])
    target = tmp_path / "t" / "target"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = vault.run("restore", snap, "--target", str(target))
    assert result.returncode == 9, result.stderr
    assert "Refusing to restore" in result.stderr and bad in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not Path("/tmp/abs-escaped").exists()
    assert not (tmp_path / "t" / "escaped").exists()


def test_6_planted_symlink_in_target_is_not_followed(backed_up: Vault, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "dir0").symlink_to(outside)
    result = backed_up.run("restore", "latest", "--source", "src", "--target", str(target))
    assert result.returncode == 9, result.stderr
    assert "symlink" in result.stderr and "dir0" in result.stderr
    assert list(outside.iterdir()) == []


def test_6_symlink_from_the_snapshot_itself_is_not_followed(
    vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    snap = _crafted_snapshot(
        vault,
        monkeypatch,
        [
            _entry(".", DIR),
            _entry("link", SYMLINK, target=str(outside)),
            _entry("link/evil", FILE, vault.source / "empty"),
        ],
    )
    result = vault.run("restore", snap, "--target", str(tmp_path / "target"))
    assert result.returncode == 9, result.stderr
    assert list(outside.iterdir()) == []
    assert (tmp_path / "target" / "link").is_symlink()


def test_6_existing_symlink_at_a_file_name_is_replaced_not_written_through(backed_up: Vault, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    target = tmp_path / "target"
    target.mkdir()
    (target / "empty").symlink_to(victim)
    result = backed_up.run("restore", "latest", "--source", "src", "--target", str(target), "--overwrite", "always")
    assert result.returncode == 0, result.stderr
    assert victim.read_bytes() == b"keep me"
    assert not (target / "empty").is_symlink()


def test_6_unit_safe_parts() -> None:
    from shardvault.restore.safepath import safe_parts

    assert safe_parts("a/b/c") == ["a", "b", "c"]
    assert safe_parts(".") == []
    for bad in ("..", "../a", "a/..", "/a", "a//b", "a/./b", "", "a\0b"):
        with pytest.raises(UnsafePathError):
            safe_parts(bad)


# --- 7. nothing is lost silently: bad input -------------------------------------------------


def test_7_wrong_passphrase(backed_up: Vault) -> None:
    before = peer_snapshot(backed_up.peers_dir)
    result = backed_up.run("backup", "src", password="not the password")
    assert result.returncode == 4
    assert result.stderr == "shardvault: error: Wrong passphrase: no key in the repository opens with it\n"
    assert peer_snapshot(backed_up.peers_dir) == before


def test_7_no_passphrase(backed_up: Vault) -> None:
    result = backed_up.run("snapshots", password="")
    assert result.returncode == 3 and "SHARDVAULT_PASSWORD" in result.stderr


def test_7_unreachable_peer_at_init_changes_nothing(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, init=False)
    config = vault.config.read_text().replace(
        f'"file://{vault.peer(4)}"', '"s3://bucket/x"\nendpoint = "http://127.0.0.1:9"'
    )
    vault.config.write_text(config)
    result = vault.run("init")
    assert result.returncode == 5, result.stderr
    assert "p4" in result.stderr and result.stderr.count("\n") == 1
    assert peer_snapshot(vault.peers_dir) == {}


def _set_quorum(vault: Vault, quorum: int) -> None:
    text = vault.config.read_text().replace("[repository]\n", f"[repository]\nwrite_quorum = {quorum}\n", 1)
    vault.config.write_text(text)


def test_7_unreachable_peer_at_backup_changes_nothing(backed_up: Vault) -> None:
    _set_quorum(backed_up, 6)
    shutil.move(backed_up.peer(2), backed_up.peers_dir / "away")
    before = peer_snapshot(backed_up.peers_dir)
    (backed_up.source / "new-file").write_bytes(os.urandom(100_000))
    result = backed_up.run("backup", "src")
    assert result.returncode == 5
    assert (
        result.stderr.startswith("shardvault: error: Peer p2 is unreachable: directory")
        and result.stderr.count("\n") == 1
    )
    assert peer_snapshot(backed_up.peers_dir) == before


def test_7_read_only_peer_at_backup(backed_up: Vault) -> None:
    import subprocess

    _set_quorum(backed_up, 6)  # every peer must take the commit: one read-only peer means nothing committed
    (backed_up.source / "new-file").write_bytes(os.urandom(100_000))
    if subprocess.run(["chattr", "+i", str(backed_up.peer(1) / "index")], capture_output=True).returncode:
        pytest.skip("chattr +i unsupported")
    try:
        result = backed_up.run("backup", "src")
    finally:
        subprocess.run(["chattr", "-i", str(backed_up.peer(1) / "index")], check=True)
    assert result.returncode == 5, result.stderr
    assert "p1 is not writable" in result.stderr
    snaps = json.loads(backed_up.cli("snapshots", "--json").stdout)
    assert len(snaps) == 1  # nothing committed
    assert backed_up.cli("check").exit_code == 0


def test_7_missing_repository_and_unknown_snapshot(tmp_path: Path, backed_up: Vault) -> None:
    fresh = make_vault(tmp_path / "other", init=False)
    for i in range(6):
        fresh.peer(i).mkdir(parents=True)
    result = fresh.run("snapshots")
    assert result.returncode == 8 and "run 'shardvault init' first" in result.stderr
    result = backed_up.run("restore", "deadbeef", "--target", str(tmp_path / "x"))
    assert result.returncode == 8 and "No snapshot matches 'deadbeef'" in result.stderr
    assert backed_up.run("init").returncode == 8


def test_7_missing_source(backed_up: Vault) -> None:
    shutil.rmtree(backed_up.source)
    result = backed_up.run("backup", "src")
    assert result.returncode == 10 and "cannot read" in result.stderr
    with pytest.raises(ConfigError):
        load_config(backed_up.config).source("nope")
    assert backed_up.run("backup", "nope").returncode == 3


def test_7_unreadable_file_is_reported(backed_up: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    deny_reading(monkeypatch, backed_up)
    result = backed_up.cli("backup", "src")
    assert result.exit_code == 11
    assert "private: cannot read: Permission denied" in result.stderr
    with backed_up.repo() as repo:
        snap = resolve(repo.snapshots(), "latest", "src")

        assert "dir1/private" not in {e.path for e in repo.iter_tree(snap)}


def test_7_data_loss_error_carries_exit_code() -> None:
    assert DataLossError("x").exit_code == 7


def test_4_default_quorum_keeps_backing_up_through_one_dead_peer(backed_up: Vault, tmp_path: Path) -> None:
    """Finding 8 of issue 7: one dead disk of six must not stop backups (write_quorum defaults to n - 1)."""
    shutil.move(backed_up.peer(2), backed_up.peers_dir / "away")
    (backed_up.source / "new-file").write_bytes(os.urandom(300_000))
    result = backed_up.run("backup", "src", "--json")
    assert result.returncode == 0, result.stderr
    assert "degraded" in result.stderr.lower() and "p2" in result.stderr
    assert json.loads(result.stdout)["stats"]["degraded"] is True
    shutil.move(backed_up.peers_dir / "away", backed_up.peer(2))  # the disk comes back
    assert backed_up.run("check").returncode == 6  # the new pack and metadata lack p2's copies
    assert backed_up.run("repair").returncode == 0
    assert backed_up.run("check").returncode == 0
    code, output = _restore(backed_up, tmp_path / "out")
    assert code == 0, output
    assert_same_tree(backed_up.source, tmp_path / "out")
