"""Backups and restores end to end: incremental skipping, dedup, S3 peers."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from conftest import SMALL, Vault, assert_same_tree, local_peers, make_vault, write_config

from shardvault.errors import SourceError
from shardvault.tree import FILE


def test_incremental_backup_of_unchanged_10k_files_reads_no_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = make_vault(tmp_path)
    many = vault.source / "many"
    for i in range(10_000):
        d = many / f"d{i % 100:02d}"
        if i < 100:
            d.mkdir(parents=True)
        (d / f"f{i}").write_bytes(f"file {i}\n".encode() * (i % 7))
    first = vault.cli("backup", "src", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["stats"]["files_read"] > 10_000

    def no_reads(path: str) -> None:
        raise AssertionError(f"unchanged file was opened: {path}")

    monkeypatch.setattr("shardvault.backup.files.open_file", no_reads)
    second = vault.cli("backup", "src", "--json")
    assert second.exit_code == 0, second.output
    doc = json.loads(second.stdout)
    assert doc["snapshot"]["kind"] == "incremental"
    assert doc["stats"]["files_read"] == 0 and doc["stats"]["bytes_read"] == 0
    assert doc["stats"]["files_unchanged"] == doc["stats"]["files"] > 10_000
    assert doc["stats"]["bytes_new"] == 0


def test_an_unchanged_files_line_is_written_again_only_when_every_field_is_the_same(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: an unchanged re-backup writes the parent's lines again instead of encoding each entry anew."""
    import shardvault.tree

    assert vault.cli("backup", "src").exit_code == 0
    touched = vault.source / "dir0" / "file0.txt"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns - 10**9, st.st_mtime_ns))  # only its atime moves (no new ctime)
    encoded: list[str] = []
    encode = shardvault.tree._encode
    monkeypatch.setattr(shardvault.tree, "_encode", lambda doc: encoded.append(doc["p"]) or encode(doc))
    assert vault.cli("backup", "src").exit_code == 0
    monkeypatch.undo()
    with vault.repo() as repo:
        first, second = sorted(repo.snapshots(), key=lambda s: s.finished)[-2:]
        before = {e.path: e for e in repo.iter_tree(first)}
        after = list(repo.iter_tree(second, keep_lines=True))
    assert after and all(e.line is not None for e in after)
    for entry in after:
        # The line as written decodes to the same entry, and is what encoding that entry gives.
        assert entry.to_line() == dataclasses.replace(entry, line=None).to_line(), entry.path
    # Files: the one whose atime moved has a new line (directories' atimes move as the backup lists them).
    changed = [e.path for e in after if e.type == FILE and e != before[e.path]]
    assert changed == ["dir0/file0.txt"], changed
    assert [p for p in encoded if before[p].type == FILE] == changed  # the other files' lines: written again
    assert next(e for e in after if e.path == "dir0/file0.txt").atime_ns == st.st_atime_ns - 10**9


