"""Issue 11: ``wal-push`` archives the segments PostgreSQL marked ready ahead of its own.

A directory laid out like ``pg_wal`` (segments and ``archive_status/*.ready``)
stands in for PostgreSQL here; tests/test_postgres.py runs the same
archive_command under a real PostgreSQL 15, where every segment goes this way.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, Vault, make_vault

from shardvault.config import PostgresSource
from shardvault.repository.wal import archived

SEGMENTS = [f"0000000100000000000000{i:02X}" for i in range(1, 13)]


@pytest.fixture
def pg_vault(tmp_path: Path) -> tuple[Vault, Path]:
    vault = make_vault(tmp_path)
    with open(vault.config, "a") as f:
        f.write('[[sources]]\nname = "db"\ntype = "postgres"\ndsn = "host=127.0.0.1"\n')
    wal = tmp_path / "data" / "pg_wal"
    (wal / "archive_status").mkdir(parents=True)
    for name in SEGMENTS:
        (wal / name).write_bytes(os.urandom(1 << 20) + name.encode() * 1000)
        (wal / "archive_status" / f"{name}.ready").write_text("")
    return vault, wal


def _archived(vault: Vault) -> set[str]:
    with vault.repo() as repo:
        return set(archived(repo, repo.config.typed_source("db", PostgresSource)))


def _done(wal: Path, name: str) -> None:
    """What PostgreSQL does once archive_command succeeded."""
    os.replace(wal / "archive_status" / f"{name}.ready", wal / "archive_status" / f"{name}.done")


def test_one_call_archives_the_next_ready_segments_and_theirs_return_at_once(pg_vault: tuple[Vault, Path]) -> None:
    vault, wal = pg_vault
    result = vault.run("wal-push", "--source", "db", str(wal / SEGMENTS[0]))
    assert result.returncode == 0, result.stderr
    assert _archived(vault) == set(SEGMENTS[:9])  # its own and 8 ahead
    _done(wal, SEGMENTS[0])
    # The next calls open no repository: a wrong passphrase cannot stop them.
    for name in SEGMENTS[1:9]:
        result = vault.run("wal-push", "--source", "db", str(wal / name), password="wrong")
        assert result.returncode == 0, result.stderr
        _done(wal, name)
    assert not any((wal.parent / "pg_wal" / ".shardvault-pushed").glob("0*"))
    # Past what was pushed ahead, a call opens the repository again (and needs the passphrase).
    assert vault.run("wal-push", "--source", "db", str(wal / SEGMENTS[9]), password="wrong").returncode == 4
    assert vault.run("wal-push", "--source", "db", str(wal / SEGMENTS[9])).returncode == 0
    assert _archived(vault) == set(SEGMENTS)
    # Every segment comes back as it was.
    for name in SEGMENTS:
        out = wal.parent / "restored" / name
        out.parent.mkdir(exist_ok=True)
        assert vault.run("wal-fetch", "--source", "db", name, str(out)).returncode == 0
        assert out.read_bytes() == (wal / name).read_bytes(), name


def test_a_marker_never_vouches_for_other_content(pg_vault: tuple[Vault, Path]) -> None:
    """A segment rewritten after it was pushed ahead (a re-created cluster) is not "archived" by its marker."""
    vault, wal = pg_vault
    assert vault.run("wal-push", "--source", "db", "--ahead", "2", str(wal / SEGMENTS[0])).returncode == 0
    (wal / SEGMENTS[1]).write_bytes(b"other content" * 1000)
    result = vault.run("wal-push", "--source", "db", str(wal / SEGMENTS[1]), "--ahead", "0")
    assert result.returncode != 0
    assert "different" in result.stderr or "conflict" in result.stderr.lower(), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ahead_zero_pushes_only_its_own(pg_vault: tuple[Vault, Path]) -> None:
    vault, wal = pg_vault
    assert vault.run("wal-push", "--source", "db", "--ahead", "0", str(wal / SEGMENTS[0])).returncode == 0
    assert _archived(vault) == {SEGMENTS[0]}
    assert not (wal / ".shardvault-pushed").exists()


@pytest.mark.parametrize(
    ("argv", "arguments"),
    [
        (["wal-push", "pg_wal/X"], ["pg_wal/X"]),
        (["--config", "c.toml", "--password-file", "p", "wal-push", "--source", "db", "--ahead", "3", "X"], ["X"]),
        (["wal-push", "--source=db", "--async", "--timeout", "5", "X"], ["X"]),
        (["--config", "wal-push", "backup", "X"], None),  # a config file named so is not the command
        (["wal-push", "--help"], None),
        (["wal-push", "X", "Y"], None),
        (["wal-fetch", "X", "Y"], ["X", "Y"]),
        (["wal-fetch", "--source", "db", "X", "Y"], ["X", "Y"]),
        (["wal-fetch", "X"], None),
        (["wal-fetch", "--async", "X", "Y"], None),
        (["--verbose", "wal-push", "X"], None),
    ],
)
def test_the_console_script_takes_the_fast_path_only_for_a_plain_wal_call(
    argv: list[str], arguments: list[str] | None
) -> None:
    from shardvault.entry import parse

    call = parse(argv)
    assert (call.arguments if call else None) == arguments


def test_the_fast_path_needs_no_configuration(pg_vault: tuple[Vault, Path], tmp_path: Path) -> None:
    """A segment pushed ahead is acknowledged before the configuration is even read (the console script)."""
    vault, wal = pg_vault
    assert vault.run("wal-push", "--source", "db", "--ahead", "1", str(wal / SEGMENTS[0])).returncode == 0
    missing = tmp_path / "no-such.toml"
    result = subprocess.run(
        [str(BIN / "shardvault"), "--config", str(missing), "wal-push", "--source", "db", str(wal / SEGMENTS[1])],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    # Its marker is used up: the same call again goes the whole way (and needs the configuration).
    again = subprocess.run(
        [str(BIN / "shardvault"), "--config", str(missing), "wal-push", "--source", "db", str(wal / SEGMENTS[1])],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 3, again.stderr
