"""A hostile pass over restore fidelity and browsing: what a careless operator or an unlucky file system does.

Sparse files that change shape, hard links cut by a selection or torn
between their names' reads, attributes the target cannot hold, immutable
entries met by a second restore, special files over regular ones, and
errors with progress turned on.  Every failure must be an exit code and one
clear line, never a traceback.  The pass found nine defects (a sparse file
shrinking while read, metadata of unchanged files with if-changed, names of
one inode read with different content, a hash mismatch reported as a lost
pack, inherited default ACLs, an attribute too big for the target, an
immutable tree restored again, progress of sparse files on backup and
restore); each test here failed before its fix.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    APPEND,
    BIN,
    IMMUTABLE,
    NODUMP,
    PASSWORD,
    Vault,
    inode_flags,
    make_vault,
    set_inode_flags,
    unlock_all,
)

from shardvault.config import load_config

MIB = 1 << 20
NS = 10**9


# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Vault]:
    """A vault whose source starts empty (each test builds what it needs)."""
    v = make_vault(tmp_path)
    shutil.rmtree(v.source)
    v.source.mkdir()
    try:
        yield v
    finally:
        unlock_all(tmp_path)


def _no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def _backup(vault: Vault, *extra: str) -> dict[str, Any]:
    result = vault.run("backup", "src", "--json", *extra)
    _no_traceback(result)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def _restore(vault: Vault, target: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = vault.run("restore", "latest", "--target", str(target), *extra)
    _no_traceback(result)
    return result


def _dump(vault: Vault, path: str) -> subprocess.CompletedProcess[bytes]:
    """``dump`` through the real CLI, stdout as bytes."""
    return subprocess.run(
        [str(BIN / "shardvault"), "--config", str(vault.config), "dump", "latest", path],
        capture_output=True,
        env=os.environ | {"SHARDVAULT_PASSWORD": PASSWORD},
        timeout=120,
    )


def _sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)


def _data_map(path: Path) -> list[tuple[int, int]]:
    """(offset, end) of every data region, as SEEK_DATA/SEEK_HOLE see them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, offset, regions = os.fstat(fd).st_size, 0, []
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            regions.append((start, end))
            offset = end
        return regions
    finally:
        os.close(fd)


def _mount(kind: str, where: Path, options: str = "") -> None:
    where.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", kind, *(["-o", options] if options else []), kind, str(where)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount {kind}: {result.stderr.strip()}")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


# --- sparse files ----------------------------------------------------------------------------------


def test_sparse_holes_at_start_and_end_restore_dump_and_path(vault: Vault, tmp_path: Path) -> None:
    src = vault.source
    tail = os.urandom(4096 + 17)
    _sparse(src / "tail.img", 64 * MIB, [(64 * MIB - len(tail), tail)])  # a hole, then data to the end
    head = os.urandom(8192)
    _sparse(src / "head.img", 32 * MIB, [(0, head)])  # data, then a hole to the end
    _sparse(src / "none.img", 16 * MIB, [])  # one hole
    (src / "sub").mkdir()
    _sparse(src / "sub" / "mid.img", 8 * MIB, [(3 * MIB + 5, b"x" * 70_000)])
    doc = _backup(vault)
    assert doc["stats"]["bytes_read"] < MIB

    target = tmp_path / "out"
    result = _restore(vault, target)
    assert result.returncode == 0, result.stderr
    for rel in ("tail.img", "head.img", "none.img", "sub/mid.img"):
        a, b = src / rel, target / rel
        assert a.stat().st_size == b.stat().st_size, rel
        assert _data_map(a) == _data_map(b), rel
        assert b.stat().st_blocks <= a.stat().st_blocks, rel
        assert a.read_bytes() == b.read_bytes(), rel

    # dump of one sparse file: the logical content byte for byte, holes as zeros.
    for rel in ("tail.img", "none.img", "sub/mid.img"):
        dumped = _dump(vault, rel)
        assert dumped.returncode == 0, dumped.stderr
        assert dumped.stdout == (src / rel).read_bytes(), rel

    # --path of the sparse file alone: written under its own name, still sparse.
    one = tmp_path / "one"
    result = _restore(vault, one, "--path", "sub/mid.img")
    assert result.returncode == 0, result.stderr
    assert os.listdir(one) == ["mid.img"]
    assert (one / "mid.img").read_bytes() == (src / "sub" / "mid.img").read_bytes()
    assert _data_map(one / "mid.img") == _data_map(src / "sub" / "mid.img")


