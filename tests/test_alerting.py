"""Alerts to people (the shipped Alertmanager config, a real Prometheus and Alertmanager) and /health."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from conftest import Vault, free_port

from shardvault.config import load_config
from shardvault.verify.exporter import find_state, make_exporter
from shardvault.verify.health import assess

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
ALERTMANAGER_YML = MONITORING / "alertmanager" / "alertmanager.yml"
RULES_YML = MONITORING / "prometheus" / "shardvault-rules.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `make test` installs it"
    return path


def _wait_for(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the shipped Alertmanager configuration, offline --------------------------------------


def _alerts() -> dict[str, str]:
    """Every alert of the shipped rules and its severity."""
    rules = yaml.safe_load(RULES_YML.read_text())
    return {r["alert"]: r["labels"]["severity"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_shipped_config_passes_amtool_check_config() -> None:
    check = subprocess.run(
        [_tool("amtool"), "check-config", str(ALERTMANAGER_YML)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "2 receivers" in check.stdout


def test_every_shipped_alert_routes_to_the_receiver_of_its_severity() -> None:
    alerts = _alerts()
    assert {"critical", "warning"} == set(alerts.values())
    for alert, severity in alerts.items():
        labels = [f"alertname={alert}", f"severity={severity}", "source=docs", "peer=p1", "zone=z1"]
        routed = subprocess.run(
            [_tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert routed.returncode == 0, routed.stderr
        assert routed.stdout.split() == [{"critical": "pager", "warning": "chat"}[severity]], alert


# --- a real Alertmanager, fed by a real Prometheus or by its API ------------------------


def render_alertmanager_config(pager_url: str, chat_url: str) -> str:
    """The shipped config with the receivers' placeholder URLs replaced, as an operator does.

    Only the URLs and the notification delays change (seconds instead of
    minutes, so a test sees a notification at once); routes, grouping and
    inhibit rules are the shipped ones.
    """
    config = yaml.safe_load(ALERTMANAGER_YML.read_text())
    urls = {"pager": pager_url, "chat": chat_url}
    for receiver in config["receivers"]:
        hooks = receiver["webhook_configs"]
        assert all(".invalid/" in h["url"] for h in hooks), "the shipped URLs are placeholders"
        for hook in hooks:
            hook["url"] = urls[receiver["name"]]
    config["route"] |= {"group_wait": "1s", "group_interval": "1s"}
    return yaml.safe_dump(config, sort_keys=False)


class Webhooks:
    """An HTTP server that records every notification POSTed to it, by path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        lock = threading.Lock()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    hooks.received.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, path: str) -> list[dict[str, Any]]:
        return [alert for p, body in list(self.received) if p == path for alert in body["alerts"]]

    def names(self, path: str) -> set[str]:
        return {a["labels"]["alertname"] for a in self.alerts(path)}


