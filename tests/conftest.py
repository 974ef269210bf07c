"""Shared fixtures: repositories on local peers, source trees, a real S3 server."""

from __future__ import annotations

import array
import fcntl
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from shardvault.cli import main
from shardvault.config import load_config
from shardvault.repository import Repository

PASSWORD = "correct horse battery staple"
BIN = Path(sys.executable).parent
# Small chunks and packs, so a few MiB of test data make several packs.
SMALL = {"chunk_min_kib": 64, "chunk_avg_kib": 256, "chunk_max_kib": 1024, "pack_size_mib": 1}


# Schedule tables for the orchestration tests (config keys of issue 8).
SCHEDULE = """
[schedule]
timezone = "Europe/Paris"
check = "*/30 * * * *"
scrub = "15 3 * * *"
"""
SOURCE_SCHEDULE = """
[sources.schedule]
incremental = "0 * * * *"
full = "0 3 * * 0"
"""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(
    path: Path,
    peers: list[dict[str, Any]],
    sources: dict[str, Path],
    **repository: Any,
) -> Path:
    lines = ["[repository]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in repository.items()]
    for peer in peers:
        lines.append("[[peers]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in peer.items()]
    for name, src in sources.items():
        lines += ["[[sources]]", f'name = "{name}"', 'type = "files"', f"path = {toml_value(str(src))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_tree(root: Path, seed: int = 1, files: int = 40, big: int = 3 << 20) -> Path:
    """A source tree with nested dirs, symlinks, an empty file, odd modes and a few large files."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        d = root / f"dir{i % 5}" / (f"sub{i % 3}" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 1, 100, 5000, 70_000, 300_000])
        (d / f"file{i}.txt").write_bytes(rng.randbytes(size // 2) + b"text " * (size // 10))
    for i in range(3):
        (root / f"large{i}.bin").write_bytes(rng.randbytes(big))
    (root / "empty").write_bytes(b"")
    (root / "link-rel").symlink_to("dir0/file0.txt")
    (root / "link-abs").symlink_to("/etc/hostname")
    (root / "dir1" / "private").write_bytes(b"secret")
    os.chmod(root / "dir1" / "private", 0o600)
    os.chmod(root / "dir2", 0o750)
    os.utime(root / "large0.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


def tree_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a restore must reproduce: type, mode, mtime, content, link target."""
    state: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("l", os.readlink(p), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                state[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_mtime_ns, p.read_bytes())
    return state


def assert_same_tree(a: Path, b: Path) -> None:
    sa, sb = tree_state(a), tree_state(b)
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key] == sb[key], key


def local_peers(base: Path, count: int = 6, zones: int = 3) -> list[dict[str, Any]]:
    base.mkdir(parents=True, exist_ok=True)  # the disks' mount point; init creates each peer's directory
    return [{"name": f"p{i}", "url": f"file://{base / f'p{i}'}", "zone": f"z{i % zones}"} for i in range(count)]


@dataclass
class Vault:
    """A configured repository on local peers, driven through the CLI."""

    root: Path
    config: Path
    peers_dir: Path
    source: Path
    env: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, password: str | None = PASSWORD) -> Result:
        env = {"SHARDVAULT_PASSWORD": password or ""}
        return CliRunner().invoke(main, ["--config", str(self.config), *args], env=env, catch_exceptions=False)

    def run(self, *args: str, password: str = PASSWORD, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The real console script in a child process (exit codes, stderr, signals)."""
        env = os.environ | {"SHARDVAULT_PASSWORD": password} | self.env
        return subprocess.run(
            [str(BIN / "shardvault"), "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=self.root,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        env = os.environ | {"SHARDVAULT_PASSWORD": PASSWORD} | self.env
        return subprocess.Popen(
            [str(BIN / "shardvault"), "--config", str(self.config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=self.root,
        )

    @contextmanager
    def repo(self) -> Iterator[Repository]:
        repo = Repository.open(load_config(self.config), PASSWORD)
        try:
            yield repo
        finally:
            repo.close()

    def peer(self, i: int) -> Path:
        return self.peers_dir / f"p{i}"

    def shards(self, i: int) -> list[Path]:
        return sorted((self.peer(i) / "data").rglob("*.*"))


def make_vault(tmp_path: Path, init: bool = True, **repository: Any) -> Vault:
    peers_dir = tmp_path / "peers"
    peers_dir.mkdir(parents=True, exist_ok=True)  # init creates each peer's own directory, never its parents
    source = make_tree(tmp_path / "src")
    settings = {"k": 4, "n": 6, "state_dir": str(tmp_path / "state")} | SMALL | repository
    config = write_config(tmp_path / "shardvault.toml", local_peers(peers_dir), {"src": source}, **settings)
    vault = Vault(tmp_path, config, peers_dir, source)
    if init:
        result = vault.cli("init")
        assert result.exit_code == 0, result.output
    return vault


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return make_vault(tmp_path)


@pytest.fixture
def backed_up(vault: Vault) -> Vault:
    result = vault.cli("backup", "src")
    assert result.exit_code == 0, result.output
    return vault


def peer_snapshot(peers_dir: Path) -> dict[str, bytes]:
    """Every object on every local peer (to prove a failure changed nothing)."""
    return {str(p.relative_to(peers_dir)): p.read_bytes() for p in sorted(peers_dir.rglob("*")) if p.is_file()}


def flip_bit(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


# --- a real S3 server on loopback ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """moto's standalone S3 server on 127.0.0.1, once it answers: the process and its endpoint."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's standalone S3 server, a real HTTP server on 127.0.0.1."""
    proc, endpoint = start_moto()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)


def deny_reading(monkeypatch: pytest.MonkeyPatch, vault: Vault, name: str = "private") -> None:
    """Make the backup's open of ``dir1/<name>`` fail with EACCES (tests run as root: chmod cannot)."""
    from shardvault.sources import files as files_source

    real = files_source.open_file

    def deny(item: files_source.SourceItem) -> Any:
        if item.path.endswith(name):
            raise PermissionError(13, "Permission denied")
        return real(item)

    monkeypatch.setattr("shardvault.backup.files.open_file", deny)
    (vault.source / "dir1" / name).write_bytes(b"changed")


# --- inode flags (chattr), for the fidelity tests ---------------------------------------------------

IMMUTABLE, APPEND, NODUMP, NOATIME = 0x10, 0x20, 0x40, 0x80
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS = 0x80086601, 0x40086602


def inode_flags(path: Path) -> int:
    """A file's or directory's inode flags (FS_IOC_GETFLAGS, as lsattr reads them)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        buf = array.array("l", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf, True)
        return int(buf[0])
    finally:
        os.close(fd)


def set_inode_flags(path: Path, flags: int) -> None:
    """Set these of IMMUTABLE, APPEND, NODUMP and NOATIME, clearing the others (chattr)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        buf = array.array("l", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf, True)
        buf[0] = (buf[0] & ~(IMMUTABLE | APPEND | NODUMP | NOATIME)) | flags
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, buf, True)
    finally:
        os.close(fd)


def unlock_all(root: Path) -> None:
    """Clear immutable and append-only flags under ``root`` (and on it), so tmp cleanup works."""
    if not root.exists():
        return
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / n for n in dirnames + filenames]
    for p in paths:
        try:
            if not p.is_symlink() and (p.is_file() or p.is_dir()) and inode_flags(p) & (IMMUTABLE | APPEND):
                set_inode_flags(p, 0)
        except OSError:
            pass
