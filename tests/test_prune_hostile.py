"""Prune and writer sessions (issue 9) under hostile peers, crashes and careless operators.

Every scenario ends the same way: each kept snapshot restores byte for byte,
``check --read-data`` exits 0 (or says exactly what is wrong), and every exit
code and message is the documented one.

A prune "killed at a step" is the real console script run through a small
driver (:data:`DRIVER`) that ends the process with ``os._exit`` (what SIGKILL
leaves: no cleanup, no session end) right before the N-th object mutation on
any peer, or at a named place in prune; "another host" is another process
with its own state directory, and where its hostname matters the driver
gives it another one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, Vault, assert_same_tree, make_vault, peer_snapshot
from test_prune import (
    add_prune_settings,
    garbage_history,
    hold_session,
    json_of,
    lean_on_garbage,
    ok,
    other_host,
    restore_matches,
    shard_packs,
    stopped,
)

# The console script, with two hooks for tests (environment variables):
#   SV_HOSTNAME=name   this process believes it runs on host ``name``
#   SV_SLOW_SESSIONS=s  each read of a session object takes that long first (a slow peer, a busy host)
#   SV_HIDE=peer:prefix  that peer's listings leave out the names under prefix (a lying peer)
#   SV_CLOCK=iso8601   prune's clock (the time it writes into condemned sets and compares them with)
#   SV_KILL_AT=spec    the process dies (os._exit, as SIGKILL would leave it) at:
#       mutation:N          right before its N-th store/delete on any peer
#       count               (never) and writes how many mutations it made to SV_COUNT_FILE at exit
#       tombstone:PREFIX:N  right after the N-th tombstone naming a PREFIX object is written
#       call:METHOD:N       right before the N-th call of Pruner.METHOD
#       repo:METHOD:PREFIX:N  right before the N-th call of Repository.METHOD (whose name starts with PREFIX)
#       stop:METHOD:N       (not a kill) stops itself (SIGSTOP) right before the N-th call of Pruner.METHOD
DRIVER = r"""
import atexit, os, socket, sys
host = os.environ.get("SV_HOSTNAME")
if host:
    socket.gethostname = lambda: host
