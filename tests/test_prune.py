"""Prune (issue 9): it frees what no snapshot needs and never breaks a kept snapshot or a running backup.

"Another host" is another process with its own state directory (its own
config file), as two Prefect workers on two machines would be.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, Vault, assert_same_tree, make_tree, make_vault

from shardvault.repository.metadata import parse_shard_name

# A process that announces a session of the given kind and holds it until its stdin closes:
# a backup (or prune) running elsewhere, frozen at the worst moment.
HOLDER = """
import sys
from shardvault.config import load_config
from shardvault.repository import Repository
from shardvault.repository.sessions import SessionKind
repo = Repository.open(load_config(sys.argv[1]), sys.argv[2])
repo.announce(SessionKind(sys.argv[3]))
print(repo.session.id, flush=True)
sys.stdin.read()
repo.close()
"""


def hold_session(config: Path, kind: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A process (of this host) holding a session of ``kind`` until its stdin closes; returns once it holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(config), PASSWORD, kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=cwd,  # not the source tree: the installed package
        env=os.environ | (env or {}),
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip(), "the holder announced no session"
    return holder


def other_host(vault: Vault, name: str = "host2") -> Vault:
    """The same repository configured on another machine: its own state directory."""
    text = vault.config.read_text().replace(str(vault.root / "state"), str(vault.root / f"state-{name}"))
    config = vault.root / f"{name}.toml"
    config.write_text(text)
    return Vault(vault.root, config, vault.peers_dir, vault.source, dict(vault.env))


def add_prune_settings(vault: Vault, **settings: str) -> None:
    lines = ["[prune]"] + [f'{key} = "{value}"' for key, value in settings.items()]
    vault.config.write_text(vault.config.read_text() + "\n".join(lines) + "\n")


def peer_usage(vault: Vault) -> dict[str, int]:
    return {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in sorted(vault.peers_dir.iterdir())
    }


def shard_packs(vault: Vault) -> set[str]:
    packs = set()
    for peer in vault.peers_dir.iterdir():
        for path in (peer / "data").rglob("*"):
            parsed = parse_shard_name(str(path.relative_to(peer)))
            if parsed:
                packs.add(parsed[0])
    return packs


def json_of(result: Any) -> dict[str, Any]:
    out = result.stdout if isinstance(result, subprocess.CompletedProcess) else result.output
    doc: dict[str, Any] = json.loads(out)
    return doc


def ok(result: Any) -> Any:
    code = result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    assert code == 0, (getattr(result, "stderr", ""), getattr(result, "output", ""), getattr(result, "stdout", ""))
    return result


def restore_matches(vault: Vault, snapshot: str, expected: Path, target: Path) -> None:
    ok(vault.cli("restore", snapshot, "--target", str(target)))
    assert_same_tree(expected, target)


def garbage_history(vault: Vault) -> tuple[str, Path]:
    """Back up the tree, change most of it, back up again, forget the first: half the data is garbage.

    Returns the kept snapshot's id and a copy of the tree it holds.
    """
    ok(vault.cli("backup", "src"))
    for path in sorted(vault.source.rglob("large*.bin")):
        path.write_bytes(os.urandom(3 << 20))
    for path in sorted(vault.source.rglob("file1*.txt")):
        path.unlink()
    second = json_of(ok(vault.cli("backup", "src", "--json")))["snapshot"]["id"]
    kept = vault.root / "kept-tree"
    shutil.copytree(vault.source, kept, symlinks=True)
    ok(vault.cli("forget", "--keep-last", "1"))
    return second, kept


def test_prune_frees_space_on_every_peer_and_every_kept_snapshot_restores(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    before = peer_usage(vault)
    doc = json_of(ok(vault.cli("prune", "--grace", "0", "--json")))
    after = peer_usage(vault)
    assert doc["deleted"]["packs"] > 0 and not doc["waiting"], doc
    for peer in before:
        assert after[peer] < before[peer], (peer, before[peer], after[peer])
        assert doc["freed_bytes"].get(peer, 0) > 0, doc["freed_bytes"]
    restore_matches(vault, kept_id, kept_tree, tmp_path / "restored")
    ok(vault.cli("check", "--read-data"))
    # Nothing left to free: a second prune deletes no pack.
    again = json_of(ok(vault.cli("prune", "--grace", "0", "--json")))
    assert again["deleted"]["packs"] == 0 and again["packs_unused"] == 0, again


def test_dry_run_changes_nothing_and_says_what_would_go(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    garbage_history(vault)
    files = {p: p.read_bytes() for p in vault.peers_dir.rglob("*") if p.is_file()}
    doc = json_of(ok(vault.cli("prune", "--dry-run", "--grace", "0", "--json")))
    assert doc["dry_run"] is True and doc["condemned"]["packs"] > 0, doc
    assert {p: p.read_bytes() for p in vault.peers_dir.rglob("*") if p.is_file()} == files
    human = ok(vault.cli("prune", "--dry-run"))
    assert "would condemn" in human.output


def test_default_grace_condemns_now_and_deletes_only_later(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    packs = shard_packs(vault)
    first = json_of(ok(vault.cli("prune", "--json")))  # the default grace: 24h
    assert first["condemned"]["packs"] > 0 and first["deleted"]["packs"] == 0, first
    assert shard_packs(vault) >= packs  # nothing deleted yet (a repack may have added packs)
    assert any("grace" in w["why"] for w in first["waiting"]), first["waiting"]
    # A backup now does not lean on condemned packs: it stores such chunks again.
    restore_matches(vault, kept_id, kept_tree, tmp_path / "r1")
    ok(vault.cli("check", "--read-data"))
    # Later (here: a prune told the grace is over) the set is deleted.
    second = json_of(ok(vault.cli("prune", "--grace", "0", "--json")))
    assert second["deleted"]["packs"] >= first["condemned"]["packs"], (first, second)
    restore_matches(vault, kept_id, kept_tree, tmp_path / "r2")


def test_orphans_and_leftovers_of_a_killed_backup_are_removed(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    ok(vault.cli("backup", "src"))
    make_tree(vault.source / "more", seed=7, files=10, big=6 << 20)
    indexed = {p.name for p in (vault.peer(0) / "index").iterdir()}
    proc = vault.popen("backup", "src")
    deadline = time.monotonic() + 60
    while len(shard_packs(vault)) < 8 + 10 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (vault.peer(2) / "data" / "ab").mkdir(parents=True, exist_ok=True)
    (vault.peer(2) / "data" / "ab" / ".tmp-0123abcd").write_bytes(b"half a shard")
    with vault.repo() as repo:
        live = set(repo.index.packs)
    assert shard_packs(vault) - live, "the killed backup left no orphan shards: the test did not test"
    doc = json_of(ok(vault.cli("prune", "--grace", "0", "--json")))
    assert doc["packs_orphaned"] > 0 and doc["deleted"]["leftovers"] >= 1, json.dumps(doc)
    with vault.repo() as repo:
        live = set(repo.index.packs)
    assert shard_packs(vault) <= live
    assert not list(vault.peers_dir.rglob(".tmp-*"))
    # The killed run's checkpointed index files were merged into the compact index.
    assert len(list((vault.peer(0) / "index").iterdir())) <= max(1, len(indexed))
    ok(vault.cli("check", "--read-data"))


def test_a_live_session_on_another_host_defers_deletion_until_it_ends(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    kept_id, kept_tree = garbage_history(vault)
    host2 = other_host(vault)
    holder = hold_session(host2.config, "backup", tmp_path)
    try:
        packs = shard_packs(vault)
        doc = json_of(ok(vault.cli("prune", "--grace", "0", "--json")))
        assert doc["condemned"]["packs"] > 0 and doc["deleted"]["packs"] == 0, doc
        assert any("backup session" in w["why"] for w in doc["waiting"]), doc["waiting"]
        metrics = ok(vault.cli("exporter", "--once")).output
        assert "shardvault_prune_condemned_sets_waiting 1.0" in metrics
        assert "shardvault_prune_oldest_condemned_timestamp_seconds" in metrics
        assert shard_packs(vault) >= packs  # nothing deleted (a repack may have added a pack)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    doc = json_of(ok(vault.cli("prune", "--grace", "0", "--json")))
    assert doc["deleted"]["packs"] > 0, doc
    restore_matches(vault, kept_id, kept_tree, tmp_path / "restored")
    metrics = ok(vault.cli("exporter", "--once")).output
    assert "shardvault_prune_condemned_sets_waiting 0.0" in metrics
    assert "shardvault_prune_oldest_condemned_timestamp_seconds" not in metrics
    assert "shardvault_prune_freed_bytes" in metrics and "shardvault_prune_last_success_timestamp_seconds" in metrics


def test_a_second_prune_is_refused_while_one_is_live_and_unlock_clears_a_killed_one(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    ok(vault.cli("backup", "src"))
    holder = hold_session(vault.config, "prune", tmp_path)
    refused = vault.run("prune", "--grace", "0")
    assert refused.returncode == 16, refused.stderr
    assert "prune session" in refused.stderr and "shardvault unlock" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    as_json = vault.run("prune", "--json")
    assert as_json.returncode == 16 and json.loads(as_json.stdout)["error"]
    live = vault.run("unlock")
    assert live.returncode == 0 and "is live" in live.stderr, live.stderr
    holder.kill()  # SIGKILL: its session stays behind
    holder.wait()
    assert list(vault.peer(0).glob("sessions/*/*"))
    cleared = json_of(ok(vault.run("unlock", "--json")))
    assert [s["kind"] for s in cleared["removed"]] == ["prune"] and "gone" in cleared["removed"][0]["why"]
    assert not list(vault.peers_dir.glob("*/sessions/*/*"))
    ok(vault.run("prune", "--grace", "0"))


def test_a_silent_session_of_another_host_goes_stale_by_this_hosts_clock(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    add_prune_settings(vault, stale_after="3s")
    garbage_history(vault)
    with vault.repo() as repo:  # a session written by another machine that then died
        doc = {"version": 1, "id": "00ff00ff00ff00ff", "kind": "backup", "hostname": "elsewhere", "pid": 4242}
        doc |= {"boot_id": "x", "process_start": 1, "started": "2026-01-01T00:00:00+00:00", "seq": 3}
        repo.write_meta("sessions/00ff00ff00ff00ff/0000000003", doc | {"heartbeat": "2099-01-01T00:00:00+00:00"})
    first = json_of(ok(vault.cli("prune", "--grace", "0", "--json")))
    assert first["deleted"]["packs"] == 0 and any("elsewhere" in w["why"] for w in first["waiting"]), first
    # The writer's clock says 2099: not trusted.  This host saw no heartbeat for longer than 3 s.
    time.sleep(3.5)
    second = json_of(ok(vault.cli("prune", "--grace", "0", "--json")))
    assert second["deleted"]["packs"] > 0 and second["deleted"]["sessions"] >= 1, second
    assert not list(vault.peers_dir.glob("*/sessions/00ff00ff00ff00ff/*"))


def test_repack_moves_the_used_part_of_mostly_garbage_packs(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    for path in vault.source.rglob("large*.bin"):
        path.unlink()
    ok(vault.cli("backup", "src"))  # small files only: a few packs shared by every file
    for i, path in enumerate(sorted(p for p in vault.source.rglob("*.txt"))):
        if i % 4:
            path.unlink()
    kept = json_of(ok(vault.cli("backup", "src", "--json")))["snapshot"]["id"]
    tree = tmp_path / "kept"
    shutil.copytree(vault.source, tree, symlinks=True)
    ok(vault.cli("forget", "--keep-last", "1"))
    before = sum(peer_usage(vault).values())
    doc = json_of(ok(vault.cli("prune", "--grace", "0", "--max-unused", "0", "--json")))
    assert doc["repacked_packs"] > 0 and doc["new_packs"] > 0, doc
    # What it says it freed is what the peers lost, net of the new packs (metadata aside: a few KiB).
    shrink = before - sum(peer_usage(vault).values())
    assert abs(doc["freed_total"] - shrink) < 64 * 1024 + shrink // 50, (doc["freed_total"], shrink)
    again = json_of(ok(vault.cli("prune", "--grace", "0", "--max-unused", "0", "--dry-run", "--json")))
    assert again["bytes_unused"] == 0 and again["packs_partly_used"] == 0, again
    restore_matches(vault, kept, tree, tmp_path / "restored")
    ok(vault.cli("check", "--read-data"))


def test_compaction_merges_index_files_and_a_returning_peer_cannot_bring_them_back(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    for i in range(4):
        (vault.source / f"new{i}").write_bytes(os.urandom(50_000))
        ok(vault.cli("backup", "src"))
    old_index = sorted((vault.peer(5) / "index").iterdir())
    assert len(old_index) >= 4
    saved = tmp_path / "p5-index"
    shutil.copytree(vault.peer(5) / "index", saved)
    doc = json_of(ok(vault.cli("prune", "--grace", "0", "--json")))
    assert doc["index_files_before"] >= 4 and doc["index_files_after"] == 1, doc
    # An old disk image of p5 comes back with the superseded index files: they stay ignored.
    for path in saved.iterdir():
        shutil.copy2(path, vault.peer(5) / "index" / path.name)
    host2 = other_host(vault)  # no local cache: everything comes from the peers
    with host2.repo() as repo:
        assert len(repo.snapshots()) == 4
        assert repo.index.files == {f"index/{p.name}" for p in (vault.peer(0) / "index").iterdir()}
    ok(vault.cli("check", "--read-data"))
    ok(vault.cli("repair"))
    assert not any((vault.peer(5) / "index" / p.name).exists() for p in old_index)


def test_a_reader_that_listed_the_index_before_a_compaction_still_reads_it(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    for i in range(3):
        (vault.source / f"new{i}").write_bytes(os.urandom(50_000))
        ok(vault.cli("backup", "src"))
    host2 = other_host(vault)  # no local cache of the index files
    with host2.repo() as repo:
        listed = repo.list_meta("index/")
        real = repo.list_meta
        calls: list[str] = []

        def stale_listing(prefix: str) -> list[str]:
            """The reader's first listing of the index is the one it took before the prune."""
            if prefix == "index/":
                calls.append(prefix)
                if len(calls) == 1:
                    return list(listed)
            return real(prefix)

        ok(vault.run("prune", "--grace", "0"))
        assert not any((vault.peer(0) / name).exists() for name in listed)
        repo.list_meta = stale_listing  # type: ignore[method-assign]
        assert repo.index.packs and len(calls) == 2
        latest = repo.snapshots()[-1]
        assert sum(1 for _ in repo.iter_tree(latest)) > 10
        assert not [p for p in repo.meta_problems if p.name.startswith("index/")]


