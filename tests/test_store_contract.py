"""One contract for every peer type (borgstore style): local directory and S3.

The S3 store runs against moto's server, a real HTTP S3 endpoint on
loopback; nothing is mocked in-process.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import free_port

from shardvault.errors import (
    InvalidObjectNameError,
    ObjectNotFoundError,
    PeerError,
    PeerReadOnlyError,
    PeerUnavailableError,
)
from shardvault.shards.stores import LocalStore, PeerStore, open_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PeerStore]:
    if request.param == "local":
        s = open_store("peer", f"file://{tmp_path / 'peer'}")
    else:
        endpoint = request.getfixturevalue("s3_server")
        s = open_store("peer", f"s3://bucket-{secrets.token_hex(4)}/some/prefix", endpoint=endpoint)
    s.create()
    yield s
    s.close()


def test_store_load_roundtrip(store: PeerStore) -> None:
    store.store("config", b"hello")
    store.store("data/ab/abcd.00", b"\x00" * 100_000)
    assert store.load("config") == b"hello"
    assert store.load("data/ab/abcd.00") == b"\x00" * 100_000
    assert store.info("data/ab/abcd.00").size == 100_000


def test_store_replaces_whole_object(store: PeerStore) -> None:
    store.store("keys/k1", b"first version, long")
    store.store("keys/k1", b"second")
    assert store.load("keys/k1") == b"second"


def test_missing_objects(store: PeerStore) -> None:
    with pytest.raises(ObjectNotFoundError):
        store.load("index/nothing")
    with pytest.raises(ObjectNotFoundError):
        store.info("index/nothing")
    with pytest.raises(ObjectNotFoundError):
        store.delete("index/nothing")


def test_delete(store: PeerStore) -> None:
    store.store("snapshots/s1", b"x")
    store.delete("snapshots/s1")
    with pytest.raises(ObjectNotFoundError):
        store.load("snapshots/s1")


def test_list_by_prefix_with_sizes(store: PeerStore) -> None:
    store.store("index/a", b"1")
    store.store("index/b", b"22")
    store.store("data/00/x.01", b"333")
    store.store("config", b"4444")
    assert sorted((i.name, i.size) for i in store.list("index/")) == [("index/a", 1), ("index/b", 2)]
    assert sorted(i.name for i in store.list("")) == ["config", "data/00/x.01", "index/a", "index/b"]
    assert list(store.list("snapshots/")) == []


@pytest.mark.parametrize(
    "name", ["", "../escape", "data/../../etc/passwd", "/abs", "UPPER", "a//b", ".hidden", "a/.tmp", "x" * 300, "a\0b"]
)
def test_invalid_names_rejected_at_the_boundary(store: PeerStore, name: str) -> None:
    with pytest.raises(InvalidObjectNameError):
        store.store(name, b"x")
    with pytest.raises(InvalidObjectNameError):
        store.load(name)


def test_unreachable_peer(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    local = open_store("gone", f"file://{tmp_path / 'missing'}")
    dead = open_store("dead", "s3://bucket/p", endpoint=f"http://127.0.0.1:{free_port()}")
    for s in (local, dead):
        with pytest.raises(PeerUnavailableError):
            s.probe()
        with pytest.raises(PeerUnavailableError):
            s.store("config", b"x")
        with pytest.raises(PeerUnavailableError):
            s.load("config")


def test_missing_bucket_is_unreachable(s3_server: str) -> None:
    s = open_store("nob", "s3://no-such-bucket/p", endpoint=s3_server)
    with pytest.raises(PeerUnavailableError, match="does not exist"):
        s.probe()


def test_local_read_only_peer(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    s = open_store("ro", f"file://{root}")
    s.create()
    s.store("config", b"x")
    # As root, permission bits do not stop writes; the immutable flag does.
    if subprocess.run(["chattr", "+i", str(root)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        with pytest.raises(PeerReadOnlyError):
            s.store("index/new", b"y")
        with pytest.raises(PeerReadOnlyError):
            s.create()
        assert s.load("config") == b"x"
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=True)


def test_local_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies half-way leaves the old object and no visible debris."""
    import os

    s = open_store("peer", f"file://{tmp_path / 'peer'}")
    s.create()
    s.store("config", b"old")
    real_write = os.write

    def failing_write(fd: int, data: object) -> int:
        real_write(fd, b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(PeerReadOnlyError):
        s.store("config", b"new content")
    monkeypatch.undo()
    assert s.load("config") == b"old"
    assert [i.name for i in s.list("")] == ["config"]
    assert not [p for p in (tmp_path / "peer").rglob(".tmp-*")]


def test_local_peer_whose_directory_vanished_is_not_recreated(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    root.mkdir()
    store = open_store("p", f"file://{root}")
    store.store("data/aa/first.00", b"x")
    root.rename(tmp_path / "unmounted")  # the disk goes away between two writes
    with pytest.raises(PeerUnavailableError):
        store.store("data/bb/second.00", b"y")
    assert not root.exists()
    # Also when it vanishes after the store's first look (the race a backup once hit):
    # creating the object's directories must not re-create the root.
    assert isinstance(store, LocalStore)
    with pytest.raises(FileNotFoundError):
        store._mkdirs(root / "data" / "cc")
    assert not root.exists()


# --- leftovers: temporaries of killed writes ---------------------------------------------


def _plant_leftover(store: PeerStore, monkeypatch: pytest.MonkeyPatch) -> str:
    """Leave a temporary object behind the way a killed run does; return its name."""
    if isinstance(store, LocalStore):
        import os

        def killed(src: object, dst: object) -> None:
            raise KeyboardInterrupt  # the process dies between the write and the rename

        monkeypatch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            store.store("data/ab/abcd.03", b"half a shard")
        monkeypatch.undo()
        (tmp,) = (store.root / "data" / "ab").glob(".tmp-*")
        return f"data/ab/{tmp.name}"
    # S3 writes are single atomic PUTs; what a killed init leaves is create()'s probe object.
    from shardvault.shards.stores.s3 import S3Store

    assert isinstance(store, S3Store)
    store.client.put_object(Bucket=store.bucket, Key=store.prefix + ".probe", Body=b"")
    return ".probe"


def test_leftovers_are_listed_apart_and_can_be_deleted(store: PeerStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.store("config", b"c")
    assert list(store.list_leftovers()) == []  # create() cleaned up its own probe
    name = _plant_leftover(store, monkeypatch)
    assert [i.name for i in store.list("")] == ["config"]  # list() never shows a torn write
    leftovers = list(store.list_leftovers())
    assert [i.name for i in leftovers] == [name]
    store.delete_leftover(name)
    assert list(store.list_leftovers()) == []
    with pytest.raises(ObjectNotFoundError):
        store.delete_leftover(name)
    assert store.load("config") == b"c"


@pytest.mark.parametrize(
    "name", ["config", "data/ab/abcd.03", ".hidden", "../.tmp-00", "a//.tmp-00", "/.tmp-00", ".tmp-XY", "x/.probe-zz"]
)
def test_delete_leftover_never_deletes_a_real_object(store: PeerStore, name: str) -> None:
    store.store("config", b"c")
    store.store("data/ab/abcd.03", b"shard")
    with pytest.raises(InvalidObjectNameError):
        store.delete_leftover(name)
    assert store.load("config") == b"c" and store.load("data/ab/abcd.03") == b"shard"


def test_default_store_has_no_leftovers() -> None:
    """A store type whose writes leave no temporaries inherits the empty default."""

    class Plain(LocalStore):
        pass

    base_list = PeerStore.list_leftovers
    assert list(base_list(Plain("p", "/nonexistent"))) == []
    with pytest.raises(ObjectNotFoundError):
        PeerStore.delete_leftover(Plain("p", "/nonexistent"), ".tmp-00")


def test_local_create_makes_only_the_last_directory(tmp_path: Path) -> None:
    s = open_store("typo", f"file://{tmp_path / 'mnt' / 'dsik3' / 'peer'}")
    with pytest.raises(PeerUnavailableError, match=f"parent directory {tmp_path / 'mnt' / 'dsik3'} does not exist"):
        s.create()
    assert not (tmp_path / "mnt").exists()


def test_retention_without_a_lock(store: PeerStore) -> None:
    """A peer without object lock keeps no retention, and cannot be asked to extend one."""
    store.store("index/a", b"1")
    assert store.retention("index/a") is None
    with pytest.raises(ObjectNotFoundError):
        store.retention("index/absent")
    with pytest.raises(PeerError, match="keeps no retention"):
        store.extend_retention("index/a", datetime.now(UTC))


# --- local peers write large objects past the page cache (O_DIRECT) -----------------------------

BIG = 3 * (1 << 20) + 12345  # several bounce buffers and a partial last block


def _direct_opens(monkeypatch: pytest.MonkeyPatch, refuse: bool = False) -> list[int]:
    """Record the flags of every file opened for writing; ``refuse``: O_DIRECT fails as on tmpfs (after creating)."""
    import os

    opened: list[int] = []
    real_open = os.open

    def recording(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_CREAT:
            opened.append(flags)
            if refuse and flags & os.O_DIRECT:
                real_open(path, os.O_WRONLY | os.O_CREAT, 0o644)  # created, then refused
                raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", recording)
    return opened


def _local_peer(tmp_path: Path) -> PeerStore:
    s = open_store("peer", f"file://{tmp_path / 'peer'}")
    s.create()
    return s


def _stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, refuse: bool = False) -> list[int]:
    """Store ``size`` random bytes on a local peer, read them back whole; the flags of each file opened."""
    s = _local_peer(tmp_path)
    data = secrets.token_bytes(size)
    opened = _direct_opens(monkeypatch, refuse)
    s.store("config", data)
    monkeypatch.undo()
    assert s.load("config") == data
    assert not [p for p in (tmp_path / "peer").rglob(".tmp-*")]
    return opened


@pytest.mark.parametrize("size", [BIG, 1 << 20, (1 << 20) - 1])
def test_local_large_objects_are_written_direct_and_read_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    import os

    opened = _stored(tmp_path, monkeypatch, size)
    assert [bool(flags & os.O_DIRECT) for flags in opened] == [size >= 1 << 20]


def test_local_store_falls_back_when_the_filesystem_refuses_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    opened = _stored(tmp_path, monkeypatch, BIG, refuse=True)
    assert [bool(flags & os.O_DIRECT) for flags in opened] == [True, False]


def test_local_direct_write_cut_short_finishes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    s = _local_peer(tmp_path)
    data = secrets.token_bytes(BIG)
    real_write = os.write
    calls: list[int] = []

    def short_once(fd: int, block: object) -> int:
        calls.append(fd)
        if len(calls) == 2:  # the second bounce buffer: one block of it gets through, the rest is left
            return real_write(fd, memoryview(block)[:4096])  # type: ignore[arg-type]
        return real_write(fd, block)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", short_once)
    s.store("config", data)
    monkeypatch.undo()
    assert s.load("config") == data
