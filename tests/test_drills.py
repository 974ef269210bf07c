"""DR drills: the shipped playbooks run green, failing checks and missed objectives are named, metrics appear."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
import test_postgres
import yaml
from botocore.config import Config as BotoConfig
from click.testing import Result
from conftest import PASSWORD, SMALL, Vault, local_peers, make_tree, write_config
from test_postgres import Cluster

from shardvault.config import load_config
from shardvault.restore.playbook import load_playbook
from shardvault.verify.exporter import find_state

PLAYBOOKS = Path(__file__).resolve().parent.parent / "dr_playbooks"
postgres_cluster = test_postgres.cluster  # its module-scoped PostgreSQL 15 fixture `cluster`, reused here


@pytest.fixture
def docs(tmp_path: Path) -> Vault:
    """A repository with a `docs` source (as in the `make run` example), zones z0..z2, one backup."""
    peers_dir = tmp_path / "peers"
    peers_dir.mkdir()
    tree = make_tree(tmp_path / "docs", files=20, big=1 << 20)
    (tree / "README").write_text("docs\n")
    settings = {"k": 4, "n": 6, "state_dir": str(tmp_path / "state")} | SMALL
    config = write_config(tmp_path / "shardvault.toml", local_peers(peers_dir), {"docs": tree}, **settings)
    vault = Vault(tmp_path, config, peers_dir, tree)
    for args in (("init",), ("backup", "docs")):
        result = vault.cli(*args)
        assert result.exit_code == 0, result.output
    return vault


def _drill(vault: Vault, playbook: Path) -> tuple[Result, dict[str, Any]]:
    result = vault.cli("drill", str(playbook), "--json")
    return result, json.loads(result.stdout)


def _variant(tmp_path: Path, shipped: str, **changes: Any) -> Path:
    """A shipped playbook with some top-level keys (or ``restore`` keys, as restore_KEY) changed."""
    doc = yaml.safe_load((PLAYBOOKS / shipped).read_text())
    for key, value in changes.items():
        if key.startswith("restore_"):
            doc["restore"][key.removeprefix("restore_")] = value
        else:
            doc[key] = value
    path = tmp_path / f"variant-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_shipped_playbooks_are_valid_against_an_example_config(docs: Vault, tmp_path: Path) -> None:
    # The postgres and bucket playbooks name sources the test config lacks: add them (never started).
    with open(docs.config, "a") as f:
        f.write('[[sources]]\nname = "db"\ntype = "postgres"\ndsn = "host=127.0.0.1"\n')
        f.write('[[sources]]\nname = "assets"\ntype = "bucket"\nbucket = "assets"\n')
    config = load_config(docs.config)
    names = {load_playbook(p, config).name: p.stem for p in sorted(PLAYBOOKS.glob("*.yaml"))}
    assert names == {n: n for n in ("docs-restore", "site-lost", "bucket-restore", "postgres-pitr")}


def test_docs_restore_runs_green_and_is_recorded_reported_and_cleaned_up(docs: Vault) -> None:
    result, doc = _drill(docs, PLAYBOOKS / "docs-restore.yaml")
    assert result.exit_code == 0, result.output
    assert doc["result"] == "passed"
    assert [(c["name"], c["passed"]) for c in doc["checks"]] == [
        ("every file matches the snapshot", True),
        ("the tree is not empty", True),
    ]
    assert "files" in doc["checks"][0]["detail"] and "match snapshot" in doc["checks"][0]["detail"]
    assert 0 < doc["rto_seconds"] < 3600 and doc["rto_objective_seconds"] == 4 * 3600
    assert 0 < doc["rpo_seconds"] < 3600 and doc["rpo_objective_seconds"] == 3600
    assert doc["restored_point_kind"] == "snapshot finished"
    assert {s["name"] for s in doc["steps"]} >= {"open repository", "resolve snapshot", "restore", "cleanup"}
    assert all(s["ok"] and s["seconds"] >= 0 for s in doc["steps"])
    assert not doc["target_kept"] and not Path(doc["target"]).exists()  # cleanup: on_success
    saved = json.loads(Path(doc["reports"]["json"]).read_text())
    assert saved["result"] == "passed" and saved["rto_seconds"] == doc["rto_seconds"]
    markdown = Path(doc["reports"]["markdown"]).read_text()
    assert "docs-restore" in markdown and "| RTO |" in markdown and "every file matches the snapshot" in markdown
    with docs.repo() as repo:
        runs = repo.state.runs("drill")
    assert [(r["source"], r["status"]) for r in runs] == [("docs-restore", "ok")]
    assert runs[0]["details"]["rpo_seconds"] == doc["rpo_seconds"]


def test_site_lost_restores_from_the_surviving_zones_with_an_empty_state(docs: Vault) -> None:
    # The site is really gone: its peers' directories and the local state's metadata cache.
    lost = [p for p in local_peers(docs.peers_dir) if p["zone"] == "z1"]
    for peer in lost:
        shutil.rmtree(docs.peers_dir / peer["name"])
    for cache in (docs.root / "state").glob("*/cache"):
        shutil.rmtree(cache)
    result, doc = _drill(docs, PLAYBOOKS / "site-lost.yaml")
    assert result.exit_code == 0, result.output
    assert doc["result"] == "passed" and doc["exclude_zones"] == ["z1"]
    assert sorted(doc["peers_used"]) == ["p0", "p2", "p3", "p5"]  # z1 (p1, p4) never configured for the drill
    assert doc["checks"][0]["passed"], doc["checks"]
    assert not list((docs.root / "state").glob("*/cache")), "the drill must not fill the real state's cache"
    assert not Path(doc["target"]).exists()


def test_a_failing_check_fails_the_drill_names_it_and_keeps_the_target(docs: Vault, tmp_path: Path) -> None:
    checks = [
        {"name": "every file matches the snapshot", "files": "verify"},
        {"name": "changelog present", "command": ["test", "-f", "{target}/CHANGELOG"]},
    ]
    playbook = _variant(tmp_path, "docs-restore.yaml", checks=checks)
    result, doc = _drill(docs, playbook)
    assert result.exit_code == 13, result.output
    assert "check 'changelog present'" in result.stderr and "exit 1" in result.stderr
    assert doc["result"] == "failed" and doc["rto_seconds"] is None
    assert [(c["name"], c["passed"]) for c in doc["checks"]] == [
        ("every file matches the snapshot", True),
        ("changelog present", False),
    ]
    assert doc["target_kept"] and (Path(doc["target"]) / "restore" / "README").exists()  # kept for inspection
    shutil.rmtree(doc["target"])
    text = docs.cli("exporter", "--once").stdout
    assert 'shardvault_drill_success{playbook="docs-restore"} 0.0' in text


def test_a_damaged_restore_fails_the_files_check(docs: Vault, tmp_path: Path) -> None:
    # `files: verify` reads what landed: a file changed after the restore is caught and named.
    playbook = _variant(
        tmp_path,
        "docs-restore.yaml",
        checks=[
            {"name": "tamper", "command": ["sh", "-c", "echo x >> '{target}/README'"]},
            {"name": "every file matches the snapshot", "files": "verify"},
        ],
    )
    result, doc = _drill(docs, playbook)
    assert result.exit_code == 13, result.output
    assert doc["checks"][1]["passed"] is False and "README" in doc["checks"][1]["detail"]
    shutil.rmtree(doc["target"])


def test_an_unmet_rto_exits_14_with_every_check_passed(docs: Vault, tmp_path: Path) -> None:
    playbook = _variant(tmp_path, "docs-restore.yaml", objectives={"rto": "0.001s", "rpo": "1h"})
    result, doc = _drill(docs, playbook)
    assert result.exit_code == 14, result.output
    assert "RTO" in result.stderr and "exceeded the objective 0.001s" in result.stderr
    assert doc["result"] == "failed" and all(c["passed"] for c in doc["checks"])
    assert doc["rto_met"] is False and doc["rpo_met"] is True and doc["rto_seconds"] > 0.001
    with docs.repo() as repo:
        assert repo.state.runs("drill")[-1]["status"] == "failed"


@pytest.mark.parametrize(
    ("text", "field", "line"),
    [
        ("name: x\nobjectives: {rto: 1h, rpo: 1h}\nrestore: {source: docs}\nchecks: [{name: a, files: verify}]\n"
         "cleanpu: always\n", "cleanpu", 5),
        ("name: x\nobjectives: {rto: 1h}\nrestore: {source: docs}\nchecks: [{name: a, files: verify}]\n",
         "objectives.rpo", 2),
        ("name: x\nobjectives: {rto: 4 hours, rpo: 1h}\nrestore: {source: docs}\nchecks: [{name: a, files: verify}]\n",
         "objectives.rto", 2),
        ("name: x\nobjectives: {rto: 1h, rpo: 1h}\nrestore:\n  source: nope\nchecks: [{name: a, files: verify}]\n",
         "restore.source", 4),
        ("name: x\nobjectives: {rto: 1h, rpo: 1h}\nrestore: {source: docs}\nchecks:\n  - name: a\n"
         "    sql: select 1\n    expect: '>= 1'\n", "checks[0].sql", 6),
        ("name: x\nobjectives: {rto: 1h, rpo: 1h}\nrestore: {source: docs, exclude_zones: [z9]}\n"
         "checks: [{name: a, files: verify}]\n", "restore.exclude_zones[0]", 3),
    ],
)  # fmt: skip
def test_a_malformed_playbook_is_one_clear_error(docs: Vault, tmp_path: Path, text: str, field: str, line: int) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = docs.cli("drill", str(path))
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and f"{field} (line {line})" in lines[0], lines[0]
    with docs.repo() as repo:
        assert repo.state.runs("drill") == []  # validated before anything ran


def test_drill_metrics_are_exported_and_pass_promtool(docs: Vault) -> None:
    result, doc = _drill(docs, PLAYBOOKS / "docs-restore.yaml")
    assert result.exit_code == 0, result.output
    text = docs.cli("exporter", "--once").stdout
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("shardvault_drill")
    }
    label = '{playbook="docs-restore"}'
    assert samples[f"shardvault_drill_success{label}"] == 1.0
    assert samples[f"shardvault_drill_rto_seconds{label}"] == pytest.approx(doc["rto_seconds"])
    assert samples[f"shardvault_drill_rto_objective_seconds{label}"] == 4 * 3600
    assert samples[f"shardvault_drill_rpo_seconds{label}"] == pytest.approx(doc["rpo_seconds"])
    assert samples[f"shardvault_drill_rpo_objective_seconds{label}"] == 3600
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert find_state(load_config(docs.config)).runs("drill")[-1]["details"]["result"] == "passed"


def test_bucket_restore_playbook_runs_green(tmp_path: Path, s3_server: str) -> None:
    client = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", config=BotoConfig(s3={"addressing_style": "path"})
    )
    bucket = f"assets-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    for i in range(12):
        client.put_object(Bucket=bucket, Key=f"img/{i:02d}.bin", Body=os.urandom(1000 * (i + 1)))
    client.put_object(Bucket=bucket, Key="index.html", Body=b"<html></html>", ContentType="text/html")
    peers_dir = tmp_path / "peers"
    peers_dir.mkdir()
    settings = {"k": 4, "n": 6, "state_dir": str(tmp_path / "state")} | SMALL
    config = write_config(tmp_path / "shardvault.toml", local_peers(peers_dir), {}, **settings)
    with open(config, "a") as f:
        f.write(f'[[sources]]\nname = "assets"\ntype = "bucket"\nendpoint = "{s3_server}"\nbucket = "{bucket}"\n')
    vault = Vault(tmp_path, config, peers_dir, tmp_path)
    for args in (("init",), ("backup", "assets")):
        result = vault.cli(*args)
        assert result.exit_code == 0, result.output
    result, doc = _drill(vault, PLAYBOOKS / "bucket-restore.yaml")
    assert result.exit_code == 0, result.output
    assert doc["result"] == "passed" and doc["checks"][0]["detail"].startswith("13 files")


# --- PostgreSQL: a real PostgreSQL 15 (the cluster fixture of test_postgres) --------------


def test_postgres_pitr_playbook_runs_green_with_no_passphrase_in_the_restored_server(
    postgres_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = postgres_cluster
    cluster.sql("CREATE TABLE orders (id serial PRIMARY KEY, amount int NOT NULL)")
    cluster.sql("INSERT INTO orders (amount) SELECT g FROM generate_series(1, 600) g")
    assert cluster.cli("backup", "db", "--full").exit_code == 0
    (between,) = cluster.sql("SELECT now()::text")[0]
    time.sleep(1.1)  # the second batch commits strictly after `between` (ordering, not a timing assertion)
    cluster.sql("INSERT INTO orders (amount) SELECT g FROM generate_series(1, 600) g")
    assert cluster.cli("backup", "db").exit_code == 0  # incremental: the WAL up to now

    result = cluster.cli("drill", str(PLAYBOOKS / "postgres-pitr.yaml"), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["result"] == "passed", doc
    assert [c["detail"] for c in doc["checks"]] == ["got 1, expected == 1", "got 1200, expected >= 1000"]
    # The second batch only exists in the WAL: it was replayed, and the RPO is measured from its commit.
    assert doc["restored_point_kind"] == "last replayed commit"
    assert 0 <= doc["rpo_seconds"] < 600
    assert {"restore base backup", "fetch WAL", "start scratch cluster", "stop scratch cluster"} <= {
        s["name"] for s in doc["steps"]
    }
    assert not Path(doc["target"]).exists()

    # Point in time, kept for inspection: only the first batch; the restored server's configuration
    # holds no passphrase nor a path to one, and the drill stopped the cluster it started.
    kept = cluster.base / f"kept-{secrets.token_hex(3)}"  # a path the postgres user can reach
    checks = [{"name": "first batch only", "sql": "select count(*) from orders", "expect": "600"}]
    changes = {"cleanup": "never", "restore_target": str(kept), "restore_to_time": between, "checks": checks}
    playbook = _variant(tmp_path, "postgres-pitr.yaml", **changes)
    result = cluster.cli("drill", str(playbook), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checks"][0]["detail"] == "got 600, expected == 600"
    conf = (kept / "data" / "postgresql.auto.conf").read_text()
    assert "wal-fetch" not in conf and "password" not in conf and str(cluster.password_file) not in conf
    assert f'cp "{kept / "wal"}/%f"' in conf
    assert not (kept / "data" / "postmaster.pid").exists()
    shutil.rmtree(kept)


# --- found by the review of issue 8 ------------------------------------------------------------


def test_the_passphrase_never_reaches_a_check_or_the_report(docs: Vault, tmp_path: Path) -> None:
    leak = ["sh", "-c", 'echo "pw=$SHARDVAULT_PASSWORD" >&2; exit 1']
    playbook = _variant(tmp_path, "docs-restore.yaml", checks=[{"name": "leak", "command": leak}])
    result, doc = _drill(docs, playbook)
    assert result.exit_code == 13
    assert PASSWORD not in result.output and PASSWORD not in json.dumps(doc)
    for report in (docs.root / "state" / "drills").iterdir():
        assert PASSWORD not in report.read_text()


@pytest.mark.parametrize(
    ("actual", "expect", "holds"),
    [
        (None, ">= 1000", False),
        (True, ">= 5", False),
        (0, ">= 1000", False),
        (1100, ">= 1000", True),
        (None, "!= 3", True),
        ("abc", "== abc", True),
    ],
)
def test_an_empty_or_null_result_never_satisfies_an_ordering(actual: Any, expect: str, holds: bool) -> None:
    from shardvault.restore.playbook import Expectation

    op, _, value = expect.partition(" ")
    assert Expectation(op, value).holds(actual) is holds


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"restore_to_lsn": "not-an-lsn"}, "restore.to_lsn"),
        ({"restore_to_time": "yesterday"}, "restore.to_time"),
        ({"objectives": {"rto": "0s", "rpo": "1h"}}, "objectives.rto"),
        ({"restore_snapshot": 12345}, "restore.snapshot"),
    ],
)
def test_more_malformed_playbooks_are_refused_before_anything_runs(
    docs: Vault, tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    shipped = (
        "postgres-pitr.yaml" if "restore_to_lsn" in changes or "restore_to_time" in changes else "docs-restore.yaml"
    )
    playbook = _variant(tmp_path, shipped, **changes)
    if shipped == "postgres-pitr.yaml":  # give it a PostgreSQL source to be checked against
        text = docs.config.read_text() + '[[sources]]\nname = "db"\ntype = "postgres"\ndsn = "host=127.0.0.1"\n'
        docs.config.write_text(text)
        doc = yaml.safe_load(playbook.read_text())
        doc["restore"]["source"] = "db"
        playbook.write_text(yaml.safe_dump(doc))
    result = docs.cli("drill", str(playbook))
    assert result.exit_code == 3, result.output
    assert field in result.stderr and "Traceback" not in result.output


def test_a_target_that_cannot_be_made_is_a_target_error_not_a_traceback(docs: Vault, tmp_path: Path) -> None:
    playbook = _variant(tmp_path, "docs-restore.yaml", restore_target="/proc/no-such-dir/x")
    result = docs.cli("drill", str(playbook))
    assert result.exit_code == 12, result.output
    assert result.stderr.count("shardvault: error:") == 1


def test_http_checks_pass_on_the_expected_status_and_fail_otherwise(docs: Vault, tmp_path: Path) -> None:
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        good = [{"name": "app healthy", "http": f"{base}/health", "expect_status": 200}]
        result, doc = _drill(docs, _variant(tmp_path, "docs-restore.yaml", checks=good))
        assert result.exit_code == 0, result.output
        assert doc["checks"][0]["passed"] and "answered 200" in doc["checks"][0]["detail"]
        bad = [{"name": "app healthy", "http": f"{base}/broken", "expect_status": 200}]
        result, doc = _drill(docs, _variant(tmp_path, "docs-restore.yaml", checks=bad))
        assert result.exit_code == 13 and "app healthy" in result.stderr
        assert "answered 503, expected 200" in doc["checks"][0]["detail"]
    finally:
        server.shutdown()
