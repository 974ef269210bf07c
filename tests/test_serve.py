"""`shardvault serve` against a real `prefect server start` on loopback.

One server for the module (its own PREFECT_HOME, a free port); ``serve`` runs
as a child process and is stopped (SIGTERM) before the server, as run.sh does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SCHEDULE, SOURCE_SCHEDULE, Vault, free_port, make_vault

BIN = Path(sys.executable).parent
WAIT = 120.0  # seconds: the longest any step may take before the test fails instead of hanging


def _stop(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _until(what: str, probe: Any, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception:  # noqa: BLE001  # not there yet
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _until("the Prefect server", lambda: urllib.request.urlopen(url + "/health", timeout=2).status == 200)
        yield {"PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    finally:
        _stop(proc)
        log.close()


@pytest.fixture
def client_for(prefect_server: dict[str, str]) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        yield c


def _serving_vault(tmp_path: Path, env: dict[str, str]) -> Vault:
    vault = make_vault(tmp_path)
    vault.config.write_text(vault.config.read_text() + SOURCE_SCHEDULE + SCHEDULE)
    vault.env = dict(env)
    return vault


@pytest.mark.slow
def test_serve_registers_the_deployments_and_a_run_completes(
    tmp_path: Path, prefect_server: dict[str, str], client_for: Any
) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.deployments import run_deployment

    client = client_for
    vault = _serving_vault(tmp_path, prefect_server)
    serve = vault.popen("serve")
    try:
        names = ("backup/src", "check/default", "scrub/default", "repair/default")
        # serve registers one deployment after another: wait for the last one
        _until("every deployment", lambda: [client.read_deployment_by_name(n) for n in names])
        backup = client.read_deployment_by_name("backup/src")
        crons = sorted((s.schedule.cron, s.schedule.timezone, s.parameters.get("full")) for s in backup.schedules)
        assert crons == [("0 * * * *", "Europe/Paris", False), ("0 3 * * 0", "Europe/Paris", True)]
        assert backup.parameters["source"] == "src" and backup.parameters["config"] == str(vault.config)
        assert backup.concurrency_options is not None
        assert backup.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
        assert backup.global_concurrency_limit is not None and backup.global_concurrency_limit.limit == 1
        for name, cron in (("check/default", "*/30 * * * *"), ("scrub/default", "15 3 * * *")):
            deployment = client.read_deployment_by_name(name)
            assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [(cron, "Europe/Paris")]
        repair = client.read_deployment_by_name("repair/default")
        assert repair.schedules == []
        (automation,) = client.read_automations_by_name("shardvault self-repair")
        assert automation.trigger.expect == {"shardvault.redundancy.degraded"}
        assert automation.trigger.within.total_seconds() >= 60 and automation.trigger.threshold == 1
        assert [str(a.deployment_id) for a in automation.actions] == [str(repair.id)]  # type: ignore[attr-defined]

        run = run_deployment("backup/src", timeout=WAIT, parameters={"full": True})
        assert run.state is not None and run.state.is_completed(), run.state
        assert run.name.startswith("backup-src-full-")
        listed = json.loads(vault.cli("snapshots", "--json").stdout)
        assert [s["source"] for s in listed] == ["src"]

        # Self-repair: a destroyed peer, found by a check run, is repaired by the trigger's run.
        shutil.rmtree(vault.peer(4))
        vault.peer(4).mkdir()  # the disk replaced by an empty one: repair refills it
        check = run_deployment("check/default", timeout=WAIT)
        assert check.state is not None and check.state.is_failed()
        assert (check.state.message or "").startswith("Damage found: ")

        def repair_runs() -> Any:
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[repair.id])))
            return [r for r in runs if r.state is not None and r.state.is_final()]

        (repair_run,) = _until("the self-repair run", repair_runs)
        assert repair_run.state.is_completed(), repair_run.state
        assert vault.cli("check").exit_code == 0  # the repair run rebuilt every shard of the destroyed peer
    finally:
        _stop(serve)  # before the server (the module fixture stops it after)
    assert serve.returncode is not None


def test_serve_with_an_unreachable_api_registers_nothing(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    vault = make_vault(tmp_path)
    vault.env = {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(tmp_path / "prefect-home")}
    result = vault.run("serve", timeout=60)
    assert result.returncode == 15, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"shardvault: error: The Prefect API at http://127.0.0.1:{port}/api is unreachable")
    )
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_cron_stops_before_asking_the_api(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    vault.config.write_text(vault.config.read_text() + SCHEDULE.replace("15 3 * * *", "15 3 * *"))
    vault.env = {"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api", "PREFECT_HOME": str(tmp_path / "ph")}
    result = vault.run("serve", timeout=60)
    assert result.returncode == 3, result.stderr
    assert "Schedule error" in result.stderr and "schedule.scrub" in result.stderr
