"""Issue 9, resume: an interrupted backup keeps what it stored, and the rerun sends only the rest.

A real ``shardvault backup`` process on a corpus of many 1 MiB packs is
frozen (SIGSTOP) as soon as its first index checkpoint is on every peer, so
what is stored and indexed at that moment can be measured exactly by an
"observer" (the same peers, another state directory); then it is killed
(SIGKILL) or interrupted (SIGINT, SIGTERM) and continued.  Deduplication is
exact, so a rerun's new bytes are exactly the fresh backup's minus what the
index already names: that is the measure of what was kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BIN,
    PASSWORD,
    SMALL,
    Vault,
    assert_same_tree,
    local_peers,
    make_tree,
    peer_snapshot,
    write_config,
)

from shardvault.backup.run import BackupRun
from shardvault.config import load_config
from shardvault.errors import BackupInterruptedError
from shardvault.repository import Repository
from shardvault.repository.index import PackRecord
from shardvault.repository.packs import KIND_DATA

N = 6
MIB = 1 << 20
WAIT = 120.0  # seconds: the longest any step may take before the test fails instead of hanging
INTERRUPTED = re.compile(
    r"^shardvault: interrupted: (\d+) packs \((\d+\.\d) MiB\) checkpointed; run the backup again to resume$", re.M
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 60 MiB: a small tree and seven 8 MiB files of random (incompressible) bytes: ~60 packs."""
    root = make_tree(tmp_path_factory.mktemp("corpus") / "src", seed=9)
    rng = random.Random(9)
    for i in range(7):
        (root / f"blob{i}.bin").write_bytes(rng.randbytes(8 * MIB))
    return root


def _vault(root: Path, corpus: Path) -> Vault:
    peers_dir = root / "peers"
    peers_dir.mkdir(parents=True)
    settings = {"k": 4, "n": N, "state_dir": str(root / "state")} | SMALL
    config = write_config(root / "shardvault.toml", local_peers(peers_dir), {"src": corpus}, **settings)
    vault = Vault(root, config, peers_dir, corpus)
    assert vault.cli("init").exit_code == 0
    return vault


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Any]:
    """The stats of an uninterrupted first backup of the corpus (another repository)."""
    vault = _vault(tmp_path_factory.mktemp("fresh"), corpus)
    done = vault.run("backup", "src", "--json")
    assert done.returncode == 0, done.stderr
    stats: dict[str, Any] = json.loads(done.stdout)["stats"]
    assert stats["packs_new"] > 40
    return stats


@contextmanager
def _observer(vault: Vault) -> Iterator[Repository]:
    """The repository as another host sees it (its own state: never the writer's SQLite)."""
    config = load_config(vault.config)
    config = replace(config, repository=replace(config.repository, state_dir=vault.root / "observer"))
    repo = Repository.open(config, PASSWORD)
    try:
        yield repo
    finally:
        repo.close()


def _indexed(vault: Vault) -> dict[str, PackRecord]:
    with _observer(vault) as repo:
        return dict(repo.index.packs)


def _complete_packs(vault: Vault) -> set[str]:
    """Packs with all n shards on the peers (stored, whether or not an index names them yet)."""
    counts: dict[str, int] = {}
    for i in range(N):
        for shard in vault.shards(i):
            if not shard.name.startswith("."):
                pack = shard.name.split(".")[0]
                counts[pack] = counts.get(pack, 0) + 1
    return {pack for pack, count in counts.items() if count == N}


def _raw(records: list[PackRecord]) -> int:
    """Plaintext bytes of the data chunks the packs hold (what a rerun need not send again)."""
    return sum(e.raw_length for r in records if r.kind == KIND_DATA for e in r.entries)


def _start_and_freeze(vault: Vault, *args: str) -> subprocess.Popen[str]:
    """Start a backup; SIGSTOP it once an index checkpoint is on every peer (never half-replicated)."""
    proc = vault.popen("backup", "src", *args)
    deadline = time.monotonic() + WAIT
    while True:
        names = [{p.name for p in (vault.peer(i) / "index").glob("[!.]*")} for i in range(N)]
        if set.intersection(*names):
            break
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no index checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    return proc


def _no_snapshot_and_consistent(vault: Vault) -> None:
    for i in range(N):
        assert not [p for p in (vault.peer(i) / "snapshots").glob("*") if not p.name.startswith(".")]
    listed = vault.cli("snapshots", "--json")
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []
    check = vault.cli("check", "--read-data", "--json")
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout)["snapshots"] == 0