def test_sparse_file_that_fills_up_and_empties_between_backups(vault: Vault, tmp_path: Path) -> None:
    img = vault.source / "disk.img"
    _sparse(img, 4 * MIB, [(MIB, b"a" * 5000)])
    _backup(vault)
    with open(img, "r+b") as f:  # every hole written: the file is dense now, same size
        f.write(os.urandom(4 * MIB))
    dense = img.read_bytes()
    _backup(vault)
    out = tmp_path / "dense"
    assert _restore(vault, out).returncode == 0
    assert (out / "disk.img").read_bytes() == dense
    # Back to sparse, with data at another place; the file keeps its inode.
    with open(img, "r+b") as f:
        f.truncate(0)
        f.truncate(4 * MIB)
        f.seek(3 * MIB)
        f.write(b"z" * 100)
    _backup(vault)
    out = tmp_path / "sparse-again"
    assert _restore(vault, out).returncode == 0
    assert (out / "disk.img").read_bytes() == img.read_bytes()
    assert _data_map(out / "disk.img") == _data_map(img)
    # And an incremental run with nothing changed reuses the extents: still right.
    doc = _backup(vault)
    assert doc["stats"]["files_read"] == 0
    out = tmp_path / "reused"
    assert _restore(vault, out).returncode == 0
    assert (out / "disk.img").read_bytes() == img.read_bytes()
    assert _data_map(out / "disk.img") == _data_map(img)


@pytest.mark.parametrize("mode", ["if-changed", "always"])
def test_sparse_file_over_an_existing_file(vault: Vault, tmp_path: Path, mode: str) -> None:
    img = vault.source / "disk.img"
    _sparse(img, 8 * MIB, [(2 * MIB, b"data" * 1000)])
    _backup(vault)
    target = tmp_path / "t"
    target.mkdir()
    (target / "disk.img").write_bytes(b"\x01" * (8 * MIB))  # same size, other content, dense
    result = _restore(vault, target, "--overwrite", mode)
    assert result.returncode == 0, result.stderr
    assert (target / "disk.img").read_bytes() == img.read_bytes()
    assert _data_map(target / "disk.img") == _data_map(img)
    # Again, now the same content: if-changed leaves it, always writes it; both keep the holes.
    result = _restore(vault, target, "--overwrite", mode)
    assert result.returncode == 0, result.stderr
    assert (target / "disk.img").read_bytes() == img.read_bytes()
    assert _data_map(target / "disk.img") == _data_map(img)


