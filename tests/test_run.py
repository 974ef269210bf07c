"""`make run` (scripts/run.sh): starts everything on loopback, serves the UI and /metrics, stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(response.status)


@pytest.mark.slow
def test_make_run_starts_serves_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("PREFECT", "EXPORTER", "PROMETHEUS", "ALERTMANAGER")}
    env = os.environ | {f"RUN_{name}_PORT": str(port) for name, port in ports.items()}
    env |= {"RUN_DIR": str(tmp_path / "run"), "BIN": str(BIN)}
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "run.sh")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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
        assert _get(f"http://127.0.0.1:{ports['PREFECT']}/") == 200  # the UI
        assert _get(f"http://127.0.0.1:{ports['PREFECT']}/api/health") == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['EXPORTER']}/metrics", timeout=10).read().decode()
        assert 'shardvault_backup_last_success_timestamp_seconds{kind="full",source="docs"}' in metrics
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert "stopped prefect-server" in output and output.index("stopped serve") < output.index("stopped prefect-server")
    for port in ports.values():  # nothing left listening
        with pytest.raises(OSError):
            _get(f"http://127.0.0.1:{port}/")