def _rerun_and_restore(vault: Vault, tmp_path: Path) -> dict[str, Any]:
    rerun = vault.run("backup", "src", "--json")
    assert rerun.returncode == 0, rerun.stderr
    stats: dict[str, Any] = json.loads(rerun.stdout)["stats"]
    # No parent (the interrupted run committed nothing): every file is read again ...
    assert stats["files_unchanged"] == 0 and stats["files_read"] == stats["files"]
    check = vault.cli("check", "--read-data")
    assert check.exit_code == 0, check.output
    restored = vault.cli("restore", "latest", "--source", "src", "--target", str(tmp_path / "out"))
    assert restored.exit_code == 0, restored.output
    assert_same_tree(vault.source, tmp_path / "out")
    return stats


def test_sigkill_rerun_sends_only_what_no_checkpoint_names(tmp_path: Path, corpus: Path, fresh: dict[str, Any]) -> None:
    vault = _vault(tmp_path / "repo", corpus)
    proc = _start_and_freeze(vault)
    indexed = _indexed(vault)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=WAIT)
    assert indexed and _indexed(vault) == indexed  # a frozen process writes nothing
    _no_snapshot_and_consistent(vault)
    stats = _rerun_and_restore(vault, tmp_path)
    # ... but stores only the chunks no checkpoint names: exactly (deduplication is exact).
    assert stats["bytes_new"] == fresh["bytes_new"] - _raw(list(indexed.values()))
    assert stats["bytes_new"] <= 0.8 * fresh["bytes_new"]
    assert stats["shard_bytes_stored"] < fresh["shard_bytes_stored"] - 15 * MIB * N // 4
    assert stats["packs_new"] <= fresh["packs_new"] - len(indexed) + 1  # + its tree pack's share


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_writes_a_final_checkpoint_and_exits_130(
    tmp_path: Path, corpus: Path, fresh: dict[str, Any], sig: signal.Signals
) -> None:
    vault = _vault(tmp_path / "repo", corpus)
    proc = _start_and_freeze(vault, "--json")
    indexed_before = _indexed(vault)
    stored_before = _complete_packs(vault)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 130, err
    match = INTERRUPTED.search(err)
    assert match, err
    doc = json.loads(out)  # --json: one document, the interruption included
    assert doc["error"]["code"] == 130 and doc["error"]["type"] == "BackupInterruptedError"
    assert doc["error"]["message"] == match.group(0).removeprefix("shardvault: ")
    indexed = _indexed(vault)
    # Everything stored when the signal came is indexed now (SIGKILL would lose what the last
    # checkpoint did not name), and the final checkpoint added to what was indexed before.
    assert stored_before <= set(indexed)
    assert set(indexed_before) < set(indexed)
    assert int(match.group(1)) == len(indexed)  # every index file is this run's
    assert match.group(2) == f"{sum(r.length for r in indexed.values()) / MIB:.1f}"
    # At most one pack is not full: the open pack, sealed and stored at the checkpoint.
    assert sum(1 for r in indexed.values() if r.length < MIB) <= 1
    _no_snapshot_and_consistent(vault)
    stats = _rerun_and_restore(vault, tmp_path)
    assert stats["bytes_new"] == fresh["bytes_new"] - _raw(list(indexed.values()))
    with _observer(vault) as repo:
        stored_raw = _raw([repo.index.packs[p] for p in stored_before])
    assert stats["bytes_new"] <= fresh["bytes_new"] - stored_raw  # nothing that was stored is sent again
    assert stats["shard_bytes_stored"] < fresh["shard_bytes_stored"]


def test_second_interrupt_stops_at_once_and_leaves_a_consistent_repository(
    tmp_path: Path, corpus: Path, fresh: dict[str, Any]
) -> None:
    vault = _vault(tmp_path / "repo", corpus)
    proc = _start_and_freeze(vault)
    # Two different signals while frozen (two of one kind would merge into one): the first starts the
    # final checkpoint, the second, delivered at once after it, ends the process without it.
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 130, err
    assert "shardvault: interrupted again: stopped at once without a final checkpoint" in err
    assert not INTERRUPTED.search(err)
    _no_snapshot_and_consistent(vault)
    stats = _rerun_and_restore(vault, tmp_path)
    assert stats["bytes_new"] < fresh["bytes_new"]


