"""Issue 10: a restore gives back the tree exactly as it was (the fidelity suite).

One source holds every kind of entry a backup records: plain, executable,
setuid and foreign-owned files, a 5 GiB sparse file, hard links across
directories, symlinks, a FIFO, character and block devices, a socket
(skipped with a note), extended attributes and POSIX ACLs (access and
default), inode flags (immutable among them), and times chosen to the
nanosecond, atimes included.  The restore is compared with the source by
content and by ``lstat`` (type, mode, owner, atime and mtime in ns, link
counts and which names share an inode, allocated blocks of the sparse
file, device numbers), attributes and flags; ``dump`` of the directory as a
tar stream is extracted by GNU tar and compared the same way.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
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
    NOATIME,
    NODUMP,
    PASSWORD,
    Vault,
    inode_flags,
    make_vault,
    set_inode_flags,
    unlock_all,
)

from shardvault.restore.inode import MetadataOptions, owner
from shardvault.tree import Entry

GIB = 1 << 30
NS = 10**9
# Times with every digit of the nanoseconds in use; atimes after the mtimes and in the future, so that
# relatime never updates them while the test reads (it does when atime <= mtime, ctime or is a day old).
MTIME = 1_600_000_000 * NS + 123_456_789
ATIME = 4_000_000_000 * NS + 987_654_321


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """The kernel's binary form of a POSIX ACL (what setfacl writes): version 2, then (tag, perm, id)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED = 0xFFFFFFFF
ACCESS_ACL = _acl(  # user 4321 may read
    (USER_OBJ, 6, UNDEFINED), (USER, 4, 4321), (GROUP_OBJ, 4, UNDEFINED), (MASK, 4, UNDEFINED), (OTHER, 0, UNDEFINED)
)
DEFAULT_ACL = _acl(  # what new entries in the directory inherit: group 5432 may read
    (USER_OBJ, 7, UNDEFINED), (GROUP_OBJ, 5, UNDEFINED), (GROUP, 5, 5432), (MASK, 5, UNDEFINED), (OTHER, 0, UNDEFINED)
)


def _times(path: Path, mtime: int = MTIME) -> None:
    os.utime(path, ns=(ATIME, mtime), follow_symlinks=False)


