"""Issue 11: ``wal-push`` archives the segments PostgreSQL marked ready ahead of its own.

A directory laid out like ``pg_wal`` (segments and ``archive_status/*.ready``)
stands in for PostgreSQL here; tests/test_postgres.py runs the same
archive_command under a real PostgreSQL 15, where every segment goes this way.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import BIN, PASSWORD, Vault, make_vault

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


def _assert_restorable(vault: Vault, wal: Path, names: list[str]) -> None:
    """Every segment comes back as it was (wal-fetch, one by one)."""
    for name in names:
        out = wal.parent / "restored" / name
        out.parent.mkdir(exist_ok=True)
        assert vault.run("wal-fetch", "--source", "db", name, str(out)).returncode == 0
        assert out.read_bytes() == (wal / name).read_bytes(), name


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
    _assert_restorable(vault, wal, SEGMENTS)


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


# --- wal-push --async: one long-lived pusher --------------------------------------------------


def _pusher_alive(wal: Path) -> bool:
    from shardvault.walspool import worker_alive

    return worker_alive(wal / ".shardvault-pushed")


def _wait(predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def async_vault(pg_vault: tuple[Vault, Path]) -> Iterator[tuple[Vault, Path]]:
    vault, wal = pg_vault
    vault.env["SHARDVAULT_WAL_PUSHER_IDLE"] = "2"
    yield vault, wal
    _wait(lambda: not _pusher_alive(wal))  # it stops by itself once idle


def test_async_calls_hand_segments_to_one_pusher_that_stops_when_idle(async_vault: tuple[Vault, Path]) -> None:
    vault, wal = async_vault
    result = vault.run("wal-push", "--source", "db", "--async", str(wal / SEGMENTS[0]))
    assert result.returncode == 0, result.stderr
    assert SEGMENTS[0] in _archived(vault)  # "archived" only once committed
    _done(wal, SEGMENTS[0])
    # The pusher goes on with every ready segment; the later calls need no repository (a wrong passphrase).
    for name in SEGMENTS[1:]:
        result = vault.run("wal-push", "--source", "db", "--async", str(wal / name), password="wrong")
        assert result.returncode == 0, result.stderr
        _done(wal, name)
    assert _archived(vault) == set(SEGMENTS)
    # A segment PostgreSQL marks ready later is pushed by the same pusher, while it runs.
    late = "000000010000000000000020"
    (wal / late).write_bytes(os.urandom(1 << 16))
    (wal / "archive_status" / f"{late}.ready").write_text("")
    assert vault.run("wal-push", "--source", "db", "--async", str(wal / late), password="wrong").returncode == 0
    _done(wal, late)
    _wait(lambda: not _pusher_alive(wal))
    assert not list((wal / ".shardvault-pushed").glob("0*")), "no marker outlives its segment's call"
    _assert_restorable(vault, wal, [*SEGMENTS, late])


def test_async_reports_the_pushers_error_in_one_line_and_archives_nothing(async_vault: tuple[Vault, Path]) -> None:
    vault, wal = async_vault
    result = vault.run("wal-push", "--source", "db", "--async", str(wal / SEGMENTS[0]), password="wrong")
    assert result.returncode == 4, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "passphrase" in result.stderr.lower(), result.stderr
    assert not (wal / ".shardvault-pushed" / ".worker.error").exists()  # reported once, used up
    assert _archived(vault) == set()
    # PostgreSQL asks again: a new pusher, which works.
    assert vault.run("wal-push", "--source", "db", "--async", str(wal / SEGMENTS[0])).returncode == 0
    assert SEGMENTS[0] in _archived(vault)


def test_async_with_too_few_peers_fails_with_the_peer_exit_code(async_vault: tuple[Vault, Path]) -> None:
    vault, wal = async_vault
    for name in SEGMENTS[1:]:
        (wal / "archive_status" / f"{name}.ready").unlink()
    assert vault.run("wal-push", "--source", "db", "--async", str(wal / SEGMENTS[0])).returncode == 0
    _done(wal, SEGMENTS[0])
    _wait(lambda: not _pusher_alive(wal))
    (wal / "archive_status" / f"{SEGMENTS[1]}.ready").write_text("")
    hidden = [vault.peers_dir / f"p{i}" for i in range(3)]  # 4-of-6: three peers gone is one too many
    for peer in hidden:
        peer.rename(peer.with_name(peer.name + ".away"))
    try:
        result = vault.run("wal-push", "--source", "db", "--async", str(wal / SEGMENTS[1]))
    finally:
        for peer in hidden:
            peer.with_name(peer.name + ".away").rename(peer)
    assert result.returncode == 5, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (wal / ".shardvault-pushed" / SEGMENTS[1]).exists()
    assert _archived(vault) == {SEGMENTS[0]}
    assert vault.run("wal-push", "--source", "db", "--async", str(wal / SEGMENTS[1])).returncode == 0
    assert _archived(vault) == set(SEGMENTS[:2])


def test_async_times_out_on_a_pusher_that_does_not_move(async_vault: tuple[Vault, Path]) -> None:
    from shardvault.walspool import worker_lock

    vault, wal = async_vault
    with worker_lock(wal / ".shardvault-pushed") as mine:  # a pusher that holds its lock and pushes nothing
        assert mine
        result = vault.run("wal-push", "--source", "db", "--async", "--timeout", "1", str(wal / SEGMENTS[0]))
    assert result.returncode == 5, result.stderr
    assert "did not finish it within 1 s" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _archived(vault) == set()


def test_async_survives_a_killed_pusher(async_vault: tuple[Vault, Path]) -> None:
    vault, wal = async_vault
    assert vault.run("wal-push", "--source", "db", "--async", str(wal / SEGMENTS[0])).returncode == 0
    _done(wal, SEGMENTS[0])
    pids = subprocess.run(["pgrep", "-f", f"wal-pusher --source db {wal}"], capture_output=True, text=True).stdout
    for pid in pids.split():
        os.kill(int(pid), signal.SIGKILL)
    _wait(lambda: not _pusher_alive(wal))  # an flock dies with its holder: no stale lock
    for name in SEGMENTS[1:]:
        assert vault.run("wal-push", "--source", "db", "--async", str(wal / name)).returncode == 0
        _done(wal, name)
    assert _archived(vault) == set(SEGMENTS)
    # The kill may have cut a commit short: a copy of a record or index missing on some peers is what check
    # reports (exit 6) and repair restores, as after any killed writer; no segment is lost either way.
    if vault.run("check").returncode != 0:
        assert vault.run("repair").returncode == 0
    assert vault.run("check", "--read-data").returncode == 0
    _assert_restorable(vault, wal, SEGMENTS)


def test_async_pushes_a_file_postgresql_did_not_mark_ready_itself(async_vault: tuple[Vault, Path]) -> None:
    vault, wal = async_vault
    (wal / "archive_status" / f"{SEGMENTS[0]}.ready").unlink()
    result = vault.run("wal-push", "--source", "db", "--async", str(wal / SEGMENTS[0]))
    assert result.returncode == 0, result.stderr
    assert SEGMENTS[0] in _archived(vault)
    assert not _pusher_alive(wal) and not (wal / ".shardvault-pushed" / ".worker.lock").exists()


# --- wal-fetch: the prefetcher ---------------------------------------------------------------


def test_the_prefetcher_serves_recovery_answers_for_history_files_and_cleans_up(
    pg_vault: tuple[Vault, Path], tmp_path: Path
) -> None:
    from shardvault.walspool import worker_alive

    vault, wal = pg_vault
    for name in SEGMENTS:
        assert vault.run("wal-push", "--source", "db", "--ahead", "0", str(wal / name)).returncode == 0
    data = tmp_path / "restored"
    (data / "pg_wal").mkdir(parents=True)
    (data / "recovery.signal").write_text("")
    spool = data / "pg_wal" / ".shardvault-prefetch"

    def fetch(name: str, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
        return vault.run("wal-fetch", "--source", "db", name, str(data / "pg_wal" / "RECOVERYXLOG"), password=password)

    assert fetch(SEGMENTS[0]).returncode == 0  # opens the repository, starts the prefetcher
    _wait(lambda: (spool / ".worker.history").exists() and worker_alive(spool))
    # Recovery's next questions need no repository: the segments, and "is there a timeline 2?"
    for name in SEGMENTS[1:6]:
        result = fetch(name, password="wrong")
        assert result.returncode == 0, result.stderr
        assert (data / "pg_wal" / "RECOVERYXLOG").read_bytes() == (wal / name).read_bytes()
    result = fetch("00000002.history", password="wrong")
    assert result.returncode == 8
    assert result.stderr.strip() == "shardvault: error: Source db: WAL file 00000002.history is not in the archive"
    # The server promoted (recovery.signal gone, postmaster.pid there): the prefetcher removes its spool and stops,
    # but only after the promotion's own question for the old timeline's history, which PostgreSQL asks after
    # it removed recovery.signal, was answered from the listing too (not by a whole command).
    (data / "recovery.signal").unlink()
    (data / "postmaster.pid").write_text("1\n")
    time.sleep(0.5)  # the prefetcher looks every 50 ms
    result = fetch("00000001.history", password="wrong")
    assert result.returncode == 8, result.stderr
    _wait(lambda: not spool.exists())


def test_the_restore_command_moves_a_prefetched_segment_without_starting_shardvault(tmp_path: Path) -> None:
    """Recovery's call for a segment already fetched ahead is a rename in the shell; anything else goes on."""
    from shardvault.walspool import prefetched_first

    data = tmp_path / "data"
    spool = data / "pg_wal" / ".shardvault-prefetch"
    spool.mkdir(parents=True)
    (spool / SEGMENTS[0]).write_bytes(b"fetched ahead")
    went_on = tmp_path / "went-on.sh"  # stands in for `shardvault ... wal-fetch %f %p`
    went_on.write_text('#!/bin/sh\necho "$1" >> went-on\nexit 8\n')
    went_on.chmod(0o755)
    command = prefetched_first(f"{went_on} %f %p")

    def restore_command(name: str, cwd: Path = data, path: str = "pg_wal/RECOVERYXLOG") -> int:
        # As PostgreSQL runs it: in the data directory, %p in pg_wal; %% is a %.
        values = {"f": name, "p": path, "%": "%"}
        shell = re.sub("%(.)", lambda m: values[m.group(1)], command)
        return subprocess.run(["sh", "-c", shell], cwd=cwd).returncode

    assert restore_command(SEGMENTS[0]) == 0
    assert (data / "pg_wal" / "RECOVERYXLOG").read_bytes() == b"fetched ahead"
    assert not (spool / SEGMENTS[0]).exists() and not (data / "went-on").exists()
    # Not fetched yet, or a history file: the command itself runs (it waits, fetches, or says why not).
    assert restore_command(SEGMENTS[1]) == 8
    assert restore_command("00000002.history") == 8
    assert (data / "went-on").read_text().split() == [SEGMENTS[1], "00000002.history"]
    assert (data / "pg_wal" / "RECOVERYXLOG").read_bytes() == b"fetched ahead"
    # An absolute %p from another directory (pg_rewind's restore_target_wal) finds the spool beside it.
    (spool / SEGMENTS[2]).write_bytes(b"third")
    assert restore_command(SEGMENTS[2], cwd=tmp_path, path=str(data / "pg_wal" / "RECOVERYXLOG")) == 0
    assert (data / "pg_wal" / "RECOVERYXLOG").read_bytes() == b"third"


