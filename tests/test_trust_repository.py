"""Issue 7, the repository's half: metadata that heals itself, peers that cannot
pretend to be separate, one bad copy never fatal, rollbacks never silent.

Each test names the finding it covers and fails without its fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import PASSWORD, Vault, assert_same_tree, make_vault, write_config

from shardvault import crypto
from shardvault.config import load_config
from shardvault.crypto import MasterKeys
from shardvault.repository import Repository
from shardvault.repository.metadata import make_key_object, seal_object
from shardvault.shards.stores.local import LocalStore


def _key_file(vault: Vault, peer: int) -> Path:
    return next((vault.peer(peer) / "keys").iterdir())


def _flip_b64(path: Path) -> None:
    """Change one character of the sealed key material: the JSON still parses, the tag does not verify."""
    doc = json.loads(path.read_text())
    data = doc["data"]
    i = len(data) // 2
    doc["data"] = data[:i] + ("A" if data[i] != "A" else "B") + data[i + 1 :]
    path.write_text(json.dumps(doc, indent=1))


# --- finding 4: one bad copy breaks everything ---------------------------------------------


def test_4_bit_flip_in_the_first_peers_key_copy_still_opens_and_is_named(backed_up: Vault) -> None:
    _flip_b64(_key_file(backed_up, 0))
    listing = backed_up.cli("snapshots", "--json")
    assert listing.exit_code == 0, listing.output
    assert len(json.loads(listing.stdout)) == 1
    assert "p0" in listing.stderr and "keys/" in listing.stderr  # the bad copy is named, not hidden
    check = backed_up.cli("check", "--json")
    assert check.exit_code == 6
    doc = json.loads(check.stdout)
    assert any(i["peer"] == "p0" and i["object"].startswith("keys/") for i in doc["metadata"]["issues"])
    repair = backed_up.cli("repair")
    assert repair.exit_code == 0, repair.output
    assert _key_file(backed_up, 0).read_bytes() == _key_file(backed_up, 1).read_bytes()
    assert backed_up.cli("check").exit_code == 0


def test_4_wrong_passphrase_is_still_wrong(backed_up: Vault) -> None:
    result = backed_up.cli("snapshots", password="not the passphrase")
    assert result.exit_code == 4
    assert "Wrong passphrase" in result.stderr


def test_4_junk_snapshot_and_index_objects_on_one_peer_do_not_stop_anything(backed_up: Vault, tmp_path: Path) -> None:
    junk_snapshot = backed_up.peer(2) / "snapshots" / ("ee" * 32)
    junk_snapshot.write_bytes(b"SVMD\x01" + b"\x00" * 64)
    junk_index = backed_up.peer(2) / "index" / ("dd" * 32)
    junk_index.write_bytes(b"not even the magic")
    listing = backed_up.cli("snapshots", "--json")
    assert listing.exit_code == 0, listing.output
    assert len(json.loads(listing.stdout)) == 1
    assert "ee" * 8 in listing.stderr  # named on stderr
    restored = backed_up.cli("restore", "latest", "--source", "src", "--target", str(tmp_path / "out"))
    assert restored.exit_code == 0, restored.output
    assert_same_tree(backed_up.source, tmp_path / "out")
    (backed_up.source / "new-file").write_bytes(b"after the junk")
    assert backed_up.cli("backup", "src").exit_code == 0
    check = backed_up.cli("check", "--json")
    assert check.exit_code == 6
    lost = json.loads(check.stdout)["metadata"]["lost"]
    assert f"snapshots/{'ee' * 32}" in lost and f"index/{'dd' * 32}" in lost


def test_4_unsupported_version_byte_on_one_copy_is_a_bad_copy(backed_up: Vault) -> None:
    snap = next((backed_up.peer(0) / "snapshots").iterdir())
    data = bytearray(snap.read_bytes())
    data[4] = 9  # a "future" envelope version on one peer only
    snap.write_bytes(bytes(data))
    shutil.rmtree(backed_up.root / "state" / next(p.name for p in (backed_up.root / "state").iterdir() if p.is_dir()))
    listing = backed_up.cli("snapshots", "--json")
    assert listing.exit_code == 0, listing.output
    assert len(json.loads(listing.stdout)) == 1


# --- finding 2: metadata redundancy decays silently ------------------------------------------


def _replace_disk(vault: Vault, i: int) -> None:
    shutil.rmtree(vault.peer(i))
    vault.peer(i).mkdir()


def test_2_replaced_disks_one_at_a_time_then_one_more_loss_loses_nothing(backed_up: Vault, tmp_path: Path) -> None:
    for i in range(6):  # every disk replaced in turn, with a repair and a clean check after each
        _replace_disk(backed_up, i)
        check = backed_up.cli("check", "--json")
        assert check.exit_code == 6, check.output
        meta = json.loads(check.stdout)["metadata"]
        assert meta["peers_empty"] == [f"p{i}"]
        assert meta["under_replicated"] == meta["objects"] > 0
        repair = backed_up.cli("repair", "--json")
        assert repair.exit_code == 0, repair.output
        assert backed_up.cli("check").exit_code == 0
    # n - k = 2 more peers lost: still everything restorable, from a machine with no state.
    shutil.rmtree(backed_up.peer(0))
    shutil.rmtree(backed_up.peer(3))
    shutil.rmtree(tmp_path / "state")
    result = backed_up.cli("restore", "latest", "--source", "src", "--target", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert_same_tree(backed_up.source, tmp_path / "out")


def test_2_no_repository_message_never_advises_init_when_one_exists(backed_up: Vault) -> None:
    for i in range(6):
        shutil.rmtree(backed_up.peer(i) / "keys")
    result = backed_up.cli("snapshots")
    assert result.exit_code == 8
    assert "init" not in result.stderr.replace("do NOT run init", "")
    assert "no key object" in result.stderr
    # Every peer empty, but this machine's state knows a repository: not "run init" either.
    for i in range(6):
        _replace_disk(backed_up, i)
    result = backed_up.cli("snapshots")
    assert result.exit_code == 8
    assert "run 'shardvault init'" not in result.stderr and "state" in result.stderr


def test_2_metadata_copy_missing_on_one_peer_is_reported_and_re_replicated(backed_up: Vault) -> None:
    snap = next((backed_up.peer(4) / "snapshots").iterdir())
    snap.unlink()
    check = backed_up.cli("check", "--json")
    assert check.exit_code == 6
    meta = json.loads(check.stdout)["metadata"]
    assert meta["peers_behind"] == {"p4": 1} and meta["under_replicated"] == 1
    assert backed_up.cli("repair").exit_code == 0
    assert snap.exists()
    assert backed_up.cli("check").exit_code == 0


def test_2_scrub_reads_metadata_copies(backed_up: Vault) -> None:
    index = next((backed_up.peer(1) / "index").iterdir())
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size: only reading finds it
    index.write_bytes(bytes(data))
    assert backed_up.cli("check").exit_code == 0  # a listing cannot see it
    scrub = backed_up.cli("scrub", "--json")
    assert scrub.exit_code == 6, scrub.output
    issues = json.loads(scrub.stdout)["metadata"]["issues"]
    assert any(i["peer"] == "p1" and i["object"] == f"index/{index.name}" for i in issues)


# --- finding 5: rollback goes unnoticed ------------------------------------------------------


def test_5_rollback_of_one_peers_metadata_is_reported_and_healed(backed_up: Vault) -> None:
    old = {p.name for p in (backed_up.peer(5) / "snapshots").iterdir()}
    old_index = {p.name for p in (backed_up.peer(5) / "index").iterdir()}
    (backed_up.source / "more").write_bytes(b"x" * 100_000)
    assert backed_up.cli("backup", "src").exit_code == 0
    for sub, keep in (("snapshots", old), ("index", old_index)):  # put back the old image of p5's metadata
        for p in (backed_up.peer(5) / sub).iterdir():
            if p.name not in keep:
                p.unlink()
    check = backed_up.cli("check", "--json")
    assert check.exit_code == 6
    assert json.loads(check.stdout)["metadata"]["peers_behind"]["p5"] >= 2
    assert backed_up.cli("repair").exit_code == 0
    assert backed_up.cli("check").exit_code == 0


def test_5_rollback_of_every_peer_is_reported_from_the_state(backed_up: Vault) -> None:
    (backed_up.source / "more").write_bytes(b"y" * 100_000)
    second = backed_up.cli("backup", "src", "--json")
    snap_id = json.loads(second.stdout)["snapshot"]["id"]
    for i in range(6):
        (backed_up.peer(i) / "snapshots" / snap_id).unlink()
    listing = backed_up.cli("snapshots", "--json")
    assert len(json.loads(listing.stdout)) == 1
    check = backed_up.cli("check", "--json")
    assert check.exit_code == 6
    assert json.loads(check.stdout)["metadata"]["snapshots_missing"] == [snap_id]
    assert snap_id[:8] in backed_up.cli("check").stdout


# --- finding 3: aliased peers, caught by identity ---------------------------------------------


@pytest.mark.s3
def test_3_same_s3_storage_under_two_endpoint_spellings_is_refused_at_init(s3_server: str, tmp_path: Path) -> None:
    import boto3
    from botocore.config import Config as BotoConfig

    s3 = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", config=BotoConfig(s3={"addressing_style": "path"})
    )
    s3.create_bucket(Bucket="alias")
    port = s3_server.rsplit(":", 1)[1]
    peers = [{"name": f"p{i}", "url": f"file://{tmp_path / f'p{i}'}", "zone": f"z{i}"} for i in range(4)]
    # Two different endpoint spellings reaching one server: the config cannot know they are one storage.
    peers.append({"name": "s1", "url": "s3://alias/repo", "endpoint": f"http://127.0.0.1:{port}", "zone": "zs"})
    peers.append({"name": "s2", "url": "s3://alias/repo", "endpoint": f"http://localhost:{port}", "zone": "zt"})
    config = write_config(tmp_path / "sv.toml", peers, {}, k=4, n=6, state_dir=str(tmp_path / "state"))
    vault = Vault(tmp_path, config, tmp_path, tmp_path)
    result = vault.cli("init")
    assert result.exit_code == 3, result.output
    assert "s1" in result.stderr and "s2" in result.stderr and "same storage" in result.stderr
    assert s3.list_objects_v2(Bucket="alias").get("KeyCount", 0) == 0  # nothing left behind
    assert all(not any((tmp_path / f"p{i}").iterdir()) for i in range(4))


def test_3_a_peer_that_shows_anothers_identity_is_left_out_named_and_separated(
    backed_up: Vault, tmp_path: Path
) -> None:
    """A copy of p0's disk put in as p3 (same identity token): never counted as a second copy of p0."""
    shutil.rmtree(backed_up.peer(3))
    shutil.copytree(backed_up.peer(0), backed_up.peer(3))
    result = backed_up.cli("snapshots", "--json")
    assert result.exit_code == 0, result.output  # one hostile or cloned peer does not block everything
    assert "p3" in result.stderr and "p0" in result.stderr and "same storage" in result.stderr
    check = backed_up.cli("check", "--json")
    assert check.exit_code == 6
    assert json.loads(check.stdout)["metadata"]["peers_aliased"] == {"p3": "p0"}
    repair = backed_up.cli("repair", "--json")  # a copy, not the same storage: p3 gets its own identity
    assert repair.exit_code == 0, repair.output
    assert json.loads(repair.stdout)["metadata"]["identities_written"] == ["p3"]
    assert backed_up.cli("check", "--read-data").exit_code == 0
    out = tmp_path / "out"
    assert backed_up.cli("restore", "latest", "--source", "src", "--target", str(out)).exit_code == 0
    assert_same_tree(backed_up.source, out)


