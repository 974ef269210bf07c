"""The lister process (shardvault.sources.listing): the walk it speeds up is the walk without it.

Every case compares a walk that lists ahead in a lister process with the
walk that lists everything itself: same items, same order, same warnings;
and whatever the lister cannot do (start, finish, list the directory the
walk holds) the walk does itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Vault, assert_same_tree

import shardvault.backup.files as backup_files
import shardvault.sources.files as files_source
from shardvault.backup_warnings import BackupWarning
from shardvault.sources import listing
from shardvault.sources.files import WalkOptions, walk


def _tree(root: Path) -> Path:
    (root / "a" / "deep" / "er").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "empty").mkdir()
    (root / "skip-me").mkdir()
    (root / "skip-me" / "x").write_text("excluded")
    for i in range(700):  # more than a batch: the walk reads several
        (root / "b" / f"f{i:04}").write_text(str(i))
    (root / "a" / "deep" / "er" / "leaf").write_bytes(b"leaf")
    (root / "a" / "link").symlink_to("deep/er/leaf")
    (root / "a" / "dangling").symlink_to("/nowhere")
    os.mkfifo(root / "a" / "fifo")
    (root / os.fsdecode(b"odd-\xff-name")).write_text("not UTF-8")
    (root / "z.tmp").write_text("excluded")
    return root


OPTIONS = WalkOptions(exclude=("skip-me", "*.tmp"))


def _walked(root: Path, ahead: bool) -> tuple[list[Any], list[BackupWarning]]:
    warnings: list[BackupWarning] = []
    items = [
        # A directory's atime moves when it is listed: not what is compared here.
        (dataclasses.replace(item.entry, atime_ns=0), item.path, item.name)
        for item in walk(root, OPTIONS, warnings.append, ahead=ahead)
    ]
    return items, warnings


@pytest.fixture
def own_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories the walk lists itself (the lister's listings are made in its own process)."""
    listed: list[str] = []
    real = listing.list_dir

    def counted(fd: int, rel_dir: str, exclude: tuple[str, ...]) -> list[Any]:
        listed.append(rel_dir)
        return real(fd, rel_dir, exclude)

    monkeypatch.setattr(listing, "list_dir", counted)
    return listed


def test_a_walk_listed_ahead_is_the_walk_listed_inline(tmp_path: Path, own_listings: list[str]) -> None:
    root = _tree(tmp_path / "src")
    inline, inline_warnings = _walked(root, ahead=False)
    own_listings.clear()
    ahead, ahead_warnings = _walked(root, ahead=True)
    assert ahead == inline
    assert ahead_warnings == inline_warnings == []
    assert own_listings == []  # every directory was listed by the lister process
    paths = [entry.path for entry, _, _ in ahead]
    assert "b/f0699" in paths and "a/deep/er/leaf" in paths and os.fsdecode(b"odd-\xff-name") in paths
    assert not [p for p in paths if p.startswith("skip-me") or p.endswith(".tmp")]


def test_the_walk_lists_itself_what_the_lister_did_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_listings: list[str]
) -> None:
    """A lister killed after its first batch: the walk lists the rest itself, and misses nothing."""
    root = _tree(tmp_path / "src")
    (root / "zz").mkdir()  # listed after b's 700 names: never in the first batch
    inline, _ = _walked(root, ahead=False)
    own_listings.clear()

    class Killed(listing.Lister):
        def _receive(self) -> bool:
            got = super()._receive()
            if self._process is not None:
                os.kill(self._process.pid, signal.SIGKILL)
                self.close()  # and what it had written is gone with it
            return got

    monkeypatch.setattr(files_source, "Lister", Killed)
    assert _walked(root, ahead=True) == (inline, [])
    assert "zz/" in own_listings and "" not in own_listings


def test_a_lister_that_cannot_start_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "src")
    inline, _ = _walked(root, ahead=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    assert _walked(root, ahead=True) == (inline, [])


def test_a_listing_is_used_only_for_the_directory_the_walk_holds(tmp_path: Path) -> None:
    """Same path, another directory (renamed in between): the walk lists its own handle, not the lister's names."""
    root = _tree(tmp_path / "src")
    other = tmp_path / "other"
    other.mkdir()
    (other / "only-here").write_text("x")
    root_fd = os.open(root, listing.DIR_FLAGS)
    other_fd = os.open(other, listing.DIR_FLAGS)
    try:
        with listing.Lister(root_fd, (), ahead=True) as lister:
            names = lister.take(other_fd, "", os.fstat(other_fd))  # the lister listed root as ""
            assert [n[0] for n in names] == ["only-here"]
            # and it moved past it: the next directory is still served
            a_fd = os.open("a", listing.DIR_FLAGS, dir_fd=root_fd)
            try:
                assert [n[0] for n in lister.take(a_fd, "a/", os.fstat(a_fd))] == ["dangling", "deep", "fifo", "link"]
            finally:
                os.close(a_fd)
    finally:
        os.close(root_fd)
        os.close(other_fd)


def test_the_lister_process_ends_with_the_walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "src")
    started: list[listing.Lister] = []

    class Kept(listing.Lister):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            started.append(self)
            self.pid = self._process.pid if self._process else None

    monkeypatch.setattr(files_source, "Lister", Kept)
    items = walk(root, OPTIONS, ahead=True)
    next(items), next(items)  # the root, then the first entry: the lister runs
    assert started and started[0].pid is not None
    items.close()  # a backup that stops early (an error, an interruption)
    with pytest.raises(ProcessLookupError):
        os.kill(started[0].pid, 0)  # killed and reaped


@pytest.mark.parametrize("ahead", [False, True])
def test_an_incremental_backup_listed_ahead_restores_the_tree(
    vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ahead: bool
) -> None:
    monkeypatch.setattr(backup_files, "LIST_AHEAD_FROM", 1 if ahead else 10**9)
    assert vault.cli("backup", "src").exit_code == 0
    files = [p for p in vault.source.rglob("*") if p.is_file() and not p.is_symlink()]
    files[0].write_bytes(b"changed since the first backup")
    (vault.source / "new-dir").mkdir()
    (vault.source / "new-dir" / "new-file").write_text("new")
    started: list[bool] = []
    real = files_source.Lister

    def recorded(root_fd: int, exclude: tuple[str, ...], list_ahead: bool) -> listing.Lister:
        started.append(list_ahead)
        return real(root_fd, exclude, list_ahead)

    monkeypatch.setattr(files_source, "Lister", recorded)
    result = vault.cli("backup", "src", "--json")
    assert result.exit_code == 0, result.output
    assert started == [ahead]
    stats = json.loads(result.stdout)["stats"]
    assert stats["files_read"] == 2 and stats["files_unchanged"] == stats["files"] - 2
    out = tmp_path / "out"
    assert vault.cli("restore", "latest", "--source", "src", "--target", str(out)).exit_code == 0
    assert_same_tree(vault.source, out)
