"""Issue 7, the backup side: never lean on lost data, never leave the source, say what could not be done."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, Vault, assert_same_tree, make_vault

import shardvault.backup.files as backup_files
from shardvault.chunker import Chunker
from shardvault.repository import Repository
from shardvault.repository.snapshot import resolve
from shardvault.sources import files as files_source
from shardvault.tree import FILE


def _backup_json(vault: Vault, *args: str) -> tuple[int, dict[str, Any], str]:
    result = vault.cli("backup", "src", "--json", *args)
    return result.exit_code, json.loads(result.stdout), result.stderr


def _restore(vault: Vault, target: Path) -> None:
    result = vault.cli("restore", "latest", "--source", "src", "--target", str(target))
    assert result.exit_code == 0, result.output


def _lose_data_packs(vault: Vault) -> set[str]:
    """Delete the shards of every data pack on three peers: with k = 4 of n = 6, every data pack is lost."""
    with vault.repo() as repo:
        data_packs = {p.id for p in repo.index.packs.values() if p.kind == 0}
    for i in (0, 2, 4):
        for shard in vault.shards(i):
            if shard.name.split(".")[0] in data_packs:
                shard.unlink()
    return data_packs


def _empty_files(root: Path) -> int:
    """Files with no chunks: nothing to lose, so an incremental run may keep them."""
    return sum(1 for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size == 0)


def _chunks_in_recoverable_packs(vault: Vault, lost: set[str]) -> None:
    """Every chunk the latest snapshot names is held by a pack that is not lost."""
    with vault.repo() as repo:
        snap = resolve(repo.snapshots(), "latest", "src")
        held: set[str] = set()
        for record in repo.index.packs.values():
            if record.id not in lost:
                held.update(e.chunk_id.hex() for e in record.entries)
        missing = [e.path for e in repo.iter_tree(snap) if e.type == FILE and not set(e.chunks) <= held]
    assert missing == []


# --- 1. a lost pack does not poison later backups ---------------------------------------------


@pytest.mark.parametrize("full", [False, True], ids=["incremental", "full"])
def test_1_backup_after_a_lost_pack_stores_the_data_again(vault: Vault, tmp_path: Path, full: bool) -> None:
    assert vault.cli("backup", "src").exit_code == 0
    lost = _lose_data_packs(vault)
    code, doc, stderr = _backup_json(vault, *(["--full"] if full else []))
    assert code == 0, stderr
    # Every file with content was re-read and stored again, although the index still names the old chunks.
    assert doc["stats"]["files_unchanged"] == (0 if full else _empty_files(vault.source))
    assert doc["stats"]["chunks_new"] > 0 and doc["stats"]["packs_new"] >= 1
    _chunks_in_recoverable_packs(vault, lost)
    _restore(vault, tmp_path / "out")
    assert_same_tree(vault.source, tmp_path / "out")


def test_1_pack_short_of_the_write_quorum_is_not_leaned_on(tmp_path: Path) -> None:
    """One shard gone of six (write_quorum 6): recoverable, but not "stored with margin", so stored again."""
    vault = make_vault(tmp_path, write_quorum=6)
    assert vault.cli("backup", "src").exit_code == 0
    with vault.repo() as repo:
        data_packs = {p.id for p in repo.index.packs.values() if p.kind == 0}
    for shard in vault.shards(1):
        if shard.name.split(".")[0] in data_packs:
            shard.unlink()
    code, doc, stderr = _backup_json(vault)
    assert code == 0, stderr
    assert doc["stats"]["files_unchanged"] == _empty_files(vault.source) and doc["stats"]["chunks_new"] > 0


def test_1_intact_repository_still_deduplicates(backed_up: Vault) -> None:
    code, doc, stderr = _backup_json(backed_up, "--full")
    assert code == 0, stderr
    assert doc["stats"]["chunks_new"] == 0 and doc["stats"]["files_read"] > 0


def test_1_run_that_deduplicates_nothing_lists_no_shards(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = Repository.list_shards

    def counting(self: Repository) -> dict[tuple[str, int], dict[str, int]]:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(Repository, "list_shards", counting)
    assert vault.cli("backup", "src").exit_code == 0
    assert calls == []  # a first backup has nothing to lean on: no survey
    assert vault.cli("backup", "src").exit_code == 0
    assert calls == [1]  # once per run, not per chunk


# --- 6. files changed while read ------------------------------------------------------------


def test_6_file_changed_while_read_is_named_and_read_again(
    vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = vault.source / "torn.bin"
    target.write_bytes(os.urandom(3 << 20))
    os.utime(target, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    inode = target.stat().st_ino
    real = Chunker.chunks
    done: list[bool] = []

    def tearing(self: Chunker, stream: Any, *hint: Any) -> Iterator[bytes]:
        for n, data in enumerate(real(self, stream, *hint)):
            yield data
            if n == 0 and not done and os.fstat(stream.fileno()).st_ino == inode:
                done.append(True)
                with open(target, "r+b") as f:  # overwrite what was already read: the copy is torn
                    f.write(b"X" * 4096)

    monkeypatch.setattr(Chunker, "chunks", tearing)
    code, doc, stderr = _backup_json(vault)
    assert done and code == 0, stderr
    assert doc["stats"]["changed_while_read"] == [str(target)]
    assert {"path": str(target), "kind": "changed_while_read"}.items() <= doc["warning_details"][0].items()
    assert any("torn.bin: changed while it was read" in w for w in doc["warnings"])
    assert "torn.bin" in stderr

    monkeypatch.setattr(Chunker, "chunks", real)
    code, doc, stderr = _backup_json(vault)
    assert code == 0, stderr
    assert doc["stats"]["files_read"] == 1 and doc["stats"]["changed_while_read"] == []
    _restore(vault, tmp_path / "out")
    assert (tmp_path / "out" / "torn.bin").read_bytes() == target.read_bytes()

    # Once read whole, it is trusted again.
    code, doc, stderr = _backup_json(vault)
    assert code == 0 and doc["stats"]["files_read"] == 0, stderr


# --- 7. the walk follows handles, not paths ---------------------------------------------------


def _outside(tmp_path: Path, like: Path) -> Path:
    """A directory outside the source whose names mirror ``like``, every file holding a marker."""
    outside = tmp_path / "outside"
    for path in like.rglob("*"):
        if path.is_file() and not path.is_symlink():
            twin = outside / path.relative_to(like)
            twin.parent.mkdir(parents=True, exist_ok=True)
            twin.write_bytes(b"OUTSIDE-SECRET " * 100)
    return outside


@pytest.fixture(params=["listed-inline", "listed-ahead"])
def listing_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the walk gets its listings: by itself, or from a lister process (shardvault.sources.listing)."""
    if request.param == "listed-ahead":
        monkeypatch.setattr(backup_files, "_list_ahead", lambda parent: True)
    return str(request.param)