# --- finding 14: mixed-up repositories ------------------------------------------------------------


@pytest.mark.parametrize("same_passphrase", [True, False])
def test_14_peer_of_another_repository_is_named(tmp_path: Path, same_passphrase: bool) -> None:
    a = make_vault(tmp_path / "a")
    b = make_vault(tmp_path / "b")
    if not same_passphrase:
        shutil.rmtree(b.peer(5) / "keys")
        (b.peer(5) / "keys").mkdir()
        other = make_key_object("another passphrase", MasterKeys.generate(), "ab" * 32)
        (b.peer(5) / "keys" / ("12" * 8)).write_bytes(other)
    text = a.config.read_text().replace(str(a.peer(5)), str(b.peer(5)))
    a.config.write_text(text)
    result = a.cli("snapshots")
    assert result.exit_code == 0, result.output  # five peers of ours: listed, and p5 named
    assert "Peer p5 holds repository" in result.stderr and "not" in result.stderr
    assert "tag mismatch" not in result.stderr
    check = a.cli("check", "--json")
    assert check.exit_code == 6 and "p5" in json.loads(check.stdout)["metadata"]["peers_foreign"]
    repair = a.cli("repair")
    assert repair.exit_code == 5 and "holds repository" in repair.stderr  # never writes into another repository
    assert not (b.peer(5) / "data").exists() or len(list((b.peer(5) / "data").rglob("*.*"))) == 0