def test_sparse_file_truncated_while_read_is_restored_as_read(
    vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardvault.backup import files as backup_files
    from shardvault.backup.files import run_backup

    img = vault.source / "disk.img"
    _sparse(img, 8 * MIB, [(MIB, os.urandom(200_000)), (5 * MIB, os.urandom(200_000))])
    original = backup_files._Range.readinto
    done = {"cut": False}

    def readinto(self: Any, buffer: memoryview, /) -> int:
        if not done["cut"]:
            done["cut"] = True
            os.truncate(img, MIB + 50_000)  # an unlucky writer shrinks the file under the reader
        return original(self, buffer)

    monkeypatch.setattr(backup_files._Range, "readinto", readinto)
    with vault.repo() as repo:
        result = run_backup(repo, load_config(vault.config).source("src"))
    monkeypatch.undo()
    assert result.stats.changed_while_read, "the shrink is seen"
    out = tmp_path / "out"
    restored = _restore(vault, out)
    # What was read is what comes back (restic and tar restore a torn file as stored, with the warning at backup).
    assert restored.returncode == 0, restored.stderr
    assert (out / "disk.img").exists()


# --- overwrite if-changed: content left, metadata given back -------------------------------------


def test_if_changed_gives_unchanged_files_their_metadata_back(vault: Vault, tmp_path: Path) -> None:
    f = vault.source / "f.txt"
    f.write_bytes(b"content\n" * 100)
    os.chmod(f, 0o640)
    os.setxattr(f, "user.tag", b"v1")
    os.utime(f, ns=(1_700_000_000 * NS + 1, 1_600_000_000 * NS + 2))
    _backup(vault)
    target = tmp_path / "t"
    assert _restore(vault, target).returncode == 0
    g = target / "f.txt"
    os.chmod(g, 0o777)
    os.chown(g, 4242, 4242)
    os.removexattr(g, "user.tag")
    os.utime(g, ns=(5 * NS, 5 * NS))
    result = _restore(vault, target, "--overwrite", "if-changed")
    assert result.returncode == 0, result.stderr
    st = g.lstat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert st.st_mtime_ns == 1_600_000_000 * NS + 2
    assert os.getxattr(g, "user.tag") == b"v1"


# --- hard links ------------------------------------------------------------------------------------


def _link_tree(src: Path) -> bytes:
    content = os.urandom(100_000)
    (src / "a").mkdir()
    (src / "b").mkdir()
    (src / "a" / "first").write_bytes(content)
    os.link(src / "a" / "first", src / "a" / "second")
    os.link(src / "a" / "first", src / "b" / "third")
    return content


def test_hard_links_cut_by_exclude_and_path(vault: Vault, tmp_path: Path) -> None:
    content = _link_tree(vault.source)
    _backup(vault)
    # The first name excluded: the other two are one inode with the content.
    out = tmp_path / "ex"
    result = _restore(vault, out, "--exclude", "a/first")
    assert result.returncode == 0, result.stderr
    assert not (out / "a" / "first").exists()
    s, t = (out / "a" / "second").stat(), (out / "b" / "third").stat()
    assert s.st_ino == t.st_ino and s.st_nlink == 2
    assert (out / "b" / "third").read_bytes() == content
    # --path a: two names inside, the third outside the selection.
    out = tmp_path / "path"
    result = _restore(vault, out, "--path", "a")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["first", "second"]
    f, s = (out / "first").stat(), (out / "second").stat()
    assert f.st_ino == s.st_ino and f.st_nlink == 2
    # --path b: only the third name, a plain file with the content.
    out = tmp_path / "pathb"
    result = _restore(vault, out, "--path", "b")
    assert result.returncode == 0, result.stderr
    assert os.listdir(out) == ["third"]
    assert (out / "third").stat().st_nlink == 1 and (out / "third").read_bytes() == content
    # --path of the second name, a file: itself only.
    out = tmp_path / "file"
    result = _restore(vault, out, "--path", "a/second")
    assert result.returncode == 0, result.stderr
    assert os.listdir(out) == ["second"] and (out / "second").read_bytes() == content
    # dump of b: the third name carries the content (its first name in the stream).
    dumped = _dump(vault, "b")
    assert dumped.returncode == 0, dumped.stderr
    with tarfile.open(fileobj=io.BytesIO(dumped.stdout), mode="r:") as tar:
        member = tar.getmember("b/third")
        assert member.isreg()
        extracted = tar.extractfile(member)
        assert extracted is not None and extracted.read() == content


@pytest.mark.parametrize("mode", ["always", "if-changed"])
def test_hard_links_over_other_files_in_the_target(vault: Vault, tmp_path: Path, mode: str) -> None:
    content = _link_tree(vault.source)
    _backup(vault)
    target = tmp_path / "t"
    (target / "a").mkdir(parents=True)
    (target / "b").mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"not yours")
    (target / "a" / "first").write_bytes(content)  # the same content, another inode
    os.link(outside, target / "a" / "second")  # a hard link to a file outside the target
    (target / "b" / "third").write_bytes(b"other")
    result = _restore(vault, target, "--overwrite", mode)
    assert result.returncode == 0, result.stderr
    inodes = {(target / p).stat().st_ino for p in ("a/first", "a/second", "b/third")}
    assert len(inodes) == 1
    assert (target / "a" / "first").stat().st_nlink == 3
    assert (target / "b" / "third").read_bytes() == content
    assert outside.read_bytes() == b"not yours", "a file outside the target was written through a link"
    assert not [p for p in target.rglob(".shardvault-*")]


