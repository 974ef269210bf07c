"""Immutability (issue 9): append-only peers and S3 Object Lock.

Append-only is enforced by the client (a store wrapper); the tests show that
a delete or an overwrite through the store fails with the named error and
changes nothing on disk, and that backups, restores and ``check`` still work
on an append-only repository.

Object Lock runs against moto's S3 *server* on loopback (the ``s3_server``
fixture): ``init`` creates a lock-enabled bucket, every object carries a
retention, a delete through the store is refused while it runs and leaves the
object intact, and ``check`` names objects whose retention has lapsed or is
missing.  A policy without ``s3:DeleteObject`` is enforced by a second moto
server with IAM authentication switched on.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from conftest import (
    BIN,
    PASSWORD,
    SMALL,
    Vault,
    assert_same_tree,
    flip_bit,
    local_peers,
    make_tree,
    make_vault,
    peer_snapshot,
    start_moto,
    write_config,
)

from shardvault.config import load_config
from shardvault.errors import (
    DeletionRefusedError,
    ObjectNotFoundError,
    OverwriteRefusedError,
    PeerError,
    PeerRefusesDeletionError,
)
from shardvault.shards.peers import Peer
from shardvault.shards.stores import AppendOnlyStore, deletion_blockers, open_peer_store, open_store
from shardvault.shards.stores.s3 import S3Store

# --- helpers ------------------------------------------------------------------------------------


def _client(endpoint: str, **keys: str) -> Any:
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=BotoConfig(s3={"addressing_style": "path"}), **keys
    )


def _one_error_line(stderr: str, *needles: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("shardvault: error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _backup(vault: Vault) -> str:
    result = vault.cli("backup", "src", "--json")
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["snapshot"]["id"])


def _restore(vault: Vault, snapshot: str, target: Path) -> None:
    result = vault.cli("restore", snapshot, "--target", str(target))
    assert result.exit_code == 0, result.output


# --- append-only: the store wrapper ----------------------------------------------------------------


def test_append_only_store_refuses_delete_and_overwrite_and_changes_nothing(tmp_path: Path) -> None:
    store = open_store("p0", f"file://{tmp_path / 'p0'}", append_only=True)
    assert isinstance(store, AppendOnlyStore)
    store.create()
    store.store("index/aa", b"first")
    store.store("index/aa", b"first")  # a retried write of the same bytes is a no-op, not an error
    before = peer_snapshot(tmp_path)

    with pytest.raises(OverwriteRefusedError) as overwrite:
        store.store("index/aa", b"other bytes")
    assert overwrite.value.exit_code == 16
    assert "p0" in str(overwrite.value) and "index/aa" in str(overwrite.value)

    with pytest.raises(PeerRefusesDeletionError) as refused:
        store.delete("index/aa")
    # Prune and sessions catch it as "refuses deletion", every other caller as a peer error.
    assert isinstance(refused.value, DeletionRefusedError) and isinstance(refused.value, PeerError)
    assert refused.value.exit_code == 16
    assert str(refused.value).startswith("Peer p0 refuses deletion (append-only): index/aa kept")

    (tmp_path / "p0" / "index" / ".tmp-0123abcd").write_bytes(b"torn")
    with pytest.raises(PeerRefusesDeletionError):
        store.delete_leftover("index/.tmp-0123abcd")
    assert peer_snapshot(tmp_path) == before | {"p0/index/.tmp-0123abcd": b"torn"}
    assert store.load("index/aa") == b"first"
    with pytest.raises(ObjectNotFoundError):  # absent stays absent, not "refused"
        store.info("index/bb")
    assert store.retention("index/aa") is None  # a local directory keeps no lock


def test_deletion_blockers_name_append_only_peers(tmp_path: Path) -> None:
    peers = local_peers(tmp_path / "peers", 3)
    peers[1]["append_only"] = True
    config = load_config(write_config(tmp_path / "a.toml", peers, {}, k=2, n=3))
    stores = [Peer(p.name, p.zone, open_peer_store(p)) for p in config.peers]
    assert deletion_blockers(stores) == [("p1", "append-only in this client's configuration")]

    everywhere = load_config(
        write_config(tmp_path / "b.toml", local_peers(tmp_path / "peers", 3), {}, k=2, n=3, append_only=True)
    )
    stores = [Peer(p.name, p.zone, open_peer_store(p)) for p in everywhere.peers]
    assert [name for name, _ in deletion_blockers(stores)] == ["p0", "p1", "p2"]


def test_backups_work_on_an_append_only_repository(tmp_path: Path) -> None:
    """Several backups, each restored byte for byte; nothing earlier is ever changed; check is clean."""
    vault = make_vault(tmp_path, append_only=True)
    first = _backup(vault)
    _restore(vault, first, tmp_path / "r1")
    assert_same_tree(vault.source, tmp_path / "r1")
    expected = [(first, tmp_path / "r1")]
    for round_ in range(2):
        before = peer_snapshot(vault.peers_dir)
        (vault.source / f"new{round_}.bin").write_bytes(os.urandom(600_000))
        (vault.source / "dir0" / "file0.txt").write_bytes(os.urandom(1000))
        snap = _backup(vault)
        after = peer_snapshot(vault.peers_dir)
        changed = [name for name, data in before.items() if after.get(name) != data]
        assert changed == [], changed  # append-only: every object still there, byte for byte
        target = tmp_path / f"copy{round_}"
        _restore(vault, snap, target)
        assert_same_tree(vault.source, target)
        expected.append((snap, target))
    for snap, target in expected:  # the earlier snapshots restore as they were
        again = tmp_path / f"again-{snap[:8]}"
        _restore(vault, snap, again)
        assert_same_tree(target, again)
    result = vault.cli("check", "--read-data")
    assert result.exit_code == 0, result.output
    assert "no errors found" in result.output


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "prune", "key", "words"),
    [
        ({"object_lock": "governance", "object_lock_days": 7}, "", "peers[0].object_lock", "S3 peers only"),
        ({"s3": True, "object_lock": "governance", "object_lock_days": 0}, "", "object_lock_days", "between 1"),
        ({"s3": True, "object_lock": "forever", "object_lock_days": 3}, "", "peers[0].object_lock", "governance"),
        ({"s3": True, "object_lock": "compliance"}, "", "object_lock_days", "is required"),
        ({"s3": True, "object_lock_days": 3}, "", "object_lock_days", "needs object_lock"),
        (
            {"s3": True, "object_lock": "governance", "object_lock_days": 1},
            'grace = "48h"',
            "object_lock_days",
            "grace",
        ),
        ({"append_only": "yes"}, "", "peers[0].append_only", "must be bool"),
    ],
)
def test_bad_immutability_settings_exit_3_with_one_line(
    tmp_path: Path, peer: dict[str, Any], prune: str, key: str, words: str
) -> None:
    peers = local_peers(tmp_path / "peers", 3)
    if peer.pop("s3", False):
        peers[0] = {"name": "s0", "url": "s3://bucket-x/p", "endpoint": "http://127.0.0.1:9"}
    peers[0] |= peer
    config = write_config(tmp_path / "sv.toml", peers, {}, k=2, n=3, state_dir=str(tmp_path / "state"))
    if prune:
        config.write_text(config.read_text() + f"[prune]\n{prune}\n")
    result = subprocess.run(
        [str(BIN / "shardvault"), "--config", str(config), "init"],
        capture_output=True,
        text=True,
        env=os.environ | {"SHARDVAULT_PASSWORD": PASSWORD},
    )
    assert result.returncode == 3, result.stderr
    _one_error_line(result.stderr, key, words)
    assert not (tmp_path / "peers" / "p1").exists()  # nothing was created


# --- S3 Object Lock against moto's server ---------------------------------------------------------


def _lock_vault(tmp_path: Path, endpoint: str, bucket: str, mode: str = "governance", days: int = 3) -> Vault:
    source = make_tree(tmp_path / "src", files=12, big=700_000)
    peers = local_peers(tmp_path / "peers", 3)
    peers += [
        {
            "name": f"s{i}",
            "url": f"s3://{bucket}/peer{i}",
            "endpoint": endpoint,
            "zone": "s3",
            "object_lock": mode,
            "object_lock_days": days,
        }
        for i in range(3)
    ]
    config = write_config(
        tmp_path / "sv.toml", peers, {"src": source}, k=3, n=6, state_dir=str(tmp_path / "st"), **SMALL
    )
    return Vault(tmp_path, config, tmp_path / "peers", source)


def _keys(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [str(o["Key"]) for page in pages for o in page.get("Contents", [])]


@pytest.fixture
def locked(s3_server: str, tmp_path: Path) -> Iterator[tuple[Vault, Any, str]]:
    bucket = f"lock-{secrets.token_hex(4)}"
    vault = _lock_vault(tmp_path, s3_server, bucket)
    result = vault.cli("init")
    assert result.exit_code == 0, result.output
    _backup(vault)
    yield vault, _client(s3_server), bucket


@pytest.mark.s3
def test_init_creates_a_lock_enabled_bucket_and_every_object_is_retained(locked: tuple[Vault, Any, str]) -> None:
    vault, client, bucket = locked
    lock = client.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    assert lock["ObjectLockEnabled"] == "Enabled"
    keys = _keys(client, bucket, "peer0/")
    kinds = {key.split("/")[1] for key in keys}
    assert {"data", "keys", "index", "snapshots", "config", "identity"} <= kinds, kinds
    now = datetime.now(UTC)
    for key in keys:
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["ObjectLockMode"] == "GOVERNANCE", key
        until = head["ObjectLockRetainUntilDate"]
        assert now + timedelta(days=3) - timedelta(hours=1) < until <= now + timedelta(days=3), key
    assert not [k for k in keys if k.split("/")[1] == "sessions"]  # ended sessions were deletable (no lock)

    store = open_peer_store(load_config(vault.config).peers[3])
    data_name = next(k for k in keys if "/data/" in k).removeprefix("peer0/")
    assert (
        store.retention(data_name)
        == client.head_object(Bucket=bucket, Key=f"peer0/{data_name}")["ObjectLockRetainUntilDate"]
    )


@pytest.mark.s3
def test_deleting_a_locked_object_is_refused_and_leaves_it_intact(locked: tuple[Vault, Any, str]) -> None:
    vault, client, bucket = locked
    store = open_peer_store(load_config(vault.config).peers[3])  # s0
    names = [i.name for i in store.list("data/")]
    name = names[0]
    data = store.load(name)
    with pytest.raises(PeerRefusesDeletionError) as refused:
        store.delete(name)
    message = str(refused.value)
    assert message.startswith(f"Peer s0 refuses deletion (object lock): {name} is retained until 20"), message
    assert "(governance mode)" in message and refused.value.exit_code == 16
    assert store.load(name) == data
    versions = client.list_object_versions(Bucket=bucket, Prefix=f"peer0/{name}")
    assert not versions.get("DeleteMarkers")  # not even hidden behind a delete marker
    assert len(versions["Versions"]) == 1

    # Once the retention has passed the delete goes through, every version of it: the space is freed.
    past = datetime.now(UTC) - timedelta(minutes=1)
    client.put_object_retention(
        Bucket=bucket, Key=f"peer0/{name}", Retention={"Mode": "GOVERNANCE", "RetainUntilDate": past}
    )
    store.delete(name)
    versions = client.list_object_versions(Bucket=bucket, Prefix=f"peer0/{name}")
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")
    with pytest.raises(ObjectNotFoundError):
        store.info(name)


@pytest.mark.s3
def test_check_reports_lapsed_and_missing_retention_without_failing(locked: tuple[Vault, Any, str]) -> None:
    vault, client, bucket = locked
    result = vault.cli("check", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc["object_lock"]) == {"s0", "s1", "s2"}
    clean = doc["object_lock"]["s1"]
    assert clean["objects"] >= 6 and clean["lapsed"] == 0 and clean["missing"] == 0 and clean["mode"] == "governance"

    lapsed = sorted(_keys(client, bucket, "peer1/data/"))[0]  # a shard
    stripped = sorted(_keys(client, bucket, "peer1/snapshots/"))[0]  # and a metadata object
    client.put_object_retention(
        Bucket=bucket,
        Key=lapsed,
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": datetime.now(UTC) - timedelta(hours=1)},
    )
    client.put_object_retention(Bucket=bucket, Key=stripped, Retention={}, BypassGovernanceRetention=True)
    assert "ObjectLockMode" not in client.head_object(Bucket=bucket, Key=stripped)

    result = vault.cli("check", "--json")
    assert result.exit_code == 0, result.output  # a warning, not damage
    doc = json.loads(result.stdout)
    s1 = doc["object_lock"]["s1"]
    assert (s1["lapsed"], s1["missing"]) == (1, 1), s1
    assert s1["lapsed_objects"] == [lapsed.removeprefix("peer1/")]
    assert s1["missing_objects"] == [stripped.removeprefix("peer1/")]
    assert doc["object_lock"]["s0"]["lapsed"] == doc["object_lock"]["s0"]["missing"] == 0
    assert not doc["damaged"]

    text = vault.cli("check")
    assert text.exit_code == 0, text.output
    in_use = s1["objects"] - s1["awaiting_deletion"]
    assert (
        f"peer s1: object lock (governance, 3 day(s)): WARNING 2 of {in_use} object(s) in use deletable now: "
        f"1 lapsed ({lapsed.removeprefix('peer1/')}); 1 without retention ({stripped.removeprefix('peer1/')})"
    ) in text.output
    assert "peer s0: object lock (governance, 3 day(s)): all " in text.output
    assert "object(s) in use retained" in text.output
    metrics = vault.cli("exporter", "--once")
    assert metrics.exit_code == 0, metrics.output
    assert 'shardvault_object_lock_exposed_objects{peer="s1"} 2.0' in metrics.output
    assert 'shardvault_object_lock_exposed_objects{peer="s0"} 0.0' in metrics.output
    assert 'shardvault_object_lock_exposed_objects{peer="p0"}' not in metrics.output  # local peers keep no lock


@pytest.mark.s3
def test_init_refuses_an_existing_bucket_without_object_lock(s3_server: str, tmp_path: Path) -> None:
    bucket = f"plain-{secrets.token_hex(4)}"
    _client(s3_server).create_bucket(Bucket=bucket)
    vault = _lock_vault(tmp_path, s3_server, bucket, mode="compliance")
    result = vault.run("init")
    assert result.returncode == 3, result.stderr
    _one_error_line(result.stderr, f"Peer s0: bucket '{bucket}' has no S3 Object Lock", 'object_lock = "compliance"')
    assert _keys(_client(s3_server), bucket, "") == []  # nothing written


@pytest.mark.s3
def test_an_s3_peer_on_a_bucket_that_lost_its_lock_config_refuses_unlocked_writes(s3_server: str) -> None:
    """The configuration asks for a lock the bucket cannot give: no object is written without one."""
    bucket = f"plain-{secrets.token_hex(4)}"
    _client(s3_server).create_bucket(Bucket=bucket)
    from shardvault.config import ObjectLockMode
    from shardvault.errors import ObjectLockNotEnabledError

    store = S3Store("s9", bucket, "p", endpoint=s3_server, object_lock=ObjectLockMode.GOVERNANCE, object_lock_days=2)
    with pytest.raises(ObjectLockNotEnabledError, match="has no S3 Object Lock"):
        store.store("index/aa", b"x")
    assert _keys(_client(s3_server), bucket, "") == []


# --- a server-side policy without s3:DeleteObject -------------------------------------------------


@pytest.fixture
def iam_s3_server() -> Iterator[str]:
    """A moto server that enforces IAM policies after its first few (setup) requests."""
    proc, endpoint = start_moto(os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.s3
def test_a_policy_without_delete_is_the_same_named_refusal(iam_s3_server: str) -> None:
    """The README's example policy: the server answers AccessDenied, the store says "refuses deletion"."""
    setup = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", endpoint_url=iam_s3_server, region_name="us-east-1", **setup)
    iam.create_user(UserName="writer")
    key = iam.create_access_key(UserName="writer")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:CreateBucket"],
                "Resource": ["arn:aws:s3:::*"],
            }
        ],
    }
    iam.put_user_policy(UserName="writer", PolicyName="no-delete", PolicyDocument=json.dumps(policy))
    client = _client(iam_s3_server, aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    client.create_bucket(Bucket="nodelete")
    store = S3Store("s0", "nodelete", "peer", client=client)
    store.store("snapshots/aa", b"history")
    with pytest.raises(PeerRefusesDeletionError) as refused:
        store.delete("snapshots/aa")
    assert isinstance(refused.value, DeletionRefusedError)
    assert str(refused.value).startswith(
        "Peer s0 refuses deletion (access denied): snapshots/aa kept: the server answered"
    )
    assert "AccessDenied" in str(refused.value)
    assert store.load("snapshots/aa") == b"history"


@pytest.mark.s3
def test_repair_renews_lapsed_and_missing_retention(locked: tuple[Vault, Any, str]) -> None:
    vault, client, bucket = locked
    lapsed = sorted(_keys(client, bucket, "peer2/data/"))[0]
    stripped = sorted(_keys(client, bucket, "peer2/index/"))[0]
    past = datetime.now(UTC) - timedelta(hours=1)
    client.put_object_retention(Bucket=bucket, Key=lapsed, Retention={"Mode": "GOVERNANCE", "RetainUntilDate": past})
    client.put_object_retention(Bucket=bucket, Key=stripped, Retention={}, BypassGovernanceRetention=True)
    untouched = sorted(_keys(client, bucket, "peer2/snapshots/"))[0]
    before = client.head_object(Bucket=bucket, Key=untouched)["ObjectLockRetainUntilDate"]

    result = vault.cli("repair", "--json")
    assert result.exit_code == 0, result.output
    renewed = json.loads(result.stdout)["object_lock"]
    assert renewed["s2"]["extended"] == 2 and renewed["s0"]["extended"] == renewed["s1"]["extended"] == 0, renewed
    now = datetime.now(UTC)
    for key in (lapsed, stripped):
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["ObjectLockMode"] == "GOVERNANCE"
        assert (
            now + timedelta(days=3) - timedelta(hours=1) < head["ObjectLockRetainUntilDate"] <= now + timedelta(days=3)
        )
    # Retained long enough already: no PutObjectRetention (a repair costs a HEAD per object, not a write).
    assert client.head_object(Bucket=bucket, Key=untouched)["ObjectLockRetainUntilDate"] == before
    doc = json.loads(vault.cli("check", "--json").stdout)
    assert all(f["lapsed"] == f["missing"] == 0 for f in doc["object_lock"].values()), doc["object_lock"]


@pytest.mark.s3
def test_prune_on_locked_peers_keeps_what_is_retained_and_deletes_it_once_the_lock_lapses(
    locked: tuple[Vault, Any, str],
) -> None:
    """Forget + prune: locked S3 copies are refused (kept for now), local ones freed; a later prune finishes."""
    vault, client, bucket = locked
    (vault.source / "large0.bin").write_bytes(os.urandom(700_000))
    latest = _backup(vault)
    result = vault.cli("forget", "--keep-last", "1")
    assert result.exit_code == 0, result.output
    result = vault.cli("prune", "--grace", "0", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    refused = [line for line in doc["refused"] if "(object lock)" in line]
    assert refused and all("is retained until" in line for line in refused), doc["refused"]
    # locked: nothing freed there (what a repack wrote makes it negative)
    assert all(size <= 0 for peer, size in doc["freed_bytes"].items() if peer.startswith("s")), doc["freed_bytes"]

    # What prune means to delete is awaiting deletion: not a finding, and repair does not renew it.
    check = json.loads(vault.cli("check", "--json").stdout)
    assert check["object_lock"]["s0"]["awaiting_deletion"] > 0, check["object_lock"]
    assert not check["damaged"]
    _restore(vault, latest, vault.root / "kept")
    assert_same_tree(vault.source, vault.root / "kept")

    # The retention runs out (moved into the past here); the next prune deletes every version.
    shards_before = set(_keys(client, bucket, "peer0/data/"))
    past = datetime.now(UTC) - timedelta(minutes=1)
    for key in shards_before:
        client.put_object_retention(Bucket=bucket, Key=key, Retention={"Mode": "GOVERNANCE", "RetainUntilDate": past})
    result = vault.cli("repair", "--json")  # renews what is in use again, leaves the condemned alone
    assert result.exit_code == 0, result.output
    result = vault.cli("prune", "--grace", "0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["freed_bytes"].get("s0", 0) > 0, result.stdout
    shards_after = set(_keys(client, bucket, "peer0/data/"))
    assert shards_after < shards_before
    for key in shards_before - shards_after:  # deleted by version id: no delete marker, no old version left
        versions = client.list_object_versions(Bucket=bucket, Prefix=key)
        assert not versions.get("Versions") and not versions.get("DeleteMarkers"), key
    for key in shards_after:  # what is still in use was renewed by the repair
        assert client.head_object(Bucket=bucket, Key=key)["ObjectLockRetainUntilDate"] > datetime.now(UTC)
    _restore(vault, latest, vault.root / "kept2")
    assert_same_tree(vault.source, vault.root / "kept2")
    result = vault.cli("check", "--read-data")
    assert result.exit_code == 0, result.output


def test_prune_refuses_on_an_append_only_client_and_changes_nothing(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, append_only=True)
    _backup(vault)
    (vault.source / "more.bin").write_bytes(os.urandom(300_000))
    _backup(vault)
    before = peer_snapshot(vault.peers_dir)
    result = vault.run("prune", "--grace", "0")
    assert result.returncode == 16, result.stderr
    _one_error_line(result.stderr, "Peer p0 refuses deletion (append-only in this client's configuration)", "prune")
    assert peer_snapshot(vault.peers_dir) == before


@pytest.mark.s3
def test_turning_object_lock_on_for_a_bucket_without_it_refuses_the_backup(s3_server: str, tmp_path: Path) -> None:
    """A configuration that asks for a lock the bucket cannot give: exit 3, one line, no snapshot committed."""
    bucket = f"plain-{secrets.token_hex(4)}"
    vault = _lock_vault(tmp_path, s3_server, bucket)
    unlocked = (
        vault.config.read_text().replace('object_lock = "governance"\n', "").replace("object_lock_days = 3\n", "")
    )
    locked = vault.config.read_text()
    vault.config.write_text(unlocked)
    assert vault.cli("init").exit_code == 0
    _backup(vault)
    vault.config.write_text(locked)
    (vault.source / "more.bin").write_bytes(os.urandom(300_000))
    result = vault.run("backup", "src")
    assert result.returncode == 3, result.stderr
    _one_error_line(result.stderr, f"bucket '{bucket}' has no S3 Object Lock", 'object_lock = "governance"')
    assert len(json.loads(vault.cli("snapshots", "--json").stdout)) == 1


def test_reconfigure_and_store_level_rewrites_are_refused_on_an_append_only_repository(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, append_only=True)
    snapshot = _backup(vault)
    before = peer_snapshot(vault.peers_dir)
    vault.config.write_text(vault.config.read_text().replace("k = 4", "k = 3"))
    result = vault.run("reconfigure")
    assert result.returncode == 16, result.stderr
    _one_error_line(result.stderr, "Peer p0 refuses to overwrite config (append-only", "trusted host")
    vault.config.write_text(vault.config.read_text().replace("k = 3", "k = 4"))
    with vault.repo() as repo:  # the repository's own peers are wrapped: every peer refuses
        for peer in repo.peers:
            with pytest.raises(PeerRefusesDeletionError):
                peer.store.delete(f"snapshots/{snapshot}")
            with pytest.raises(OverwriteRefusedError):
                peer.store.store("config", b"rewritten")
    after = peer_snapshot(vault.peers_dir)
    assert {name: data for name, data in after.items() if "/sessions/" not in name} == {
        name: data for name, data in before.items() if "/sessions/" not in name
    }  # only the session heartbeats of the runs above were added


def test_repair_on_an_append_only_client_keeps_the_peer_up_and_a_trusted_host_finishes(tmp_path: Path) -> None:
    """A corrupt copy cannot be replaced in place from an append-only client; the peer is not taken for down."""
    vault = make_vault(tmp_path, append_only=True)
    _backup(vault)
    flip_bit(vault.shards(0)[0])
    flip_bit(sorted((vault.peer(1) / "snapshots").iterdir())[0])
    assert vault.run("check", "--read-data").returncode == 6
    result = vault.run("repair", "--json")
    assert result.returncode == 5, result.stderr  # the snapshot copy on p1 could not be rewritten: said, not hidden
    doc = json.loads(result.stdout)
    assert doc["shards_rebuilt"] == 1 and doc["peers_unreachable"] == {}, doc  # p0 refused an overwrite, not down
    assert any("refuses to overwrite snapshots/" in line for line in doc["metadata"]["failed"]), doc["metadata"]
    assert "down for this run" not in result.stderr
    vault.config.write_text(vault.config.read_text().replace("append_only = true\n", ""))  # the trusted host
    assert vault.run("repair").returncode == 0
    result = vault.run("check", "--read-data")
    assert result.returncode == 0, result.stdout + result.stderr