def lean_on_garbage(vault: Vault, tmp: Path) -> Path:
    """Two backups, the first forgotten, and the source put back to the first: a backup now leans on garbage."""
    first_tree = tmp / "first"
    ok(vault.cli("backup", "src"))
    shutil.copytree(vault.source, first_tree, symlinks=True)
    for path in sorted(vault.source.rglob("large*.bin")):
        path.write_bytes(os.urandom(2 << 20))
    ok(vault.cli("backup", "src"))
    ok(vault.cli("forget", "--keep-last", "1"))
    shutil.rmtree(vault.source)
    shutil.copytree(first_tree, vault.source, symlinks=True)
    return first_tree


def stopped(proc: subprocess.Popen[str]) -> bool:
    """Whether the process stopped itself at a failpoint (state T in /proc)."""
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] == "T"


@pytest.mark.parametrize("round_", range(4))
def test_prune_during_a_backup_on_another_host_breaks_neither(tmp_path: Path, round_: int) -> None:
    """The backup leans on data that only garbage packs hold, while a prune with no grace runs.

    Rounds 0-1 freeze the backup at a failpoint (shardvault.failpoints): just
    after it read the index, or just before it commits, with its references
    chosen; the prune runs to the end meanwhile, then the backup goes on.
    Those are the worst moments, made certain.  Rounds 2-3 let both run
    freely with a random offset.  Whatever the order, both exit 0, the new
    snapshot restores byte for byte and check --read-data is clean.
    """
    rng = random.Random(round_)
    vault = make_vault(tmp_path)
    # The source goes back to what only a forgotten snapshot held: a backup leans on garbage.
    first_tree = lean_on_garbage(vault, tmp_path)
    host2 = other_host(vault)
    host2.env["SHARDVAULT_HEARTBEAT_SECONDS"] = "0.5"
    if round_ < 2:
        host2.env["SHARDVAULT_FAILPOINTS"] = ["index-loaded", "commit"][round_]
        backup = host2.popen("backup", "src", "--full", "--json")
        deadline = time.monotonic() + 120
        while not stopped(backup) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stopped(backup), "the backup never reached its failpoint"
        prune = vault.run("prune", "--grace", "0", "--json")
        backup.send_signal(signal.SIGCONT)
    else:
        backup = host2.popen("backup", "src", "--full", "--json")
        time.sleep(rng.uniform(0, 1.5))
        prune = vault.run("prune", "--grace", "0", "--json")
    out, errors = backup.communicate(timeout=300)
    assert backup.returncode == 0, errors
    assert prune.returncode == 0, prune.stderr
    snapshot = json.loads(out)["snapshot"]["id"]
    restore_matches(vault, snapshot, first_tree, tmp_path / "restored")
    ok(vault.cli("check", "--read-data"))
    # And once the backup is over, a prune frees the rest without harm.
    ok(vault.cli("prune", "--grace", "0"))
    restore_matches(vault, snapshot, first_tree, tmp_path / "restored-again")
    ok(vault.cli("check", "--read-data"))