def test_hard_link_that_changed_between_its_names_reads(
    vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardvault.backup import files as backup_files
    from shardvault.backup.files import run_backup

    _link_tree(vault.source)
    original = backup_files._read_file

    def read_file(run: Any, item: Any, *rest: Any) -> None:
        original(run, item, *rest)
        if item.entry.path == "a/first":  # a writer rewrites the inode between the reads of its names
            with open(vault.source / "a" / "first", "r+b") as f:
                f.write(b"CHANGED" * 100)

    monkeypatch.setattr(backup_files, "_read_file", read_file)
    with vault.repo() as repo:
        run_backup(repo, load_config(vault.config).source("src"))
    monkeypatch.undo()
    with vault.repo() as repo:
        snap = repo.resolve_snapshot("latest", None)
        hashes = {e.path: e.hash for e in repo.iter_tree(snap) if e.type == "f"}
    assert hashes["a/first"] != hashes["b/third"], "the test's premise: two contents under one inode"
    out = tmp_path / "out"
    result = _restore(vault, out, "--json")
    from shardvault.crypto import new_content_hasher

    for rel in ("a/first", "a/second", "b/third"):
        h = new_content_hasher()
        h.update((out / rel).read_bytes())
        assert h.hexdigest() == hashes[rel] or result.returncode != 0, f"{rel} does not match its recorded hash"


def test_hard_link_whose_first_name_is_lost_is_data_loss(vault: Vault, tmp_path: Path) -> None:
    content = _link_tree(vault.source)
    (vault.source / "z-other").write_bytes(b"kept")
    _backup(vault)
    with vault.repo() as repo:
        snap = repo.resolve_snapshot("latest", None)
        entry = next(e for e in repo.iter_tree(snap) if e.path == "a/first")
        pack_id = repo.index.blobs[bytes.fromhex(entry.chunks[0])].pack_id
        record = repo.index.packs[pack_id]
    # Three of six shards corrupted (k = 4): present, so the plan goes ahead; the read fails.
    for shard in record.shards[:3]:
        path = vault.peer(int(shard.peer[1:])) / "data" / pack_id[:2] / f"{pack_id}.{shard.num:02d}"
        if not path.exists():
            path = vault.peers_dir / shard.peer / "data" / pack_id[:2] / f"{pack_id}.{shard.num:02d}"
        data = bytearray(path.read_bytes())
        for i in range(100, len(data), 997):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = _restore(vault, out)
    assert result.returncode == 7, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("shardvault: error")]
    assert len(lines) == 1, result.stderr
    assert "a/first" in lines[0] or "3 file(s)" in lines[0], lines[0]
    for rel in ("a/first", "a/second", "b/third"):  # never a wrong or partial file under the name
        p = out / rel
        assert not p.exists() or p.read_bytes() == content, rel
    assert not [p for p in out.rglob(".shardvault-*")]


def test_ls_long_json_shows_link_counts(vault: Vault, tmp_path: Path) -> None:
    _link_tree(vault.source)
    (vault.source / "single").write_bytes(b"1")
    _backup(vault)
    result = vault.run("ls", "latest", "--recursive", "--long", "--json")
    assert result.returncode == 0, result.stderr
    docs = {d["path"]: d for d in json.loads(result.stdout)["entries"]}
    assert docs["a/first"]["links"] == 3 and docs["b/third"]["links"] == 3
    assert "links" not in docs["single"] and "links" not in docs["a"]
    plain = vault.run("ls", "latest", "a", "--long")
    assert plain.returncode == 0 and "first" in plain.stdout