@pytest.mark.parametrize("when", ["listing-the-directory", "reading-its-files"])
def test_7_directory_swapped_for_a_symlink_is_not_followed(
    vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str, listing_mode: str
) -> None:
    victim = vault.source / "dir3"
    outside = _outside(tmp_path, victim)
    trigger = "dir3" if when == "listing-the-directory" else "dir3/file8.txt"
    assert (vault.source / trigger).exists()
    real = files_source.entry_from_stat

    def swapping(rel: str, st: os.stat_result, target: str | None = None) -> Any:
        entry = real(rel, st, target)
        if rel == trigger and not victim.is_symlink():
            victim.rename(tmp_path / "moved-dir3")
            victim.symlink_to(outside)
        return entry

    monkeypatch.setattr(files_source, "entry_from_stat", swapping)
    code, doc, stderr = _backup_json(vault)
    assert victim.is_symlink()
    if when == "listing-the-directory":
        # Left out, and said so, with the exit status of an incomplete backup.
        assert code == 11, stderr
        assert {"path": str(victim), "kind": "replaced"}.items() <= doc["warning_details"][0].items()
        assert "dir3: was a directory when listed, is not one now: not followed" in stderr
    else:
        # Read through the handle of the directory that was listed.
        assert code == 0, stderr
    monkeypatch.undo()
    out = tmp_path / "out"
    _restore(vault, out)
    leaked = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink() and b"OUTSIDE-SECRET" in p.read_bytes()]
    assert leaked == []
    if when == "reading-its-files":
        assert (out / "dir3" / "file8.txt").read_bytes() == (tmp_path / "moved-dir3" / "file8.txt").read_bytes()


def test_7_file_swapped_for_a_symlink_is_not_followed(
    vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listing_mode: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"OUTSIDE-SECRET")
    victim = vault.source / "dir1" / "private"
    real = files_source.entry_from_stat

    def swapping(rel: str, st: os.stat_result, target: str | None = None) -> Any:
        entry = real(rel, st, target)
        if rel == "dir1/private":
            victim.unlink()
            victim.symlink_to(secret)
        return entry

    monkeypatch.setattr(files_source, "entry_from_stat", swapping)
    code, doc, stderr = _backup_json(vault)
    assert code == 11, stderr
    assert doc["warning_details"][0]["kind"] == "replaced"
    assert "private: is a symlink now, not the file listed: not followed" in stderr
    with vault.repo() as repo:
        snap = resolve(repo.snapshots(), "latest", "src")
        assert "dir1/private" not in {e.path for e in repo.iter_tree(snap)}


