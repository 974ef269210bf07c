"""DR drills: run a playbook's restore, check what came back, measure RTO and RPO, report.

A drill is a rehearsal of the day the data is needed:

1. **Open** the repository as the playbook says.  With ``exclude_zones`` the
   drill uses a copy of the configuration without the peers of those zones
   and with an empty, temporary state directory: a lost site takes its
   machine (and its state and metadata cache) with it, so the drill proves
   that the surviving peers and the passphrase are enough (invariant 1).
2. **Restore** into a target the drill owns (a scratch directory, or a path
   it creates).  PostgreSQL: the base backup is unpacked into ``data/`` and
   every WAL segment recovery may need is fetched (verified) into ``wal/``
   beside it first, as Barman does, so the restored server's
   ``restore_command`` is a plain ``cp``: no passphrase and no path to one
   in its configuration.  The scratch cluster is started on a free loopback
   port and waited for until recovery promoted it.
3. **Check** in the playbook's order; every check runs even when an earlier
   one failed, so the report lists everything that is wrong.
4. **Measure.**  The achieved RTO is the time from the drill's start until
   every check passed; the RPO is the drill's start minus the time of the
   restored point (the snapshot's end for files and buckets, the last
   replayed commit, ``pg_last_xact_replay_timestamp()``, for PostgreSQL).
5. **Report and record**: ``<state_dir>/drills/<name>-<time>.json`` and
   ``.md``, and a ``drill`` run in the state, which the exporter shows per
   playbook.  Then clean up as the playbook says (a PostgreSQL cluster is
   always stopped; a failed drill keeps its target under ``on_success``).

:func:`run_drill` returns the report whatever happened; the caller turns it
into an exit code with :meth:`DrillReport.error`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg

from shardvault.config import Config, PostgresSource
from shardvault.crypto import new_content_hasher
from shardvault.durations import format_duration
from shardvault.errors import (
    DrillCheckFailedError,
    DrillObjectiveMissedError,
    RepositoryNotFoundError,
    RestoreTargetError,
    ShardvaultError,
    SourceError,
)
from shardvault.repository import Repository
from shardvault.repository.snapshot import Snapshot
from shardvault.repository.wal import archived
from shardvault.sources import postgres as pg
from shardvault.state import State
from shardvault.tree import BLOCK_DEVICE, CHAR_DEVICE, DIR, FIFO, FILE, SYMLINK
from shardvault.walnames import segment_number

from .playbook import Check, CheckKind, Cleanup, Playbook
from .safepath import safe_parts

WAL_SEGMENT_BYTES = 16 << 20  # PostgreSQL's default; walnames assumes it too
ProgressFn = Callable[[str], None]


class DrillResult(StrEnum):
    PASSED = "passed"
    FAILED = "failed"


class PointKind(StrEnum):
    """What the restored point's time is (the RPO's reference)."""

    SNAPSHOT_FINISHED = "snapshot finished"
    LAST_REPLAYED_COMMIT = "last replayed commit"


_SECRETS = ("SHARDVAULT_PASSWORD", "SHARDVAULT_PASSWORD_FILE")


def check_environment() -> dict[str, str]:
    """The environment of a check or of the scratch server: ours, without the passphrase.

    A check's output lands in the report, the Prefect artifact and the error
    line; a scratch server needs no key (the WAL it replays was fetched first).
    """
    return {k: v for k, v in os.environ.items() if k not in _SECRETS}


@dataclass
class StepResult:
    name: str
    seconds: float
    ok: bool
    detail: str = ""

    def to_doc(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CheckResult:
    name: str
    kind: CheckKind
    passed: bool
    detail: str
    seconds: float

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "passed": self.passed,
            "detail": self.detail,
            "seconds": self.seconds,
        }


@dataclass
class DrillReport:
    playbook: str
    playbook_path: str
    source: str
    source_type: str
    started: float
    rto_objective_seconds: float
    rpo_objective_seconds: float
    exclude_zones: list[str]
    finished: float = 0.0
    result: DrillResult = DrillResult.FAILED
    rto_seconds: float | None = None
    rpo_seconds: float | None = None
    snapshot: str | None = None
    restored_point: str | None = None
    restored_point_kind: PointKind | None = None
    peers_used: list[str] = field(default_factory=list)
    target: str = ""
    target_kept: bool = True
    steps: list[StepResult] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    failure: str | None = None  # why the drill could not restore (then no check ran)
    reports: dict[str, str] = field(default_factory=dict)
    exception: ShardvaultError | None = field(default=None, repr=False)

    @property
    def checks_passed(self) -> bool:
        return self.failure is None and bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def rto_met(self) -> bool:
        return self.rto_seconds is not None and self.rto_seconds <= self.rto_objective_seconds

    @property
    def rpo_met(self) -> bool:
        return self.rpo_seconds is not None and self.rpo_seconds <= self.rpo_objective_seconds

    def missed(self) -> list[str]:
        out = []
        if self.rto_seconds is not None and not self.rto_met:
            out.append(
                f"RTO {self.rto_seconds:.3f}s exceeded the objective {format_duration(self.rto_objective_seconds)}"
            )
        if self.rpo_seconds is not None and not self.rpo_met:
            out.append(
                f"RPO {self.rpo_seconds:.3f}s exceeded the objective {format_duration(self.rpo_objective_seconds)}"
            )
        return out

    def error(self) -> ShardvaultError | None:
        """The error the drill ends with (exit code), or None when it passed."""
        if self.exception is not None:
            return self.exception
        for check in self.checks:
            if not check.passed:
                return DrillCheckFailedError(self.playbook, check.name, check.detail)
        if missed := self.missed():
            return DrillObjectiveMissedError(self.playbook, "; ".join(missed))
        return None

    def to_doc(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "playbook_path": self.playbook_path,
            "source": self.source,
            "source_type": self.source_type,
            "result": self.result.value,
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "duration_seconds": round(self.finished - self.started, 3),
            "rto_seconds": self.rto_seconds,
            "rto_objective_seconds": self.rto_objective_seconds,
            "rto_met": self.rto_met,
            "rpo_seconds": self.rpo_seconds,
            "rpo_objective_seconds": self.rpo_objective_seconds,
            "rpo_met": self.rpo_met,
            "snapshot": self.snapshot,
            "restored_point": self.restored_point,
            "restored_point_kind": self.restored_point_kind.value if self.restored_point_kind else None,
            "exclude_zones": self.exclude_zones,
            "peers_used": self.peers_used,
            "target": self.target,
            "target_kept": self.target_kept,
            "failure": self.failure,
            "steps": [s.to_doc() for s in self.steps],
            "checks": [c.to_doc() for c in self.checks],
            "reports": self.reports,
        }

    def to_markdown(self) -> str:
        def secs(value: float | None) -> str:
            return "–" if value is None else f"{value:.3f} s"

        mark = {True: "✅", False: "❌"}
        rto_goal, rpo_goal = format_duration(self.rto_objective_seconds), format_duration(self.rpo_objective_seconds)
        lines = [
            f"# DR drill `{self.playbook}`: {self.result.value.upper()}",
            "",
            f"- playbook: `{self.playbook_path}`",
            f"- source: `{self.source}` ({self.source_type}), snapshot `{self.snapshot or '–'}`",
            f"- started {_iso(self.started)}, finished {_iso(self.finished)}",
            f"- restored into `{self.target or '–'}` ({'kept' if self.target_kept else 'removed'})",
        ]
        if self.exclude_zones:
            lines.append(f"- zones lost (excluded): {', '.join(self.exclude_zones)}; peers used: "
                         f"{', '.join(self.peers_used)}; empty state directory")  # fmt: skip
        if self.failure:
            lines.append(f"- **restore failed:** {self.failure}")
        lines += [
            "",
            "| objective | target | achieved | met |",
            "| --- | --- | --- | --- |",
            f"| RTO | {rto_goal} | {secs(self.rto_seconds)} | {mark[self.rto_met]} |",
            f"| RPO | {rpo_goal} | {secs(self.rpo_seconds)} | {mark[self.rpo_met]} |",
            "",
        ]
        if self.restored_point:
            lines += [f"Restored point: {self.restored_point} ({self.restored_point_kind})", ""]
        lines += ["## Steps", "", "| step | duration | ok | detail |", "| --- | --- | --- | --- |"]
        lines += [f"| {s.name} | {s.seconds:.3f} s | {mark[s.ok]} | {_cell(s.detail)} |" for s in self.steps]
        lines += [
            "",
            "## Checks",
            "",
            "| check | kind | duration | passed | detail |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {_cell(c.name)} | {c.kind.value} | {c.seconds:.3f} s | {mark[c.passed]} | {_cell(c.detail)} |"
            for c in self.checks
        ]
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Drill:
    """One run of a playbook: the state the steps share."""

    def __init__(self, config: Config, password: str, playbook: Playbook, progress: ProgressFn | None) -> None:
        self.config = config
        self.password = password
        self.playbook = playbook
        self.progress = progress
        self.source = config.source(playbook.restore.source)
        self.report = DrillReport(
            playbook=playbook.name,
            playbook_path=str(playbook.path),
            source=playbook.restore.source,
            source_type=playbook.restore.source_type.value,
            started=time.time(),
            rto_objective_seconds=playbook.objectives.rto_seconds,
            rpo_objective_seconds=playbook.objectives.rpo_seconds,
            exclude_zones=list(playbook.restore.exclude_zones),
        )
        self.t0 = time.monotonic()  # durations come from the monotonic clock; times shown, from the wall clock
        self.repo_id: str | None = None
        self.cleanup_paths: list[Path] = []  # what the drill created and may remove
        self.temp_state: Path | None = None
        self.restored = Path()  # what {target} means: the restored tree, or PostgreSQL's data directory
        self.port: int | None = None
        self.pg_data: Path | None = None

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[StepResult]:
        if self.progress:
            self.progress(name)
        start = time.monotonic()
        result = StepResult(name, 0.0, False)
        self.report.steps.append(result)
        try:
            yield result
            result.ok = True
        except ShardvaultError as exc:
            result.detail = str(exc)
            raise
        finally:
            result.seconds = round(time.monotonic() - start, 3)

    # -- 1. open ---------------------------------------------------------------------------

    def drill_config(self) -> Config:
        spec = self.playbook.restore
        if not spec.exclude_zones:
            return self.config
        peers = tuple(p for p in self.config.peers if p.zone not in spec.exclude_zones)
        # The machine of a lost site is gone with its state: metadata comes from the surviving peers only.
        self.temp_state = Path(tempfile.mkdtemp(prefix=f"shardvault-drill-{self.playbook.name}-state-"))
        repository = dataclasses.replace(self.config.repository, state_dir=self.temp_state)
        return dataclasses.replace(self.config, peers=peers, repository=repository)

    # -- 2. restore --------------------------------------------------------------------------

    def make_target(self) -> Path:
        spec = self.playbook.restore
        if spec.scratch:
            root = Path(tempfile.mkdtemp(prefix=f"shardvault-drill-{self.playbook.name}-"))
            self.cleanup_paths.append(root)
        else:
            root = Path(spec.target)
            if not root.exists():
                self.cleanup_paths.append(root)  # a path the drill creates is the drill's to remove
            root.mkdir(parents=True, exist_ok=True)
        if spec.source_type == "postgres":
            os.chmod(root, 0o711)  # the postgres user must reach data/ and wal/ inside
        self.report.target = str(root)
        return root

    def restore(self, repo: Repository, snap: Snapshot, root: Path) -> None:
        from .files import restore_files

        if isinstance(self.source, PostgresSource):
            self.restore_postgres(repo, snap, root)
            return
        # Bucket snapshots restore as files too: a drill proves the data, not a live bucket.
        self.restored = root / "restore"
        with self.step("restore") as s:
            stats = restore_files(repo, snap, self.restored)
            s.detail = f"{stats.files} files, {stats.dirs} dirs, {stats.symlinks} symlinks, {stats.bytes} bytes"
        self.report.restored_point = snap.finished
        self.report.restored_point_kind = PointKind.SNAPSHOT_FINISHED

    def restore_postgres(self, repo: Repository, snap: Snapshot, root: Path) -> None:
        from . import postgres as pgr
        from .wal import fetch

        assert isinstance(self.source, PostgresSource)
        source = self.source
        spec = self.playbook.restore
        data, wal = root / "data", root / "wal"
        self.restored = self.pg_data = data
        with self.step("restore base backup") as s:
            # restore_physical writes a restore_command that runs wal-fetch with a password file;
            # the drill replaces it below, so the path given here is never used by the server.
            doc = pgr.restore_physical(
                repo,
                snap,
                source,
                data,
                config_path=self.config.path,
                password_file=Path("/nonexistent/unused-by-the-drill"),
                to_time=spec.to_time,
                to_lsn=spec.to_lsn,
            )
            s.detail = f"base backup {doc['base'][:8]} into {data}"
        settings: dict[str, str] = doc["settings"]
        with self.step("fetch WAL") as s:
            wal.mkdir()
            names = _wal_needed(archived(repo, source), doc["postgres"], settings.get("recovery_target_lsn"))
            for name in names:
                fetch(repo, source, name, wal / name)
            pgr.give_to_postgres(wal, include_root=True)
            s.detail = f"{len(names)} WAL file(s) into {wal}"
        _local_restore_command(data / "postgresql.auto.conf", wal)
        self.port = _free_port()
        with self.step("start scratch cluster") as s:
            pgr.start(source, data, self.port, timeout=self.playbook.objectives.rto_seconds + 60)
            s.detail = f"recovered and promoted on 127.0.0.1:{self.port}"
        with psycopg.connect(_dsn(self.port, "postgres"), autocommit=True) as conn:
            row = conn.execute("SELECT pg_last_xact_replay_timestamp()").fetchone()
        replayed = row[0] if row else None
        if isinstance(replayed, datetime):
            self.report.restored_point = replayed.astimezone(UTC).isoformat()
            self.report.restored_point_kind = PointKind.LAST_REPLAYED_COMMIT
        else:  # nothing replayed after the base backup: the backup's own end is the point
            self.report.restored_point = snap.finished
            self.report.restored_point_kind = PointKind.SNAPSHOT_FINISHED

    def stop_postgres(self) -> None:
        if self.pg_data is None or not (self.pg_data / "postmaster.pid").exists():
            return
        assert isinstance(self.source, PostgresSource)
        argv = [pg.tool(self.source, "pg_ctl"), "-D", str(self.pg_data), "-m", "fast", "-w", "-t", "60", "stop"]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        with self.step("stop scratch cluster") as s:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=90, env=check_environment())
            if result.returncode != 0:
                # A server still running must keep its data directory: never clean up under it.
                self.cleanup_paths.clear()
                raise SourceError("drill", f"pg_ctl stop failed: {result.stderr.strip()[-200:]}")
            s.detail = "stopped"

    # -- 3. checks ---------------------------------------------------------------------------

    def fill(self, text: str) -> str:
        text = text.replace("{target}", str(self.restored))
        return text.replace("{port}", str(self.port)) if self.port is not None else text

    def run_check(self, repo: Repository, snap: Snapshot, check: Check) -> CheckResult:
        if self.progress:
            self.progress(f"check: {check.name}")
        start = time.monotonic()
        try:
            passed, detail = self._check(repo, snap, check)
        except ShardvaultError as exc:
            passed, detail = False, str(exc)
        return CheckResult(check.name, check.kind, passed, detail, round(time.monotonic() - start, 3))

    def _check(self, repo: Repository, snap: Snapshot, check: Check) -> tuple[bool, str]:
        if check.kind is CheckKind.FILES:
            return verify_files(repo, snap, self.restored)
        if check.kind is CheckKind.COMMAND:
            argv = [self.fill(a) for a in check.command]
            try:
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=check.timeout_seconds, env=check_environment()
                )
            except FileNotFoundError:
                return False, f"{argv[0]}: command not found"
            except subprocess.TimeoutExpired:
                return False, f"still running after {format_duration(check.timeout_seconds)}: stopped"
            if done.returncode == 0:
                return True, "exit 0"
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            return False, f"exit {done.returncode}" + (f": {said[-1]}" if said else "")
        if check.kind is CheckKind.HTTP:
            url = self.fill(check.http)
            try:
                with urllib.request.urlopen(url, timeout=check.timeout_seconds) as answer:
                    status = int(answer.status)
            except urllib.error.HTTPError as exc:
                status = exc.code
            except (urllib.error.URLError, OSError) as exc:
                return False, f"{url}: {getattr(exc, 'reason', exc)}"
            ok = status == check.expect_status
            return ok, f"{url} answered {status}" + ("" if ok else f", expected {check.expect_status}")
        assert check.kind is CheckKind.SQL and check.expect is not None
        if self.port is None:
            return False, "no scratch cluster is running"
        query = self.fill(check.sql)
        options = f"-c statement_timeout={int(check.timeout_seconds * 1000)}"
        try:
            with psycopg.connect(_dsn(self.port, check.database), autocommit=True, options=options) as conn:
                row = conn.execute(query.encode()).fetchone()
        except psycopg.Error as exc:
            return False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
        value = row[0] if row else None
        ok = check.expect.holds(value)
        return ok, f"got {value!r}, expected {check.expect}"

    # -- the whole drill ---------------------------------------------------------------------

    def run(self) -> DrillReport:
        report = self.report
        repo: Repository | None = None
        try:
            with self.step("open repository") as s:
                config = self.drill_config()
                repo = Repository.open(config, self.password)
                self.repo_id = repo.id
                report.peers_used = [p.name for p in repo.peers.up()]
                s.detail = f"{len(report.peers_used)} peer(s) answered" + (
                    f", zones {', '.join(report.exclude_zones)} excluded, empty state" if report.exclude_zones else ""
                )
            with self.step("resolve snapshot") as s:
                snap = repo.resolve_snapshot(self.playbook.restore.snapshot, self.playbook.restore.source)
                report.snapshot = snap.id
                s.detail = f"{snap.kind} snapshot {snap.short_id} of {snap.finished}"
            root = self.make_target()
            self.restore(repo, snap, root)
            for check in self.playbook.checks:
                report.checks.append(self.run_check(repo, snap, check))
            if report.checks_passed:
                report.rto_seconds = round(time.monotonic() - self.t0, 3)
            if report.restored_point:
                report.rpo_seconds = round(max(0.0, report.started - _parse_time(report.restored_point)), 3)
        except ShardvaultError as exc:
            report.failure = str(exc)
            report.exception = exc
        except OSError as exc:  # the target (or a scratch file) failed: say where, never a traceback
            error = RestoreTargetError(report.target or str(self.playbook.restore.target), exc.strerror or str(exc))
            report.failure = str(error)
            report.exception = error
        finally:
            try:
                self.stop_postgres()
            except (ShardvaultError, OSError, subprocess.SubprocessError) as exc:
                report.steps.append(StepResult("stop scratch cluster", 0.0, False, str(exc)))
            if repo is not None:
                repo.close()
        ok = report.checks_passed and report.rto_met and report.rpo_met
        report.result = DrillResult.PASSED if ok else DrillResult.FAILED
        self.cleanup(ok)
        report.finished = time.time()
        self.write_reports()
        self.record()
        return report

    def cleanup(self, passed: bool) -> None:
        if self.temp_state is not None:
            shutil.rmtree(self.temp_state, ignore_errors=True)  # a cache of the drill's own; never kept
        remove = self.playbook.cleanup is Cleanup.ALWAYS or (self.playbook.cleanup is Cleanup.ON_SUCCESS and passed)
        if not remove or not self.cleanup_paths:
            self.report.target_kept = bool(self.report.target)
            return
        with self.step("cleanup") as s:
            for path in self.cleanup_paths:
                shutil.rmtree(path, ignore_errors=True)
            s.detail = f"removed {', '.join(map(str, self.cleanup_paths))}"
        self.report.target_kept = False

    def write_reports(self) -> None:
        directory = self.config.repository.state_dir / "drills"
        stamp = datetime.fromtimestamp(self.report.started, UTC).strftime("%Y%m%dT%H%M%SZ")
        base = directory / f"{self.playbook.name}-{stamp}"
        paths = {"json": str(base.with_suffix(".json")), "markdown": str(base.with_suffix(".md"))}
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.report.reports = paths
            Path(paths["json"]).write_text(json.dumps(self.report.to_doc(), indent=2) + "\n")
            Path(paths["markdown"]).write_text(self.report.to_markdown())
        except OSError as exc:  # the verdict still reaches the caller and the state
            self.report.reports = {}
            self.report.steps.append(StepResult("write report", 0.0, False, f"{directory}: {exc.strerror}"))

    def record(self) -> None:
        report = self.report
        state: State | None = None
        if self.repo_id is not None:
            state = State(self.config.repository.state_dir, self.repo_id)
        else:  # the repository did not open: record in the state this configuration already has
            from shardvault.verify.exporter import find_state

            with contextlib.suppress(RepositoryNotFoundError):
                state = find_state(self.config)
        if state is None:
            return
        details = {
            "result": report.result.value,
            "rto_seconds": report.rto_seconds,
            "rto_objective_seconds": report.rto_objective_seconds,
            "rpo_seconds": report.rpo_seconds,
            "rpo_objective_seconds": report.rpo_objective_seconds,
            "checks_passed": sum(c.passed for c in report.checks),
            "checks": len(self.playbook.checks),
            "failed_checks": [c.name for c in report.checks if not c.passed],
            "failure": report.failure,
            "exclude_zones": report.exclude_zones,
            "report": report.reports.get("json"),
        }
        try:
            state.record_run(
                "drill",
                "ok" if report.result is DrillResult.PASSED else "failed",
                report.started,
                source=self.playbook.name,
                snapshot=report.snapshot,
                details=details,
                finished=report.finished,
            )
        finally:
            state.close()


_NODE_KINDS = {FIFO: stat.S_IFIFO, CHAR_DEVICE: stat.S_IFCHR, BLOCK_DEVICE: stat.S_IFBLK}


def verify_files(repo: Repository, snap: Snapshot, root: Path) -> tuple[bool, str]:
    """Every path of the snapshot is in ``root`` with its type, and every file with its size and hash.

    This reads the restored files back from the disk, independently of the
    restore's own hash check: it proves what landed, not what was written.
    """
    counts = {DIR: 0, FILE: 0, SYMLINK: 0}
    problems: list[str] = []
    for entry in repo.iter_tree(snap):
        if entry.skip:
            continue  # unreadable at backup time: never in the snapshot's data
        path = root.joinpath(*safe_parts(entry.path))
        try:
            st = path.lstat()
        except FileNotFoundError:
            if entry.type in (CHAR_DEVICE, BLOCK_DEVICE) and os.geteuid() != 0:
                continue  # only root creates device nodes: the restore noted it
            problems.append(f"{entry.path}: missing")
            continue
        except OSError as exc:
            problems.append(f"{entry.path}: {exc.strerror}")
            continue
        if entry.type == DIR:
            ok = stat.S_ISDIR(st.st_mode)
        elif entry.type == SYMLINK:
            ok = stat.S_ISLNK(st.st_mode) and os.readlink(path) == entry.target
        elif entry.type == FILE:
            ok = stat.S_ISREG(st.st_mode) and st.st_size == entry.size and _hash(path) == entry.hash
        else:  # a FIFO or device node: the right kind, and a device the right number
            kind_ok = stat.S_IFMT(st.st_mode) == _NODE_KINDS.get(entry.type)
            ok = kind_ok and (entry.type == FIFO or st.st_rdev == entry.rdev)
        counts[entry.type] = counts.get(entry.type, 0) + 1
        if not ok:
            problems.append(f"{entry.path}: differs from the snapshot")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return False, f"{len(problems)} path(s) wrong: {'; '.join(problems[:3])}{more}"
    return True, f"{counts[FILE]} files, {counts[DIR]} dirs, {counts[SYMLINK]} symlinks match snapshot {snap.short_id}"


def _hash(path: Path) -> str:
    hasher = new_content_hasher()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            hasher.update(block)
    return str(hasher.hexdigest())


def _dsn(port: int, database: str) -> str:
    return psycopg.conninfo.make_conninfo(
        host="127.0.0.1", port=port, user="postgres", dbname=database, connect_timeout=10
    )


def _lsn_segment(lsn: str) -> int:
    high, _, low = lsn.partition("/")
    return ((int(high, 16) << 32) | int(low, 16)) // WAL_SEGMENT_BYTES


def _wal_needed(names: list[str], facts: dict[str, Any], target_lsn: str | None) -> list[str]:
    """The archived WAL files a recovery from this base backup may read.

    Every segment from the base backup's first one on (later timelines
    included) and every timeline history file; with a target LSN, none past
    the segment that holds it.
    """
    first = segment_number(str(facts.get("start_wal_file", "")))
    last = _lsn_segment(target_lsn) if target_lsn else None
    out = []
    for name in names:
        if name.endswith(".history"):
            out.append(name)
            continue
        number = segment_number(name)
        if number is None:
            continue  # .backup labels and .partial files: recovery does not need them
        tli, seg = number
        if first is not None and (tli < first[0] or seg < first[1]):
            continue
        if last is not None and seg > last:
            continue
        out.append(name)
    return out


def _local_restore_command(conf: Path, wal: Path) -> None:
    """Point recovery at the fetched WAL: drop shardvault's restore_command, add a plain ``cp``."""
    try:
        kept = [line for line in conf.read_text().splitlines() if not line.startswith("restore_command")]
        quoted = str(wal).replace("'", "''")
        kept.append(f'restore_command = \'cp "{quoted}/%f" "%p"\'  # WAL fetched by the drill')
        with open(conf, "w") as f:  # in place: the file keeps its owner (postgres)
            f.write("\n".join(kept) + "\n")
    except OSError as exc:
        raise SourceError("drill", f"cannot write {conf}: {exc.strerror}") from None


def run_drill(config: Config, password: str, playbook: Playbook, progress: ProgressFn | None = None) -> DrillReport:
    """Run ``playbook`` and return its report (passed or failed); ``report.error()`` is the exit verdict."""
    return _Drill(config, password, playbook, progress).run()