def test_hash_mismatch_is_named_as_such(vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shardvault.backup import files as backup_files
    from shardvault.backup.files import run_backup

    (vault.source / "f").write_bytes(b"some content" * 1000)
    original = backup_files._read_file

    def read_file(run: Any, item: Any, *rest: Any) -> None:
        original(run, item, *rest)
        item.entry.hash = "00" * 32  # a recorded hash the stored content does not have

    monkeypatch.setattr(backup_files, "_read_file", read_file)
    with vault.repo() as repo:
        run_backup(repo, load_config(vault.config).source("src"))
    monkeypatch.undo()
    result = _restore(vault, tmp_path / "out")
    assert result.returncode == 7, result.stderr
    assert "0 pack(s) lost" not in result.stderr, result.stderr
    assert "hash" in result.stderr and "f" in result.stderr, result.stderr


# --- extended attributes and ACLs --------------------------------------------------------------------


def test_big_many_binary_and_security_xattrs(vault: Vault, tmp_path: Path) -> None:
    f = vault.source / "f"
    f.write_bytes(b"x")
    values = {
        "user.big": bytes(range(256)) * 12,  # 3 KiB, every byte value
        "user.nul": b"\x00\x00\xff\x00",
        "user.utf8": "éß漢".encode(),
        "user.empty": b"",
        "trusted.t": b"\xff\xfe",
    }
    for name, value in values.items():
        os.setxattr(f, name, value)
    try:
        os.setxattr(f, "security.shardvault", b"sec\x00val")
        values["security.shardvault"] = b"sec\x00val"
    except OSError:
        pass
    many = vault.source / "many"
    many.write_bytes(b"y")
    for i in range(60):
        os.setxattr(many, f"user.k{i:03d}", f"v{i}".encode())
    before = {p: {n: os.getxattr(p, n) for n in os.listxattr(p)} for p in (f, many)}
    _backup(vault)
    out = tmp_path / "out"
    result = _restore(vault, out)
    assert result.returncode == 0, result.stderr
    for p in (f, many):
        q = out / p.name
        assert {n: os.getxattr(q, n) for n in os.listxattr(q)} == before[p], p.name
    # The tar stream carries them too, binary values unchanged.
    dumped = _dump(vault, "/")
    assert dumped.returncode == 0, dumped.stderr
    with tarfile.open(fileobj=io.BytesIO(dumped.stdout), mode="r:") as tar:
        member = tar.getmember("f")
        got = {
            k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
            for k, v in member.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
    want = {k: v for k, v in before[f].items()}
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in want.items() if v}


def test_file_without_acl_does_not_inherit_its_directorys_default_acl(vault: Vault, tmp_path: Path) -> None:
    import struct

    def acl(*entries: tuple[int, int, int]) -> bytes:
        return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)

    und = 0xFFFFFFFF
    d = vault.source / "d"
    d.mkdir()
    (d / "f").write_bytes(b"created before the default ACL")
    os.chmod(d / "f", 0o600)
    default = acl((0x01, 7, und), (0x04, 5, und), (0x08, 5, 5432), (0x10, 5, und), (0x20, 0, und))
    os.setxattr(d, "system.posix_acl_default", default)
    assert "system.posix_acl_access" not in os.listxattr(d / "f")
    _backup(vault)
    out = tmp_path / "out"
    assert _restore(vault, out).returncode == 0
    assert "system.posix_acl_access" not in os.listxattr(out / "d" / "f")
    again = _restore(vault, out, "--overwrite", "always")
    assert again.returncode == 0, again.stderr
    assert "system.posix_acl_access" not in os.listxattr(out / "d" / "f")
    assert stat.S_IMODE((out / "d" / "f").stat().st_mode) == 0o600


