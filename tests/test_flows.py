"""The flows under ``prefect_test_harness``: each gives the CLI's --json document; failures are one line.

Also the schedule plan (crons, timezone, parameters) and ``shardvault schedule``,
which need no server.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, SCHEDULE, SOURCE_SCHEDULE, Vault, make_vault

from shardvault.config import load_config


@pytest.fixture(scope="session")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One Prefect test server for the whole session (about 10-15 s), with its own PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    from prefect.settings import PREFECT_RUNNER_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    try:
        no_heartbeats = temporary_settings({PREFECT_RUNNER_HEARTBEAT_FREQUENCY: None})
        with no_heartbeats, prefect_test_harness(server_startup_timeout=60):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def password_file(tmp_path: Path) -> str:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    return str(path)


def cli_json(vault: Vault, *args: str) -> tuple[int, Any]:
    result = vault.cli(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


def test_backup_flow_gives_the_cli_document_and_the_snapshot_is_listed(
    harness: None, vault: Vault, password_file: str
) -> None:
    from prefect.client.orchestration import get_client

    from shardvault.flows.flows import backup

    state = backup(source="src", config=str(vault.config), password_file=password_file, return_state=True)
    assert state.is_completed(), state.message
    doc = state.result()
    code, listed = cli_json(vault, "snapshots")
    assert code == 0
    assert [s["id"] for s in listed] == [doc["snapshot"]["id"]]
    assert doc["snapshot"]["kind"] == "full"  # the first backup of a source is full
    # The CLI's own document for the next (incremental) backup has the same shape.
    code, cli_doc = cli_json(vault, "backup", "src")
    assert code == 0
    assert sorted(cli_doc) == sorted(doc)
    assert sorted(cli_doc["stats"]) == sorted(doc["stats"])
    assert doc["stats"]["files"] == cli_doc["stats"]["files"] > 0
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        assert run.name.startswith("backup-src-incremental-")  # parameters as given: full=False
        artifact = client.read_latest_artifacts()
        keys = {a.key for a in artifact}
    assert "backup-src" in keys


def test_check_flow_matches_the_cli_and_a_destroyed_peer_fails_it_and_emits_the_event(
    harness: None, backed_up: Vault, password_file: str
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from shardvault.flows.flows import check

    config = str(backed_up.config)
    state = check(config=config, password_file=password_file, return_state=True)
    assert state.is_completed(), state.message
    code, cli_doc = cli_json(backed_up, "check")
    assert code == 0
    assert state.result() == cli_doc

    shutil.rmtree(backed_up.peer(1))  # a destroyed peer: every pack degraded
    state = check(config=config, password_file=password_file, return_state=True)
    assert state.is_failed()
    result = backed_up.cli("check")
    assert result.exit_code == 6
    assert result.stderr.splitlines()[-1] == f"shardvault: error: {state.message}"  # the CLI's line, no traceback
    with get_client(sync_client=True) as client:
        verdicts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["check-verdict"])))
        verdict = max(verdicts, key=lambda a: a.created or 0)
    rows = {row["peer"]: row["verdict"] for row in _table(verdict.data)}
    assert rows["p1"] in ("unreachable", "empty", "damaged") and rows["p0"] == "healthy"


def _table(data: Any) -> list[dict[str, Any]]:
    return json.loads(data) if isinstance(data, str) else data  # type: ignore[no-any-return]


def test_check_emits_the_degraded_event(harness: None, backed_up: Vault, password_file: str) -> None:
    """The self-repair event carries the repository as its resource (what the repair trigger matches)."""
    from shardvault.flows import events, flows

    shutil.rmtree(backed_up.peer(2))
    emitted: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        emitted.append(real(*args, **kwargs))
        return emitted[-1]

    real, flows.emit_degraded = flows.emit_degraded, spy  # type: ignore[assignment]
    try:
        state = flows.check(config=str(backed_up.config), password_file=password_file, return_state=True)
    finally:
        flows.emit_degraded = real
    assert state.is_failed()
    (event,) = emitted
    assert event is not None and event.event == events.DEGRADED_EVENT
    with backed_up.repo() as repo:
        assert event.resource.id == f"shardvault.repository.{repo.id}"
    assert event.payload["found_by"] == "check" and "p2" in event.payload["peers_down"]
    assert event.payload["packs"]["degraded"] > 0


def test_scrub_and_repair_flows_match_the_cli(harness: None, backed_up: Vault, password_file: str) -> None:
    from shardvault.flows.flows import repair, scrub

    config = str(backed_up.config)
    state = scrub(config=config, password_file=password_file, return_state=True)
    assert state.is_completed(), state.message
    doc = state.result()
    assert doc["shards_read"] == doc["shards_total"] > 0 and not doc["damaged"]
    code, cli_doc = cli_json(backed_up, "scrub")
    assert code == 0 and sorted(cli_doc) == sorted(doc)

    for shard in backed_up.shards(3):
        shard.unlink()  # repair rebuilds them
    state = repair(config=config, password_file=password_file, return_state=True)
    assert state.is_completed(), state.message
    doc = state.result()
    assert doc["shards_rebuilt"] > 0 and doc["complete"]
    code, cli_doc = cli_json(backed_up, "repair")
    assert code == 0 and sorted(cli_doc) == sorted(doc) and cli_doc["shards_rebuilt"] == 0
    assert cli_json(backed_up, "check")[0] == 0


def test_prune_flow_applies_each_sources_retention_then_prunes(harness: None, vault: Vault, password_file: str) -> None:
    from shardvault.flows.flows import prune

    vault.config.write_text(vault.config.read_text() + '[sources.retention]\nkeep_last = 1\n[prune]\ngrace = "0"\n')
    assert vault.cli("backup", "src").exit_code == 0
    for path in sorted(vault.source.rglob("large*.bin")):
        path.write_bytes(os.urandom(1 << 20))
    assert vault.cli("backup", "src").exit_code == 0
    state = prune(config=str(vault.config), password_file=password_file, return_state=True)
    assert state.is_completed(), state.message
    doc = state.result()
    assert doc["forget"]["snapshots_removed"] == 1 and doc["prune"]["deleted"]["packs"] > 0, doc
    code, listing = cli_json(vault, "snapshots")
    assert code == 0 and len(listing) == 1
    assert cli_json(vault, "check")[0] == 0
    # A prune that cannot run (another prune holds the repository) fails the run with its one line.
    with vault.repo() as repo:
        from shardvault.repository.sessions import SessionKind

        repo.announce(SessionKind.PRUNE)
        state = prune(config=str(vault.config), password_file=password_file, return_state=True)
    assert state.is_failed() and "prune session" in str(state.message)


def test_a_failing_library_call_fails_the_flow_with_its_one_line_message(
    harness: None, vault: Vault, tmp_path: Path
) -> None:
    from shardvault.flows.flows import backup, check

    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    state = check(config=str(vault.config), password_file=str(wrong), return_state=True)
    assert state.is_failed()
    assert state.message == "Wrong passphrase: no key in the repository opens with it"
    state = backup(source="nope", config=str(vault.config), password_file=str(wrong), return_state=True)
    assert state.is_failed()
    assert "no source named 'nope'" in (state.message or "") and "Traceback" not in (state.message or "")


def test_drill_flow_gives_the_cli_report_and_a_failed_check_fails_it(
    harness: None, backed_up: Vault, password_file: str, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    from shardvault.flows.drill import drill

    def playbook(name: str, command: str) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"name: {name}\nobjectives: {{rto: 1h, rpo: 1h}}\nrestore: {{source: src}}\n"
            f"checks:\n  - {{name: every file matches the snapshot, files: verify}}\n"
            f"  - {{name: the check, command: {command}}}\ncleanup: always\n"
        )
        return str(path)

    good = playbook("flow-green", '["true"]')
    state = drill(playbook=good, config=str(backed_up.config), password_file=password_file, return_state=True)
    assert state.is_completed(), state.message
    doc = state.result()
    assert doc["result"] == "passed" and all(c["passed"] for c in doc["checks"])
    code, cli_doc = cli_json(backed_up, "drill", good)
    assert code == 0 and sorted(cli_doc) == sorted(doc)
    with get_client(sync_client=True) as client:  # the Markdown report is an artifact under a stable key
        artifact = client.read_latest_artifacts()
        assert any(a.key == "drill-flow-green" and "flow-green" in str(a.data) for a in artifact)

    bad = playbook("flow-red", '["false"]')
    state = drill(playbook=bad, config=str(backed_up.config), password_file=password_file, return_state=True)
    assert state.is_failed()
    assert "the check" in (state.message or "") and "Traceback" not in (state.message or "")


# --- the plan and `shardvault schedule` (no server) -----------------------------------------


def scheduled_vault(tmp_path: Path) -> Vault:
    vault = make_vault(tmp_path, init=False)
    vault.config.write_text(vault.config.read_text() + SOURCE_SCHEDULE + SCHEDULE)
    return vault


def test_schedule_json_lists_every_deployment_with_its_crons_in_the_timezone(tmp_path: Path) -> None:
    vault = scheduled_vault(tmp_path)
    result = vault.cli("schedule", "--json", "--count", "2")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["timezone"] == "Europe/Paris"
    by_name = {d["name"]: d for d in doc["deployments"]}
    assert set(by_name) >= {"backup/src", "check/default", "scrub/default", "repair/default"}
    backup = by_name["backup/src"]
    assert [(s["cron"], s["parameters"]) for s in backup["schedules"]] == [
        ("0 * * * *", {"full": False}),
        ("0 3 * * 0", {"full": True}),
    ]
    assert backup["concurrency_limit"] == 1 and backup["parameters"]["source"] == "src"
    assert by_name["repair/default"]["schedules"] == []  # on demand and by the self-repair trigger
    fulls = [r for r in doc["next_runs"] if r["deployment"] == "backup/src" and r["label"] == "full"]
    assert len(fulls) == 2
    for run in fulls:  # Sunday 03:00 in Paris, whatever the machine's zone
        assert run["at"].endswith(("T03:00:00+01:00", "T03:00:00+02:00"))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (('"0 3 * * 0"', '"0 25 * * 0"'), "sources[0].schedule.full: Invalid cron string"),
        (('"*/30 * * * *"', '"every half hour"'), "schedule.check: Invalid cron string"),
        (('"Europe/Paris"', '"Mars/Olympus"'), "schedule.timezone: unknown timezone 'Mars/Olympus'"),
    ],
)
def test_a_bad_cron_or_timezone_is_one_clear_error(tmp_path: Path, edit: tuple[str, str], needle: str) -> None:
    vault = scheduled_vault(tmp_path)
    vault.config.write_text(vault.config.read_text().replace(*edit))
    for command in ("schedule", "deploy"):
        result = vault.cli(command)
        assert result.exit_code == 3, result.output
        assert needle in result.stderr and str(vault.config) in result.stderr
    load_config(vault.config)  # the rest of shardvault still reads the config: a restore never waits on a cron


def test_an_unknown_schedule_key_is_refused(tmp_path: Path) -> None:
    vault = scheduled_vault(tmp_path)
    vault.config.write_text(vault.config.read_text().replace("incremental =", "incrementl ="))
    result = vault.cli("schedule")
    assert result.exit_code == 3 and "sources[0].schedule.incrementl: unknown key" in result.stderr


def test_deploy_writes_a_prefect_yaml_with_the_same_deployments(tmp_path: Path) -> None:
    import yaml

    vault = scheduled_vault(tmp_path)
    out = tmp_path / "prefect.yaml"
    result = vault.cli("deploy", "--pool", "backup-hosts", "--output", str(out))
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text())
    entries = {(d["entrypoint"].rsplit(".", 1)[1], d["name"]): d for d in doc["deployments"]}
    backup = entries[("backup", "src")]
    assert backup["work_pool"] == {"name": "backup-hosts"}
    assert backup["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert {(s["cron"], s["timezone"]) for s in backup["schedules"]} == {
        ("0 * * * *", "Europe/Paris"),
        ("0 3 * * 0", "Europe/Paris"),
    }
    (trigger,) = entries[("repair", "default")]["triggers"]
    assert trigger["expect"] == ["shardvault.redundancy.degraded"] and trigger["within"] > 0
    from prefect.flows import load_flow_from_entrypoint

    assert load_flow_from_entrypoint(backup["entrypoint"]).name == "backup"


def test_the_shipped_prefect_yaml_describes_the_example_config_deployments(tmp_path: Path) -> None:
    """prefect.yaml at the root is `shardvault deploy` of run.sh's example config, minus host-specific paths."""
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).parent.parent
    run_sh = (root / "scripts" / "run.sh").read_text()
    assert '"0 * * * *"' in run_sh and '"*/30 * * * *"' in run_sh  # the crons of the example config below
    vault = make_vault(tmp_path, init=False)
    vault.config.write_text(
        vault.config.read_text().replace('name = "src"', 'name = "docs"')
        + SOURCE_SCHEDULE
        + SCHEDULE.replace("Europe/Paris", "UTC")
    )
    result = vault.cli("deploy", "--playbooks", str(root / "dr_playbooks"))
    assert result.exit_code == 0, result.output
    generated = yaml.safe_load(result.stdout)["deployments"]
    shipped = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]

    def shape(entries: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted(
            (
                d["entrypoint"],
                d["name"],
                json.dumps(d["schedules"], sort_keys=True),
                json.dumps(d.get("concurrency_limit"), sort_keys=True),
                json.dumps(d.get("triggers"), sort_keys=True),
                d["parameters"].get("source"),
                Path(d["parameters"].get("playbook", "")).name,
            )
            for d in entries
        )

    assert shape(shipped) == shape(generated)
    for d in shipped:
        assert "config" not in d["parameters"]  # the worker's $SHARDVAULT_CONFIG
        load_flow_from_entrypoint(d["entrypoint"])


def test_a_cancelled_base_backup_terminates_pg_basebackup_and_commits_nothing(
    backed_up: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect cancels a run by raising TerminationSignal in it: the producer must not outlive the run."""
    from prefect.exceptions import TerminationSignal

    from shardvault.backup import postgres as pgbackup
    from shardvault.config import PostgresSource, SourceKind
    from shardvault.sources import postgres as pg

    source = PostgresSource("db", SourceKind.POSTGRES, dsn="host=127.0.0.1")
    started: list[pg.Producer] = []

    def fake_basebackup(src: PostgresSource) -> pg.Producer:
        started.append(pg.Producer(src, ["sleep", "600"]))  # stands in for a long pg_basebackup
        return started[0]

    def cancelled(*args: object, **kwargs: object) -> None:
        raise TerminationSignal(15)

    monkeypatch.setattr(pg, "basebackup", fake_basebackup)
    monkeypatch.setattr(pgbackup, "backup_stream", cancelled)
    before = json.loads(backed_up.cli("snapshots", "--json").stdout)
    with backed_up.repo() as repo, pytest.raises(TerminationSignal):
        pgbackup._base(repo, source, {})
    assert started and started[0].proc.poll() is not None  # terminated, not left running
    assert json.loads(backed_up.cli("snapshots", "--json").stdout) == before
