"""Bucket sources against a real S3 server on loopback (moto's server)."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from conftest import Vault, make_vault

from shardvault.crypto import content_hash


def _client(endpoint: str) -> Any:
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    )


def _state(client: Any, bucket: str, prefix: str = "") -> dict[str, tuple[str, str, dict[str, str]]]:
    """key -> (content hash, content type, user metadata): what a restore must reproduce."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            got = client.get_object(Bucket=bucket, Key=item["Key"])
            key = item["Key"][len(prefix) :]
            out[key] = (content_hash(got["Body"].read()).hex(), got["ContentType"], got["Metadata"])
    return out


@pytest.fixture
def bucket_vault(tmp_path: Path, s3_server: str) -> tuple[Vault, Any, str]:
    vault = make_vault(tmp_path)
    bucket = f"src-{secrets.token_hex(4)}"
    client = _client(s3_server)
    client.create_bucket(Bucket=bucket)
    with open(vault.config, "a") as f:
        f.write(f'[[sources]]\nname = "media"\ntype = "bucket"\nendpoint = "{s3_server}"\nbucket = "{bucket}"\n')
        f.write('prefix = "app/"\n')
    return vault, client, bucket


def _put(client: Any, bucket: str, key: str, data: bytes, **extra: Any) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=data, **extra)


def _json(vault: Vault, *args: str) -> dict[str, Any]:
    result = vault.cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_bucket_backups_follow_changes_and_restore_each_state_exactly(
    bucket_vault: tuple[Vault, Any, str], s3_server: str, tmp_path: Path
) -> None:
    vault, client, bucket = bucket_vault
    for i in range(150):  # many small objects
        _put(client, bucket, f"app/small/{i:03d}.txt", f"object {i}\n".encode() * (i + 1), ContentType="text/plain")
    big = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    for i in range(2):  # a few large, multipart ones
        client.upload_fileobj(
            io.BytesIO(secrets.token_bytes(12 << 20)),
            bucket,
            f"app/large/{i}.bin",
            ExtraArgs={"ContentType": "application/octet-stream", "Metadata": {"owner": f"team-{i}"}},
            Config=big,
        )
    _put(client, bucket, "app/meta.json", b'{"a": 1}', ContentType="application/json", Metadata={"k": "v"})
    _put(client, bucket, "outside/not-backed-up.txt", b"other prefix")
    first_state = _state(client, bucket, "app/")
    first = _json(vault, "backup", "media")
    assert first["snapshot"]["kind"] == "full" and first["stats"]["files"] == 153

    # Changed, deleted and added objects.
    for i in (1, 2, 3):
        _put(client, bucket, f"app/small/{i:03d}.txt", b"changed", ContentType="text/plain")
    client.delete_object(Bucket=bucket, Key="app/small/010.txt")
    client.delete_object(Bucket=bucket, Key="app/large/1.bin")
    _put(client, bucket, "app/new/a.txt", b"new a", Metadata={"fresh": "yes"})
    _put(client, bucket, "app/new/b.txt", b"new b")
    second_state = _state(client, bucket, "app/")
    second = _json(vault, "backup", "media")
    assert second["snapshot"]["kind"] == "incremental"
    assert second["stats"]["files_read"] == 5  # only what changed was read
    assert second["stats"]["files"] == 153  # two deleted, two added
    assert second["snapshot"]["stats"]["bucket"]["deleted_since_parent"] == 2

    # The older snapshot into another bucket: exactly the first state, deleted objects included.
    _json(vault, "restore", first["snapshot"]["id"], "--to-bucket", "restored-first", "--endpoint", s3_server)
    assert _state(client, "restored-first") == first_state
    # The newer one, with a prefix.
    _json(vault, "restore", second["snapshot"]["id"], "--to-bucket", "restored-second", "--to-prefix", "x/")
    assert _state(client, "restored-second", "x/") == second_state
    # Back into the source bucket, removing what the snapshot does not have.
    _put(client, bucket, "app/stray.txt", b"created after the snapshot")
    _json(vault, "restore", first["snapshot"]["id"], "--to-bucket", bucket, "--to-prefix", "app/", "--delete")
    assert _state(client, bucket, "app/") == first_state
    assert "outside/not-backed-up.txt" in {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}

    # And to a local directory.
    out = tmp_path / "local"
    _json(vault, "restore", second["snapshot"]["id"], "--target", str(out))
    assert (out / "new" / "a.txt").read_bytes() == b"new a"
    assert content_hash((out / "large" / "0.bin").read_bytes()).hex() == second_state["large/0.bin"][0]


def test_unreachable_or_missing_bucket_is_one_clear_line(bucket_vault: tuple[Vault, Any, str]) -> None:
    vault, client, bucket = bucket_vault
    client.delete_bucket(Bucket=bucket)
    result = vault.cli("backup", "media")
    assert result.exit_code == 10 and "NoSuchBucket" in result.output and "Traceback" not in result.output


def test_bucket_config_errors_name_the_key(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from conftest import local_peers, write_config

    from shardvault.cli import main

    config = write_config(tmp_path / "c.toml", local_peers(tmp_path), {}, k=1, n=1, allow_no_redundancy=True)
    with open(config, "a") as f:
        f.write('[[sources]]\nname = "media"\ntype = "bucket"\nendpoint = "http://127.0.0.1:1"\n')
    result = CliRunner().invoke(main, ["--config", str(config), "snapshots"], env={"SHARDVAULT_PASSWORD": "x"})
    assert result.exit_code == 3 and "sources[0].bucket: is required" in result.output