def test_restore_to_a_file_system_without_xattrs_or_flags_notes_them(vault: Vault, tmp_path: Path) -> None:
    (vault.source / "d").mkdir()
    f = vault.source / "d" / "f"
    f.write_bytes(b"hello" * 1000)
    os.setxattr(f, "user.tag", b"1")
    set_inode_flags(f, NODUMP)
    _backup(vault)
    mnt = tmp_path / "ramfs"
    _mount("ramfs", mnt)
    try:
        target = mnt / "t"
        result = _restore(vault, target, "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert (target / "d" / "f").read_bytes() == f.read_bytes()
        assert any("d/f" in note and "user.tag" in note for note in doc["notes"]), doc["notes"]
        assert any("d/f" in note and "flags" in note for note in doc["notes"]), doc["notes"]
    finally:
        _umount(mnt)


def test_xattr_too_big_for_the_target_is_a_note(vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shardvault.backup import files as backup_files
    from shardvault.backup.files import run_backup

    f = vault.source / "f"
    f.write_bytes(b"content")
    original = backup_files.read_xattrs

    def read_xattrs(target: Any, acls: bool = True) -> dict[str, str] | None:
        found = original(target, acls) or {}
        name = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else target
        if name.endswith("/f"):  # what an XFS source holds: a 60 KiB value
            found["user.huge"] = base64.b64encode(os.urandom(60_000)).decode()
        return found or None

    monkeypatch.setattr(backup_files, "read_xattrs", read_xattrs)
    with vault.repo() as repo:
        run_backup(repo, load_config(vault.config).source("src"))
    monkeypatch.undo()
    out = tmp_path / "out"
    result = _restore(vault, out, "--json")
    assert result.returncode == 0, result.stderr
    assert (out / "f").read_bytes() == b"content"
    assert any("user.huge" in n for n in json.loads(result.stdout)["notes"])


def test_backup_without_xattrs_then_restore(vault: Vault, tmp_path: Path) -> None:
    f = vault.source / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.a", b"1")
    _backup(vault, "--no-xattrs")
    out = tmp_path / "out"
    assert _restore(vault, out).returncode == 0
    assert os.listxattr(out / "f") == []
    ls = vault.run("ls", "latest", "--json")
    assert "xattrs" not in {k for d in json.loads(ls.stdout)["entries"] for k in d}


# --- inode flags ---------------------------------------------------------------------------------------


def test_immutable_directory_and_append_only_file(vault: Vault, tmp_path: Path) -> None:
    locked = vault.source / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "f").write_bytes(b"child")
    (locked / "g").write_bytes(b"child2")
    (vault.source / "log").write_bytes(b"grows\n")
    set_inode_flags(locked, IMMUTABLE)
    set_inode_flags(vault.source / "log", APPEND)
    _backup(vault)
    out = tmp_path / "out"
    result = _restore(vault, out)
    assert result.returncode == 0, result.stderr
    assert (out / "locked" / "inner" / "f").read_bytes() == b"child"
    assert (out / "locked" / "g").read_bytes() == b"child2"
    assert inode_flags(out / "locked") & IMMUTABLE
    assert inode_flags(out / "log") & APPEND
    assert (out / "log").read_bytes() == b"grows\n"

    # A second restore over the first with --overwrite always meets immutable entries: one clear line, exit 12.
    again = _restore(vault, out, "--overwrite", "always")
    assert again.returncode in (0, 12), again.stderr
    if again.returncode == 12:
        errors = [line for line in again.stderr.splitlines() if line.startswith("shardvault: ")]
        assert len(errors) == 1, again.stderr
        assert str(out) in errors[0], errors[0]
    # Nothing half-written is left under a snapshot name.
    assert (out / "locked" / "inner" / "f").read_bytes() == b"child"
    assert (out / "log").read_bytes() == b"grows\n"


def test_if_changed_over_an_identical_immutable_tree_succeeds(vault: Vault, tmp_path: Path) -> None:
    locked = vault.source / "locked"
    locked.mkdir()
    (locked / "f").write_bytes(b"child")
    set_inode_flags(locked, IMMUTABLE)
    _backup(vault)
    out = tmp_path / "out"
    assert _restore(vault, out).returncode == 0
    again = _restore(vault, out, "--overwrite", "if-changed")
    assert again.returncode == 0, again.stderr


# --- special files -----------------------------------------------------------------------------------


def test_fifo_and_device_over_existing_regular_files(vault: Vault, tmp_path: Path) -> None:
    os.mkfifo(vault.source / "fifo")
    os.chmod(vault.source / "fifo", 0o620)
    os.mknod(vault.source / "zero", 0o640 | stat.S_IFCHR, os.makedev(1, 5))
    _backup(vault)
    target = tmp_path / "t"
    target.mkdir()
    (target / "fifo").write_bytes(b"a regular file where the FIFO goes")
    (target / "zero").write_bytes(b"and one where the device goes")
    refused = _restore(vault, target)
    assert refused.returncode != 0 and (target / "fifo").is_file()
    result = _restore(vault, target, "--overwrite", "always")
    assert result.returncode == 0, result.stderr
    st = (target / "fifo").lstat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    st = (target / "zero").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 5)
    # Again with if-changed: still the same nodes, nothing left behind.
    result = _restore(vault, target, "--overwrite", "if-changed")
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO((target / "fifo").lstat().st_mode)
    assert not [p for p in target.iterdir() if p.name.startswith(".shardvault-")]