def test_incremental_reads_only_changed_files_and_full_reads_all(vault: Vault, tmp_path: Path) -> None:
    assert vault.cli("backup", "src").exit_code == 0
    (vault.source / "dir0" / "file0.txt").write_bytes(b"changed content")
    (vault.source / "added.bin").write_bytes(os.urandom(200_000))
    os.unlink(vault.source / "dir1" / "private")
    inc = json.loads(vault.cli("backup", "src", "--json").stdout)
    assert inc["stats"]["files_read"] == 2
    assert 200_000 <= inc["stats"]["bytes_new"] < 300_000
    full = json.loads(vault.cli("backup", "src", "--full", "--json").stdout)
    assert full["snapshot"]["kind"] == "full"
    assert full["stats"]["files_read"] == full["stats"]["files"]
    assert full["stats"]["bytes_new"] == 0  # everything deduplicates
    result = vault.cli("restore", inc["snapshot"]["id"], "--target", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert_same_tree(vault.source, tmp_path / "out")


def test_older_snapshot_restores_its_own_state(vault: Vault, tmp_path: Path) -> None:
    first = json.loads(vault.cli("backup", "src", "--json").stdout)["snapshot"]["id"]
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(vault.source, copy, symlinks=True)
    (vault.source / "large1.bin").write_bytes(b"replaced")
    assert vault.cli("backup", "src").exit_code == 0
    result = vault.cli("restore", first[:8], "--target", str(tmp_path / "old"))
    assert result.exit_code == 0, result.output
    assert_same_tree(copy, tmp_path / "old")


def test_snapshot_listing_and_prefixes(vault: Vault) -> None:
    for _ in range(2):
        assert vault.cli("backup", "src").exit_code == 0
    text = vault.cli("snapshots").stdout
    assert "2 snapshot(s)" in text and "incremental" in text and "full" in text
    snaps = json.loads(vault.cli("snapshots", "--json", "--source", "src").stdout)
    assert [s["kind"] for s in snaps] == ["full", "incremental"]
    assert snaps[1]["parent"] == snaps[0]["id"]
    assert json.loads(vault.cli("snapshots", "--json", "--source", "other").stdout) == []


def test_peers_command(vault: Vault) -> None:
    assert vault.cli("backup", "src").exit_code == 0
    rows = json.loads(vault.cli("peers", "--json").stdout)
    assert [r["name"] for r in rows] == [f"p{i}" for i in range(6)]
    assert all(r["reachable"] and r["shards"] > 0 for r in rows)
    counts = {r["shards"] for r in rows}
    assert len(counts) == 1  # 6 peers, n = 6: one shard of every pack on each
    vault.peer(3).rename(vault.peers_dir / "gone")
    rows = json.loads(vault.cli("peers", "--json").stdout)
    assert not rows[3]["reachable"] and "does not exist" in rows[3]["error"]


def test_check_reports_states_and_missing_shards_by_peer(vault: Vault) -> None:
    assert vault.cli("backup", "src").exit_code == 0
    healthy = json.loads(vault.cli("check", "--json").stdout)
    assert healthy["damaged"] is False and healthy["packs"]["degraded"] == 0
    one = vault.shards(0)[0]
    one.unlink()
    text = vault.cli("check")
    assert text.exit_code == 6
    assert f"missing shard {one.relative_to(vault.peer(0))} on peer p0" in text.stdout
    assert "DEGRADED" in text.stdout
    assert "shardvault: error: Damage found: packs:" in text.stderr


def test_backup_source_must_be_a_directory(vault: Vault) -> None:
    from shardvault.sources.files import walk

    with pytest.raises(SourceError, match="is not a directory"):
        list(walk(vault.source / "empty"))


@pytest.mark.s3
def test_repository_on_s3_and_local_peers(s3_server: str, tmp_path: Path) -> None:
    """Three peers on a real S3 server (loopback), three local; 3-of-6; lose two S3 peers."""
    source = tmp_path / "src"
    from conftest import make_tree

    make_tree(source, files=20, big=1 << 20)
    peers = local_peers(tmp_path / "peers", 3)
    peers += [{"name": f"s{i}", "url": f"s3://sv-e2e/peer{i}", "endpoint": s3_server, "zone": "s3"} for i in range(3)]
    config = write_config(
        tmp_path / "sv.toml", peers, {"src": source}, k=3, n=6, state_dir=str(tmp_path / "st"), **SMALL
    )
    vault = Vault(tmp_path, config, tmp_path / "peers", source)
    import boto3
    from botocore.config import Config

    boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    ).create_bucket(Bucket="sv-e2e")
    assert vault.cli("init").exit_code == 0
    result = vault.cli("backup", "src")
    assert result.exit_code == 0, result.output
    assert vault.cli("check", "--read-data").exit_code == 0
    rows = json.loads(vault.cli("peers", "--json").stdout)
    assert all(r["shards"] > 0 for r in rows)
    client = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    )
    for prefix in ("peer0/", "peer1/"):
        for obj in client.list_objects_v2(Bucket="sv-e2e", Prefix=prefix).get("Contents", []):
            client.delete_object(Bucket="sv-e2e", Key=obj["Key"])
    result = vault.cli("restore", "latest", "--source", "src", "--target", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert_same_tree(source, tmp_path / "out")
