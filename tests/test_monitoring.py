"""Metrics and alerts: promtool on the rules and the exposition, and a real Prometheus end to end."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, PASSWORD, Vault, flip_bit, free_port

from shardvault.config import load_config
from shardvault.verify.exporter import find_state
from shardvault.verify.metrics import StateCollector

RULES = Path(__file__).resolve().parent.parent / "monitoring" / "prometheus"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `make test` installs it (scripts/apt-install prometheus)"
    return path


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = _tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", "shardvault-rules.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool, "test", "rules", "shardvault-rules.test.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = (RULES / "shardvault-rules.yml").read_text()
    tests = (RULES / "shardvault-rules.test.yml").read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if line.strip().startswith("- alert:")]
    assert alerts and all(f"alertname: {a}" in tests for a in alerts)


def _exposition(vault: Vault) -> str:
    result = vault.cli("exporter", "--once")
    assert result.exit_code == 0, result.output
    return result.stdout


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the exposition")


def test_exposition_passes_promtool_and_reports_the_state(backed_up: Vault) -> None:
    assert backed_up.cli("scrub").exit_code == 0
    text = _exposition(backed_up)
    check = subprocess.run([_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with backed_up.repo() as repo:
        packs = len(repo.index.packs)
    assert _value(text, 'shardvault_packs{state="healthy"}') == packs
    assert _value(text, 'shardvault_packs{state="lost"}') == 0
    assert _value(text, "shardvault_scrub_coverage_ratio") == 1.0
    assert _value(text, 'shardvault_peer_up{peer="p0",zone="z0"}') == 1.0
    assert 0 <= _value(text, 'shardvault_rpo_seconds{source="src"}') < 600
    assert _value(text, 'shardvault_shards_read_total{peer="p0"}') == len(backed_up.shards(0))
    assert _value(text, 'shardvault_verification_damage_found{kind="scrub"}') == 0


def test_rpo_keeps_rising_without_backups(backed_up: Vault) -> None:
    config = load_config(backed_up.config)
    state = find_state(config)
    now = time.time()

    def rpo(at: float) -> float:
        for family in StateCollector(config, state, clock=lambda: at).collect():
            if family.name == "shardvault_rpo_seconds":
                return float(family.samples[0].value)
        raise AssertionError("no RPO")

    assert rpo(now + 3600) - rpo(now) == pytest.approx(3600)


def test_a_source_never_backed_up_has_infinite_rpo(vault: Vault) -> None:
    assert vault.cli("check").exit_code == 0  # creates the state
    assert _value(_exposition(vault), 'shardvault_rpo_seconds{source="src"}') == float("inf")


def _get(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _firing(base: str) -> set[str]:
    alerts = _get(f"{base}/api/v1/alerts")["data"]["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def _wait_for(predicate, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_corruption_alert_fires_in_prometheus_and_resolves_after_repair(backed_up: Vault, tmp_path: Path) -> None:
    prometheus = _tool("prometheus")
    assert backed_up.cli("scrub").exit_code == 0
    exporter_port, prom_port = free_port(), free_port()
    exporter = subprocess.Popen(
        [
            str(BIN / "shardvault"),
            "--config",
            str(backed_up.config),
            "exporter",
            "--listen",
            f"127.0.0.1:{exporter_port}",
        ],
        stderr=subprocess.PIPE,
        env={"PATH": str(BIN), "SHARDVAULT_PASSWORD": PASSWORD},
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{RULES / 'shardvault-rules.yml'}]\n"
        "scrape_configs:\n"
        "  - job_name: shardvault\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n"
    )
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{prom_port}"
    try:

        def scraped() -> bool:
            try:
                targets = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
            except OSError:
                return False
            return any(t["health"] == "up" for t in targets)

        _wait_for(scraped)
        assert "ShardvaultDamageFound" not in _firing(base)

        flip_bit(backed_up.shards(2)[0])
        assert backed_up.cli("scrub").exit_code == 6
        _wait_for(lambda: {"ShardvaultDamageFound", "ShardvaultCorruptionRatioHigh"} <= _firing(base))

        assert backed_up.cli("repair").exit_code == 0
        assert backed_up.cli("scrub").exit_code == 0
        _wait_for(lambda: not {"ShardvaultDamageFound", "ShardvaultCorruptionRatioHigh"} & _firing(base))
    finally:
        for proc in (server, exporter):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_dashboard_queries_only_metrics_the_exporter_serves(backed_up: Vault) -> None:
    assert backed_up.cli("scrub").exit_code == 0
    exposed = {line.split()[2] for line in _exposition(backed_up).splitlines() if line.startswith("# TYPE")}
    exposed |= {f"{name}_total" for name in exposed}  # counters are served as name_total
    dashboard = json.loads((RULES.parent / "grafana" / "shardvault-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"shardvault_[a-z_]+", target["expr"]):
                assert name in exposed, f"panel {panel['title']!r} queries {name}, which the exporter does not serve"