def test_dump_of_a_fifo_or_device_path_does_not_hang(vault: Vault) -> None:
    os.mkfifo(vault.source / "fifo")
    os.mknod(vault.source / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    _backup(vault)
    for name in ("fifo", "null"):
        result = _dump(vault, name)
        assert b"Traceback" not in result.stderr, result.stderr
        if result.returncode == 0:  # a tar stream naming the node (restic's dump of a non-file)
            with tarfile.open(fileobj=io.BytesIO(result.stdout), mode="r:") as tar:
                assert tar.getnames() == [name]


def test_socket_is_skipped_with_a_warning(vault: Vault, tmp_path: Path) -> None:
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(vault.source / "sock"))
    sock.close()
    (vault.source / "f").write_bytes(b"1")
    doc = _backup(vault)
    assert [d["kind"] for d in doc["warning_details"]] == ["special_file"]
    out = tmp_path / "out"
    assert _restore(vault, out).returncode == 0
    assert sorted(os.listdir(out)) == ["f"]


# --- the target's own metadata -------------------------------------------------------------------------


def test_existing_target_gets_the_roots_metadata_with_if_changed(vault: Vault, tmp_path: Path) -> None:
    (vault.source / "f").write_bytes(b"1")
    os.chmod(vault.source, 0o705)
    os.setxattr(vault.source, "user.root", b"r")
    os.utime(vault.source, ns=(1_650_000_000 * NS, 1_600_000_000 * NS + 5))
    _backup(vault)
    target = tmp_path / "t"
    target.mkdir(mode=0o777)
    os.chmod(target, 0o777)
    (target / "unrelated").write_bytes(b"stays")
    result = _restore(vault, target, "--overwrite", "if-changed")
    assert result.returncode == 0, result.stderr
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o705
    assert st.st_mtime_ns == 1_600_000_000 * NS + 5
    assert os.getxattr(target, "user.root") == b"r"
    assert (target / "unrelated").read_bytes() == b"stays"


def test_read_only_root_and_directories_are_restored_completely(vault: Vault, tmp_path: Path) -> None:
    (vault.source / "ro").mkdir()
    (vault.source / "ro" / "f").write_bytes(b"in a read-only dir")
    os.chmod(vault.source / "ro", 0o500)
    os.chmod(vault.source, 0o500)
    _backup(vault)
    out = tmp_path / "out"
    result = _restore(vault, out)
    assert result.returncode == 0, result.stderr
    assert (out / "ro" / "f").read_bytes() == b"in a read-only dir"
    assert stat.S_IMODE(out.stat().st_mode) == 0o500
    assert stat.S_IMODE((out / "ro").stat().st_mode) == 0o500
    os.chmod(vault.source, 0o755)