# --- 13. warnings are values; unreadable directories exit 11 -----------------------------------


def test_13_unreadable_directory_exits_11_and_is_named(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, for whom chmod 000 changes nothing: refuse the directory at the system call.
    real_open, real_scandir = os.open, os.scandir

    def deny_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == "dir2" and kwargs.get("dir_fd") is not None and flags & os.O_DIRECTORY:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    def deny_scandir(path: Any = ".") -> Any:
        if isinstance(path, str) and path.endswith(os.sep + "dir2"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "open", deny_open)
    monkeypatch.setattr(os, "scandir", deny_scandir)
    code, doc, stderr = _backup_json(vault)
    assert code == 11, stderr
    details = [d for d in doc["warning_details"] if d["kind"] == "unreadable_dir"]
    assert [d["path"] for d in details] == [str(vault.source / "dir2")]
    assert "dir2" in stderr and "could not be read" in stderr
    assert doc["warnings"] == [d["message"] for d in doc["warning_details"]]


def test_13_special_file_is_a_warning_not_an_incomplete_backup(vault: Vault) -> None:
    import socket

    sock = socket.socket(socket.AF_UNIX)  # FIFOs and devices are recorded (tests/test_fidelity.py); sockets not
    sock.bind(str(vault.source / "sock"))
    sock.close()
    code, doc, stderr = _backup_json(vault)
    assert code == 0, stderr
    assert [d["kind"] for d in doc["warning_details"]] == ["special_file"]


# --- 8. degraded commits say so ------------------------------------------------------------------


def test_8_degraded_commit_exits_0_warns_and_is_marked(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, write_quorum=5)
    shutil.rmtree(vault.peer(5))
    code, doc, stderr = _backup_json(vault)
    assert code == 0, stderr
    stats = doc["stats"]
    assert stats["degraded"] is True and stats["failed_peers"] == ["p5"]
    assert stats["packs_degraded"] == stats["packs_new"] > 0
    assert "DEGRADED" in stderr and "p5" in stderr
    assert [d["kind"] for d in doc["warning_details"]] == ["degraded_pack"]
    with vault.repo() as repo:
        snap = resolve(repo.snapshots(), "latest", "src")
        assert snap.stats["degraded"] is True and snap.stats["failed_peers"] == ["p5"]
        assert [r["status"] for r in repo.state.runs("backup")] == ["degraded"]
    text = vault.cli("backup", "src")
    assert text.exit_code == 0, text.output
    assert "degraded" in text.stdout.splitlines()[0]


def test_8_healthy_commit_is_not_degraded(backed_up: Vault) -> None:
    code, doc, stderr = _backup_json(backed_up)
    assert code == 0 and doc["stats"]["degraded"] is False and doc["warning_details"] == [], stderr
    with backed_up.repo() as repo:
        assert {r["status"] for r in repo.state.runs("backup")} == {"ok"}


def test_1_wal_push_after_a_lost_pack_stores_the_segment_again(tmp_path: Path) -> None:
    from shardvault.backup.wal import push
    from shardvault.config import load_config
    from shardvault.repository.wal import record_name

    vault = make_vault(tmp_path)
    with open(vault.config, "a") as f:
        f.write('[[sources]]\nname = "db"\ntype = "postgres"\ndsn = "host=127.0.0.1"\n')
    cfg = load_config(vault.config)
    data = os.urandom(3 << 20)
    first, second = tmp_path / "000000010000000000000001", tmp_path / "000000010000000000000002"
    first.write_bytes(data)
    second.write_bytes(data)  # the same bytes (a recycled segment): deduplicated while its packs live
    with Repository.open(cfg, PASSWORD) as repo:
        assert push(repo, cfg.source("db"), first)
    lost = _lose_data_packs(vault)
    with Repository.open(cfg, PASSWORD) as repo:
        assert push(repo, cfg.source("db"), second)
    with Repository.open(cfg, PASSWORD) as repo:
        chunks = set(repo.read_meta(record_name("db", second.name))["chunks"])
        held = {e.chunk_id.hex() for r in repo.index.packs.values() if r.id not in lost for e in r.entries}
    assert chunks and chunks <= held
