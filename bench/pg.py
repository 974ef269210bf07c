"""shardvault against pgBackRest on one PostgreSQL 15 cluster (pgbench scale 50), in one run.

    .venv/bin/python bench/pg.py [--scale 50] [--repeat 2]

Both archive the cluster's WAL (archive_command runs both), both encrypt
(pgBackRest: aes-256-cbc) and compress with zstd (pgBackRest: compress-type=zst,
process-max=2, as shardvault uses both cores).  Measured: a full backup, and a
point-in-time restore to a time between two pgbench runs, up to the moment
the restored server has finished recovery and accepts writes.  Prints times
and ratios (shardvault / pgBackRest).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
PGBIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "benchmark passphrase"


def as_postgres(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, check=check)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_promoted(port: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2"
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row and not row[0]:
                    return
        except psycopg.OperationalError:
            pass
        time.sleep(0.2)
    raise RuntimeError("recovery did not finish")


def wait_archived(dsn: str, timeout: float = 900) -> None:
    """Switch WAL and wait until the archiver has caught up, so no tool pays for another's backlog."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]  # type: ignore[index]
            if last is not None and last >= segment:
                return
            time.sleep(0.2)
    raise RuntimeError("the archiver did not catch up")


def archive_backlog(dsn: str, command: str, segments: int) -> tuple[float, int]:
    """Seconds ``command`` (as archive_command) takes to archive a backlog of about ``segments`` WAL segments.

    Archiving is paused (an empty archive_command) while the backlog is
    written (rows of random text: WAL that compresses about as pgbench's),
    then ``command`` is set and the clock runs until the archiver has
    caught up.  Returns the seconds and how many segments were archived.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:

        def value(query: str) -> Any:
            return conn.execute(query).fetchone()[0]  # type: ignore[index]

        conn.execute("ALTER SYSTEM SET archive_command = ''")
        conn.execute("SELECT pg_reload_conf()")
        time.sleep(1)
        before = value("SELECT archived_count FROM pg_stat_archiver")
        conn.execute("CREATE TABLE IF NOT EXISTS backlog (t text)")
        while True:
            conn.execute(
                "INSERT INTO backlog SELECT md5(random()::text) || md5(random()::text) FROM generate_series(1, 50000)"
            )
            if value("SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'") >= segments:
                break
        last = value("SELECT pg_walfile_name(pg_switch_wal())")
        start = time.perf_counter()
        conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET archive_command = {}").format(psycopg.sql.Literal(command)))
        conn.execute("SELECT pg_reload_conf()")
        deadline = start + 900
        while (value("SELECT last_archived_wal FROM pg_stat_archiver") or "") < last:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{command} did not catch up")
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
        done = value("SELECT archived_count FROM pg_stat_archiver") - before
        conn.execute("TRUNCATE backlog")
    return elapsed, done


def timed(argv: list[str], **kw: object) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {result.stdout[-500:]} {result.stderr[-1500:]}")
    return time.perf_counter() - start


def alternated(
    i: int, shardvault: Callable[[], float], pgbackrest: Callable[[], float], settle: Callable[[], None] = lambda: None
) -> tuple[float, float]:
    """Both tools' times for run ``i``: shardvault first in even runs, pgBackRest in odd ones.

    The first one pays for what ran before it (writeback, a cold cache); ``settle`` runs before each.
    """
    times: dict[str, float] = {}
    for name, run in [("sv", shardvault), ("br", pgbackrest)][:: -1 if i % 2 else 1]:
        settle()
        times[name] = run()
    return times["sv"], times["br"]


def synced() -> None:
    subprocess.run(["sync"], check=True)
    time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--backlog", type=int, default=32, help="WAL segments in each archiving backlog")
    parser.add_argument("--keep", action="store_true", help="keep the repositories (prints where, and the PITR target)")
    args = parser.parse_args()
    subprocess.run(
        [str(HERE.parent / "scripts" / "apt-install"), "pgbackrest", "postgresql:/usr/lib/postgresql/15/bin/initdb"],
        check=True,
    )
    os.umask(0)
    base = Path(tempfile.mkdtemp(prefix="sv-pgbench-", dir="/tmp"))
    os.chmod(base, 0o777)
    data, port = base / "pg" / "data", free_port()
    (base / "pg").mkdir()
    shutil.chown(base / "pg", "postgres", "postgres")
    password_file = base / "password"
    password_file.write_text(PASSWORD + "\n")
    config = base / "shardvault.toml"
    peers = "".join(f'[[peers]]\nname = "p{i}"\nurl = "{base}/peers/p{i}"\nzone = "z{i % 3}"\n' for i in range(6))
    (base / "peers").mkdir(parents=True, exist_ok=True)
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    config.write_text(
        f'[repository]\nk = 4\nn = 6\nstate_dir = "{base}/state"\n{peers}'
        f'[[sources]]\nname = "db"\ntype = "postgres"\ndsn = "{dsn}"\n'
    )
    pgbr = base / "pgbackrest"
    pgbr.mkdir()
    shutil.chown(pgbr, "postgres", "postgres")
    pgbr_conf = pgbr / "pgbackrest.conf"
    pgbr_conf.write_text(
        f"[global]\nrepo1-path={pgbr}/repo\nrepo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=benchmark\n"
        f"compress-type=zst\nprocess-max=2\nlog-level-console=warn\nlock-path={pgbr}/lock\nlog-path={pgbr}/log\n"
        f"spool-path={pgbr}/spool\nstart-fast=y\n\n"
        f"[bench]\npg1-path={data}\npg1-port={port}\npg1-socket-path={base / 'pg'}\n"
    )
    os.chmod(pgbr_conf, 0o644)
    sv = [str(BIN / "shardvault"), "--config", str(config), "--password-file", str(password_file)]
    pgbackrest = ["runuser", "-u", "postgres", "--", "pgbackrest", f"--config={pgbr_conf}", "--stanza=bench"]
    archive = f"{' '.join(sv)} wal-push %p && pgbackrest --config={pgbr_conf} --stanza=bench archive-push %p"
    as_postgres(str(PGBIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale")
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"wal_level = replica\narchive_mode = on\narchive_command = '{archive}'\nmax_wal_size = 2GB\n")
    started: list[Path] = []
    target = ""
    try:
        as_postgres(str(PGBIN / "pg_ctl"), "-D", str(data), "-l", str(base / "pg" / "log"), "-w", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {base / 'pg'}", "start")  # fmt: skip
        started.append(data)
        subprocess.run([*sv, "init"], check=True, capture_output=True)
        subprocess.run([*pgbackrest, "stanza-create"], check=True, capture_output=True)
        t = time.perf_counter()
        subprocess.run([str(PGBIN / "pgbench"), "-i", "-s", str(args.scale), "-q", "-h", "127.0.0.1", "-p", str(port),
                        "-U", "postgres", "postgres"], check=True, capture_output=True)  # fmt: skip
        with psycopg.connect(dsn) as conn:
            size = conn.execute("SELECT pg_database_size('postgres')").fetchone()[0]  # type: ignore[index]
        print(f"pgbench scale {args.scale}: {size / 2**20:.0f} MiB database, loaded in {time.perf_counter() - t:.0f} s")

        t = time.perf_counter()
        wait_archived(dsn)
        print(f"archiving the load's WAL (both tools, one after the other) took {time.perf_counter() - t:.0f} s more")
        # One WAL segment's archiving, as archive_command runs it (a new process each time).
        # Real WAL content (pgBackRest checks the page header), under names no timeline of ours uses.
        real = sorted(p for p in (data / "pg_wal").iterdir() if len(p.name) == 24)[0]
        segment = base / "0000000A00000000000000A0"
        shutil.copy(real, segment)
        rows: dict[str, tuple[list[float], list[float]]] = {"wal-push of one segment": ([], [])}
        for i in range(3):
            name = base / f"0000000A00000000000000A{i + 1}"
            shutil.copy(segment, name)
            os.chmod(name, 0o644)
            push = rows["wal-push of one segment"]
            push[0].append(timed(["runuser", "-u", "postgres", "--", *sv, "wal-push", "--source", "db", str(name)]))
            push[1].append(timed([*pgbackrest, "archive-push", str(name)]))
        rows["full backup"] = ([], [])
        for i in range(args.repeat):
            wait_archived(dsn)
            sv_t, br_t = alternated(
                i, lambda: timed([*sv, "backup", "db", "--full"]), lambda: timed([*pgbackrest, "--type=full", "backup"])
            )
            rows["full backup"][0].append(sv_t)
            rows["full backup"][1].append(br_t)

        bench = [str(PGBIN / "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-T", "15", "-c", "2",
                 "postgres"]  # fmt: skip
        timed(bench)
        with psycopg.connect(dsn) as conn:
            lsn0 = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        t = time.perf_counter()
        timed(bench)
        with psycopg.connect(dsn) as conn:
            wal = conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (str(lsn0),)).fetchone()[0]  # type: ignore[index]
        rate = float(wal) / (time.perf_counter() - t) / 2**20
        push = statistics.median(rows["wal-push of one segment"][0])
        print(
            f"pgbench -c 2 wrote WAL at {rate:.1f} MiB/s; one wal-push takes {push:.2f} s, "
            f"so archiving keeps up to {16 / push:.0f} MiB/s ({16 / push / rate:.1f}x that rate)"
        )
        with psycopg.connect(dsn) as conn:
            target = conn.execute("SELECT now()::text").fetchone()[0]  # type: ignore[index]
            before = conn.execute("SELECT sum(abalance) FROM pgbench_accounts").fetchone()[0]  # type: ignore[index]
        time.sleep(1)
        timed(bench)
        subprocess.run([*sv, "backup", "db"], check=True, capture_output=True)  # WAL switch, archived
        rows["PITR restore + recovery"] = ([], [])

        def run_sv(target_dir: Path, port: int) -> float:
            return timed([*sv, "restore", "latest", "--source", "db", "--to-time", target,
                          "--target", str(target_dir), "--start", "--port", str(port)])  # fmt: skip

        def run_br(target_dir: Path, port: int) -> float:
            target_dir.mkdir(mode=0o700)
            shutil.chown(target_dir, "postgres", "postgres")
            start = time.perf_counter()
            subprocess.run([*pgbackrest, f"--pg1-path={target_dir}", "--type=time", f"--target={target}",
                            "--target-action=promote", "restore"], check=True, capture_output=True)  # fmt: skip
            options = f"-c listen_addresses=127.0.0.1 -p {port} -k {target_dir} -c archive_mode=off"
            log = str(target_dir / "log")
            as_postgres(str(PGBIN / "pg_ctl"), "-D", str(target_dir), "-l", log, "-w", "-o", options, "start")
            wait_promoted(port)
            return time.perf_counter() - start

        for i in range(args.repeat):
            sv_dir, sv_port = base / f"sv-restore-{i}", free_port()
            br_dir, br_port = base / f"br-restore-{i}", free_port()
            started += [sv_dir, br_dir]  # stopped at the end even if a run fails half-way
            # After a sync: the first restore after the backups would pay for their writeback (as in bench/run.py).
            sv_t, br_t = alternated(i, partial(run_sv, sv_dir, sv_port), partial(run_br, br_dir, br_port), synced)
            for p in (sv_port, br_port):
                with psycopg.connect(f"host=127.0.0.1 port={p} user=postgres dbname=postgres") as conn:
                    got = conn.execute("SELECT sum(abalance) FROM pgbench_accounts").fetchone()[0]  # type: ignore[index]
                assert got == before, f"restore on port {p}: sum(abalance) {got}, expected {before}"
            rows["PITR restore + recovery"][0].append(sv_t)
            rows["PITR restore + recovery"][1].append(br_t)
            for d in (sv_dir, br_dir):
                as_postgres(str(PGBIN / "pg_ctl"), "-D", str(d), "-m", "immediate", "stop", check=False)
                started.remove(d)
                shutil.rmtree(d)
        # Archiving a backlog as PostgreSQL runs archive_command (one call per segment, in order), each tool
        # alone, synchronous and asynchronous: seconds per segment, and how far above pgbench's WAL rate.
        backlog: dict[str, tuple[float, int]] = {}
        pgbr_cmd = f"pgbackrest --config={pgbr_conf} --stanza=bench"
        for label, command in [
            ("shardvault wal-push (--ahead 8)", f"{' '.join(sv)} wal-push %p"),
            ("shardvault wal-push --async", f"{' '.join(sv)} wal-push --async %p"),
            ("pgbackrest archive-push", f"{pgbr_cmd} archive-push %p"),
            ("pgbackrest archive-push, archive-async", f"{pgbr_cmd} --archive-async archive-push %p"),
        ]:
            backlog[label] = archive_backlog(dsn, command, args.backlog)
        sv_size = sum(p.stat().st_size for p in (base / "peers").rglob("*") if p.is_file())
        br_size = sum(p.stat().st_size for p in (pgbr / "repo").rglob("*") if p.is_file())
        print(f"median of {args.repeat}; both verified to restore the same sum(abalance) at the target time")
        print(f"{'operation':<26}{'shardvault':>12}{'pgBackRest':>12}{'ratio':>8}   each run")
        for name, (a, b) in rows.items():
            ma, mb = statistics.median(a), statistics.median(b)
            runs = " ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(a, b, strict=True))
            print(f"{name:<26}{ma:10.2f} s{mb:10.2f} s{ma / mb:8.2f}   {runs}")
        print(
            f"archiving a backlog of ~{args.backlog} segments (archive_command alone; pgbench -c 2: {rate:.1f} MiB/s)"
        )
        per = {label: seconds / max(count, 1) for label, (seconds, count) in backlog.items()}
        for label, (seconds, count) in backlog.items():
            print(
                f"  {label:<40}{count:4d} in {seconds:6.2f} s: {per[label]:.3f} s per segment, "
                f"{16 / per[label]:6.1f} MiB/s ({16 / per[label] / rate:4.1f}x pgbench's WAL rate)"
            )
        sync = per["shardvault wal-push (--ahead 8)"] / per["pgbackrest archive-push"]
        asynchronous = per["shardvault wal-push --async"] / per["pgbackrest archive-push, archive-async"]
        print(f"  ratio per segment: synchronous {sync:.2f}, asynchronous {asynchronous:.2f}")
        print(
            f"stored: shardvault {sv_size / 2**20:.0f} MiB over 6 peers (4-of-6), "
            f"pgBackRest {br_size / 2**20:.0f} MiB (one copy); {args.repeat} full backups each plus WAL"
        )
    finally:
        for d in started:
            as_postgres(str(PGBIN / "pg_ctl"), "-D", str(d), "-m", "immediate", "stop", check=False)
        if args.keep:
            print(f"kept {base} (config {config}); PITR target time {target!r}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