# --- errors, with progress on --------------------------------------------------------------------------


def _progress_vault(vault: Vault) -> None:
    vault.env["SHARDVAULT_PROGRESS_INTERVAL"] = "0.05"
    for i in range(6):
        (vault.source / f"f{i}").write_bytes(os.urandom(3 * MIB))


def test_target_full_with_progress_is_one_clear_error(vault: Vault, tmp_path: Path) -> None:
    _progress_vault(vault)
    _backup(vault)
    mnt = tmp_path / "small"
    _mount("tmpfs", mnt, "size=4m")
    try:
        result = _restore(vault, mnt / "t")
        assert result.returncode == 12, (result.returncode, result.stderr)
        lines = result.stderr.splitlines()
        errors = [line for line in lines if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("shardvault: error: "), result.stderr
        assert lines[-1] == errors[0], "a progress line came after the error"
        for line in lines:
            assert line.startswith(("restore", "shardvault: ")), line
        as_json = _restore(vault, mnt / "u", "--json")
        assert as_json.returncode == 12
        assert json.loads(as_json.stdout)["error"]["code"] == 12
    finally:
        _umount(mnt)


def test_read_only_target_is_one_clear_error(vault: Vault, tmp_path: Path) -> None:
    (vault.source / "f").write_bytes(b"1")
    _backup(vault)
    mnt = tmp_path / "ro"
    _mount("tmpfs", mnt, "size=1m,ro")
    try:
        result = _restore(vault, mnt)
        assert result.returncode == 12, (result.returncode, result.stderr)
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert result.stderr.startswith("shardvault: error: ")
    finally:
        _umount(mnt)


def test_data_loss_with_progress_keeps_json_one_document(vault: Vault, tmp_path: Path) -> None:
    _progress_vault(vault)
    _backup(vault)
    for i in (0, 1, 2):
        for shard in vault.shards(i):
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
    result = _restore(vault, tmp_path / "t", "--json")
    assert result.returncode == 7, result.stderr
    doc = json.loads(result.stdout)
    assert doc["error"]["code"] == 7
    plain = _restore(vault, tmp_path / "u")
    assert plain.returncode == 7
    lines = plain.stderr.splitlines()
    errors = [line for line in lines if line.startswith("shardvault: error")]
    assert len(errors) == 1 and lines[-1] == errors[0], plain.stderr


def test_restore_progress_of_sparse_files_reaches_its_totals(vault: Vault, tmp_path: Path) -> None:
    from shardvault.restore.files import FileRestorer

    _sparse(vault.source / "disk.img", 256 * MIB, [(MIB, b"d" * 10_000)])
    _backup(vault)
    seen: list[tuple[int, int]] = []
    with vault.repo() as repo:
        restorer = FileRestorer(
            repo,
            repo.resolve_snapshot("latest", None),
            tmp_path / "out",
            progress=lambda s, _p: seen.append((s.bytes_written, s.totals.bytes)),
        )
        stats = restorer.run()
    assert seen, "progress was reported"
    done, total = seen[-1]
    assert done == total == stats.totals.bytes


def test_backup_progress_of_sparse_files_reaches_its_totals(vault: Vault) -> None:
    from shardvault.backup.files import run_backup

    _sparse(vault.source / "disk.img", 256 * MIB, [(MIB, b"d" * 10_000)])
    kept: list[Any] = []
    with vault.repo() as repo:
        run_backup(repo, load_config(vault.config).source("src"), progress=lambda s, _p: kept.append(s))
    assert kept
    stats = kept[-1]
    assert stats.totals.complete
    assert stats.bytes_read + stats.bytes_unchanged + stats.bytes_sparse == stats.totals.bytes  # the CLI's done