def build_tree(src: Path, sparse_size: int = 5 * GIB) -> None:
    """Every kind of entry, in place of the source ``src``."""
    shutil.rmtree(src)
    src.mkdir()
    (src / "docs").mkdir()
    (src / "docs" / "plain.txt").write_bytes(b"plain text\n" * 100)
    (src / "docs" / "tool.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(src / "docs" / "tool.sh", 0o755)
    (src / "docs" / "setuid").write_bytes(b"s" * 5000)
    os.chown(src / "docs" / "setuid", 0, 0)
    os.chmod(src / "docs" / "setuid", 0o4755)
    (src / "docs" / "foreign").write_bytes(os.urandom(70_000))
    os.chown(src / "docs" / "foreign", 12345, 23456)  # ids without names on this machine
    os.chmod(src / "docs" / "foreign", 0o2640)
    # A 5 GiB sparse file with data at the start, in the middle (not block aligned) and at the end.
    sparse = src / "disk.img"
    with open(sparse, "wb") as f:
        f.write(os.urandom(100_000))
        f.seek(sparse_size * 2 // 5 + 12_345)
        f.write(os.urandom(300_000))
        f.seek(sparse_size - 4096)
        f.write(b"e" * 4096)
    # A sparse file that is one hole.
    with open(src / "hole.img", "wb") as f:
        f.truncate(sparse_size // 5)
    # Hard links: three names in two directories, and a separate pair.
    (src / "links").mkdir()
    (src / "links" / "a").write_bytes(os.urandom(50_000))
    os.link(src / "links" / "a", src / "links" / "b")
    os.link(src / "links" / "a", src / "docs" / "a-again")
    (src / "links" / "c").write_bytes(b"second inode")
    os.link(src / "links" / "c", src / "links" / "d")
    # Symlinks, a FIFO, devices, a socket.
    os.symlink("docs/plain.txt", src / "to-plain")
    os.symlink("/nowhere/at/all", src / "dangling")
    (src / "special").mkdir()
    os.mkfifo(src / "special" / "fifo", 0o640)
    os.mknod(src / "special" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "special" / "loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "special" / "sock"))
    sock.close()
    # Extended attributes and ACLs.
    os.setxattr(src / "docs" / "plain.txt", "user.comment", b"kept \x00 binary \xff")
    os.setxattr(src / "docs" / "plain.txt", "system.posix_acl_access", ACCESS_ACL)
    os.setxattr(src / "docs", "user.dir", b"on a directory")
    os.setxattr(src / "docs", "system.posix_acl_default", DEFAULT_ACL)
    os.setxattr(src / "docs" / "setuid", "trusted.note", b"root only")
    os.setxattr(src, "user.root", b"on the root")
    # Flags (chattr): no-dump, no-atime, and immutable / append-only, which must be set last.
    set_inode_flags(src / "docs" / "tool.sh", NODUMP)
    set_inode_flags(src / "links", NOATIME)
    (src / "locked").mkdir()
    (src / "locked" / "frozen").write_bytes(b"cannot change")
    (src / "locked" / "log").write_bytes(b"only grows\n")
    # Times: every entry its own, to the nanosecond; directories after their content.
    for i, path in enumerate(sorted(src.rglob("*"), key=lambda p: -len(p.parts))):
        if path.name != "sock":
            _times(path, MTIME + i * 1_000_001)
    os.chmod(src, 0o751)
    _times(src, MTIME - 7)
    set_inode_flags(src / "locked" / "frozen", IMMUTABLE)
    set_inode_flags(src / "locked" / "log", APPEND)


def snapshot_of(root: Path) -> dict[str, dict[str, Any]]:
    """lstat, attributes and flags of every entry (no content read: atimes stay as they are)."""
    state: dict[str, dict[str, Any]] = {}
    paths = [root, *sorted(root.rglob("*"))]
    inodes: dict[int, str] = {}
    for path in paths:
        rel = "." if path == root else str(path.relative_to(root))
        st = path.lstat()
        kind = stat.S_IFMT(st.st_mode)
        doc: dict[str, Any] = {
            "type": kind,
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime": st.st_mtime_ns,
            "atime": st.st_atime_ns,
            "nlink": st.st_nlink,
        }
        if stat.S_ISREG(kind):
            doc["size"] = st.st_size
            doc["inode_of"] = inodes.setdefault(st.st_ino, rel)  # which names share an inode
        if stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
            doc["rdev"] = st.st_rdev
        if stat.S_ISLNK(kind):
            doc["target"] = os.readlink(path)
            del doc["atime"]  # reading a symlink updates its atime; restic does not promise it either
        else:
            doc["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(os.listxattr(path))}
        if stat.S_ISREG(kind) or stat.S_ISDIR(kind):
            doc["flags"] = inode_flags(path) & (IMMUTABLE | APPEND | NODUMP | NOATIME)
        state[rel] = doc
    return state


def same_content(a: Path, b: Path, holes: bool = True) -> None:
    """Same bytes in every file; with ``holes``, sparse files have their data and holes in the same places."""
    for path in sorted(a.rglob("*")):
        if path.is_file() and not path.is_symlink():
            other = b / path.relative_to(a)
            if path.name.endswith(".img") and holes:
                _same_sparse_content(path, other)
            else:
                assert other.read_bytes() == path.read_bytes(), path


def _same_sparse_content(a: Path, b: Path) -> None:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for offset in _data_offsets(fa.fileno()):
            fa.seek(offset)
            fb.seek(offset)
            assert fa.read(1 << 20) == fb.read(1 << 20), (a, offset)
    assert _data_offsets_of(a) == _data_offsets_of(b)


def _data_offsets(fd: int) -> Iterator[int]:
    offset, size = 0, os.fstat(fd).st_size
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield from range(start, end, 1 << 20)
        offset = end


def _data_offsets_of(path: Path) -> list[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(_data_offsets(fd))
    finally:
        os.close(fd)


@pytest.fixture
def rich_vault(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Vault, dict[str, dict[str, Any]]]]:
    """A vault whose source has every kind of entry, and the source's metadata before any backup."""
    vault = make_vault(tmp_path)
    build_tree(vault.source, getattr(request, "param", 5 * GIB))
    before = snapshot_of(vault.source)
    try:
        yield vault, before
    finally:
        unlock_all(tmp_path)


def _backup(vault: Vault) -> dict[str, Any]:
    import json

    result = vault.run("backup", "src", "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_restore_gives_back_every_kind_of_entry_exactly(rich_vault: Any, tmp_path: Path) -> None:
    vault, before = rich_vault
    doc = _backup(vault)
    stats = doc["stats"]
    # The socket is the one thing left out, with a note; the holes were not read.
    assert [d["kind"] for d in doc["warning_details"]] == ["special_file"]
    assert "sock" in doc["warning_details"][0]["path"]
    assert stats["special_files"] == 3
    assert stats["bytes_read"] < 5_000_000, "a 5 GiB sparse file is read as its data only"
    assert snapshot_of(vault.source) == before, "the backup changed the source's metadata"

    target = tmp_path / "restored"
    result = vault.run("restore", "latest", "--target", str(target))
    assert result.returncode == 0, result.stderr
    after = snapshot_of(target)
    assert sorted(after) == sorted(p for p in before if not p.endswith("sock"))
    for path, doc_before in before.items():
        if path.endswith("sock"):
            continue
        assert after[path] == doc_before, path
    # Allocated blocks: the sparse files take what the source took, not their size.
    for name in ("disk.img", "hole.img"):
        src_blocks = (vault.source / name).stat().st_blocks
        assert (target / name).stat().st_blocks == src_blocks, name
    assert (target / "hole.img").stat().st_blocks == 0
    same_content(vault.source, target)


def test_restore_options_leave_out_attributes_acls_and_names(rich_vault: Any, tmp_path: Path) -> None:
    vault, before = rich_vault
    _backup(vault)
    target = tmp_path / "plain"
    result = vault.run("restore", "latest", "--target", str(target), "--no-acls")
    assert result.returncode == 0, result.stderr
    xattrs = {n for n in os.listxattr(target / "docs" / "plain.txt")}
    assert xattrs == {"user.comment"}
    assert "system.posix_acl_default" not in os.listxattr(target / "docs")
    target = tmp_path / "bare"
    result = vault.run("restore", "latest", "--target", str(target), "--no-xattrs")
    assert result.returncode == 0, result.stderr
    assert os.listxattr(target / "docs" / "plain.txt") == []
    assert os.listxattr(target) == []
    # The rest is as it was.
    assert snapshot_of(target)["docs/foreign"] == before["docs/foreign"]


def test_backup_without_xattrs_records_none(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    os.setxattr(vault.source, "user.x", b"1")
    text = vault.config.read_text().replace('path = "', 'xattrs = false\npath = "', 1)
    vault.config.write_text(text)
    _backup(vault)
    target = tmp_path / "out"
    assert vault.run("restore", "latest", "--target", str(target)).returncode == 0
    assert os.listxattr(target) == []


def test_hard_links_are_links_only_within_the_restored_set(rich_vault: Any, tmp_path: Path) -> None:
    vault, _ = rich_vault
    _backup(vault)
    target = tmp_path / "part"
    result = vault.run("restore", "latest", "--target", str(target), "--include", "links/b", "--include", "*-again")
    assert result.returncode == 0, result.stderr
    b, again = (target / "links" / "b").stat(), (target / "docs" / "a-again").stat()
    assert (b.st_ino, b.st_nlink) == (again.st_ino, 2)
    assert (target / "links" / "b").read_bytes() == (vault.source / "links" / "a").read_bytes()
    assert not (target / "links" / "a").exists()
    # One name alone is a plain file.
    target = tmp_path / "one"
    assert vault.run("restore", "latest", "--target", str(target), "--include", "links/d").returncode == 0
    assert (target / "links" / "d").stat().st_nlink == 1
    assert (target / "links" / "d").read_bytes() == b"second inode"


def test_restore_again_over_itself_keeps_links(rich_vault: Any, tmp_path: Path) -> None:
    vault, before = rich_vault
    _backup(vault)
    target = tmp_path / "again"
    assert vault.run("restore", "latest", "--target", str(target), "--exclude", "locked").returncode == 0
    result = vault.run("restore", "latest", "--target", str(target), "--exclude", "locked", "--overwrite", "always")
    assert result.returncode == 0, result.stderr
    after = snapshot_of(target)
    for path in ("links/a", "links/b", "docs/a-again", "links/c", "links/d"):
        assert after[path]["nlink"] == before[path]["nlink"], path
        assert after[path]["inode_of"] == before[path]["inode_of"], path
    assert not [p for p in os.listdir(target / "links") if p.startswith(".shardvault-")]


def test_incremental_backup_keeps_holes_flags_and_links(rich_vault: Any, tmp_path: Path) -> None:
    vault, before = rich_vault
    _backup(vault)
    doc = _backup(vault)  # nothing changed: nothing is read, and the snapshot still knows everything
    assert doc["stats"]["files_read"] == 0
    target = tmp_path / "incr"
    assert vault.run("restore", "latest", "--target", str(target)).returncode == 0
    after = snapshot_of(target)
    for path in before:
        if not path.endswith("sock"):
            assert after[path] == before[path], path
    assert (target / "disk.img").stat().st_blocks == (vault.source / "disk.img").stat().st_blocks


def test_owner_by_name_with_numeric_fallback() -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    entry = Entry("f", "f", 0o644, uid=777, gid=888, mtime_ns=0, user="nobody", group="no-such-group-here")
    assert owner(entry, numeric=False) == (nobody.pw_uid, 888)
    assert owner(entry, numeric=True) == (777, 888)
    unnamed = Entry("f", "f", 0o644, uid=777, gid=888, mtime_ns=0)
    assert owner(unnamed, numeric=False) == (777, 888)
    assert MetadataOptions().numeric_owner is False


def test_owners_are_mapped_by_name_unless_numeric_owner(tmp_path: Path) -> None:
    """A user whose id differs on the restoring machine: by name by default, by number with --numeric-owner."""
    if shutil.which("useradd") is None:
        pytest.skip("useradd is missing")
    name = f"svt{os.getpid() % 100000}"
    vault = make_vault(tmp_path)
    path = vault.source / "owned"
    path.write_bytes(b"x")
    try:
        subprocess.run(["useradd", "-M", "-u", "47001", "-U", name], check=True)
        os.chown(path, 47001, 47001)
        _backup(vault)
        # The same user on "another machine": same name, other ids.
        subprocess.run(["userdel", name], check=True)
        subprocess.run(["useradd", "-M", "-u", "47002", "-U", name], check=True)
        by_name, by_number = tmp_path / "by-name", tmp_path / "by-number"
        assert vault.run("restore", "latest", "--target", str(by_name)).returncode == 0
        result = vault.run("restore", "latest", "--target", str(by_number), "--numeric-owner")
        assert result.returncode == 0, result.stderr
        st = (by_name / "owned").stat()
        assert (st.st_uid, st.st_gid) == (47002, 47002)
        st = (by_number / "owned").stat()
        assert (st.st_uid, st.st_gid) == (47001, 47001)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


# A tar stream has the holes as zeros: 64 MiB of them here, not 5 GiB.
@pytest.mark.parametrize("rich_vault", [64 << 20], indirect=True)
def test_dump_of_a_directory_extracts_to_the_same_tree(rich_vault: Any, tmp_path: Path) -> None:
    vault, before = rich_vault
    _backup(vault)
    tar_path = tmp_path / "dump.tar"
    with open(tar_path, "wb") as out:
        result = subprocess.run(
            [str(BIN / "shardvault"), "--config", str(vault.config), "dump", "latest", "/"],
            stdout=out,
            stderr=subprocess.PIPE,
            env=os.environ | {"SHARDVAULT_PASSWORD": PASSWORD},
            timeout=300,
        )
    assert result.returncode == 0, result.stderr
    with tarfile.open(tar_path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["links/b"].islnk() and members["links/b"].linkname == "docs/a-again"
    assert members["special/fifo"].isfifo() and members["special/null"].ischr()
    assert (members["special/null"].devmajor, members["special/null"].devminor) == (1, 3)
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--same-owner", "-xpf", str(tar_path), "-C", str(out)],
        check=True,
    )
    after = snapshot_of(out)
    del after["."]  # the directory extracted into: the dump names what is inside the root
    assert sorted(after) == sorted(p for p in before if p != "." and not p.endswith("sock"))
    for path, doc in after.items():
        want = dict(before[path])
        got = dict(doc)
        for key in ("atime", "flags"):  # tar keeps neither atimes (by default) nor inode flags
            want.pop(key, None)
            got.pop(key, None)
        if stat.S_ISDIR(want["type"]):
            got.pop("mtime")  # GNU tar sets a directory's mtime before later members' links touch it
            want.pop("mtime")
        assert got == want, path
    same_content(vault.source, out, holes=False)


def test_without_root_device_nodes_are_noted_and_the_rest_restored(rich_vault: Any, tmp_path: Path) -> None:
    from shardvault.restore.files import FileRestorer

    vault, before = rich_vault
    _backup(vault)
    target = tmp_path / "as-user"
    with vault.repo() as repo:
        restorer = FileRestorer(repo, repo.resolve_snapshot("latest", None), target)
        restorer.is_root = False  # what a restore by an ordinary user may do (owners, device nodes)
        stats = restorer.run()
    assert not (target / "special" / "null").exists() and not (target / "special" / "loop9").exists()
    assert sorted(n for n in stats.notes if "device node" in n) == [
        "special/loop9: device node not created (needs root)",
        "special/null: device node not created (needs root)",
    ]
    assert stat.S_ISFIFO((target / "special" / "fifo").lstat().st_mode)
    assert stats.special_files == 1 and stats.hardlinks == 3
    assert snapshot_of(target)["docs/plain.txt"]["xattrs"] == before["docs/plain.txt"]["xattrs"]


def test_extents_a_tree_cannot_honour_are_refused() -> None:
    from shardvault.errors import DataLossError
    from shardvault.restore.files import _SparseWriter

    base = {"path": "f", "type": "f", "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": 0, "size": 100}
    for extents in ([(50, 10), (40, 5)], [(90, 20)], [(0, 0)], [(-1, 5)]):
        with pytest.raises(DataLossError, match="extents"):
            _SparseWriter(-1, Entry(**base, extents=extents), None)  # type: ignore[arg-type]


def test_unchanged_files_get_attributes_a_parent_without_them_lacked(tmp_path: Path) -> None:
    """Attributes of unchanged files come from the parent only when it recorded them (issue 11's reuse)."""
    vault = make_vault(tmp_path)
    os.setxattr(vault.source / "dir0" / "file0.txt", "user.tag", b"v1")
    assert vault.run("backup", "src", "--no-xattrs", "--json").returncode == 0
    doc = _backup(vault)  # unchanged files, a parent without attributes: read by path
    assert doc["stats"]["files_read"] == 0
    target = tmp_path / "out"
    assert vault.run("restore", "latest", "--target", str(target)).returncode == 0
    assert os.getxattr(target / "dir0" / "file0.txt", "user.tag") == b"v1"
    doc = _backup(vault)  # now the parent has them: kept from it
    assert doc["stats"]["files_read"] == 0
    target = tmp_path / "out2"
    assert vault.run("restore", "latest", "--target", str(target), "--no-acls").returncode == 0
    assert os.getxattr(target / "dir0" / "file0.txt", "user.tag") == b"v1"
