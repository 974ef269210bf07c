"""`make run` (scripts/run.sh): starts everything on loopback, every shipped drill passes, serves the UI
and /metrics, stops cleanly (PostgreSQL included)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
PLAYBOOKS = sorted(p.stem for p in (ROOT / "dr_playbooks").glob("*.yaml"))


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(response.status)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Not under tmp_path (mode 700 parents): PostgreSQL's archive_command runs as `postgres` and must reach it.
    base = Path(tempfile.mkdtemp(prefix="sv-run-", dir="/tmp"))
    yield base / "run"
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_make_run_starts_drills_serves_and_stops_cleanly(run_dir: Path) -> None:
    names = ("PREFECT", "EXPORTER", "PROMETHEUS", "ALERTMANAGER", "PG", "S3")
    ports = {name: free_port() for name in names}
    env = os.environ | {f"RUN_{name}_PORT": str(port) for name, port in ports.items()}
    env |= {"RUN_DIR": str(run_dir), "BIN": str(BIN)}
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "run.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a failed test kills every child, not just the script
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the test's timeout
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        else:
            pytest.fail("run.sh ended before it was ready:\n" + "".join(lines[-40:]))
        printed = "".join(lines)
        for name in PLAYBOOKS:  # every shipped playbook ran, through Prefect, and passed
            assert f"Creating flow run for deployment 'drill/{name}'" in printed, name
            assert any(line.startswith(f"drill {name}:") and " passed " in line for line in lines), printed[-3000:]
        docs = [json.loads(path.read_text()) for path in (run_dir / "state" / "drills").glob("*.json")]
        reports = {doc["playbook"]: doc for doc in docs}  # the drills' own reports
        assert sorted(reports) == PLAYBOOKS and len(docs) == len(PLAYBOOKS)
        assert {name: doc["result"] for name, doc in reports.items()} == dict.fromkeys(PLAYBOOKS, "passed")
        # The PITR replayed the rows that only the archived WAL holds (the incremental point).
        assert reports["postgres-pitr"]["restored_point_kind"] == "last replayed commit"
        assert reports["postgres-pitr"]["checks"][1]["detail"] == "got 1100, expected >= 1000"
        assert reports["bucket-restore"]["checks"][0]["detail"].startswith("13 files")
        assert _get(f"http://127.0.0.1:{ports['PREFECT']}/") == 200  # the UI
        assert _get(f"http://127.0.0.1:{ports['PREFECT']}/api/health") == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['EXPORTER']}/metrics", timeout=10).read().decode()
        for source in ("docs", "db", "assets"):
            assert f'shardvault_backup_last_success_timestamp_seconds{{kind="full",source="{source}"}}' in metrics
        for name in PLAYBOOKS:
            assert f'shardvault_drill_success{{playbook="{name}"}} 1.0' in metrics
        assert _listening(ports["PG"]) and _listening(ports["S3"])
        # SIGTERM takes the same trap as Ctrl-C's SIGINT; a shell started with SIGINT ignored (a background
        # job of a non-interactive shell, as some CI runners start commands) could not trap SIGINT at all.
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if (run_dir / "pg" / "data" / "postmaster.pid").exists():  # never leave a cluster behind
            pg_ctl = Path("/usr/lib/postgresql/15/bin/pg_ctl")
            argv = ["runuser", "-u", "postgres", "--", str(pg_ctl), "-D", str(run_dir / "pg" / "data")]
            subprocess.run([*argv, "-m", "immediate", "-w", "stop"], capture_output=True)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    stopped = [line.removeprefix("stopped ").strip() for line in output.splitlines() if line.startswith("stopped ")]
    assert stopped.index("serve") < stopped.index("prefect-server") < stopped.index("s3") < stopped.index("postgres")
    assert stopped[-1] == "postgres", stopped
    assert not (run_dir / "pg" / "data" / "postmaster.pid").exists()  # the cluster was stopped (cleanly)
    for port in ports.values():  # nothing left listening
        assert not _listening(port), port