def test_prune_settings_are_checked(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    add_prune_settings(vault, grace="soon")
    result = vault.run("prune")
    assert result.returncode == 3 and "prune.grace" in result.stderr, result.stderr
    bad_flag = make_vault(tmp_path / "b").run("prune", "--grace", "yesterday")
    assert bad_flag.returncode == 2 and "yesterday" in bad_flag.stderr


def test_check_is_not_fooled_by_a_write_or_a_deletion_made_while_it_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another host's metadata write lands on the peers one by one, and a prune elsewhere deletes and
    tombstones index files: a check whose listing caught either half-way reports no damage."""
    from shardvault.verify import metadata as audit_module
    from shardvault.verify.check import check

    vault = make_vault(tmp_path)
    for i in range(2):
        (vault.source / f"new{i}").write_bytes(os.urandom(50_000))
        ok(vault.cli("backup", "src"))
    real = audit_module._list_peer
    first_index = sorted(p.name for p in (vault.peer(0) / "index").iterdir())[0]

    def listed_early(peer: Any) -> dict[str, int]:
        found = real(peer)
        if peer.name == "p3":  # listed before the other host's copy of the snapshot reached p3
            for name in [n for n in found if n.startswith("snapshots/")][:1]:
                del found[name]
        return found

    host2 = other_host(vault)
    monkeypatch.setattr(audit_module, "_list_peer", listed_early)
    with host2.repo() as repo:
        report = check(repo)
    assert not report.metadata.damaged, report.metadata.to_doc()

    def listed_before_prune(peer: Any) -> dict[str, int]:
        found = real(peer)
        found[f"index/{first_index}"] = 1  # the prune deleted (and tombstoned) it after this listing
        return found

    ok(vault.cli("prune", "--grace", "0"))
    assert not (vault.peer(0) / "index" / first_index).exists()
    monkeypatch.setattr(audit_module, "_list_peer", listed_before_prune)
    with other_host(vault, "host3").repo() as repo:
        report = check(repo)
    assert not report.metadata.damaged, report.metadata.to_doc()
