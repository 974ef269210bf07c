"""PostgreSQL sources against a real PostgreSQL 15, started here as the postgres user.

The server archives its WAL with ``shardvault wal-push`` (run by PostgreSQL,
as ``postgres``), so the repository, its config and the password file live in
a directory that user can reach.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from conftest import BIN, PASSWORD, free_port, local_peers, write_config

from shardvault.cli import main

PGBIN = Path(max(glob.glob("/usr/lib/postgresql/*/bin"), default="/usr/lib/postgresql/15/bin"))


def _as_postgres(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, check=check)


@dataclass
class Cluster:
    base: Path
    data: Path
    port: int
    config: Path
    password_file: Path

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def sql(self, query: str, port: int | None = None) -> list[tuple[object, ...]]:
        dsn = f"host=127.0.0.1 port={port or self.port} user=postgres dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchall() if cur.description else []

    def cli(self, *args: str) -> Result:
        argv = ["--config", str(self.config), "--password-file", str(self.password_file), *args]
        return CliRunner().invoke(main, argv, catch_exceptions=False)

    def json(self, *args: str) -> dict:  # type: ignore[type-arg]
        result = self.cli(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)  # type: ignore[no-any-return]


def _start(data: Path, port: int, log: Path) -> None:
    _as_postgres(
        str(PGBIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
        f"-c listen_addresses=127.0.0.1 -p {port} -k {data.parent}", "start",
    )  # fmt: skip


def _stop(data: Path) -> None:
    _as_postgres(str(PGBIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop", check=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not (PGBIN / "initdb").exists():
        pytest.fail("PostgreSQL 15 is not installed: `make test` installs it (scripts/apt-install postgresql)")
    reach = _as_postgres(str(BIN / "python"), "-P", "-c", "import shardvault.backup.wal", check=False)
    if reach.returncode != 0:
        # A checkout under a private directory (mode 700): let postgres traverse down to the venv
        # and the editable link tree, which is all archive_command needs.
        root = Path(__file__).resolve().parent.parent
        for directory in {*BIN.parents, *root.parents, root, root / "build"}:
            if directory.is_dir() and not directory.stat().st_mode & 0o001:
                directory.chmod(directory.stat().st_mode | 0o001)
        reach = _as_postgres(str(BIN / "python"), "-P", "-c", "import shardvault.backup.wal", check=False)
    if reach.returncode != 0:  # archive_command would fail and base backups would wait for it forever
        pytest.fail(f"the postgres user cannot run {BIN / 'python'} (the venv must be world-readable): {reach.stderr}")
    old_umask = os.umask(0)  # peers and state shared by root (the tests) and postgres (archive_command)
    base = Path(tempfile.mkdtemp(prefix="sv-pg-", dir="/tmp"))
    os.chmod(base, 0o777)
    password_file = base / "password"
    password_file.write_text(PASSWORD + "\n")
    port = free_port()
    config = base / "shardvault.toml"
    peers = local_peers(base / "peers")
    settings = {"k": 4, "n": 6, "state_dir": str(base / "state"), "fsync": False}
    write_config(config, peers, {}, **settings)
    with open(config, "a") as f:
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        f.write(f'[[sources]]\nname = "db"\ntype = "postgres"\ndsn = "{dsn}"\n')
        f.write(f'[[sources]]\nname = "dump"\ntype = "postgres"\nmode = "logical"\ndsn = "{dsn}"\n')
    pg = base / "pg"
    pg.mkdir()
    shutil.chown(pg, "postgres", "postgres")
    data = pg / "data"
    _as_postgres(str(PGBIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale")
    archive = f"{BIN / 'shardvault'} --config {config} --password-file {password_file} wal-push %p"
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            "wal_level = replica\narchive_mode = on\n"
            f"archive_command = '{archive}'\nfsync = off\nmax_wal_senders = 4\nlog_min_messages = warning\n"
        )
    c = Cluster(base, data, port, config, password_file)
    assert c.cli("init").exit_code == 0
    _start(data, port, pg / "log")
    try:
        yield c
    finally:
        _stop(data)
        os.umask(old_umask)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def restored(cluster: Cluster) -> Iterator[list[tuple[Path, int]]]:
    """Restored clusters to stop after the test."""
    started: list[tuple[Path, int]] = []
    yield started
    for data, _ in started:
        _stop(data)
        shutil.rmtree(data, ignore_errors=True)


def _restore_and_start(cluster: Cluster, restored: list[tuple[Path, int]], *args: str) -> int:
    target = cluster.base / f"restore-{len(restored)}-{time.time_ns()}"
    port = free_port()
    result = cluster.cli("restore", *args, "--source", "db", "--target", str(target), "--start", "--port", str(port))
    restored.append((target, port))
    assert result.exit_code == 0, result.output + _log(target)
    return port


def _log(target: Path) -> str:
    log = target / "startup.log"
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def test_point_in_time_recovery_restores_exactly_the_transactions_before_the_time(
    cluster: Cluster, restored: list[tuple[Path, int]]
) -> None:
    subprocess.run(
        [str(PGBIN / "pgbench"), "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
         "postgres"], check=True, capture_output=True,
    )  # fmt: skip
    cluster.sql("CREATE TABLE events (id serial PRIMARY KEY, batch int NOT NULL, amount int NOT NULL)")
    full = cluster.json("backup", "db", "--full")
    assert full["snapshot"]["kind"] == "full"
    assert "start_lsn" in full["snapshot"]["stats"]["postgres"], full["snapshot"]["stats"]["postgres"]
    cluster.sql("INSERT INTO events (batch, amount) SELECT 1, g FROM generate_series(1, 1000) g")
    (between,) = cluster.sql("SELECT now()::text")[0]
    time.sleep(1.2)
    cluster.sql("INSERT INTO events (batch, amount) SELECT 2, g FROM generate_series(1, 500) g")
    cluster.sql("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 100")
    incremental = cluster.json("backup", "db")
    assert incremental["snapshot"]["kind"] == "incremental"

    port = _restore_and_start(cluster, restored, full["snapshot"]["id"], "--to-time", str(between))
    rows = cluster.sql("SELECT batch, count(*), sum(amount) FROM events GROUP BY batch ORDER BY batch", port)
    assert rows == [(1, 1000, 500500)]
    assert cluster.sql("SELECT sum(abalance) FROM pgbench_accounts", port) == [(0,)]

    # The incremental snapshot restores everything up to its own point.
    port = _restore_and_start(cluster, restored, incremental["snapshot"]["id"])
    rows = cluster.sql("SELECT batch, count(*) FROM events GROUP BY batch ORDER BY batch", port)
    assert rows == [(1, 1000), (2, 500)]
    assert cluster.sql("SELECT sum(abalance) FROM pgbench_accounts", port) == [(700,)], (
        cluster.sql("SELECT sum(abalance) FROM pgbench_accounts"),
        incremental["snapshot"]["stats"]["postgres"],
        cluster.sql("SELECT pg_current_wal_lsn()::text", port),
    )


def _dumpall(port: int) -> str:
    out = subprocess.run(
        [str(PGBIN / "pg_dumpall"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    # Comments and the per-run random \restrict keys of newer pg_dump releases differ by design, and
    # sequences come back up to 32 values ahead (WAL logs them in advance): PostgreSQL's own behaviour
    # after any crash recovery, which loses no row.
    skip = ("--", "\\restrict", "\\unrestrict", "SELECT pg_catalog.setval(")
    keep = (line for line in out.splitlines() if not line.startswith(skip))
    return "\n".join(keep)


def test_restore_latest_matches_pg_dumpall_of_the_source(cluster: Cluster, restored: list[tuple[Path, int]]) -> None:
    cluster.sql("CREATE TABLE IF NOT EXISTS notes (id int PRIMARY KEY, body text)")
    cluster.sql("INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 2000) g ON CONFLICT DO NOTHING")
    latest = cluster.json("backup", "db")
    port = _restore_and_start(cluster, restored, latest["snapshot"]["id"])
    assert _dumpall(port) == _dumpall(cluster.port)


def test_logical_dump_round_trip_and_dedup(cluster: Cluster) -> None:
    cluster.sql("CREATE TABLE IF NOT EXISTS big (id int PRIMARY KEY, body text)")
    cluster.sql(
        "INSERT INTO big SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 40000) g ON CONFLICT DO NOTHING"
    )
    first = cluster.json("backup", "dump")
    cluster.sql("INSERT INTO big VALUES (1000001, 'one more row')")
    second = cluster.json("backup", "dump")
    total, new = second["stats"]["bytes_read"], second["stats"]["bytes_new"]
    assert total > 20 << 20 and new < total / 4, second["stats"]  # a mostly unchanged dump is mostly deduplicated
    result = cluster.cli("restore", second["snapshot"]["id"], "--source", "dump", "--database", "roundtrip")
    assert result.exit_code == 0, result.output
    dsn = cluster.dsn.replace("dbname=postgres", "dbname=roundtrip")
    with psycopg.connect(dsn) as conn:
        assert (
            conn.execute("SELECT count(*), sum(length(body)) FROM big").fetchone()
            == cluster.sql("SELECT count(*), sum(length(body)) FROM big")[0]
        )
    assert first["snapshot"]["stats"]["postgres"]["mode"] == "logical"
    again = cluster.cli("restore", second["snapshot"]["id"], "--source", "dump", "--database", "roundtrip")
    assert again.exit_code != 0 and "already exists" in again.output


def test_wal_push_is_idempotent_and_refuses_different_content(cluster: Cluster) -> None:
    records = sorted((cluster.base / "peers" / "p0" / "wal" / "db").iterdir())
    name = records[0].name.upper()
    fetched = cluster.base / "fetched" / name
    fetched.parent.mkdir(exist_ok=True)
    assert cluster.cli("wal-fetch", name, str(fetched), "--source", "db").exit_code == 0
    assert cluster.cli("wal-push", str(fetched), "--source", "db").exit_code == 0  # the same bytes again: fine
    data = bytearray(fetched.read_bytes())
    data[100] ^= 1
    other = cluster.base / "other" / name
    other.parent.mkdir(exist_ok=True)
    other.write_bytes(bytes(data))
    result = cluster.cli("wal-push", str(other), "--source", "db")
    assert result.exit_code == 10 and "different content" in result.output


def test_a_missing_wal_segment_is_reported(cluster: Cluster) -> None:
    for _ in range(3):
        cluster.sql("CREATE TABLE IF NOT EXISTS churn (x int); INSERT INTO churn VALUES (1); SELECT pg_switch_wal()")
    cluster.json("backup", "db")  # waits until the last switch is archived
    wal_dir = cluster.base / "peers"
    names = sorted(p.name for p in (wal_dir / "p0" / "wal" / "db").iterdir() if len(p.name) == 24)
    victim = names[len(names) // 2]
    saved = {p: p.read_bytes() for p in wal_dir.glob(f"p*/wal/db/{victim}")}
    try:
        for p in saved:
            p.unlink()
        check = cluster.cli("check")
        assert check.exit_code == 6 and victim.upper() in check.output and "missing from the archive" in check.output
        fetch = cluster.cli("wal-fetch", victim.upper(), str(cluster.base / "x"), "--source", "db")
        assert fetch.exit_code == 8 and "gap" in fetch.output
    finally:
        for p, data in saved.items():
            p.write_bytes(data)
    assert cluster.cli("check").exit_code == 0


def test_wrong_dsn_or_server_down_is_one_clear_line(cluster: Cluster, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    text = cluster.config.read_text().replace(f"port={cluster.port}", f"port={free_port()}")
    config.write_text(text)
    result = CliRunner().invoke(
        main, ["--config", str(config), "--password-file", str(cluster.password_file), "backup", "db", "--full"]
    )
    assert result.exit_code == 10
    assert "cannot connect to PostgreSQL" in result.output and "Traceback" not in result.output


def test_postgres_config_errors_name_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", local_peers(tmp_path), {}, k=1, n=1, allow_no_redundancy=True)
    with open(config, "a") as f:
        f.write('[[sources]]\nname = "db"\ntype = "postgres"\nmode = "sideways"\ndsn = "x"\n')
    result = CliRunner().invoke(main, ["--config", str(config), "snapshots"], env={"SHARDVAULT_PASSWORD": "x"})
    assert result.exit_code == 3 and "sources[0].mode" in result.output


@pytest.mark.parametrize(
    "member",
    [
        ("../escaped", tarfile.REGTYPE, ""),
        ("/etc/escaped", tarfile.REGTYPE, ""),
        ("base/../../escaped", tarfile.REGTYPE, ""),
        ("pg_tblspc/16384", tarfile.SYMTYPE, "/etc"),
        ("global/hard", tarfile.LNKTYPE, "/etc/passwd"),
    ],
)
def test_a_base_backup_cannot_write_outside_its_target(tmp_path: Path, member: tuple[str, bytes, str]) -> None:
    """Invariant 6 for PostgreSQL restores: the tar is unpacked by our own checks, not tarfile's."""
    from shardvault.errors import UnsafePathError
    from shardvault.restore.postgres import _untar

    name, kind, link = member
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        ok = tarfile.TarInfo("PG_VERSION")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"15\n"))
        bad = tarfile.TarInfo(name)
        bad.type, bad.linkname = kind, link
        tar.addfile(bad, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    buffer.seek(0)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(UnsafePathError):
        _untar(buffer, target)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["PG_VERSION", "target"]


def _base_backup_tar(files: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    buffer.seek(0)
    return buffer


BASE_FILES = {f"base/1/{1200 + i}": os.urandom(3000 + i) for i in range(80)} | {"PG_VERSION": b"15\n"}


def test_a_base_backup_is_synced_file_by_file_as_it_is_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file is on disk when the restore says so (PostgreSQL then finds nothing left to write back)."""
    from shardvault.restore.postgres import _untar

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "target"
    target.mkdir()
    open_before = len(os.listdir("/proc/self/fd"))
    _untar(_base_backup_tar(BASE_FILES), target)  # type: ignore[arg-type]
    assert sorted(synced) == sorted(str(target / name) for name in BASE_FILES)
    assert all((target / name).read_bytes() == content for name, content in BASE_FILES.items())
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_a_file_that_fails_to_sync_fails_the_restore_as_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full or failing disk can refuse the data only at fsync (delayed allocation): exit 12, naming the file."""
    from shardvault.errors import RestoreTargetError
    from shardvault.restore.postgres import _untar

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/base/1/1240"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "target"
    target.mkdir()
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RestoreTargetError) as failed:
        _untar(_base_backup_tar(BASE_FILES), target)  # type: ignore[arg-type]
    assert failed.value.exit_code == 12
    assert "base/1/1240" in str(failed.value) and "No space left" in str(failed.value)
    assert len(os.listdir("/proc/self/fd")) == open_before  # every descriptor handed to the syncer was closed


def test_wal_fetch_reads_ahead_and_serves_later_segments_without_the_repository(cluster: Cluster) -> None:
    cluster.sql("CREATE TABLE IF NOT EXISTS ahead (x int)")
    for _ in range(3):
        cluster.sql("INSERT INTO ahead VALUES (1); SELECT pg_switch_wal()")
    cluster.json("backup", "db")
    names = sorted(
        p.name.upper() for p in (cluster.base / "peers" / "p0" / "wal" / "db").iterdir() if len(p.name) == 24
    )
    first, second = names[-3], names[-2]
    pg_wal = cluster.base / "fetch-test" / "pg_wal"
    pg_wal.mkdir(parents=True)
    assert cluster.cli("wal-fetch", first, str(pg_wal / "RECOVERYXLOG"), "--source", "db").exit_code == 0
    # The call started a prefetcher, which fetches the next segments while recovery replays this one.
    deadline = time.monotonic() + 60
    while not (pg_wal / ".shardvault-prefetch" / second).exists():
        assert time.monotonic() < deadline, "the prefetcher fetched nothing"
        time.sleep(0.05)
    # The next call is served from the read-ahead: it needs neither the passphrase nor a peer.
    wrong = cluster.base / "wrong-password"
    wrong.write_text("not the passphrase\n")
    result = CliRunner().invoke(
        main,
        [
            "--config",
            str(cluster.config),
            "--password-file",
            str(wrong),
            "wal-fetch",
            second,
            str(pg_wal / "next"),
            "--source",
            "db",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (pg_wal / "next").stat().st_size == 16 << 20
    assert not (pg_wal / ".shardvault-prefetch" / second).exists()


def test_read_ahead_never_fails_the_segment_asked_for(tmp_path: Path) -> None:
    """A segment archived after wal-fetch loaded the index is skipped by the read-ahead, not an error."""
    from shardvault.backup.wal import push
    from shardvault.config import load_config
    from shardvault.repository import Repository
    from shardvault.restore.wal import fetch, prefetch
    from shardvault.walspool import wal_files

    config = write_config(
        tmp_path / "c.toml", local_peers(tmp_path / "peers"), {}, k=4, n=6, state_dir=str(tmp_path / "s")
    )
    with open(config, "a") as f:
        f.write('[[sources]]\nname = "db"\ntype = "postgres"\ndsn = "host=127.0.0.1"\n')
    assert (
        CliRunner().invoke(main, ["--config", str(config), "init"], env={"SHARDVAULT_PASSWORD": PASSWORD}).exit_code
        == 0
    )
    cfg = load_config(config)
    segments = {n: os.urandom(1 << 20) for n in ("000000010000000000000001", "000000010000000000000002")}
    for n, data in segments.items():
        (tmp_path / n).write_bytes(data)
    with Repository.open(cfg, PASSWORD) as writer:
        push(writer, cfg.source("db"), tmp_path / "000000010000000000000001")
    reader = Repository.open(cfg, PASSWORD)
    _ = reader.index  # loaded now, before the second segment exists
    with Repository.open(cfg, PASSWORD) as writer:
        push(writer, cfg.source("db"), tmp_path / "000000010000000000000002")
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    fetch(reader, cfg.source("db"), "000000010000000000000001", pg_wal / "RECOVERYXLOG")
    (pg_wal / ".shardvault-prefetch").mkdir()
    assert prefetch(reader, cfg.source("db"), "000000010000000000000002", pg_wal / "RECOVERYXLOG", idle=0) == 0
    reader.close()
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == segments["000000010000000000000001"]
    assert not wal_files(pg_wal / ".shardvault-prefetch")


def test_async_archiving_and_a_prefetched_recovery_under_postgresql(
    cluster: Cluster, restored: list[tuple[Path, int]]
) -> None:
    """archive_command = 'wal-push --async %p' under PostgreSQL; a PITR whose WAL the prefetcher fetched."""
    from shardvault.walspool import worker_alive

    archive = f"{BIN / 'shardvault'} --config {cluster.config} --password-file {cluster.password_file}"
    cluster.sql(f"ALTER SYSTEM SET archive_command = '{archive} wal-push --async %p'")
    cluster.sql("SELECT pg_reload_conf()")
    try:
        full = cluster.json("backup", "db", "--full")
        (failed_before,) = cluster.sql("SELECT failed_count FROM pg_stat_archiver")[0]
        cluster.sql("CREATE TABLE IF NOT EXISTS pushed (id int, body text)")
        for batch in range(6):
            cluster.sql(f"INSERT INTO pushed SELECT {batch}, md5(g::text) FROM generate_series(1, 20000) g")
            cluster.sql("SELECT pg_switch_wal()")
        (target,) = cluster.sql("SELECT now()::text")[0]
        time.sleep(1.2)
        cluster.sql("INSERT INTO pushed SELECT 99, 'after the target'")
        (last,) = cluster.sql("SELECT pg_walfile_name(pg_switch_wal())")[0]
        deadline = time.monotonic() + 120
        while (cluster.sql("SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") < last:
            assert time.monotonic() < deadline, cluster.sql("SELECT * FROM pg_stat_archiver")
            time.sleep(0.1)
        assert cluster.sql("SELECT failed_count FROM pg_stat_archiver")[0][0] == failed_before
        assert worker_alive(cluster.data / "pg_wal" / ".shardvault-pushed"), "one pusher runs for the calls"
        archived = {p.name.upper() for p in (cluster.base / "peers" / "p0" / "wal" / "db").iterdir()}
        assert last in archived
    finally:
        cluster.sql("ALTER SYSTEM RESET archive_command")
        cluster.sql("SELECT pg_reload_conf()")
    port = _restore_and_start(cluster, restored, full["snapshot"]["id"], "--to-time", str(target))
    assert cluster.sql("SELECT count(*), count(DISTINCT id) FROM pushed", port) == [(120000, 6)]
    # restore_command takes a segment fetched ahead with mv before it would start shardvault (the recovery
    # above went through it: this is the command the server ran).
    conf = (restored[-1][0] / "postgresql.auto.conf").read_text()
    assert """restore_command = 'p=%p; mv -f "${p%%/*}/.shardvault-prefetch/%f" "$p" 2>/dev/null || """ in conf
    spool = restored[-1][0] / "pg_wal" / ".shardvault-prefetch"
    deadline = time.monotonic() + 30
    while spool.exists():  # the server promoted: the prefetcher removes what it fetched and stops
        assert time.monotonic() < deadline, sorted(p.name for p in spool.iterdir())
        time.sleep(0.1)
