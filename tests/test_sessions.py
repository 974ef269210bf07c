"""Sessions and condemned sets (issue 9): golden vectors and the liveness rules of docs/concurrency.md."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Vault, make_vault

from shardvault.crypto import Cipher, MasterKeys
from shardvault.errors import SessionLostError
from shardvault.repository import sessions as sessions_module
from shardvault.repository.condemned import CondemnedSet
from shardvault.repository.metadata import kind_of, open_object
from shardvault.repository.sessions import Liveness, SessionKind, list_sessions, liveness

VECTOR = json.loads((Path(__file__).parent / "vectors" / "lifecycle_v1.json").read_text())
KEYS = MasterKeys(bytes(range(32)), bytes(range(32, 64)))  # those of metadata_v1.json


def test_condemned_set_body_is_pinned() -> None:
    v = VECTOR["condemned"]
    doc = open_object(Cipher(KEYS.encryption), v["name"], base64.b64decode(v["sealed"]))
    assert doc == v["body"]
    cset = CondemnedSet.from_doc(doc)
    assert cset.name == v["name"] and cset.to_doc() == v["body"]
    assert cset.stray_shards == {("d4" * 32, 3, "p2")} and cset.leftovers == {("p1", "data/ab/.tmp-0123abcd")}
    assert kind_of(v["name"]) == "condemned"


def test_session_body_and_names_are_pinned() -> None:
    v = VECTOR["session"]
    doc = open_object(Cipher(KEYS.encryption), v["name"], base64.b64decode(v["sealed"]))
    assert doc == v["body"] and kind_of(v["name"]) == "session"
    assert kind_of("sessions/00ff00ff00ff00ff/end") == "session"
    for junk in ("sessions/00ff/0000000001", "sessions/00ff00ff00ff00ff/12", "sessions/00ff00ff00ff00ff/../x"):
        assert kind_of(junk) is None


def test_a_session_of_this_host_is_live_while_its_process_runs(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    with vault.repo() as repo:
        repo.announce(SessionKind.BACKUP)
        assert repo.session is not None
        (info,) = [i for i in list_sessions(repo) if i.id == repo.session.id]
        assert info.kind == "backup" and info.pid == os.getpid()
        assert liveness(repo, info, 1.0)[0] is Liveness.LIVE
        # The same session seen as another process's: a pid that no process has is stale at once.
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        gone = info.__class__(**(info.__dict__ | {"id": "1" * 16, "pid": int(dead.stdout)}))
        state, why = liveness(repo, gone, 3600.0)
        assert state is Liveness.STALE and "gone" in why
        # A pid now held by another process (start time differs) is stale too.
        reused = info.__class__(**(info.__dict__ | {"id": "2" * 16, "process_start": 1}))
        assert liveness(repo, reused, 3600.0)[0] is Liveness.STALE
    assert not list(vault.peers_dir.glob("*/sessions/*/*"))  # close ends the session: its objects are gone


def test_a_writer_that_cannot_renew_its_session_does_not_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault: Vault = make_vault(tmp_path)
    with vault.repo() as repo:
        repo.announce(SessionKind.BACKUP)
        assert repo.session is not None
        repo.session.lost = True  # what the heartbeat thread sets after stale_after / 2 without a heartbeat
        with pytest.raises(SessionLostError):
            repo.write_meta("snapshots/" + "ab" * 32, {"version": 1})
    assert not list(vault.peers_dir.glob("*/snapshots/*"))


def test_heartbeats_replace_each_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions_module, "HEARTBEAT_SECONDS", 0.05)
    vault = make_vault(tmp_path)
    with vault.repo() as repo:
        repo.announce(SessionKind.REPAIR)
        assert repo.session is not None
        import time

        deadline = time.monotonic() + 10
        while repo.session.seq < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert repo.session.seq >= 4
        names = {p.name for p in vault.peer(0).glob(f"sessions/{repo.session.id}/*")}
        assert len(names) <= 2  # the newest (and at most the one being replaced)


def test_a_writer_whose_session_was_removed_commits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its heartbeat was removed (unlock --remove-all, or a prune that took it for dead), as restic's lock can go."""
    import time

    monkeypatch.setattr(sessions_module, "HEARTBEAT_SECONDS", 0.05)
    vault = make_vault(tmp_path)
    with vault.repo() as repo:
        repo.announce(SessionKind.BACKUP)
        assert repo.session is not None
        for path in vault.peers_dir.glob(f"*/sessions/{repo.session.id}/*"):
            path.unlink()
        deadline = time.monotonic() + 10
        while not repo.session.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        assert repo.session.lost
        time.sleep(0.2)
        assert not list(vault.peers_dir.glob(f"*/sessions/{repo.session.id}/*"))  # it stopped beating
        with pytest.raises(SessionLostError):
            repo.write_meta("snapshots/" + "cd" * 32, {"version": 1})