def test_14_a_configuration_mixing_two_repositories_is_refused(tmp_path: Path) -> None:
    a = make_vault(tmp_path / "a")
    b = make_vault(tmp_path / "b")
    text = a.config.read_text()
    for i in (3, 4, 5):
        text = text.replace(str(a.peer(i)), str(b.peer(i)))
    a.config.write_text(text)
    result = a.cli("snapshots")
    assert result.exit_code == 8, result.output
    assert "holds repository" in result.stderr


# --- finding 15: one peer can stall or slow everyone ------------------------------------------------


def test_15_planted_key_with_huge_scrypt_parameters_is_not_derived(
    backed_up: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    evil = json.loads(_key_file(backed_up, 0).read_text())
    evil.update(n=1 << 20, r=32)
    (backed_up.peer(0) / "keys" / ("00" * 8)).write_text(json.dumps(evil))
    calls: list[tuple[int, int, int]] = []
    real = crypto.derive_key

    def spy(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
        calls.append((n, r, p))
        return real(passphrase, salt, n, r, p)

    monkeypatch.setattr("shardvault.repository.metadata.derive_key", spy)
    (backed_up.root / "state" / "last-key").unlink()
    result = backed_up.cli("snapshots", "--json")
    assert result.exit_code == 0, result.output
    assert all(n * r <= 1 << 20 for n, r, _ in calls)  # the planted parameters were refused before scrypt
    assert "exceed the accepted bounds" in result.stderr


def test_15_the_key_that_opened_last_is_tried_first(backed_up: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    # A second key (another passphrase) whose name sorts first: without the hint it costs a scrypt each run.
    other = make_key_object("another passphrase", MasterKeys.generate(), "ab" * 32)
    for i in range(6):
        (backed_up.peer(i) / "keys" / ("00" * 8)).write_bytes(other)
    assert backed_up.cli("snapshots").exit_code == 0
    calls: list[int] = []
    real = crypto.derive_key
    monkeypatch.setattr("shardvault.repository.metadata.derive_key", lambda *a: calls.append(1) or real(*a))
    assert backed_up.cli("snapshots").exit_code == 0
    assert len(calls) == 1


# --- finding 16: repository parameters are authoritative -----------------------------------------


@pytest.mark.parametrize(("key", "value"), [("k", 3), ("n", 5), ("chunk_avg_kib", 512)])
def test_16_toml_that_disagrees_with_the_repository_is_refused(vault: Vault, key: str, value: int) -> None:
    text = vault.config.read_text()
    lines = [line for line in text.splitlines() if not line.startswith(f"{key} =")]
    lines.insert(1, f"{key} = {value}")
    vault.config.write_text("\n".join(lines) + "\n")
    before = {p: p.read_bytes() for p in vault.peers_dir.rglob("*") if p.is_file()}
    result = vault.cli("backup", "src")
    assert result.exit_code == 3, result.output
    assert f"repository.{key}" in result.stderr and str(value) in result.stderr
    assert before == {p: p.read_bytes() for p in vault.peers_dir.rglob("*") if p.is_file()}


def test_16_json_errors_are_one_json_document(backed_up: Vault) -> None:
    result = backed_up.cli("snapshots", "--json", password="wrong")
    assert result.exit_code == 4
    doc = json.loads(result.stdout)
    assert doc["error"]["code"] == 4 and "passphrase" in doc["error"]["message"]


def test_16_snapshot_body_of_an_unknown_version_is_refused_by_name(backed_up: Vault) -> None:
    with backed_up.repo() as repo:
        name = "snapshots/" + "cd" * 32
        data = seal_object(repo.cipher, name, {"version": 2, "id": "cd" * 32})
    for i in range(6):
        LocalStore(f"p{i}", backed_up.peer(i)).store(name, data)
    with backed_up.repo() as repo:
        assert len(repo.snapshots()) == 1
        assert any("format version 2" in p.detail for p in repo.meta_problems)


# --- finding 9: committed means visible, and visible means committed ------------------------------


def test_9_snapshot_not_committed_is_not_visible(backed_up: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    real = LocalStore.store

    def store(self: LocalStore, name: str, data: bytes | memoryview) -> None:
        if name.startswith("snapshots/") and self.peer in ("p1", "p2"):
            from shardvault.errors import PeerReadOnlyError

            raise PeerReadOnlyError(self.peer, "no space left")
        real(self, name, data)

    monkeypatch.setattr(LocalStore, "store", store)
    (backed_up.source / "new").write_bytes(b"z" * 50_000)
    result = backed_up.cli("backup", "src")  # quorum 5 of 6: 4 copies are not a commit
    assert result.exit_code == 5, result.output
    monkeypatch.undo()
    assert len(json.loads(backed_up.cli("snapshots", "--json").stdout)) == 1


def test_open_config_in_a_new_place_needs_only_passphrase_and_peers(backed_up: Vault, tmp_path: Path) -> None:
    config = load_config(backed_up.config)
    repo = Repository.open(config, PASSWORD)
    try:
        assert repo.survey and all(a.identity is not None for a in repo.survey.values())
    finally:
        repo.close()


def test_15_a_peer_given_up_is_named_once(backed_up: Vault) -> None:
    shutil.move(backed_up.peer(2), backed_up.peers_dir / "away")
    result = backed_up.cli("snapshots", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 1
    assert result.stderr.count("peer p2 is down for this run") == 1


# --- k and n change only by an explicit, recorded operation --------------------------------------


def _set_repository_key(vault: Vault, key: str, value: int) -> None:
    lines = [line for line in vault.config.read_text().splitlines() if not line.startswith(f"{key} =")]
    lines.insert(1, f"{key} = {value}")
    vault.config.write_text("\n".join(lines) + "\n")


def test_16_reconfigure_records_a_change_of_k_and_n(backed_up: Vault, tmp_path: Path) -> None:
    first = json.loads(backed_up.cli("snapshots", "--json").stdout)[0]["id"]
    _set_repository_key(backed_up, "k", 3)
    refused = backed_up.cli("backup", "src")
    assert refused.exit_code == 3 and "reconfigure" in refused.stderr
    result = backed_up.cli("reconfigure", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["changed"] and doc["previous"]["k"] == 4 and doc["parameters"]["k"] == 3 and doc["revision"] == 1
    assert len(doc["peers_written"]) == 6
    (backed_up.source / "after").write_bytes(b"a" * 300_000)
    assert backed_up.cli("backup", "src").exit_code == 0
    with backed_up.repo() as repo:
        kinds = {(p.k, p.n) for p in repo.index.packs.values()}
        assert kinds == {(4, 6), (3, 6)}  # old packs keep theirs, new packs use the new k
        assert [h["k"] for h in repo.doc["history"]] == [4]
    assert backed_up.cli("check", "--read-data").exit_code == 0
    for snap, target in ((first, tmp_path / "old"), ("latest", tmp_path / "new")):
        args = ["restore", snap, "--source", "src", "--target", str(target)]
        assert backed_up.cli(*args).exit_code == 0
    assert_same_tree(backed_up.source, tmp_path / "new")
    assert backed_up.cli("reconfigure", "--json").exit_code == 0  # nothing left to change
    assert json.loads(backed_up.cli("reconfigure", "--json").stdout)["changed"] is False


def test_16_a_stale_config_copy_is_reported_and_healed(backed_up: Vault) -> None:
    old = (backed_up.peer(2) / "config").read_bytes()
    _set_repository_key(backed_up, "k", 3)
    assert backed_up.cli("reconfigure").exit_code == 0
    (backed_up.peer(2) / "config").write_bytes(old)  # an old image of one peer put back
    assert backed_up.cli("backup", "src").exit_code == 0  # the highest revision wins
    check = backed_up.cli("check", "--json")
    assert check.exit_code == 6
    issues = json.loads(check.stdout)["metadata"]["issues"]
    assert any(i["object"] == "config" and i["peer"] == "p2" for i in issues)
    assert backed_up.cli("repair").exit_code == 0
    assert (backed_up.peer(2) / "config").read_bytes() == (backed_up.peer(0) / "config").read_bytes()
    assert backed_up.cli("check", "--read-data").exit_code == 0