def test_time_checkpoints_index_a_run_shorter_than_the_pack_count(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer packs than CHECKPOINT_PACKS: only the interval can make more than the final index file."""
    monkeypatch.setenv("SHARDVAULT_CHECKPOINT_SECONDS", "0.001")
    done = vault.cli("backup", "src", "--json")
    assert done.exit_code == 0, done.output
    packs = json.loads(done.stdout)["stats"]["packs_new"]
    assert 3 <= packs < 16
    files = list((vault.peer(0) / "index").glob("[!.]*"))
    assert len(files) > 2, files


def test_without_the_interval_a_short_run_writes_one_index_file(vault: Vault) -> None:
    done = vault.cli("backup", "src")
    assert done.exit_code == 0, done.output
    assert len(list((vault.peer(0) / "index").glob("[!.]*"))) == 1


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan"])
def test_a_bad_checkpoint_interval_is_refused_before_anything_is_written(vault: Vault, value: str) -> None:
    before = peer_snapshot(vault.peers_dir)
    vault.env = {"SHARDVAULT_CHECKPOINT_SECONDS": value}
    done = vault.run("backup", "src")
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"shardvault: error: Configuration error: $SHARDVAULT_CHECKPOINT_SECONDS must be a positive number "
        f"of seconds, got {value!r}"
    ]
    assert peer_snapshot(vault.peers_dir) == before


def test_ctrl_c_outside_a_backup_is_still_plain_exit_130(backed_up: Vault) -> None:
    """The CLI's other commands keep Python's Ctrl-C: one line, exit 130."""
    env = os.environ | {"SHARDVAULT_PASSWORD": PASSWORD}
    proc = subprocess.Popen(
        [str(BIN / "shardvault"), "--config", str(backed_up.config), "exporter", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    assert "serving" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 130 and err.strip() == "shardvault: interrupted", err


# --- the final checkpoint, in process: what it keeps and what it must not ---------------------


def _interrupt_with_open_pack(vault: Vault, tear: bool) -> tuple[str, list[str]]:
    """Two chunks in the open (not full) pack, then Ctrl-C; ``tear`` leaves the writer half-added."""
    rng = random.Random(3)
    ids: list[str] = []
    with vault.repo() as repo, pytest.raises(BackupInterruptedError) as caught, BackupRun(repo) as run:
        run.pipe.submit_stream(iter([rng.randbytes(100_000), rng.randbytes(100_000)]), ids)
        run.pipe.drain(0)  # both are in the open pack now
        if tear:  # as if the interrupt landed inside PackWriter.add, between its two appends
            run.pipe.writers[KIND_DATA].parts.append(b"half")
        raise KeyboardInterrupt
    assert isinstance(caught.value.__cause__, KeyboardInterrupt)
    return str(caught.value), ids


def test_the_open_pack_is_sealed_and_indexed_at_the_final_checkpoint(vault: Vault) -> None:
    message, ids = _interrupt_with_open_pack(vault, tear=False)
    assert message == "interrupted: 1 packs (0.2 MiB) checkpointed; run the backup again to resume"
    indexed = _indexed(vault)
    assert len(indexed) == 1
    (record,) = indexed.values()
    assert [e.chunk_id.hex() for e in record.entries] == ids
    assert vault.cli("check", "--read-data").exit_code == 0
    assert vault.cli("snapshots", "--json").stdout.strip() == "[]"


def test_a_torn_open_pack_is_dropped_not_indexed(vault: Vault) -> None:
    """An index entry pointing at the wrong bytes would poison every later backup's dedup: never."""
    message, _ = _interrupt_with_open_pack(vault, tear=True)
    assert message.startswith("interrupted: 0 packs (0.0 MiB) checkpointed")
    assert _indexed(vault) == {}
    assert not any(vault.shards(i) for i in range(N))


def test_an_interrupt_during_the_commit_says_the_snapshot_may_exist(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything is indexed by then, and the snapshot's own write may have landed: the message says so."""
    from shardvault.backup import files, run

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "commit_snapshot", interrupted)
    with vault.repo() as repo, pytest.raises(BackupInterruptedError) as caught:
        files.run_backup(repo, repo.config.sources[0])
    assert str(caught.value).endswith(
        "checkpointed, but it came while the snapshot was written (`shardvault snapshots` shows if it was); "
        "run the backup again to resume"
    )
    assert len(_indexed(vault)) >= 3  # the data and the tree: all indexed before the commit began


def test_a_schedulers_cancellation_checkpoints_too_and_goes_on_unchanged(vault: Vault) -> None:
    """Prefect cancels a flow run by raising TerminationSignal (a BaseException) in it: keep what is stored."""
    from prefect.exceptions import TerminationSignal

    ids: list[str] = []
    with vault.repo() as repo, pytest.raises(TerminationSignal), BackupRun(repo) as run:
        run.pipe.submit_stream(iter([random.Random(4).randbytes(100_000)]), ids)
        run.pipe.drain(0)
        raise TerminationSignal(signal.SIGTERM)
    (record,) = _indexed(vault).values()
    assert [e.chunk_id.hex() for e in record.entries] == ids


def test_an_ordinary_failure_is_not_an_interruption(vault: Vault) -> None:
    """A bug or a failed source is not Ctrl-C: it goes on as it was, and nothing is indexed on the way out."""
    with vault.repo() as repo, pytest.raises(RuntimeError), BackupRun(repo) as run:
        run.pipe.submit_stream(iter([random.Random(5).randbytes(100_000)]), [])
        run.pipe.drain(0)
        raise RuntimeError("a bug")
    assert _indexed(vault) == {}