def test_a_second_push_completes_a_record_a_killed_writer_left_short(pg_vault: tuple[Vault, Path]) -> None:
    """Finding of issue 11's note: "already archived" vouched for a record on fewer peers than any commit."""
    vault, wal = pg_vault
    name = SEGMENTS[0]
    push = ("wal-push", "--source", "db", "--ahead", "0", str(wal / name))
    assert vault.run(*push).returncode == 0

    def copies() -> list[Path]:
        return [p for i in range(6) for p in vault.peer(i).rglob(name.lower())]

    assert len(copies()) == 6
    for extra in copies()[1:]:  # what a writer SIGKILLed between its copies leaves
        extra.unlink()
    assert vault.run("check").returncode == 6  # the damage is real: check says so
    result = vault.run(*push)
    assert result.returncode == 0, result.stderr
    assert len(copies()) == 6
    assert vault.run("check").returncode == 0, vault.run("check").stdout
    _assert_restorable(vault, wal, [name])

    # Too few peers to complete it: no "archived" (PostgreSQL keeps the segment and retries).
    for extra in copies()[1:]:
        extra.unlink()
    holder = next(i for i in range(6) if list(vault.peer(i).rglob(name.lower())))
    gone = [i for i in range(6) if i != holder][:4]
    for i in gone:
        vault.peer(i).rename(vault.peers_dir / f"gone{i}")
    result = vault.run(*push)
    assert result.returncode == 5, result.stderr
    assert f"wal/db/{name.lower()} is held by only 2 peer(s), fewer than the write quorum" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for i in gone:
        (vault.peers_dir / f"gone{i}").rename(vault.peer(i))
    assert vault.run(*push).returncode == 0
    assert len(copies()) == 6