@contextmanager
def alertmanager(tmp_path: Path, hooks: Webhooks) -> Iterator[str]:
    config = tmp_path / "alertmanager.yml"
    config.write_text(render_alertmanager_config(f"{hooks.url}/pager", f"{hooks.url}/chat"))
    port = free_port()
    proc = subprocess.Popen(
        [
            _tool("prometheus-alertmanager"),
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _status(f"{base}/-/ready") == 200 or proc.poll() is not None, 30, "Alertmanager")
        assert proc.poll() is None, "Alertmanager exited: see its config"
        yield base
    finally:
        _stop(proc)
        hooks.server.shutdown()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@contextmanager
def tiny_exporter(text: str) -> Iterator[int]:
    """Serves fixed exposition text: the series that make chosen shipped rules fire at once."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


def test_a_critical_and_a_warning_alert_reach_their_own_receivers(tmp_path: Path) -> None:
    # ShardvaultRPOExceeded (critical) for docs and ShardvaultBackupDegraded (warning) for logs:
    # neither has a `for:`, so they fire at the first evaluation after a scrape.
    series = (
        'shardvault_rpo_seconds{source="docs"} 7200\n'
        'shardvault_rpo_objective_seconds{source="docs"} 3600\n'
        'shardvault_backup_degraded{source="logs"} 1\n'
        'shardvault_backup_degraded{source="docs"} 0\n'
    )
    hooks = Webhooks()
    with tiny_exporter(series) as exporter_port, alertmanager(tmp_path, hooks) as am:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{RULES_YML}]\n"
            f"alerting: {{alertmanagers: [{{static_configs: [{{targets: ['{am.removeprefix('http://')}']}}]}}]}}\n"
            "scrape_configs:\n"
            "  - job_name: shardvault\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n"
        )
        prometheus = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{free_port()}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for(
                lambda: (
                    "ShardvaultRPOExceeded" in hooks.names("/pager")
                    and "ShardvaultBackupDegraded" in hooks.names("/chat")
                ),
                90,
                "both notifications",
            )
        finally:
            _stop(prometheus)
    pager, chat = hooks.alerts("/pager"), hooks.alerts("/chat")
    assert {a["labels"]["severity"] for a in pager} == {"critical"}
    assert {a["labels"]["severity"] for a in chat} == {"warning"}
    assert {(a["labels"]["alertname"], a["labels"]["source"]) for a in pager} == {("ShardvaultRPOExceeded", "docs")}
    assert {(a["labels"]["alertname"], a["labels"]["source"]) for a in chat} == {("ShardvaultBackupDegraded", "logs")}
    assert {body["receiver"] for path, body in hooks.received} == {"pager", "chat"}
    assert all(a["annotations"]["description"] for a in pager + chat)  # the runbook line reaches people


def _post_alerts(am: str, alerts: list[dict[str, str]]) -> None:
    body = json.dumps([{"labels": labels, "annotations": {"summary": "test"}} for labels in alerts]).encode()
    request = urllib.request.Request(
        f"{am}/api/v2/alerts", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def _inhibited(am: str) -> dict[tuple[str, str], bool]:
    with urllib.request.urlopen(f"{am}/api/v2/alerts", timeout=5) as response:
        alerts = json.loads(response.read())
    key = ("source", "peer", "playbook")
    return {
        (a["labels"]["alertname"], next((a["labels"][k] for k in key if k in a["labels"]), "")): bool(
            a["status"]["inhibitedBy"]
        )
        for a in alerts
    }


def test_inhibit_rules_silence_the_echoes_and_only_them(tmp_path: Path) -> None:
    hooks = Webhooks()
    with alertmanager(tmp_path, hooks) as am:
        _post_alerts(
            am,
            [
                {"alertname": "ShardvaultPeerDown", "severity": "warning", "peer": "p1", "zone": "z1"},
                # repository-wide echoes of a down peer
                {"alertname": "ShardvaultMetadataUnderReplicated", "severity": "warning"},
                {"alertname": "ShardvaultPackDegraded", "severity": "warning"},
                # a per-peer warning: inhibited for the down peer only
                {"alertname": "ShardvaultPeerSlow", "severity": "warning", "peer": "p1"},
                {"alertname": "ShardvaultPeerSlow", "severity": "warning", "peer": "p3"},
                # a warning never silences a critical
                {"alertname": "ShardvaultPackAtRisk", "severity": "critical"},
                # a critical silences the warning about the same thing, not about another
                {"alertname": "ShardvaultRPOExceeded", "severity": "critical", "source": "docs"},
                {"alertname": "ShardvaultBackupMissed", "severity": "warning", "source": "docs"},
                {"alertname": "ShardvaultBackupMissed", "severity": "warning", "source": "logs"},
                {"alertname": "ShardvaultDrillFailed", "severity": "critical", "playbook": "docs-restore"},
                {"alertname": "ShardvaultRTOExceeded", "severity": "warning", "playbook": "docs-restore"},
                {"alertname": "ShardvaultRTOExceeded", "severity": "warning", "playbook": "site-lost"},
            ],
        )
        expected = {
            ("ShardvaultPeerDown", "p1"): False,
            ("ShardvaultMetadataUnderReplicated", ""): True,
            ("ShardvaultPackDegraded", ""): True,
            ("ShardvaultPeerSlow", "p1"): True,
            ("ShardvaultPeerSlow", "p3"): False,
            ("ShardvaultPackAtRisk", ""): False,
            ("ShardvaultRPOExceeded", "docs"): False,
            ("ShardvaultBackupMissed", "docs"): True,
            ("ShardvaultBackupMissed", "logs"): False,
            ("ShardvaultDrillFailed", "docs-restore"): False,
            ("ShardvaultRTOExceeded", "docs-restore"): True,
            ("ShardvaultRTOExceeded", "site-lost"): False,
        }
        # The inhibitor learns of source alerts asynchronously: wait until it has them all.
        _wait_for(lambda: _inhibited(am) == expected, 30, "the inhibitions")
        # And what is inhibited is never sent, while the rest is.
        _wait_for(lambda: "ShardvaultBackupMissed" in hooks.names("/chat"), 30, "a notification")
        _wait_for(lambda: {"ShardvaultDrillFailed", "ShardvaultPackAtRisk"} <= hooks.names("/pager"), 30, "pages")
        sent = {
            (a["labels"]["alertname"], a["labels"].get("source") or a["labels"].get("peer", ""))
            for a in hooks.alerts("/chat")
        }
        assert ("ShardvaultBackupMissed", "docs") not in sent
        assert ("ShardvaultMetadataUnderReplicated", "") not in sent
        assert ("ShardvaultBackupMissed", "logs") in sent


# --- /health and /health/detailed ---------------------------------------------------------


@contextmanager
def exporter_for(vault: Vault, clock: Callable[[], float] = time.time) -> Iterator[str]:
    config = load_config(vault.config)
    state = find_state(config)
    server = make_exporter(config, state, "127.0.0.1", 0, clock=clock)

    def serve() -> None:
        server.serve_forever()
        state.close()  # SQLite connections belong to the thread that used them

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


def _fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_is_200_on_a_fresh_backed_up_vault_served_by_the_cli(backed_up: Vault) -> None:
    port = free_port()
    proc = backed_up.popen("exporter", "--listen", f"127.0.0.1:{port}")
    try:
        _wait_for(lambda: _status(f"http://127.0.0.1:{port}/health") != 0 or proc.poll() is not None, 30, "exporter")
        assert _fetch(f"http://127.0.0.1:{port}/health") == (200, "ok\n")
        status, metrics = _fetch(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and 'shardvault_rpo_seconds{source="src"}' in metrics
    finally:
        _stop(proc)


def test_health_is_503_with_the_reason_once_the_rpo_objective_passes(backed_up: Vault) -> None:
    rpo = load_config(backed_up.config).sources[0].rpo_objective_seconds
    later = time.time() + rpo + 120
    with exporter_for(backed_up, clock=lambda: later) as base:
        status, body = _fetch(f"{base}/health")
        assert status == 503
        assert body.startswith("source src: newest backup is ") and "over its RPO objective of" in body
        assert len(body.splitlines()) == 1, body  # the scrub window (30 days) has not passed
        # /metrics at the same instant agrees: the RPO alert would fire.
        _, metrics = _fetch(f"{base}/metrics")
        values = {
            line.split()[0]: float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("shardvault_rpo")
        }
        assert values['shardvault_rpo_seconds{source="src"}'] > values['shardvault_rpo_objective_seconds{source="src"}']
    with exporter_for(backed_up) as base:
        assert _fetch(f"{base}/health")[0] == 200  # the same state, now: healthy again


def test_health_names_a_missed_scrub_window_and_a_failed_drill(backed_up: Vault) -> None:
    assert backed_up.cli("check").exit_code == 0
    config = load_config(backed_up.config)
    state = find_state(config)
    try:
        # An old check (a state row with an old timestamp) and a failed drill.
        window = config.scrub.window_days * 86400
        with sqlite3.connect(state.dir / "state.db") as db:
            db.execute("UPDATE runs SET finished = finished - ? WHERE kind = 'check'", (window + 3600,))
        state.record_run("drill", "failed", time.time() - 60, source="docs-restore", details={"rto_seconds": 12.0})
        verdict = assess(config, state)
    finally:
        state.close()
    assert not verdict.healthy
    assert len(verdict.reasons) == 2, verdict.reasons
    assert verdict.reasons[0].startswith("no check or scrub within the scrub window of 30.0d (last ran 30.")
    assert verdict.reasons[1] == "drill docs-restore: the last drill failed"


def test_health_detailed_reports_peers_sources_check_scrub_and_drills(backed_up: Vault) -> None:
    assert backed_up.cli("check").exit_code == 0
    assert backed_up.cli("scrub").exit_code == 0
    config = load_config(backed_up.config)
    state = find_state(config)
    state.record_run("drill", "ok", time.time() - 30, source="docs-restore", details={"rto_seconds": 3.5})
    state.close()
    with exporter_for(backed_up) as base:
        status, body = _fetch(f"{base}/health/detailed")
        for path in ("/health", "/health/detailed"):  # a probe may use HEAD: the status, no body
            with urllib.request.urlopen(urllib.request.Request(f"{base}{path}", method="HEAD"), timeout=10) as head:
                assert head.status == 200 and head.read() == b""
    assert status == 200, body
    doc = json.loads(body)
    assert doc["healthy"] is True and doc["reasons"] == []
    assert set(doc) >= {"checked_at", "peers", "packs", "sources", "check", "scrub", "verification", "drills"}
    assert doc["packs"]["healthy"] > 0 and doc["packs"]["lost"] == 0
    assert set(doc["peers"]) == {f"p{i}" for i in range(6)}
    assert doc["peers"]["p1"]["up"] is True and doc["peers"]["p1"]["zone"] == "z1"
    assert doc["peers"]["p1"]["error"] is None
    assert 0 <= doc["peers"]["p1"]["last_listed_age_seconds"] < 600
    src = doc["sources"]["src"]
    assert src["within_objective"] is True and 0 <= src["age_seconds"] < 600
    assert src["rpo_objective_seconds"] == 86400 and set(src["last_backup_by_kind"]) == {"full"}
    assert doc["check"]["status"] == "ok" and doc["scrub"]["status"] == "ok"
    assert doc["scrub"]["last_complete"] >= doc["check"]["last"]
    assert doc["verification"]["within_window"] is True
    drill = doc["drills"]["docs-restore"]
    assert drill["passed"] is True and drill["rto_seconds"] == 3.5 and 0 < drill["age_seconds"] < 600


def test_health_is_503_when_the_state_cannot_be_read(backed_up: Vault) -> None:
    config = load_config(backed_up.config)
    state = find_state(config)
    state.close()
    (state.dir / "state.db").write_bytes(b"this is not a database" * 100)
    verdict = assess(config, find_state(config))
    assert not verdict.healthy
    assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith("state unreadable: ")


def test_a_vault_never_backed_up_is_unhealthy(vault: Vault) -> None:
    assert vault.cli("check").exit_code == 0  # creates the state
    config = load_config(vault.config)
    state = find_state(config)
    try:
        verdict = assess(config, state)
    finally:
        state.close()
    assert verdict.reasons == ["source src: never backed up"]
    assert verdict.detail["sources"]["src"]["age_seconds"] is None


def test_a_down_peer_shows_in_detailed_without_failing_health(backed_up: Vault) -> None:
    # k-of-n exists so that a peer can be down: alerts speak for it, /health stays a statement about objectives.
    shutil.rmtree(backed_up.peer(5))
    assert backed_up.cli("check").exit_code != 0
    with exporter_for(backed_up) as base:
        status, body = _fetch(f"{base}/health/detailed")
    doc = json.loads(body)
    assert doc["peers"]["p5"]["up"] is False and doc["peers"]["p5"]["error"]
    assert doc["peers"]["p4"]["up"] is True and doc["check"]["status"] != "ok"
    assert status == 200 and doc["healthy"] is True


def test_data_lost_is_never_healthy(backed_up: Vault) -> None:
    for i in (3, 4, 5):  # k = 4 of n = 6: three peers gone lose every pack
        shutil.rmtree(backed_up.peer(i))
    backed_up.cli("check")
    config = load_config(backed_up.config)
    state = find_state(config)
    try:
        verdict = assess(config, state)
    finally:
        state.close()
    assert not verdict.healthy
    assert any(r.endswith("pack(s) lost (fewer than k good shards): run `shardvault repair`") for r in verdict.reasons)
