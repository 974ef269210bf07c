"""Browsing snapshots (issue 10): ls, find and diff read trees only, never data packs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, PASSWORD, Vault, assert_same_tree, make_vault

from shardvault.repository.packs import KIND_DATA


def run_bytes(vault: Vault, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = os.environ | {"SHARDVAULT_PASSWORD": PASSWORD}
    return subprocess.run([str(BIN / "shardvault"), "--config", str(vault.config), *args], capture_output=True, env=env)


def snap_id(vault: Vault) -> str:
    result = vault.cli("backup", "src", "--json")
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return str(doc["snapshot"]["id"])


def json_of(vault: Vault, *args: str) -> Any:
    result = vault.cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def history(tmp_path: Path) -> tuple[Vault, str, str]:
    """Two snapshots: between them a file added, one removed, one changed, one chmod-ed only."""
    vault = make_vault(tmp_path)
    first = snap_id(vault)
    (vault.source / "dir0" / "added.txt").write_bytes(b"new")
    (vault.source / "dir1" / "private").unlink()
    (vault.source / "dir0" / "file0.txt").write_bytes(b"changed content")
    os.chmod(vault.source / "dir2" / "file2.txt", 0o600)
    second = snap_id(vault)
    return vault, first, second


def test_ls_lists_children_or_everything_below_a_path(history: tuple[Vault, str, str]) -> None:
    vault, first, _ = history
    top = [e["path"] for e in json_of(vault, "ls", first)["entries"]]
    assert "dir0" in top and "large0.bin" in top
    assert all("/" not in p for p in top) and "." not in top
    dir1 = json_of(vault, "ls", first, "dir1")["entries"]
    now = {str(p.relative_to(vault.source)) for p in (vault.source / "dir1").iterdir()}
    assert {e["path"] for e in dir1} == now | {"dir1/private"}  # (removed from the source after the first)
    private = next(e for e in dir1 if e["path"] == "dir1/private")
    assert private["mode"] == "0600" and private["size"] == 6 and private["type"] == "file"
    everything = json_of(vault, "ls", first, "/dir1/", "--recursive")["entries"]
    assert {e["path"] for e in everything} > {e["path"] for e in dir1}
    assert all(e["path"].startswith("dir1/") for e in everything)
    one = json_of(vault, "ls", first, "dir1/private")["entries"]
    assert [e["path"] for e in one] == ["dir1/private"]
    link = json_of(vault, "ls", first, "link-rel")["entries"][0]
    assert link["type"] == "symlink" and link["target"] == "dir0/file0.txt"
    long = vault.cli("ls", first, "dir1", "--long")
    assert long.exit_code == 0 and "-rw------- " in long.output and "dir1/sub0/" in long.output


def test_ls_of_a_missing_path_is_exit_8_in_one_line(history: tuple[Vault, str, str]) -> None:
    vault, _, second = history
    result = vault.run("ls", second, "dir1/private")  # removed before the second snapshot
    assert result.returncode == 8 and "'dir1/private' is not in snapshot" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    as_json = vault.run("ls", second, "nowhere", "--json")
    assert as_json.returncode == 8 and json.loads(as_json.stdout)["error"]["code"] == 8


def test_ls_find_and_diff_read_no_data_pack(history: tuple[Vault, str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from shardvault.repository import Repository

    vault, first, second = history
    kinds: list[int] = []
    real = Repository.fetch_pack

    def counting(self: Repository, record: Any) -> Any:
        kinds.append(record.kind)
        return real(self, record)

    monkeypatch.setattr(Repository, "fetch_pack", counting)
    json_of(vault, "ls", first, "--recursive")
    json_of(vault, "find", "*.txt")
    json_of(vault, "diff", first, second)
    assert kinds and KIND_DATA not in kinds, kinds  # tree packs only


@pytest.mark.parametrize(
    ("pattern", "newest", "expected"),
    [
        ("private", None, {("first", "dir1/private")}),
        ("added.txt", None, {("second", "dir0/added.txt")}),
        ("file0.txt", None, {("first", "dir0/file0.txt"), ("second", "dir0/file0.txt")}),
        ("file0.txt", 1, {("second", "dir0/file0.txt")}),
        ("dir1/priv*", None, {("first", "dir1/private")}),
        ("priv", None, set()),
        ("large?.bin", 1, {("second", f"large{i}.bin") for i in range(3)}),
    ],
)
def test_find_names_the_snapshots_that_hold_a_match(
    history: tuple[Vault, str, str], pattern: str, newest: int | None, expected: set[tuple[str, str]]
) -> None:
    vault, first, second = history
    names = {first: "first", second: "second"}
    args = ["find", pattern] + (["--newest", str(newest)] if newest else [])
    found = json_of(vault, *args)["matches"]
    assert {(names[m["snapshot"]], m["path"]) for m in found} == expected
    assert all(m["source"] == "src" and "size" in m and "mtime" in m for m in found)


def test_diff_says_what_was_added_removed_changed_and_touched(history: tuple[Vault, str, str]) -> None:
    vault, first, second = history
    doc = json_of(vault, "diff", first, second)
    assert doc["added"] == ["dir0/added.txt"]
    assert doc["removed"] == ["dir1/private"]
    assert doc["changed"] == ["dir0/file0.txt"]
    assert "dir2/file2.txt" in doc["metadata"] and "dir0/file0.txt" not in doc["metadata"]
    assert doc["stats"]["added"] == 1 and doc["stats"]["removed"] == 1
    back = json_of(vault, "diff", second, first)
    assert back["added"] == ["dir1/private"] and back["removed"] == ["dir0/added.txt"]
    same = json_of(vault, "diff", first, first)
    assert not (same["added"] or same["removed"] or same["changed"] or same["metadata"])
    human = vault.cli("diff", first, second)
    assert "+    dir0/added.txt" in human.output and "-    dir1/private" in human.output


def test_dump_writes_one_file_byte_for_byte(history: tuple[Vault, str, str]) -> None:
    vault, first, second = history
    result = run_bytes(vault, "dump", first, "large1.bin")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (vault.source / "large1.bin").read_bytes()
    empty = run_bytes(vault, "dump", first, "empty")
    assert empty.returncode == 0 and empty.stdout == b""
    gone = run_bytes(vault, "dump", second, "dir1/private")
    assert gone.returncode == 8 and b"is not in snapshot" in gone.stderr and not gone.stdout


def test_dump_of_a_directory_is_a_tar_that_extracts_to_the_same_tree(
    history: tuple[Vault, str, str], tmp_path: Path
) -> None:
    vault, _, second = history
    for path, where in (("dir2", tmp_path / "one"), ("/", tmp_path / "all")):
        result = run_bytes(vault, "dump", second, path)
        assert result.returncode == 0, result.stderr
        where.mkdir()
        with tarfile.open(fileobj=io.BytesIO(result.stdout), mode="r|") as tar:
            names = tar.getnames()
        assert names and all(not n.startswith(("/", "..")) for n in names)
        # GNU tar, as an operator would: it restores the pax headers' nanosecond mtimes.
        subprocess.run(["tar", "-x", "--numeric-owner", "-C", str(where)], input=result.stdout, check=True)
        source = vault.source / path.strip("/") if path.strip("/") else vault.source
        extracted = where / path.strip("/") if path.strip("/") else where
        assert_same_tree(source, extracted)


def tree_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["--include", "*.bin"], lambda p: p.endswith(".bin")),
        (["--include", "dir1"], lambda p: p.startswith("dir1/")),
        (["--exclude", "dir1", "--exclude", "*.bin"], lambda p: not p.startswith("dir1/") and not p.endswith(".bin")),
        (["--include", "dir0/*", "--exclude", "file1*"], lambda p: p.startswith("dir0/") and "/file1" not in p),
        (["--include", "dir0/sub0/*.txt"], lambda p: p.startswith("dir0/sub0/") and p.endswith(".txt")),
    ],
)
def test_include_and_exclude_restore_exactly_the_selected_set(
    history: tuple[Vault, str, str], tmp_path: Path, args: list[str], wanted: Any
) -> None:
    vault, _, second = history
    target = tmp_path / "out"
    result = vault.cli("restore", second, "--target", str(target), *args)
    assert result.exit_code == 0, result.output
    expected = {p for p in tree_files(vault.source) if wanted(p)}
    assert expected and tree_files(target) == expected
    for path in expected:
        assert (target / path).read_bytes() == (vault.source / path).read_bytes() or (target / path).is_symlink()


def test_path_restores_one_subtree_as_the_target(history: tuple[Vault, str, str], tmp_path: Path) -> None:
    vault, _, second = history
    target = tmp_path / "sub"
    result = vault.cli("restore", second, "--target", str(target), "--path", "/dir2/")
    assert result.exit_code == 0, result.output
    assert_same_tree(vault.source / "dir2", target)
    one = tmp_path / "one"
    assert vault.cli("restore", second, "--target", str(one), "--path", "large2.bin").exit_code == 0
    assert tree_files(one) == {"large2.bin"}
    missing = vault.run("restore", second, "--target", str(tmp_path / "none"), "--path", "dir1/private")
    assert missing.returncode == 8 and "is not in snapshot" in missing.stderr


def test_dry_run_writes_nothing_and_says_what_it_would_fetch(history: tuple[Vault, str, str], tmp_path: Path) -> None:
    vault, _, second = history
    target = tmp_path / "never"
    whole = json_of(vault, "restore", second, "--target", str(target), "--dry-run")
    assert not target.exists()
    files = [p for p in vault.source.rglob("*") if p.is_file() and not p.is_symlink()]
    assert whole["dry_run"] is True and whole["files"] == len(files)
    assert whole["bytes"] == sum(p.stat().st_size for p in files)
    small = json_of(vault, "restore", second, "--dry-run", "--include", "file2*.txt")
    assert 0 < small["files"] < whole["files"] and small["packs"] < whole["packs"]
    assert 0 < small["fetch_bytes"] < whole["fetch_bytes"]
    assert all(p.split("/")[-1].startswith("file2") or "/" not in p or p.count("/") < 3 for p in small["paths"])
