"""Issue 7, restore side: target problems are target errors (exit 12), overwriting is a choice,
'latest' needs a source when several exist, and only the root may be '.' (findings 12 and 16)."""

from __future__ import annotations

import errno
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, Vault, assert_same_tree, make_vault, tree_state

from shardvault.backup import run_backup
from shardvault.config import load_config
from shardvault.errors import LatestNeedsSourceError, RestoreTargetError, TargetNotEmptyError
from shardvault.repository.snapshot import Snapshot, resolve
from shardvault.sources import files as files_source
from shardvault.tree import DIR, FILE, SYMLINK, Entry


def _restore(vault: Vault, target: Path, *extra: str) -> Any:
    return vault.cli("restore", "latest", "--source", "src", "--target", str(target), *extra)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# --- target errors: exit 12, never "data lost", never a traceback ------------------------


def test_target_that_is_a_file_is_a_target_error(backed_up: Vault, tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_bytes(b"keep")
    result = _restore(backed_up, target)
    assert result.exit_code == 12, result.output
    assert "not a directory" in result.stderr and str(target) in result.stderr
    assert target.read_bytes() == b"keep"


def test_target_under_a_file_is_a_target_error(backed_up: Vault, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"keep")
    result = _restore(backed_up, tmp_path / "a-file" / "sub")
    assert result.exit_code == 12, result.output
    assert "not a directory" in result.stderr


def test_target_whose_parent_is_missing_is_refused_and_not_created(backed_up: Vault, tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "target"
    result = _restore(backed_up, target)
    assert result.exit_code == 12, result.output
    assert "does not exist" in result.stderr and str(target.parent) in result.stderr
    assert not (tmp_path / "no").exists()


def test_disk_full_in_a_worker_is_a_target_error_not_data_loss(
    backed_up: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "target"
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        if _fd_path(fd).startswith(str(target)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    result = _restore(backed_up, target)
    monkeypatch.undo()
    assert result.exit_code == 12, result.output
    assert "no space left" in result.stderr and "ENOSPC" in result.stderr and str(target) in result.stderr
    assert "Data lost" not in result.output and "lost" not in result.stderr


def test_read_only_target_in_the_main_thread_is_a_target_error(
    backed_up: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    real_mkdir = os.mkdir

    def read_only(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if dir_fd is not None and _fd_path(dir_fd).startswith(str(target)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", read_only)
    result = _restore(backed_up, target)
    monkeypatch.undo()
    assert result.exit_code == 12, result.output
    assert "read-only" in result.stderr and "EROFS" in result.stderr


def test_a_lost_pack_is_still_data_loss(backed_up: Vault, tmp_path: Path) -> None:
    for i in (0, 1, 2):
        for shard in backed_up.shards(i):
            shard.unlink()
    result = _restore(backed_up, tmp_path / "target")
    assert result.exit_code == 7, result.output


# --- overwriting is a choice -------------------------------------------------------------


def test_never_is_the_default_and_refuses_before_writing(backed_up: Vault, tmp_path: Path) -> None:
    target = tmp_path / "target"
    assert _restore(backed_up, target).exit_code == 0
    (target / "dir0" / "file0.txt").write_bytes(b"edited by the operator")
    (target / "large1.bin").unlink()  # a file to be written, to prove nothing is written
    before = tree_state(target)
    result = _restore(backed_up, target)
    assert result.exit_code == 12, result.output
    assert "not empty" in result.stderr and "path(s)" in result.stderr and "first:" in result.stderr
    assert tree_state(target) == before


def test_never_accepts_existing_directories_and_keeps_other_files(backed_up: Vault, tmp_path: Path) -> None:
    target = tmp_path / "target"
    (target / "dir0").mkdir(parents=True)
    (target / "not-in-the-snapshot").write_bytes(b"mine")
    result = _restore(backed_up, target)
    assert result.exit_code == 0, result.output
    assert (target / "not-in-the-snapshot").read_bytes() == b"mine"
    (target / "not-in-the-snapshot").unlink()
    assert_same_tree(backed_up.source, target)


def test_if_changed_rewrites_only_changed_files(backed_up: Vault, tmp_path: Path) -> None:
    target = tmp_path / "target"
    assert _restore(backed_up, target).exit_code == 0
    first = json.loads(_restore(backed_up, tmp_path / "other", "--json").stdout)
    same_size = target / "large2.bin"
    data = bytearray(same_size.read_bytes())
    data[100] ^= 0xFF
    same_size.write_bytes(bytes(data))  # same size, other content
    (target / "large1.bin").unlink()
    untouched = (target / "large0.bin").stat().st_ino
    result = _restore(backed_up, target, "--overwrite", "if-changed", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # exactly one document
    assert doc["files"] == first["files"]
    assert doc["files_skipped_unchanged"] == first["files"] - 2
    assert doc["files_overwritten"] == 1
    assert (target / "large0.bin").stat().st_ino == untouched
    assert_same_tree(backed_up.source, target)


def test_always_replaces_everything(backed_up: Vault, tmp_path: Path) -> None:
    target = tmp_path / "target"
    assert _restore(backed_up, target).exit_code == 0
    inode = (target / "large0.bin").stat().st_ino
    result = _restore(backed_up, target, "--overwrite", "always", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["files_overwritten"] == doc["files"] + doc["symlinks"] and doc["files_skipped_unchanged"] == 0
    assert (target / "large0.bin").stat().st_ino != inode
    assert_same_tree(backed_up.source, target)


@pytest.mark.parametrize("mode", ["if-changed", "always"])
def test_planted_symlink_at_a_file_name_is_replaced_never_written_through(
    backed_up: Vault, tmp_path: Path, mode: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    target = tmp_path / "target"
    target.mkdir()
    (target / "empty").symlink_to(victim)
    refused = _restore(backed_up, target)
    assert refused.exit_code == 12 and "empty is a symlink" in refused.stderr, refused.output
    assert (target / "empty").is_symlink()
    result = _restore(backed_up, target, "--overwrite", mode)
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == b"keep me"
    assert not (target / "empty").is_symlink()


def test_planted_symlink_where_a_directory_goes_is_refused_in_every_mode(backed_up: Vault, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "dir0").symlink_to(outside)
    for mode in ("never", "if-changed", "always"):
        result = _restore(backed_up, target, "--overwrite", mode)
        assert result.exit_code == 9, (mode, result.output)
        assert list(outside.iterdir()) == []


def test_file_where_a_directory_goes(backed_up: Vault, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "dir3").write_bytes(b"in the way")
    result = _restore(backed_up, target)
    assert result.exit_code == 12 and "dir3 is a file" in result.stderr, result.output
    result = _restore(backed_up, target, "--overwrite", "always")
    assert result.exit_code == 0, result.output
    assert_same_tree(backed_up.source, target)


def test_directory_where_a_file_goes_is_never_deleted(backed_up: Vault, tmp_path: Path) -> None:
    target = tmp_path / "target"
    (target / "large0.bin").mkdir(parents=True)
    (target / "large0.bin" / "precious").write_bytes(b"x")
    result = _restore(backed_up, target, "--overwrite", "always")
    assert result.exit_code == 12, result.output
    assert "large0.bin" in result.stderr and "directory" in result.stderr
    assert (target / "large0.bin" / "precious").read_bytes() == b"x"
    assert sorted(p.name for p in target.iterdir()) == ["large0.bin"]  # refused before writing


# --- 'latest' needs --source when the repository holds several -----------------------------


def test_latest_without_source_is_ambiguous_with_two_sources(vault: Vault, tmp_path: Path) -> None:
    other = tmp_path / "other-src"
    other.mkdir()
    (other / "f").write_bytes(b"other machine")
    with open(vault.config, "a") as conf:
        conf.write(f'[[sources]]\nname = "other"\ntype = "files"\npath = "{other}"\n')
    assert vault.cli("backup", "src").exit_code == 0
    assert vault.cli("backup", "other").exit_code == 0
    result = vault.cli("restore", "latest", "--target", str(tmp_path / "t"))
    assert result.exit_code == 2, result.output
    assert "other" in result.stderr and "src" in result.stderr and "--source" in result.stderr
    assert not (tmp_path / "t").exists()
    assert _restore(vault, tmp_path / "t").exit_code == 0
    assert_same_tree(vault.source, tmp_path / "t")


def _snap(source: str, finished: str) -> Snapshot:
    return Snapshot(finished + source, source, "files", "/", "full", None, finished, finished, "h", ())


def test_resolve_latest_unit() -> None:
    one = [_snap("a", "2026-01-01"), _snap("a", "2026-01-02")]
    assert resolve(one, "latest").finished == "2026-01-02"
    two = [*one, _snap("b", "2026-01-03")]
    with pytest.raises(LatestNeedsSourceError) as exc:
        resolve(two, "latest")
    assert exc.value.exit_code == 2 and "a, b" in str(exc.value)
    assert resolve(two, "latest", "a").finished == "2026-01-02"


# --- only the root may be '.' (finding 16) -------------------------------------------------


def _crafted(vault: Vault, monkeypatch: pytest.MonkeyPatch, entries: list[tuple[Entry, Path | None]]) -> str:
    """A snapshot whose tree holds exactly these entries (FILE entries read from the given path)."""
    fds: list[int] = []

    def items() -> Iterator[Any]:
        for entry, payload in entries:
            if not hasattr(files_source, "SourceItem"):  # the walk of before issue 7 yields (entry, path)
                yield entry, str(payload or "/")
                continue
            if payload is None:
                yield files_source.SourceItem(entry, "/")
                continue
            st = os.stat(payload)
            entry.inode = st.st_ino
            fds.append(os.open(payload.parent, os.O_RDONLY | os.O_DIRECTORY))
            yield files_source.SourceItem(entry, str(payload), fds[-1], payload.name, st.st_dev)

    monkeypatch.setitem(run_backup.__globals__, "walk", lambda *a, **k: items())
    try:
        with vault.repo() as repo:
            result = run_backup(repo, load_config(vault.config).source("src"), full=True)
    finally:
        monkeypatch.undo()
        for fd in fds:
            os.close(fd)
    return result.snapshot.id


def _e(path: str, kind: str, payload: Path | None = None) -> tuple[Entry, Path | None]:
    st = os.lstat(payload or "/")
    size = st.st_size if kind == FILE else 0
    entry = Entry(path, kind, 0o644 if kind == FILE else 0o755, 0, 0, st.st_mtime_ns, size=size, target="x")
    return entry, payload


@pytest.mark.parametrize(
    "bad",
    [
        [_e(".", DIR), _e(".", FILE, Path(__file__))],
        [_e(".", FILE, Path(__file__))],
        [_e(".", DIR), _e(".", SYMLINK)],
        [_e(".", DIR), _e("dir", DIR), _e(".", DIR)],
        [_e(".", DIR), _e("dir", DIR), _e("dir/.", DIR)],
        [_e(".", DIR), _e("dir", DIR), _e("dir/./f", SYMLINK)],
    ],
    ids=["file-dot-after-root", "file-dot-as-root", "symlink-dot", "second-root", "dir-dot", "dot-component"],
)
def test_dot_entries_other_than_the_root_are_refused(
    vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: list[tuple[Entry, Path | None]]
) -> None:
    snap = _crafted(vault, monkeypatch, [(replace(e), p) for e, p in bad])
    target = tmp_path / "target"
    result = vault.cli("restore", snap, "--target", str(target))
    assert result.exit_code == 9, result.output
    assert "Refusing to restore" in result.stderr and "'.'" in result.stderr
    assert not target.exists()  # refused before anything is written


# --- PostgreSQL: a data directory is restored into an empty one ------------------------------


@pytest.fixture
def tar_vault(tmp_path: Path) -> Vault:
    """A repository whose snapshot holds one stream, a tar, as a physical PostgreSQL snapshot does."""
    vault = make_vault(tmp_path)
    for child in sorted(vault.source.rglob("*"), reverse=True):
        child.unlink() if not child.is_dir() or child.is_symlink() else child.rmdir()
    data = tmp_path / "pgdata"
    (data / "base").mkdir(parents=True)
    (data / "PG_VERSION").write_text("16\n")
    (data / "base" / "1").write_bytes(os.urandom(5000))
    with tarfile.open(vault.source / "base.tar", "w") as tar:
        tar.add(data, arcname=".")
    assert vault.cli("backup", "src").exit_code == 0
    return vault


def _physical(vault: Vault, target: Path) -> dict[str, Any]:
    from shardvault.restore.postgres import restore_physical

    password = vault.root / "password"
    password.write_text(PASSWORD)
    with vault.repo() as repo:
        snap = resolve(repo.snapshots(), "latest", "src")
        source = load_config(vault.config).source("src")
        return restore_physical(repo, snap, source, target, config_path=vault.config, password_file=password)


def test_postgres_target_not_empty_or_a_file_is_a_target_error(tar_vault: Vault, tmp_path: Path) -> None:
    target = tmp_path / "restored"
    target.mkdir()
    (target / "old").write_bytes(b"keep")
    with pytest.raises(RestoreTargetError) as exc:
        _physical(tar_vault, target)
    assert exc.value.exit_code == 12 and "not empty" in str(exc.value)
    assert [p.name for p in target.iterdir()] == ["old"]
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(RestoreTargetError) as exc:
        _physical(tar_vault, tmp_path / "a-file")
    assert exc.value.exit_code == 12
    doc = _physical(tar_vault, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "PG_VERSION").read_text() == "16\n" and doc["target"] == str(tmp_path / "fresh")


def test_postgres_disk_full_is_a_target_error(
    tar_vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shardvault.restore.postgres as pgr

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pgr.shutil, "copyfileobj", full)
    with pytest.raises(RestoreTargetError) as exc:
        _physical(tar_vault, tmp_path / "restored")
    assert exc.value.exit_code == 12 and "ENOSPC" in str(exc.value)


def test_not_empty_error_classes() -> None:
    assert TargetNotEmptyError("/t", "x").exit_code == 12