clock = os.environ.get("SV_CLOCK")
if clock:
    import datetime as datetime_module
    import shardvault.lifecycle.prune as prune_module
    class Skewed(datetime_module.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime_module.datetime.fromisoformat(clock)
    prune_module.datetime = Skewed
slow = os.environ.get("SV_SLOW_SESSIONS")
if slow:
    import time
    from shardvault.repository import Repository
    real_read = Repository.read_meta
    def slow_read(self, name, *args, **kwargs):
        if name.startswith("sessions/"):
            time.sleep(float(slow))
        return real_read(self, name, *args, **kwargs)
    Repository.read_meta = slow_read
hide = os.environ.get("SV_HIDE")
if hide:
    from shardvault.shards.stores.local import LocalStore
    liar, _, hidden = hide.partition(":")
    real_list = LocalStore.list
    def lying_list(self, prefix=""):
        for item in real_list(self, prefix):
            if not (self.peer == liar and item.name.startswith(hidden)):
                yield item
    LocalStore.list = lying_list
spec = os.environ.get("SV_KILL_AT", "")
if spec:
    from shardvault.shards.stores.local import LocalStore
    import shardvault.lifecycle.prune as prune_module
    kind, _, arg = spec.partition(":")
    count = [0]
    if kind in ("mutation", "count"):
        def counting(real):
            def wrapped(self, *args, **kwargs):
                count[0] += 1
                if kind == "mutation" and count[0] == int(arg):
                    os._exit(137)
                return real(self, *args, **kwargs)
            return wrapped
        for method in ("store", "delete", "delete_leftover"):
            setattr(LocalStore, method, counting(getattr(LocalStore, method)))
        if kind == "count":
            atexit.register(lambda: open(os.environ["SV_COUNT_FILE"], "w").write(str(count[0])))
    elif kind == "tombstone":
        real_tombstone = prune_module.write_tombstone
        def tombstone(repo, names, reason):
            names = list(names)
            name = real_tombstone(repo, names, reason)
            prefix, _, nth = arg.partition(":")
            if any(n.startswith(prefix) for n in names):
                count[0] += 1
                if count[0] == int(nth):
                    os._exit(137)
            return name
        prune_module.write_tombstone = tombstone
    elif kind == "repo":
        from shardvault.repository import Repository
        method, _, rest = arg.partition(":")
        prefix, _, nth = rest.rpartition(":")
        real_repo = getattr(Repository, method)
        def repo_call(self, *args, **kwargs):
            if not prefix or (args and isinstance(args[0], str) and args[0].startswith(prefix)):
                count[0] += 1
                if count[0] == int(nth):
                    os._exit(137)
            return real_repo(self, *args, **kwargs)
        setattr(Repository, method, repo_call)
    elif kind == "stop":
        method, _, nth = arg.partition(":")
        real_stopped = getattr(prune_module.Pruner, method)
        def stop(self, *args, **kwargs):
            count[0] += 1
            if count[0] == int(nth):
                os.kill(os.getpid(), 19)  # SIGSTOP: frozen here until SIGCONT
            return real_stopped(self, *args, **kwargs)
        setattr(prune_module.Pruner, method, stop)
    elif kind == "call":
        method, _, nth = arg.partition(":")
        real_method = getattr(prune_module.Pruner, method)
        def call(self, *args, **kwargs):
            count[0] += 1
            if count[0] == int(nth):
                os._exit(137)
            return real_method(self, *args, **kwargs)
        setattr(prune_module.Pruner, method, call)
from shardvault.cli import main
sys.argv[0] = "shardvault"
main()
"""


def driven(vault: Vault, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI through :data:`DRIVER` (see its hooks), in a child process."""
    return subprocess.run(
        [sys.executable, "-c", DRIVER, "--config", str(vault.config), *args],
        capture_output=True,
        text=True,
        env=os.environ | {"SHARDVAULT_PASSWORD": PASSWORD} | vault.env | env,
        cwd=vault.root,
        timeout=300,
    )


def driven_popen(vault: Vault, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, "--config", str(vault.config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"SHARDVAULT_PASSWORD": PASSWORD} | vault.env | env,
        cwd=vault.root,
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def index_packs(vault: Vault) -> set[str]:
    with vault.repo() as repo:
        repo.announce_sessions = False
        return set(repo.index.packs)


def objects(vault: Vault, prefix: str) -> set[str]:
    """Names under ``prefix`` on any peer (e.g. "condemned", "sessions")."""
    return {
        str(p.relative_to(peer))
        for peer in vault.peers_dir.iterdir()
        for p in peer.glob(f"{prefix}/**/*")
        if p.is_file()
    }


def settled(vault: Vault, kept: dict[str, Path], tmp: Path) -> None:
    """The end of every scenario: kept snapshots restore, check --read-data is clean, nothing is left behind."""
    for i, (snapshot, tree) in enumerate(kept.items()):
        target = tmp / f"settled-{snapshot[:8]}-{i}-{time.monotonic_ns()}"
        restore_matches(vault, snapshot, tree, target)
        shutil.rmtree(target)
    result = vault.run("check", "--read-data")
    assert result.returncode == 0, (result.stdout, result.stderr)


def tombstoned(vault: Vault) -> set[str]:
    with vault.repo() as repo:
        return repo.deleted_names


def finish(vault: Vault) -> dict[str, Any]:
    """A prune with no grace that runs to the end: afterwards no garbage, no condemned set, no session.

    Copies of tombstoned objects may stay behind (a prune killed after a
    tombstone, before the deletion): check names them and repair deletes them.
    """
    doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert not doc["waiting"], doc
    left = objects(vault, "condemned") | objects(vault, "index")
    if left & tombstoned(vault):
        check = ok(vault.run("check"))
        assert "stray copy of deleted" in check.stdout + check.stderr, check
        assert "stray copies deleted" in ok(vault.run("repair")).stdout
    assert not objects(vault, "condemned"), objects(vault, "condemned")
    assert not objects(vault, "index") & tombstoned(vault)
    assert not objects(vault, "sessions"), objects(vault, "sessions")
    assert shard_packs(vault) <= index_packs(vault)
    assert not list(vault.peers_dir.rglob(".tmp-*"))
    return doc


# -- a prune killed at every step ---------------------------------------------------


def more_garbage(vault: Vault, round_: int, kept_tree: Path) -> str:
    """Change the large files, back up, forget all but the newest: garbage again.  Returns the kept snapshot."""
    for path in sorted(vault.source.rglob("large*.bin")):
        path.write_bytes(os.urandom(1 << 20))
    (vault.source / f"round{round_}.txt").write_bytes(os.urandom(20_000))
    kept = json_of(ok(vault.cli("backup", "src", "--json")))["snapshot"]["id"]
    shutil.rmtree(kept_tree, ignore_errors=True)
    shutil.copytree(vault.source, kept_tree, symlinks=True)
    ok(vault.cli("forget", "--keep-last", "1"))
    return str(kept)


NAMED_STEPS = [
    # after the first (pending, "*") condemned set was written, before the final one
    "call:_sessions:2",
    # after the final set was written and the pending one tombstoned, before that one is deleted
    "tombstone:condemned/:1",
    # after the compact index and its tombstone of the old index files, before they are deleted
    "tombstone:index/:1",
    # after the old index files were deleted, before any shard
    "call:_delete_on:1",
    # halfway through the shards
    "call:_delete_on:20",
    # after every shard, the set's tombstone written, before the set is deleted
    "tombstone:condemned/:2",
]


def test_a_prune_killed_at_any_step_leaves_a_repository_the_next_prune_finishes(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_tree = tmp_path / "kept"
    ok(vault.cli("backup", "src"))
    more_garbage(vault, 0, kept_tree)
    counter = tmp_path / "count"
    # How many peer mutations a whole run makes: kill points spread over them, plus the named steps.
    ok(driven(vault, "prune", "--grace", "0", "--max-unused", "0", SV_KILL_AT="count", SV_COUNT_FILE=str(counter)))
    total = int(counter.read_text())
    assert total > 20, total
    kept = more_garbage(vault, 100, kept_tree)
    steps = [f"mutation:{n}" for n in sorted({7, total // 2, total * 9 // 10})] + NAMED_STEPS
    for round_, step in enumerate(steps, start=1):
        killed = driven(vault, "prune", "--grace", "0", "--max-unused", "0", SV_KILL_AT=step)
        # (A run of this round's garbage may make fewer mutations than the counted one: then it ends.)
        assert killed.returncode == 137 or (step.startswith("mutation") and killed.returncode == 0), (step, killed)
        # Right after the kill: nothing kept is lost, and check says at most that garbage waits.
        restore_matches(vault, kept, kept_tree, tmp_path / f"r{round_}")
        check = vault.run("check")
        assert check.returncode == 0, (step, check.stdout, check.stderr)
        # The next prune (the killed one's session is recognised as dead) finishes the job.
        finish(vault)
        settled(vault, {kept: kept_tree}, tmp_path)
        kept = more_garbage(vault, round_, kept_tree)


# -- a writer of another host, frozen longer than stale_after ---------------------------


def let_go(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Continue a process every time it stops at a failpoint, until it exits; its output."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if stopped(proc):
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=60)


def wait_stopped(proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while not stopped(proc) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert stopped(proc), ("the process never reached its failpoint", proc.poll())


def test_a_backup_of_another_host_frozen_past_stale_after_does_not_commit_onto_deleted_packs(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    add_prune_settings(vault, stale_after="2s")
    first_tree = lean_on_garbage(vault, tmp_path)
    host2 = other_host(vault)
    host2.env |= {"SHARDVAULT_HEARTBEAT_SECONDS": "0.2", "SHARDVAULT_FAILPOINTS": "commit"}
    backup = driven_popen(host2, "backup", "src", "--full", "--json", SV_HOSTNAME="elsewhere")
    wait_stopped(backup)
    waiting = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert waiting["deleted"]["packs"] == 0 and "elsewhere" in json.dumps(waiting["waiting"]), waiting
    time.sleep(3)  # by this host's clock the frozen writer's heartbeat is now older than stale_after
    deleting = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert deleting["deleted"]["packs"] > 0, deleting
    backup.send_signal(signal.SIGCONT)
    out, errors = backup.communicate(timeout=300)
    # Either the writer knows it may have been taken for dead and refuses (exit 5, no snapshot) ...
    if backup.returncode == 5:
        assert "session" in errors.lower(), errors
        settled(vault, {}, tmp_path)
        return
    # ... or what it committed restores.
    assert backup.returncode == 0, errors
    snapshot = json.loads(out)["snapshot"]["id"]
    settled(vault, {snapshot: first_tree}, tmp_path)


# -- condemned sets written by a host whose clock is wrong ------------------------------


def test_a_set_from_a_host_whose_clock_is_ahead_does_not_wait_for_that_clock(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    fast = json_of(ok(driven(vault, "prune", "--json", SV_CLOCK="2099-01-01T00:00:00+00:00")))
    assert fast["condemned"]["packs"] > 0 and fast["deleted"]["packs"] == 0, fast
    doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert doc["deleted"]["packs"] >= fast["condemned"]["packs"], doc["waiting"]
    settled(vault, {kept_id: kept_tree}, tmp_path)


def test_a_set_from_a_host_whose_clock_is_behind_still_gets_its_grace(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    slow = json_of(ok(driven(vault, "prune", "--json", SV_CLOCK="2025-01-01T00:00:00+00:00")))
    assert slow["condemned"]["packs"] > 0 and slow["deleted"]["packs"] == 0, slow
    doc = json_of(ok(vault.run("prune", "--json")))  # the default grace, 24 h: just after the set was written
    assert doc["deleted"]["packs"] == 0, doc
    settled(vault, {kept_id: kept_tree}, tmp_path)


# -- operators' mistakes: flags, dry runs, --json ---------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("--grace", "yesterday"),
        ("--grace", "-1s"),
        ("--grace", ""),
        ("--max-unused", "101"),
        ("--max-unused", "-0.5"),
        ("--max-unused", "five"),
        ("--max-unused", "nan"),  # FloatRange lets nan through: every comparison with it is false
    ],
)
def test_malformed_prune_flags_are_refused_in_one_line_and_change_nothing(
    tmp_path: Path, args: tuple[str, str]
) -> None:
    vault = make_vault(tmp_path)
    ok(vault.cli("backup", "src"))
    before = peer_snapshot(vault.peers_dir)
    result = vault.run("prune", *args)
    assert result.returncode == 2, (args, result.returncode, result.stdout, result.stderr)
    assert args[1] in result.stderr or "max-unused" in result.stderr, result.stderr
    assert peer_snapshot(vault.peers_dir) == before


def test_prune_json_is_one_document_on_success_and_on_errors(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    for args in (("--dry-run",), ("--grace", "0"), ()):
        doc = json.loads(ok(vault.run("prune", "--json", *args)).stdout)
        assert "deleted" in doc and "waiting" in doc
    # Refused: another prune is live (exit 16).
    holder = hold_session(vault.config, "prune", tmp_path)
    try:
        busy = vault.run("prune", "--json", "--grace", "0")
        assert busy.returncode == 16 and json.loads(busy.stdout)["error"]["code"] == 16, busy
        one_line(busy.stderr)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    # Refused: too few peers to write (exit of NotEnoughPeers), nothing changed.
    shutil.move(vault.peer(4), tmp_path / "p4-away")
    shutil.move(vault.peer(5), tmp_path / "p5-away")
    before = peer_snapshot(vault.peers_dir)
    few = vault.run("prune", "--json", "--grace", "0")
    assert few.returncode != 0 and json.loads(few.stdout)["error"]["code"] == few.returncode, few
    one_line(few.stderr)
    assert peer_snapshot(vault.peers_dir) == before
    shutil.move(tmp_path / "p4-away", vault.peer(4))
    shutil.move(tmp_path / "p5-away", vault.peer(5))
    settled(vault, {kept_id: kept_tree}, tmp_path)


@pytest.mark.parametrize("args", [("--grace", "yesterday"), ("--max-unused", "101")])
def test_prune_json_is_one_document_for_malformed_flags(tmp_path: Path, args: tuple[str, str]) -> None:
    vault = make_vault(tmp_path)
    result = vault.run("prune", "--json", *args)
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["code"] == 2, result.stdout


def test_dry_run_writes_no_session_or_set_and_deletes_nothing_whatever_it_finds(tmp_path: Path) -> None:
    """A killed prune's pending set, a killed backup's session and a leftover: a dry run leaves all of them."""
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    killed = driven(vault, "prune", "--grace", "0", SV_KILL_AT="call:_sessions:2")  # leaves a pending "*" set
    assert killed.returncode == 137
    holder = hold_session(vault.config, "backup", tmp_path)
    holder.kill()
    holder.wait()
    (vault.peer(1) / "data" / "cd").mkdir(parents=True, exist_ok=True)
    (vault.peer(1) / "data" / "cd" / ".tmp-00aa11bb").write_bytes(b"half")
    before = peer_snapshot(vault.peers_dir)
    for args in (("--grace", "0"), ("--grace", "0", "--max-unused", "0"), ()):
        doc = json_of(ok(vault.run("prune", "--dry-run", "--json", *args)))
        assert doc["dry_run"] and doc["condemned"]["packs"] > 0, doc
        assert all(v == 0 for v in doc["deleted"].values()) and not doc["freed_bytes"], doc
    assert peer_snapshot(vault.peers_dir) == before
    finish(vault)
    settled(vault, {kept_id: kept_tree}, tmp_path)


# -- peers that were down, or lie ------------------------------------------------------


def test_a_peer_down_during_prune_comes_back_with_everything_old_and_nothing_returns(tmp_path: Path) -> None:
    """p5 is away (its disk unplugged) while a prune deletes; it comes back with old shards, index files,
    condemned sets and a session of a process that ended meanwhile."""
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    ok(vault.run("prune"))  # the default grace: a condemned set now waits on every peer
    holder = hold_session(vault.config, "backup", tmp_path)
    image = tmp_path / "p5-image"
    shutil.copytree(vault.peer(5), image)  # p5 as it is unplugged: with the set and the live session
    shutil.rmtree(vault.peer(5))
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(timeout=60)
    doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert doc["deleted"]["packs"] > 0 and doc["deleted"]["condemned_sets"] >= 1, doc
    live_packs = index_packs(vault)
    shutil.copytree(image, vault.peer(5))  # back, with everything it had
    old = {p.split(".")[0] for p in map(str, (vault.peer(5) / "data").rglob("*.*"))}
    assert old, "p5 had no shards"
    # Nothing it brings back counts: no deleted pack record, no condemned set, no false loss.
    assert index_packs(vault) == live_packs
    with vault.repo() as repo:
        assert not repo.condemned_sets or not (set().union(*(c.packs for c in repo.condemned_sets)) & live_packs)
    restore_matches(vault, kept_id, kept_tree, tmp_path / "r1")
    # check: p5 is behind (it lacks the tombstones) and holds stray copies; nothing is lost.
    check = vault.run("check", "--read-data")
    assert check.returncode in (0, 6), (check.stdout, check.stderr)
    assert "0 lost" in check.stdout and "LOST" not in check.stdout and "0 degraded" in check.stdout, check.stdout
    # The next prune takes its orphaned shards (and the dead session); repair its stray metadata.
    again = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert again["deleted"]["packs"] > 0 and again["deleted"]["sessions"] >= 1, again
    ok(vault.run("repair"))
    assert index_packs(vault) == live_packs
    finish(vault)
    assert not (set(tombstoned(vault)) & {str(p.relative_to(vault.peer(5))) for p in vault.peer(5).rglob("*")})
    settled(vault, {kept_id: kept_tree}, tmp_path)


def plant(vault: Vault, peer: int, name: str, data: bytes) -> None:
    path = vault.peer(peer) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_junk_session_objects_planted_by_one_peer_block_nothing(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    plant(vault, 3, "sessions/00112233aabbccdd/0000000001", os.urandom(200))
    plant(vault, 3, "sessions/0011223344556677/0000000009", b"")
    plant(vault, 3, "sessions/not-a-session/0000000001", b"junk")
    plant(vault, 3, "sessions/8899aabbccddeeff/end", os.urandom(40))  # an end marker alone: ended
    doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert doc["deleted"]["packs"] > 0 and not doc["waiting"], doc
    assert not (vault.peer(3) / "sessions/8899aabbccddeeff/end").exists()
    restore_matches(vault, kept_id, kept_tree, tmp_path / "r1")
    unlock = json_of(ok(vault.run("unlock", "--remove-all", "--json")))
    assert not unlock["live"], unlock
    settled(vault, {kept_id: kept_tree}, tmp_path)


def test_a_junk_condemned_set_planted_by_one_peer_is_no_data_loss(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    plant(vault, 3, "condemned/" + "ab" * 32, os.urandom(300))
    doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert doc["deleted"]["packs"] > 0 and not doc["waiting"], doc  # (this much holds)
    restore_matches(vault, kept_id, kept_tree, tmp_path / "r1")
    vault.run("repair")
    check = vault.run("check")
    assert check.returncode == 0 and "LOST" not in check.stdout, (check.stdout, check.stderr)
    settled(vault, {kept_id: kept_tree}, tmp_path)


def test_a_peer_that_drops_or_replays_condemned_sets_changes_nothing(tmp_path: Path) -> None:
    """p0 deletes its copies of the condemned set; later it replays a set whose packs were since deleted."""
    vault = make_vault(tmp_path)
    first_tree = lean_on_garbage(vault, tmp_path)
    ok(vault.run("prune"))  # condemns, waits out the default grace
    sets = sorted((vault.peer(0) / "condemned").iterdir())
    assert sets
    saved = {p.name: p.read_bytes() for p in sets}
    for path in sets:
        path.unlink()  # the hostile peer drops them
    # A backup that starts now still sees the set (the other peers have it): it leans on nothing condemned.
    out = json_of(ok(vault.run("backup", "src", "--full", "--json")))
    snapshot = out["snapshot"]["id"]
    doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert doc["deleted"]["packs"] > 0 and doc["kept_referenced"] == 0, doc
    for name, data in saved.items():  # replayed after its packs are gone
        (vault.peer(0) / "condemned" / name).write_bytes(data)
    with vault.repo() as repo:
        assert not repo.condemned_sets
    restore_matches(vault, snapshot, first_tree, tmp_path / "r1")
    after = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert after["deleted"]["packs"] == 0 and not after["waiting"], after
    ok(vault.run("repair"))
    finish(vault)
    settled(vault, {snapshot: first_tree}, tmp_path)


def test_a_truncated_heartbeat_on_one_peer_does_not_hide_a_live_session(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    host2 = other_host(vault)
    holder = hold_session(host2.config, "backup", tmp_path)
    try:
        for beat in (vault.peer(2) / "sessions").rglob("*"):
            if beat.is_file():
                beat.write_bytes(beat.read_bytes()[:20])
        doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
        assert doc["deleted"]["packs"] == 0 and "backup session" in json.dumps(doc["waiting"]), doc
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    finish(vault)
    settled(vault, {kept_id: kept_tree}, tmp_path)


# -- unlock ----------------------------------------------------------------------------


def foreign_session(vault: Vault, sid: str, heartbeat: str) -> None:
    """A session object written by another machine (its clock says ``heartbeat``)."""
    with vault.repo() as repo:
        repo.announce_sessions = False
        doc = {"version": 1, "id": sid, "kind": "backup", "hostname": "elsewhere", "pid": 4242, "boot_id": "x"}
        doc |= {"process_start": 1, "started": heartbeat, "seq": 7, "heartbeat": heartbeat}
        repo.write_meta(f"sessions/{sid}/0000000007", doc)


def test_unlock_removes_dead_and_ended_sessions_and_a_foreign_one_only_after_stale_after_by_this_clock(
    tmp_path: Path,
) -> None:
    vault = make_vault(tmp_path)
    add_prune_settings(vault, stale_after="2s")
    ok(vault.cli("backup", "src"))
    live = hold_session(vault.config, "backup", tmp_path)
    dead = hold_session(vault.config, "repair", tmp_path)
    dead.kill()
    dead.wait()
    with vault.repo() as repo:
        repo.announce_sessions = False
        repo.write_meta("sessions/1234567812345678/end", {"version": 1, "id": "1234567812345678"})
    foreign_session(vault, "aaaaaaaaaaaaaaaa", "2099-01-01T00:00:00+00:00")  # its clock runs ahead
    foreign_session(vault, "bbbbbbbbbbbbbbbb", "1970-01-02T00:00:00+00:00")  # its clock runs behind
    try:
        first = json_of(ok(vault.run("unlock", "--json")))
        assert sorted(s["kind"] for s in first["removed"]) == ["?", "repair"], first
        assert sorted(s["hostname"] for s in first["live"]) == ["elsewhere", "elsewhere", socket.gethostname()], first
        human = vault.run("unlock")
        assert human.returncode == 0 and human.stderr.count("is live") == 3, human.stderr
        assert all("--remove-all" in line for line in human.stderr.strip().splitlines()), human.stderr
        time.sleep(2.5)  # this host's clock: the foreign heartbeats have not changed for stale_after
        second = json_of(ok(vault.run("unlock", "--json")))
        assert sorted(s["id"] for s in second["removed"]) == ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"], second
        assert [s["kind"] for s in second["live"]] == ["backup"] and "running" in second["live"][0]["why"], second
        forced = json_of(ok(vault.run("unlock", "--remove-all", "--json")))
        assert [s["why"] for s in forced["removed"]] == ["removed by --remove-all"] and not forced["live"], forced
        # The live holder finds its heartbeat gone at its next beat and stops (it may have written
        # one more while unlock listed: then a second --remove-all takes that one too).
        time.sleep(1.0)
        if objects(vault, "sessions") - {n for n in objects(vault, "sessions") if n.endswith("/end")}:
            ok(vault.run("unlock", "--remove-all"))
            time.sleep(1.0)
        assert not objects(vault, "sessions") - {n for n in objects(vault, "sessions") if n.endswith("/end")}
    finally:
        assert live.stdin is not None
        live.stdin.close()
        live.wait(timeout=60)
    ok(vault.run("unlock"))
    assert not objects(vault, "sessions"), objects(vault, "sessions")
    ok(vault.run("check"))


# -- two prunes at once ------------------------------------------------------------------


def test_two_prunes_started_together_on_two_hosts_at_most_one_goes_on(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    host2 = other_host(vault)
    kept_tree = tmp_path / "kept"
    ok(vault.cli("backup", "src"))
    for round_ in range(2):
        kept = more_garbage(vault, round_, kept_tree)
        procs = [v.popen("prune", "--grace", "0", "--json") for v in (vault, host2)]
        results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
        codes = sorted(code for code, _, _ in results)
        assert codes in ([0, 0], [0, 16], [16, 16]), results
        for code, out, errors in results:
            if code == 16:
                assert "prune session" in one_line(errors) and json.loads(out)["error"]["code"] == 16, errors
        restore_matches(vault, kept, kept_tree, tmp_path / f"r{round_}")
        finish(vault)
        settled(vault, {kept: kept_tree}, tmp_path)


# -- repacking a pack that is damaged ------------------------------------------------------


def partly_used_history(vault: Vault, tmp: Path) -> tuple[str, Path]:
    """Small files sharing packs, three in four deleted and forgotten: most packs are partly used."""
    for path in vault.source.rglob("large*.bin"):
        path.unlink()
    ok(vault.cli("backup", "src"))
    for i, path in enumerate(sorted(vault.source.rglob("*.txt"))):
        if i % 4:
            path.unlink()
    kept = json_of(ok(vault.cli("backup", "src", "--json")))["snapshot"]["id"]
    tree = tmp / "kept"
    shutil.copytree(vault.source, tree, symlinks=True)
    ok(vault.cli("forget", "--keep-last", "1"))
    return str(kept), tree


def a_partly_used_pack(vault: Vault, snapshot: str) -> tuple[str, list[Path]]:
    """A data pack holding some of ``snapshot``'s chunks and some garbage, and its shard files."""
    with vault.repo() as repo:
        snap = next(s for s in repo.snapshots() if s.id == snapshot)
        refs = {bytes.fromhex(c) for e in repo.iter_tree(snap) for c in e.chunks}
        for record in repo.index.packs.values():
            chunks = {e.chunk_id for e in record.entries}
            if record.kind == 0 and chunks & refs and chunks - refs:
                return record.id, sorted(p for p in vault.peers_dir.rglob(f"{record.id}.*"))
    raise AssertionError("no partly used data pack")


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_repack_of_a_pack_below_k_loses_nothing_more_and_keeps_that_pack(tmp_path: Path, damage: str) -> None:
    vault = make_vault(tmp_path)
    kept_id, _ = partly_used_history(vault, tmp_path)
    pack_id, shard_files = a_partly_used_pack(vault, kept_id)
    assert len(shard_files) == 6
    for path in shard_files[:3]:  # n - k + 1 = 3 shards: the pack is below k
        if damage == "missing":
            path.unlink()
        else:
            data = bytearray(path.read_bytes())
            for offset in range(100, len(data), 997):
                data[offset] ^= 0xFF
            path.write_bytes(bytes(data))
    survivors = {p: p.read_bytes() for p in shard_files[3:]}
    before = vault.run("check", "--read-data")
    assert before.returncode != 0, before.stdout
    restore_before = vault.run("restore", kept_id, "--target", str(tmp_path / "before"))
    doc = json_of(ok(vault.run("prune", "--grace", "0", "--max-unused", "0", "--json")))
    assert doc["deleted"]["packs"] > 0, doc  # what no snapshot needs still goes
    # The damaged pack holds the only copy of referenced chunks: it is neither repacked nor condemned.
    assert {p: p.read_bytes() for p in survivors} == survivors
    assert pack_id in index_packs(vault)
    if damage == "missing":
        assert doc["chunks_unrecoverable"] > 0, doc
        human = vault.run("prune", "--grace", "0", "--max-unused", "0")
        assert human.returncode == 0 and "no recoverable pack" in human.stderr, human.stderr
    after = vault.run("check", "--read-data")
    assert after.returncode == before.returncode, (before.stdout, after.stdout)
    assert pack_id[:16] in after.stdout + after.stderr or "1 lost" in after.stdout, after.stdout
    # A restore of the kept snapshot fares no worse than before the prune.
    restore_after = vault.run("restore", kept_id, "--target", str(tmp_path / "after"))
    assert restore_after.returncode == restore_before.returncode, restore_after.stderr


# -- prune, again and again, around frozen writers and repair -----------------------------


@pytest.mark.parametrize("failpoint", ["index-loaded", "commit"])
def test_repeated_prunes_and_a_repair_while_a_backup_is_frozen(tmp_path: Path, failpoint: str) -> None:
    """A backup leaning on garbage is frozen; prune runs three times (no grace) and a repair, frozen too, waits."""
    vault = make_vault(tmp_path)
    first_tree = lean_on_garbage(vault, tmp_path)
    host2 = other_host(vault)
    host2.env |= {"SHARDVAULT_HEARTBEAT_SECONDS": "0.5", "SHARDVAULT_FAILPOINTS": failpoint}
    backup = host2.popen("backup", "src", "--full", "--json")
    wait_stopped(backup)
    host3 = other_host(vault, "host3")
    host3.env |= {"SHARDVAULT_FAILPOINTS": "index-loaded"}
    repair = host3.popen("repair")
    wait_stopped(repair)
    for _ in range(3):
        doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
        assert doc["deleted"]["packs"] == 0 or not doc["waiting"], doc
    repair.send_signal(signal.SIGCONT)
    assert repair.wait(timeout=300) == 0, repair.communicate()
    backup.send_signal(signal.SIGCONT)
    out, errors = backup.communicate(timeout=300)
    assert backup.returncode == 0, errors
    snapshot = json.loads(out)["snapshot"]["id"]
    restore_matches(vault, snapshot, first_tree, tmp_path / "r1")
    finish(vault)
    settled(vault, {snapshot: first_tree}, tmp_path)


def test_prune_does_not_delete_the_intact_copy_and_keep_a_silently_corrupt_one(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    ok(vault.cli("backup", "src"))
    tree = tmp_path / "tree"
    shutil.copytree(vault.source, tree, symlinks=True)
    with vault.repo() as repo:
        first = {p.id for p in repo.index.packs.values() if p.kind == 0}
    away: dict[Path, Path] = {}
    for i in (0, 1, 2):  # three peers unplugged for a while: every data pack is below k
        for path in vault.shards(i):
            if path.name.split(".")[0] in first:
                away[path] = tmp_path / f"away-{i}-{path.name}"
                shutil.move(path, away[path])
    ok(vault.cli("backup", "src", "--full"))  # stores every chunk again, in new packs
    for path, moved in away.items():  # the peers come back
        shutil.move(moved, path)
    with vault.repo() as repo:
        repo.announce_sessions = False
        assert repo.index.alternatives, "no chunk is stored twice: the test did not test"
        preferred = {repo.index.blobs[c].pack_id for c in repo.index.alternatives}
        intact = {loc.pack_id for others in repo.index.alternatives.values() for loc in others} - preferred
    for pack_id in preferred:  # the copies prune would keep rot silently on three peers
        for path in sorted(vault.peers_dir.rglob(f"{pack_id}.*"))[:3]:
            data = bytearray(path.read_bytes())
            for offset in range(64, len(data), 499):
                data[offset] ^= 0xFF
            path.write_bytes(bytes(data))
    ok(vault.run("prune", "--grace", "0"))
    # The intact copies are still there: a check --read-data finds the rot, and the restore reads them.
    assert intact <= shard_packs(vault), "prune deleted the only intact copies"
    vault.run("check", "--read-data")
    restore_matches(vault, "latest", tree, tmp_path / "after")


def test_a_prune_of_another_host_frozen_past_stale_after_brings_back_no_deleted_pack(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    add_prune_settings(vault, stale_after="2s")
    garbage_history(vault)
    host2 = other_host(vault)
    frozen = driven_popen(host2, "prune", "--grace", "0", SV_HOSTNAME="elsewhere", SV_KILL_AT="stop:compact:1")
    wait_stopped(frozen)
    # Meanwhile: a new backup, the kept snapshot forgotten, and a prune here once the frozen one looks dead.
    for path in sorted(vault.source.rglob("large*.bin")):
        path.write_bytes(os.urandom(1 << 20))
    kept = json_of(ok(vault.cli("backup", "src", "--json")))["snapshot"]["id"]
    kept_tree = tmp_path / "kept-now"
    shutil.copytree(vault.source, kept_tree, symlinks=True)
    ok(vault.cli("forget", "--keep-last", "1"))
    refused = vault.run("prune", "--grace", "0")
    assert refused.returncode == 16 and "elsewhere" in one_line(refused.stderr), refused.stderr
    time.sleep(3)  # by this host's clock, the frozen prune's heartbeat is older than stale_after
    doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert doc["deleted"]["packs"] > 0, doc
    frozen.send_signal(signal.SIGCONT)
    frozen.communicate(timeout=300)
    # Whatever the resumed prune did, the index names no pack that was deleted meanwhile.
    check = vault.run("check")
    assert check.returncode == 0, (check.stdout, check.stderr)
    assert index_packs(vault) <= shard_packs(vault), "the index names deleted packs again"
    settled(vault, {kept: kept_tree}, tmp_path)


@pytest.mark.parametrize(
    "step",
    [
        "repo:write_index::1",  # every new pack stored, not yet indexed
        "repo:write_meta:condemned/:1",  # the new packs indexed, nothing condemned yet
        "repo:write_meta:condemned/:2",  # the pending set written, not the final one
    ],
)
def test_a_prune_killed_while_repacking_loses_nothing(tmp_path: Path, step: str) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = partly_used_history(vault, tmp_path)
    killed = driven(vault, "prune", "--grace", "0", "--max-unused", "0", SV_KILL_AT=step)
    assert killed.returncode == 137, (step, killed)
    restore_matches(vault, kept_id, kept_tree, tmp_path / "r1")
    check = vault.run("check", "--read-data")
    assert check.returncode == 0, (check.stdout, check.stderr)
    doc = finish(vault)
    assert doc["packs_partly_used"] == 0 or doc["repacked_packs"] > 0, doc
    again = json_of(ok(vault.run("prune", "--grace", "0", "--max-unused", "0", "--dry-run", "--json")))
    assert again["bytes_unused"] == 0 and again["packs_partly_used"] == 0, again
    settled(vault, {kept_id: kept_tree}, tmp_path)


def test_a_drain_frozen_after_reading_the_index_while_prune_condemns_and_compacts(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    host2 = other_host(vault)
    host2.env |= {"SHARDVAULT_FAILPOINTS": "index-loaded", "SHARDVAULT_HEARTBEAT_SECONDS": "0.5"}
    drain = host2.popen("peers", "drain", "p5")
    wait_stopped(drain)
    for _ in range(2):  # the drain's session holds deletion back; the index is compacted meanwhile
        doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
        assert doc["deleted"]["packs"] == 0 and "repair session" in json.dumps(doc["waiting"]), doc
    out, errors = let_go(drain)  # (it reads the index again after each round: the failpoint stops it again)
    assert drain.returncode == 0, (out, errors)
    assert not vault.shards(5), "the drain left shards on p5"
    restore_matches(vault, kept_id, kept_tree, tmp_path / "r1")
    doc = finish(vault)
    assert doc["deleted"]["packs"] > 0, doc
    assert not vault.shards(5)
    restore_matches(vault, kept_id, kept_tree, tmp_path / "r2")
    # A drained peer still configured leaves packs with two shards on one peer (degraded): nothing else.
    check = vault.run("check", "--read-data")
    assert check.returncode in (0, 6) and "LOST" not in check.stdout, (check.stdout, check.stderr)
    assert "0 lost; shards missing: 0, corrupt: 0" in check.stdout, check.stdout


def test_a_peer_that_hides_the_condemned_sets_from_a_backup_while_another_is_down(tmp_path: Path) -> None:
    """p5 is unplugged, p0 lists no condemned set: the backup still sees the set on p1-p4 (quorums meet)."""
    vault = make_vault(tmp_path)
    first_tree = lean_on_garbage(vault, tmp_path)
    condemned = json_of(ok(vault.run("prune", "--json")))  # the default grace: the set waits
    assert condemned["condemned"]["packs"] > 0, condemned
    shutil.move(vault.peer(5), tmp_path / "p5-away")
    host2 = other_host(vault)
    out = driven(host2, "backup", "src", "--full", "--json", SV_HIDE="p0:condemned/")
    assert out.returncode == 0, out.stderr
    snapshot = json.loads(out.stdout)["snapshot"]["id"]
    shutil.move(tmp_path / "p5-away", vault.peer(5))
    ok(vault.run("repair"))  # p5 catches up on the metadata it missed
    doc = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert doc["deleted"]["packs"] > 0 and doc["kept_referenced"] == 0, doc  # the backup leaned on nothing condemned
    finish(vault)
    settled(vault, {snapshot: first_tree}, tmp_path)


def test_a_junk_snapshot_name_planted_by_one_peer_makes_prune_refuse_without_changing_anything(tmp_path: Path) -> None:
    """An object intact nowhere may be a snapshot whose every copy rotted: what it references is unknown."""
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    plant(vault, 2, "snapshots/" + "cd" * 32, os.urandom(500))
    before = peer_snapshot(vault.peers_dir)
    for args in ((), ("--json",)):
        refused = vault.run("prune", "--grace", "0", *args)
        assert refused.returncode == 8, (refused.returncode, refused.stderr)  # a repository error
        line = refused.stderr.strip().splitlines()[-1]  # (after the warnings naming the bad copies)
        assert line.startswith("shardvault: error: Prune refused: snapshots/" + "cd" * 32), line
        assert "shardvault check" in line, line
        if args:
            assert json.loads(refused.stdout)["error"]["type"] == "PruneRefusedError", refused.stdout
    assert peer_snapshot(vault.peers_dir) == before
    (vault.peer(2) / "snapshots" / ("cd" * 32)).unlink()  # the operator removes the junk
    finish(vault)
    settled(vault, {kept_id: kept_tree}, tmp_path)


def test_a_session_that_beats_while_prune_reads_it_still_holds_deletion_back(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    host2 = other_host(vault)
    holder = hold_session(host2.config, "backup", tmp_path, {"SHARDVAULT_HEARTBEAT_SECONDS": "0.2"})
    try:
        # Reading a heartbeat takes longer than the writer takes to replace it (1 s against 0.2 s).
        doc = json_of(ok(driven(vault, "prune", "--grace", "0", "--json", SV_SLOW_SESSIONS="1")))
        # Every read loses the race: the session is held for live (its kind unknown), never dropped.
        assert doc["deleted"]["packs"] == 0 and " session " in json.dumps(doc["waiting"]), doc
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    finish(vault)
    settled(vault, {kept_id: kept_tree}, tmp_path)


def test_a_peer_replaying_a_removed_foreign_session_blocks_prune_no_longer(tmp_path: Path) -> None:
    """This host already watched that heartbeat go silent: a replayed copy is stale at once."""
    vault = make_vault(tmp_path)
    add_prune_settings(vault, stale_after="2s")
    kept_id, kept_tree = garbage_history(vault)
    foreign_session(vault, "cccccccccccccccc", "2026-01-01T00:00:00+00:00")
    saved = (vault.peer(0) / "sessions/cccccccccccccccc/0000000007").read_bytes()
    first = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert first["deleted"]["packs"] == 0 and "elsewhere" in json.dumps(first["waiting"]), first
    time.sleep(2.5)
    second = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert second["deleted"]["packs"] > 0 and second["deleted"]["sessions"] == 1, second
    kept_id2 = more_garbage(vault, 1, kept_tree)
    plant(vault, 0, "sessions/cccccccccccccccc/0000000007", saved)  # the hostile peer puts it back
    third = json_of(ok(vault.run("prune", "--grace", "0", "--json")))
    assert third["deleted"]["packs"] > 0 and not third["waiting"], third
    assert not objects(vault, "sessions")
    settled(vault, {kept_id2: kept_tree}, tmp_path)
    assert kept_id != kept_id2


def test_a_restore_frozen_after_reading_the_index_while_prune_repacks_what_it_reads(tmp_path: Path) -> None:
    """The restore planned to read packs that the prune then repacks and condemns: they wait for it."""
    vault = make_vault(tmp_path)
    kept_id, kept_tree = partly_used_history(vault, tmp_path)
    host2 = other_host(vault)
    host2.env |= {"SHARDVAULT_FAILPOINTS": "index-loaded", "SHARDVAULT_HEARTBEAT_SECONDS": "0.5"}
    target = tmp_path / "restored"
    restore = host2.popen("restore", kept_id, "--target", str(target))
    wait_stopped(restore)
    doc = json_of(ok(vault.run("prune", "--grace", "0", "--max-unused", "0", "--json")))
    assert doc["repacked_packs"] > 0 and doc["deleted"]["packs"] == 0, doc
    # (restore announces itself as a "read" session: SessionKind.RESTORE is never used)
    assert f"pid {restore.pid}" in json.dumps(doc["waiting"]), doc["waiting"]
    out, errors = let_go(restore)
    assert restore.returncode == 0, (out, errors)
    restore_matches(vault, kept_id, kept_tree, tmp_path / "again")
    shutil.rmtree(tmp_path / "again")
    assert_same_tree(kept_tree, target)
    finish(vault)
    settled(vault, {kept_id: kept_tree}, tmp_path)
