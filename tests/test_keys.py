"""Keys (issue 9): several passphrases or key files open one repository; list, add, remove, passwd.

CLI level on local peers (make_vault), one run on S3 peers (moto's server),
and the golden vector of the key object's sealed ``info`` (tests/vectors/keys_v1.json).
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from conftest import PASSWORD, SMALL, Vault, assert_same_tree, local_peers, make_vault, peer_snapshot, write_config

from shardvault.crypto import Cipher, content_hash
from shardvault.repository.keys import KeyInfo, info_doc, make_key, read_key_info
from shardvault.repository.metadata import MalformedObject, open_key_object

SECOND = "a second passphrase, for the on-call laptop"


def _doc(result: Result) -> Any:
    """The one JSON document on stdout (success or error)."""
    return json.loads(result.stdout)


def _key_ids(vault: Vault, i: int = 0) -> list[str]:
    return sorted(p.name for p in (vault.peer(i) / "keys").iterdir())


def _add(vault: Vault, tmp_path: Path, passphrase: str = SECOND, password: str = PASSWORD) -> str:
    secret = tmp_path / f"new-{len(list(tmp_path.glob('new-*')))}"
    secret.write_text(passphrase + "\n")
    result = vault.cli("key", "add", "--new-password-file", str(secret), "--json", password=password)
    assert result.exit_code == 0, result.output
    added: str = _doc(result)["added"]["id"]
    return added


@pytest.fixture
def backed_up_small(tmp_path: Path) -> Vault:
    vault = make_vault(tmp_path)
    result = vault.cli("backup", "src")
    assert result.exit_code == 0, result.output
    return vault


# --- add, list, either passphrase ----------------------------------------------------------


def test_an_added_key_opens_the_same_repository_and_list_marks_the_current_one(
    backed_up_small: Vault, tmp_path: Path
) -> None:
    vault = backed_up_small
    first = _key_ids(vault)
    assert len(first) == 1
    added = _add(vault, tmp_path)
    for i in range(6):  # replicated to every peer, like other metadata
        assert sorted([*first, added]) == _key_ids(vault, i)

    snaps = {pw: _doc(vault.cli("snapshots", "--json", password=pw)) for pw in (PASSWORD, SECOND)}
    assert snaps[PASSWORD] == snaps[SECOND] and len(snaps[PASSWORD]) == 1
    result = vault.cli("restore", "latest", "--source", "src", "--target", str(tmp_path / "out"), password=SECOND)
    assert result.exit_code == 0, result.output
    assert_same_tree(vault.source, tmp_path / "out")

    for pw, current in ((PASSWORD, first[0]), (SECOND, added)):
        listed = _doc(vault.cli("key", "list", "--json", password=pw))
        assert listed["current"] == current
        assert sorted(k["id"] for k in listed["keys"]) == sorted([first[0], added])
        assert [k["id"] for k in listed["keys"] if k["current"]] == [current]
        for key in listed["keys"]:  # both verified under the master key, made here, on all peers
            assert key["verified"] and key["hostname"] and key["created"] and len(key["peers"]) == 6
    text = vault.cli("key", "list", password=SECOND).stdout
    assert f"* {added}" in text and f"  {first[0]}" in text


def test_a_prompted_passphrase_is_asked_twice_and_without_one_json_is_one_error_document(vault: Vault) -> None:
    from click.testing import CliRunner

    from shardvault.cli import main

    env = {"SHARDVAULT_PASSWORD": PASSWORD}
    args = ["--config", str(vault.config), "key", "add", "--label", "typed"]
    result = CliRunner().invoke(main, args, input="typed pass\ntyped pass\n", env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    listed = _doc(vault.cli("key", "list", "--json", password="typed pass"))
    assert [k["label"] for k in listed["keys"] if k["current"]] == ["typed"]

    before = peer_snapshot(vault.peers_dir)
    result = CliRunner().invoke(main, [*args, "--json"], input="", env=env, catch_exceptions=False)
    assert result.exit_code == 2
    assert "new passphrase" in _doc(result)["error"]["message"]
    assert peer_snapshot(vault.peers_dir) == before


def test_a_generated_key_file_opens_the_repository_and_is_never_replaced(vault: Vault, tmp_path: Path) -> None:
    keyfile = tmp_path / "keyfile"
    result = vault.cli("key", "add", "--generate-key-file", str(keyfile), "--json")
    assert result.exit_code == 0, result.output
    assert _doc(result)["key_file"] == str(keyfile)
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert len(keyfile.read_text().strip()) >= 43  # 256 random bits
    opened = vault.run("--password-file", str(keyfile), "key", "list", "--json", password="")
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["current"] == _doc(result)["added"]["id"]

    before = peer_snapshot(vault.peers_dir)
    again = vault.cli("key", "add", "--generate-key-file", str(keyfile), "--json")
    assert again.exit_code == 3
    assert "already exists" in _doc(again)["error"]["message"]
    assert peer_snapshot(vault.peers_dir) == before


def test_a_wrong_current_passphrase_adds_nothing_and_leaves_no_key_file(vault: Vault, tmp_path: Path) -> None:
    before = peer_snapshot(vault.peers_dir)
    result = vault.cli("key", "add", "--generate-key-file", str(tmp_path / "kf"), "--json", password="nope")
    assert result.exit_code == 4
    assert _doc(result)["error"]["type"] == "WrongPassphraseError"
    assert not (tmp_path / "kf").exists()
    assert peer_snapshot(vault.peers_dir) == before


# --- passwd --------------------------------------------------------------------------------


def test_passwd_then_the_old_passphrase_fails_and_the_new_one_opens(backed_up_small: Vault, tmp_path: Path) -> None:
    vault = backed_up_small
    old = _key_ids(vault)
    secret = tmp_path / "new"
    secret.write_text(SECOND)
    result = vault.cli("key", "passwd", "--new-password-file", str(secret), "--json")
    assert result.exit_code == 0, result.output
    doc = _doc(result)
    assert doc["removed"] == old[0] and doc["added"]["current"] and doc["tombstone"]
    assert sorted(doc["peers_deleted"]) == [f"p{i}" for i in range(6)] and not doc["peers_kept"]
    for i in range(6):
        assert _key_ids(vault, i) == [doc["added"]["id"]]

    refused = vault.run("snapshots", "--json")
    assert refused.returncode == 4, refused.stderr
    assert json.loads(refused.stdout)["error"]["type"] == "WrongPassphraseError"
    assert len(_doc(vault.cli("snapshots", "--json", password=SECOND))) == 1
    result = vault.cli("restore", "latest", "--source", "src", "--target", str(tmp_path / "out"), password=SECOND)
    assert result.exit_code == 0, result.output
    assert_same_tree(vault.source, tmp_path / "out")
    assert vault.cli("check", password=SECOND).exit_code == 0  # the tombstone is metadata like any other


# --- remove --------------------------------------------------------------------------------


def test_removing_the_last_or_the_current_key_is_refused_and_changes_nothing(vault: Vault, tmp_path: Path) -> None:
    only = _key_ids(vault)[0]
    before = peer_snapshot(vault.peers_dir)
    result = vault.cli("key", "remove", only, "--json")
    assert result.exit_code == 8
    error = _doc(result)["error"]
    assert error["type"] == "KeyRemovalRefusedError" and "only key" in error["message"]
    assert peer_snapshot(vault.peers_dir) == before

    added = _add(vault, tmp_path)
    before = peer_snapshot(vault.peers_dir)
    result = vault.cli("key", "remove", only[:6])
    assert result.exit_code == 8
    assert "this passphrase opened" in result.stderr and result.stderr.count("\n") == 1
    assert vault.cli("key", "remove", added, password=SECOND).exit_code == 8
    assert peer_snapshot(vault.peers_dir) == before

    result = vault.cli("key", "remove", added[:5], "--json")  # another key, by a prefix: removed
    assert result.exit_code == 0, result.output
    assert _doc(result)["removed"] == added
    assert _key_ids(vault) == [only]
    assert vault.cli("snapshots", password=SECOND).exit_code == 4


def test_unknown_and_ambiguous_key_ids_are_exit_8(vault: Vault) -> None:
    only = _key_ids(vault)[0]
    for i in range(6):  # a second object whose id shares 15 characters (a planted copy)
        keys = vault.peer(i) / "keys"
        shutil.copy(keys / only, keys / (only[:15] + ("0" if only[15] != "0" else "1")))
    before = peer_snapshot(vault.peers_dir)
    for spec, kind in (
        (only[:15], "AmbiguousKeyError"),
        ("ffff0000ffff0000", "KeyNotFoundError"),
        ("zz", "KeyNotFoundError"),
    ):
        if spec == "ffff0000ffff0000" and only.startswith("ffff"):
            continue
        result = vault.cli("key", "remove", spec, "--json")
        assert result.exit_code == 8, (spec, result.output)
        assert _doc(result)["error"]["type"] == kind
        assert spec in _doc(result)["error"]["message"]
    assert peer_snapshot(vault.peers_dir) == before


def test_a_key_removed_while_a_peer_was_down_stays_removed(backed_up_small: Vault, tmp_path: Path) -> None:
    vault = backed_up_small
    added = _add(vault, tmp_path)
    shutil.move(vault.peer(5), vault.peers_dir / "away")
    result = vault.cli("key", "remove", added, "--json")
    assert result.exit_code == 0, result.output
    doc = _doc(result)
    assert doc["tombstone"] and list(doc["peers_kept"]) == ["p5"]
    shutil.move(vault.peers_dir / "away", vault.peer(5))
    assert added in _key_ids(vault, 5)  # p5 still holds the old key object

    # The copy p5 kept opens nothing: the removal is named, exit 4.
    refused = vault.run("snapshots", "--json", password=SECOND)
    assert refused.returncode == 4, refused.stderr
    assert json.loads(refused.stdout)["error"]["type"] == "KeyRemovedError"
    assert added not in {k["id"] for k in _doc(vault.cli("key", "list", "--json"))["keys"]}

    check = vault.cli("check", "--json")
    assert check.exit_code == 6, check.output
    assert _doc(check)["metadata"]["stray"] == {f"keys/{added}": ["p5"]}
    repair = vault.cli("repair", "--json")
    assert repair.exit_code == 0, repair.output
    for i in range(6):  # repair deleted the stray copy, and copied nothing back
        assert added not in _key_ids(vault, i)
    assert vault.cli("check").exit_code == 0
    assert vault.run("snapshots", password=SECOND).returncode == 4


# --- check and repair ----------------------------------------------------------------------


def _damage_key(path: Path) -> None:
    """Change one base64 character of the wrapped master keys: still a well-formed key object."""
    doc = json.loads(path.read_bytes())
    data = doc["data"]
    doc["data"] = data[:10] + ("A" if data[10] != "A" else "B") + data[11:]
    path.write_text(json.dumps(doc, indent=1))


def test_a_damaged_copy_of_another_passphrases_key_is_found_by_check_and_healed_by_repair(
    backed_up_small: Vault, tmp_path: Path
) -> None:
    vault = backed_up_small
    current = _key_ids(vault)[0]
    added = _add(vault, tmp_path)
    good = (vault.peer(0) / "keys" / added).read_bytes()
    _damage_key(vault.peer(2) / "keys" / added)
    _damage_key(vault.peer(4) / "keys" / current)

    check = vault.cli("check", "--json")  # no --read-data: key objects are always read
    assert check.exit_code == 6, check.output
    issues = {(i["object"], i["peer"], i["problem"]) for i in _doc(check)["metadata"]["issues"]}
    assert (f"keys/{added}", "p2", "corrupt") in issues
    assert (f"keys/{current}", "p4", "corrupt") in issues

    repair = vault.cli("repair", "--json")
    assert repair.exit_code == 0, repair.output
    assert (vault.peer(2) / "keys" / added).read_bytes() == good
    assert vault.cli("check", "--json").exit_code == 0
    assert vault.cli("check", "--json", password=SECOND).exit_code == 0
    # The healed copy is the one that opens: p2 alone (others away) still takes SECOND.
    for i in (0, 1, 3, 4, 5):
        shutil.move(vault.peer(i), vault.peers_dir / f"away{i}")
    listed = vault.cli("key", "list", "--json", password=SECOND)
    assert listed.exit_code == 0, listed.output
    assert _doc(listed)["current"] == added


# --- S3 peers ------------------------------------------------------------------------------


@pytest.mark.s3
def test_keys_on_s3_peers(s3_server: str, tmp_path: Path) -> None:
    import boto3
    from botocore.config import Config as BotoConfig

    s3 = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", config=BotoConfig(s3={"addressing_style": "path"})
    )
    s3.create_bucket(Bucket="sv-keys")
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("hello keys\n")
    peers = local_peers(tmp_path / "peers", 2)
    peers += [{"name": f"s{i}", "url": f"s3://sv-keys/peer{i}", "endpoint": s3_server, "zone": "s3"} for i in range(2)]
    config = write_config(
        tmp_path / "sv.toml", peers, {"src": source}, k=2, n=4, state_dir=str(tmp_path / "st"), **SMALL
    )
    vault = Vault(tmp_path, config, tmp_path / "peers", source)
    assert vault.cli("init").exit_code == 0
    assert vault.cli("backup", "src").exit_code == 0
    secret = tmp_path / "new"
    secret.write_text(SECOND)
    result = vault.cli("key", "passwd", "--new-password-file", str(secret), "--json")
    assert result.exit_code == 0, result.output
    new_id = _doc(result)["added"]["id"]
    for i in range(2):
        listed = s3.list_objects_v2(Bucket="sv-keys", Prefix=f"peer{i}/keys/").get("Contents", [])
        assert [o["Key"] for o in listed] == [f"peer{i}/keys/{new_id}"]
    assert vault.cli("snapshots").exit_code == 4
    result = vault.cli("restore", "latest", "--source", "src", "--target", str(tmp_path / "out"), password=SECOND)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a.txt").read_text() == "hello keys\n"


# --- the key object's sealed info (tests/vectors/keys_v1.json) -------------------------------

VEC = json.loads((Path(__file__).parent / "vectors" / "keys_v1.json").read_text())
META = json.loads((Path(__file__).parent / "vectors" / "metadata_v1.json").read_text())


def _info(vec: dict[str, Any] = VEC) -> KeyInfo:
    body = vec["info_body"]
    return KeyInfo(body["created"], body["hostname"], body["username"], body["label"])


def test_key_vector_reads_exactly() -> None:
    data = VEC["key_object"].encode()
    keys, repo_id = open_key_object(VEC["passphrase"], data)
    assert (keys.encryption.hex(), keys.chunk_id.hex(), repo_id) == (
        VEC["keys"]["encryption"],
        VEC["keys"]["chunk_id"],
        VEC["repository"],
    )
    cipher = Cipher(keys.encryption)
    assert read_key_info(cipher, VEC["name"], data) == _info()
    # The layout: info = AES-GCM(master key, "shardvault key info v1:" + name) over the body, whose
    # digest is BLAKE3 of the other fields as canonical JSON.
    doc = json.loads(data)
    body = cipher.open(base64.b64decode(doc.pop("info")), b"shardvault key info v1:" + VEC["name"].encode())
    assert json.loads(body) == VEC["info_body"]
    canonical = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    assert VEC["info_body"]["digest"] == content_hash(canonical).hex()
    assert info_doc(_info(), VEC["info_body"]["digest"]) == VEC["info_body"]


def test_key_vector_writer_and_older_key_objects() -> None:
    from shardvault.crypto import MasterKeys

    keys = MasterKeys(bytes.fromhex(VEC["keys"]["encryption"]), bytes.fromhex(VEC["keys"]["chunk_id"]))
    data = make_key(VEC["passphrase"], keys, VEC["repository"], VEC["name"], _info())
    assert json.loads(data)["version"] == 1  # an optional field: version 1 readers ignore it
    assert read_key_info(Cipher(keys.encryption), VEC["name"], data) == _info()
    assert open_key_object(VEC["passphrase"], data)[1] == VEC["repository"]
    # A key object from before info existed still opens, and simply has none.
    old = META["key_object"].encode()
    assert open_key_object(META["passphrase"], old)[1] == META["repository"]
    assert read_key_info(Cipher(keys.encryption), "keys/00000000000000aa", old) is None


@pytest.mark.parametrize("change", ["moved", "field", "info", "other-repository"])
def test_key_info_refuses_tampering(change: str) -> None:
    from shardvault.crypto import MasterKeys

    keys = MasterKeys(bytes.fromhex(VEC["keys"]["encryption"]), bytes.fromhex(VEC["keys"]["chunk_id"]))
    data, name, cipher = VEC["key_object"].encode(), VEC["name"], Cipher(keys.encryption)
    doc = json.loads(data)
    if change == "moved":
        name = "keys/fedcba9876543210"
    elif change == "field":
        doc["n"] = 16384
    elif change == "info":
        raw = bytearray(base64.b64decode(doc["info"]))
        raw[20] ^= 1
        doc["info"] = base64.b64encode(raw).decode()
    else:
        cipher = Cipher(bytes(32))
    with pytest.raises(MalformedObject):
        read_key_info(cipher, name, json.dumps(doc).encode())


def test_without_the_write_quorum_add_and_remove_change_nothing(vault: Vault, tmp_path: Path) -> None:
    added = _add(vault, tmp_path)
    for i in (4, 5):  # write_quorum is n - 1 = 5: two peers away leave four
        shutil.move(vault.peer(i), vault.peers_dir / f"away{i}")
    before = peer_snapshot(vault.peers_dir)
    secret = tmp_path / "third"
    secret.write_text("a third passphrase")
    for args in (("add", "--new-password-file", str(secret)), ("passwd", "--new-password-file", str(secret))):
        result = vault.cli("key", *args, "--json")
        assert result.exit_code == 5, result.output
        assert _doc(result)["error"]["type"] in ("NotEnoughPeersError", "PeerUnavailableError")  # both exit 5
    result = vault.cli("key", "remove", added, "--json")
    assert result.exit_code == 5, result.output
    assert peer_snapshot(vault.peers_dir) == before
    for i in (4, 5):
        shutil.move(vault.peers_dir / f"away{i}", vault.peer(i))
    assert vault.cli("snapshots", password="a third passphrase").exit_code == 4
    assert vault.cli("snapshots", password=SECOND).exit_code == 0


def _stopped(proc: subprocess.Popen[str]) -> bool:
    """Whether the process stopped itself at a failpoint (state T in /proc)."""
    try:
        text = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] == "T"


def test_passwd_that_cannot_remove_the_old_key_keeps_both_and_the_key_file(vault: Vault, tmp_path: Path) -> None:
    """The new key is on the quorum before the old one is touched; losing peers in between loses no way in."""
    keyfile = tmp_path / "keyfile"
    vault.env["SHARDVAULT_FAILPOINTS"] = "key-added"
    proc = vault.popen("key", "passwd", "--generate-key-file", str(keyfile), "--json")
    deadline = time.monotonic() + 60
    while not _stopped(proc) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stopped(proc), "passwd never reached its failpoint"
    for i in (4, 5):
        shutil.move(vault.peer(i), vault.peers_dir / f"away{i}")
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    error = json.loads(out)["error"]
    assert error["type"] == "KeyRotationIncompleteError" and "key remove" in error["message"]
    assert keyfile.exists()
    for i in (4, 5):
        shutil.move(vault.peers_dir / f"away{i}", vault.peer(i))
    vault.env.clear()
    assert vault.run("snapshots", "--json").returncode == 0  # the old passphrase still opens
    new = vault.run("--password-file", str(keyfile), "key", "list", "--json", password="")
    assert new.returncode == 0, new.stderr
    assert len(json.loads(new.stdout)["keys"]) == 2


def test_key_usage_errors_are_one_json_document(vault: Vault) -> None:
    result = vault.run("key", "remove", "--json")  # no ID
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["type"] == "UsageError"
    assert result.stderr.count("\n") == 1
    both = vault.run("key", "add", "--new-password-file", "f", "--generate-key-file", "g", "--json")
    assert both.returncode == 2 and "not both" in json.loads(both.stdout)["error"]["message"]
