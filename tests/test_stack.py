"""The deployable stack: docker-compose.yml, the Dockerfile and what they mount from deploy/.

No Docker engine runs here, so these tests check everything that can be checked
without one: compose resolves the file (``docker-compose config``), every path it
mounts or builds from exists, every path the services' own configs name inside
the containers is one of those mounts (a typo there would only show at
``docker compose up``), shardvault itself loads the mounted config and builds its
deployment plan from it, Prometheus accepts its config with the shipped rules,
and the Docker build context (the .dockerignore allow-list) is enough to build
a wheel with every module of the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from shardvault.config import BucketSource, FilesSource, PostgresSource, load_config
from shardvault.restore.playbook import load_playbook
from shardvault.schedule import build_plan, find_playbooks

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
STACK_CONFIG = DEPLOY / "shardvault.toml"
# The variables the compose file refuses to start without (deploy/stack.env.example).
STACK_ENV = {
    "MINIO_ROOT_USER": "shardvault",
    "MINIO_ROOT_PASSWORD": "not-a-real-password",
    "POSTGRES_PASSWORD": "not-a-real-password",
    "GRAFANA_ADMIN_PASSWORD": "not-a-real-password",
}
OPTIONAL_ENV = (
    "SHARDVAULT_PASSWORD_FILE",
    "SHARDVAULT_DATA_DIR",
    "SHARDVAULT_IMAGE",
    "SHARDVAULT_POSTGRES_IMAGE",
    "MINIO_IMAGE",
    "PREFECT_UI_API_URL",
)
SERVICES = {
    "postgres",
    "minio1",
    "minio2",
    "minio3",
    "shardvault-init",
    "prefect-server",
    "shardvault-worker",
    "exporter",
    "prometheus",
    "alertmanager",
    "grafana",
}


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.skip("docker-compose is not installed (make test installs Debian's docker-compose)")
    return found


def run_compose(tmp_path: Path, env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose -f docker-compose.yml ARGS`` with only the given variables.

    An empty --env-file keeps a developer's .env (and the caller's environment)
    from filling in what the test means to leave out.
    """
    env = {k: v for k, v in os.environ.items() if k not in STACK_ENV and k not in OPTIONAL_ENV}
    env.update(env_extra)
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return subprocess.run(
        [docker_compose(), "--env-file", str(empty), "-f", str(COMPOSE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "shardvault-password"
    path.write_text("a passphrase that lives outside the checkout\n")
    return path


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory, secret_file: Path) -> dict[str, Any]:
    """The compose file as docker-compose resolves it (anchors merged, paths absolute)."""
    tmp = tmp_path_factory.mktemp("compose")
    result = run_compose(tmp, STACK_ENV | {"SHARDVAULT_PASSWORD_FILE": str(secret_file)}, "config")
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    assert isinstance(doc, dict)
    return doc


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume of a resolved service; bind sources are absolute paths."""
    out = []
    for spec in service.get("volumes", []):
        if isinstance(spec, dict):
            out.append((str(spec.get("source", "")), str(spec["target"])))
        else:
            source, target, *_ = spec.split(":")
            out.append((source, target))
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Where a container path of ``service`` comes from on the host, or None if it is not bind-mounted."""
    want = PurePosixPath(container_path)
    best: tuple[int, Path] | None = None
    for source, target in mounts(service):
        if not source.startswith("/"):
            continue  # a named volume: not the repository's
        t = PurePosixPath(target)
        if want == t or t in want.parents:
            candidate = Path(source) / want.relative_to(t)
            if best is None or len(t.parts) > best[0]:
                best = (len(t.parts), candidate)  # the deepest mount wins, as in the container
    return best[1] if best else None


def named_volume_at(service: dict[str, Any], container_path: str) -> str | None:
    for source, target in mounts(service):
        if target == container_path and not source.startswith("/"):
            return source
    return None


def secret_names(service: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", [])
    return command if isinstance(command, str) else " ".join(command)


def option(service: dict[str, Any], name: str) -> str:
    """The value of ``--name=VALUE`` or ``-c name=VALUE`` in a service's command."""
    match = re.search(rf"(?:--{re.escape(name)}=|-c {re.escape(name)}=)(\S+)", command_text(service))
    assert match, f"no {name} in {command_text(service)!r}"
    return match.group(1)


# --- compose itself ---------------------------------------------------------------------------


def test_compose_file_validates(tmp_path: Path, secret_file: Path) -> None:
    result = run_compose(tmp_path, STACK_ENV | {"SHARDVAULT_PASSWORD_FILE": str(secret_file)}, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path, secret_file: Path) -> None:
    # No default passwords: each missing variable stops compose with its own name.
    for missing in [*STACK_ENV, "SHARDVAULT_PASSWORD_FILE"]:
        env = {k: v for k, v in STACK_ENV.items() if k != missing}
        if missing != "SHARDVAULT_PASSWORD_FILE":
            env["SHARDVAULT_PASSWORD_FILE"] = str(secret_file)
        result = run_compose(tmp_path, env, "config", "-q")
        assert result.returncode != 0, f"compose accepted a stack without {missing}"
        assert missing in result.stderr, result.stderr


def test_every_service_of_the_stack(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == SERVICES
    assert services["prefect-server"]["image"] == "prefecthq/prefect:3.8.8-python3.11"
    assert "prefect server start --host 0.0.0.0" in command_text(services["prefect-server"])
    for name in ("minio1", "minio2", "minio3"):
        assert services[name]["image"].startswith("minio/minio")
    # The worker serves the deployments against the Prefect server it waits for.
    worker = services["shardvault-worker"]
    assert command_text(worker).endswith(" serve")
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert worker["depends_on"]["shardvault-init"]["condition"] == "service_completed_successfully"
    assert "shardvault exporter --listen 0.0.0.0:9477" in command_text(services["exporter"])
    # The exporter needs neither the passphrase nor the peers' keys.
    assert not secret_names(services["exporter"])
    assert not any(k.startswith("AWS_") for k in services["exporter"].get("environment", {}))
    # Every port published on loopback only: nothing of the stack faces the network by default.
    for name, service in services.items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}"
            assert published.startswith("127.0.0.1:"), (name, port)


def test_everything_mounted_or_built_exists(resolved: dict[str, Any], secret_file: Path) -> None:
    checked = []
    for name, service in resolved["services"].items():
        for source, _target in mounts(service):
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which does not exist"
                checked.append(Path(source))
        build = service.get("build")
        if build:
            context = Path(build["context"])
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name} builds from {dockerfile}"
            stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.MULTILINE | re.IGNORECASE)
            assert build.get("target") in stages, f"{name} builds target {build.get('target')!r}; stages {stages}"
    for secret in resolved["secrets"].values():
        assert Path(secret["file"]) == secret_file
    # The shipped monitoring files are mounted from monitoring/, not copied into deploy/.
    for shipped in (
        "monitoring/prometheus/shardvault-rules.yml",
        "monitoring/alertmanager/alertmanager.yml",
        "monitoring/grafana/shardvault-dashboard.json",
    ):
        assert ROOT / shipped in checked, f"{shipped} is not mounted"
    assert not list(DEPLOY.rglob("*.json")), "a dashboard copy in deploy/ would drift from monitoring/"


# --- what the containers' own configs name must be mounted --------------------------------------


def test_prometheus_alertmanager_grafana_wiring(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    prometheus = services["prometheus"]
    config_path = host_path(prometheus, option(prometheus, "config.file"))
    assert config_path == DEPLOY / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    rules = [host_path(prometheus, p) for p in config["rule_files"]]
    assert rules == [ROOT / "monitoring/prometheus/shardvault-rules.yml"]
    # Scrape and alert targets are services of this stack, on the ports they listen on.
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "exporter:9477" in targets
    am_targets = [t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert am_targets == ["alertmanager:9093"]

    alertmanager = services["alertmanager"]
    assert host_path(alertmanager, option(alertmanager, "config.file")) == (
        ROOT / "monitoring/alertmanager/alertmanager.yml"
    )

    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == DEPLOY / "grafana/provisioning"
    datasources = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert [d["url"] for d in datasources if d["type"] == "prometheus"] == ["http://prometheus:9090"]
    providers = yaml.safe_load((provisioning / "dashboards/shardvault.yml").read_text())["providers"]
    folder = providers[0]["options"]["path"]
    dashboard = host_path(grafana, folder + "/shardvault-dashboard.json")
    assert dashboard == ROOT / "monitoring/grafana/shardvault-dashboard.json"
    assert dashboard.is_file()


def test_prometheus_accepts_its_config_with_the_shipped_rules(resolved: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs Debian's prometheus)")
    prometheus = resolved["services"]["prometheus"]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    # Container paths rewritten to where the mounts take them from, so promtool reads the real rules.
    config["rule_files"] = [str(host_path(prometheus, p)) for p in config["rule_files"]]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def postgres_settings() -> dict[str, str]:
    settings = {}
    for line in (DEPLOY / "postgres/postgresql.conf").read_text().splitlines():
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("archive_command") else line.strip()
        if "=" in line:
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip().strip("'")
    return settings


def test_postgres_archives_its_wal_into_shardvault(resolved: dict[str, Any]) -> None:
    postgres = resolved["services"]["postgres"]
    conf = host_path(postgres, option(postgres, "config_file"))
    assert conf == DEPLOY / "postgres/postgresql.conf"
    settings = postgres_settings()
    assert settings["archive_mode"] == "on"
    assert settings["wal_level"] == "replica"
    # archive_command: the shardvault the postgres stage installs, the mounted config, the
    # passphrase secret of this service, wal-push of the configured PostgreSQL source.
    argv = settings["archive_command"].split()
    assert argv[0] == "/opt/shardvault/bin/shardvault"
    assert "python3 -m venv /opt/shardvault" in (ROOT / "Dockerfile").read_text()
    assert host_path(postgres, argv[argv.index("--config") + 1]) == STACK_CONFIG
    password_file = PurePosixPath(argv[argv.index("--password-file") + 1])
    assert password_file.parent == PurePosixPath("/run/secrets")
    assert password_file.name in secret_names(postgres)
    assert argv[-3:] == ["--source", "db", "%p"] and "wal-push" in argv
    config = load_config(STACK_CONFIG)
    assert isinstance(config.source("db"), PostgresSource)
    # wal-push records runs in the state the exporter reads: the same named volume in both.
    state = str(config.repository.state_dir)
    assert named_volume_at(postgres, state) == named_volume_at(resolved["services"]["exporter"], state) == "state"
    # The worker's pg_basebackup connects over the network: a replication line for pg_hba.conf.
    init = host_path(postgres, "/docker-entrypoint-initdb.d/10-replication.sh")
    assert init is not None and "host replication" in init.read_text()


@pytest.fixture
def postgres_dir() -> Iterator[Path]:
    """A directory the postgres user can reach (pytest's tmp_path sits under a root-only 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="shardvault-stack-pg-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_postgresql_15_accepts_the_config_file(postgres_dir: Path) -> None:
    # The real server parses the file (a misspelt setting or a bad value is a startup error in
    # the container): `postgres -C NAME` reads the config file and prints what it set.
    pgbin = Path("/usr/lib/postgresql/15/bin")
    if not (pgbin / "initdb").exists() or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs Debian's PostgreSQL 15 and root (initdb runs as postgres)")
    work = postgres_dir / "pg"
    work.mkdir()
    conf = work / "postgresql.conf"
    shutil.copy(DEPLOY / "postgres/postgresql.conf", conf)  # the postgres user may not read the checkout
    for path in (work, conf):
        shutil.chown(path, "postgres", "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, str(pgbin / "initdb"), "-D", str(work / "data"), "-U", "postgres", "-A", "trust"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    settings = postgres_settings()
    for name in ("archive_mode", "archive_command", "wal_level", "listen_addresses"):
        result = subprocess.run(
            [*as_postgres, str(pgbin / "postgres"), "-D", str(work / "data"), "-c", f"config_file={conf}", "-C", name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == settings[name], name


# --- shardvault's own view of the mounted config ----------------------------------------------


def test_shardvault_loads_the_stack_config(resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # S3 credentials come from the AWS variables at run time; loading needs none.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    config = load_config(STACK_CONFIG)
    services = resolved["services"]
    peers = {p.name: p for p in config.peers}
    assert set(peers) == {"minio1", "minio2", "minio3"}
    for name, peer in peers.items():
        assert peer.url.startswith("s3://")
        assert peer.endpoint == f"http://{name}:9000"
        assert name in services  # the endpoint's host is the compose service
    zones = {p.zone for p in config.peers}
    assert len(zones) == 3
    # k-of-n survives losing one whole zone.
    assert config.repository.n - config.repository.k >= 1
    kinds = {type(s) for s in config.sources}
    assert {PostgresSource, FilesSource} <= kinds
    db = config.source("db")
    assert isinstance(db, PostgresSource) and db.mode == "physical"
    assert "host=postgres " in db.dsn + " "
    data = config.source("data")
    assert isinstance(data, FilesSource)
    worker = services["shardvault-worker"]
    assert host_path(worker, str(data.path)) is not None, "the files source is not mounted in the worker"
    assert not [s for s in config.sources if isinstance(s, BucketSource) and not s.endpoint]
    # The worker and everything else read this file through $SHARDVAULT_CONFIG.
    for name in ("shardvault-worker", "exporter", "shardvault-init", "postgres"):
        env_config = services[name]["environment"]["SHARDVAULT_CONFIG"]
        assert host_path(services[name], env_config) == STACK_CONFIG, name
        assert named_volume_at(services[name], str(config.repository.state_dir)) == "state", name


def test_serve_would_register_every_deployment(resolved: dict[str, Any]) -> None:
    # What `shardvault serve` checks before it talks to Prefect: crons, timezone and the playbooks
    # it finds beside the config (deploy/dr_playbooks, mounted with it) against this config.
    config = load_config(STACK_CONFIG)
    playbooks = find_playbooks(DEPLOY / "dr_playbooks")
    assert {p.stem for p in playbooks} == {"data-restore", "db-pitr", "zone-lost"}
    books = {p.stem: load_playbook(p, config) for p in playbooks}
    assert books["zone-lost"].restore.exclude_zones == ("zone-a",)
    plan = build_plan(config, "/run/secrets/shardvault_password", playbooks)
    names = {d.full_name for d in plan.deployments}
    assert {"backup/db", "backup/data", "check/default", "scrub/default", "repair/default"} <= names
    assert {"drill/data-restore", "drill/db-pitr", "drill/zone-lost"} <= names
    for d in plan.deployments:
        if d.full_name.startswith("backup/"):
            assert {s.label for s in d.schedules} == {"incremental", "full"}, d.full_name
    worker = resolved["services"]["shardvault-worker"]
    assert "--password-file /run/secrets/shardvault_password" in command_text(worker)
    assert secret_names(worker) == {"shardvault_password"}
    assert host_path(worker, "/etc/shardvault/dr_playbooks") == DEPLOY / "dr_playbooks"


# --- the image ------------------------------------------------------------------------------------


def dockerignore_allowed() -> list[str]:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    assert lines[0] == "*", "the .dockerignore is an allow-list: everything out, then what the build needs"
    return [ln[1:] for ln in lines if ln.startswith("!")]


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.MULTILINE)
    app = text.split("AS app", 1)[1]
    assert re.search(r"^USER shardvault$", app, re.MULTILINE), "the worker image must not run as root"
    assert "postgresql" in app  # pg_basebackup/pg_dump (and initdb/pg_ctl for drills)
    # Every COPY from the context copies something the .dockerignore lets in and that exists.
    allowed = dockerignore_allowed()
    for source in re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.MULTILINE):
        for item in source.split():
            assert (ROOT / item).exists(), item
            assert item.rstrip("/") in allowed, f"{item} is copied but excluded by .dockerignore"


def test_docker_context_builds_a_complete_wheel(tmp_path: Path) -> None:
    # The wheel stage, without Docker: build from exactly what .dockerignore lets into the
    # context, and compare with every module of the checkout (a new folder left out of the
    # allow-list or of pyproject's packages would make the image fail at import time).
    uv = Path(sys.executable).parent / "uv"
    if not uv.exists():
        pytest.skip("uv is not in the venv (make setup installs it)")
    context = tmp_path / "context"
    context.mkdir()
    for item in dockerignore_allowed():
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, context / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, context / item)
    out = tmp_path / "wheels"
    result = subprocess.run(
        [str(uv), "build", "-q", "--wheel", "--out-dir", str(out), str(context)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("shardvault-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {n for n in zf.namelist() if n.endswith(".py")}
        entry_points = next(zf.read(n).decode() for n in zf.namelist() if n.endswith("entry_points.txt"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {"shardvault": "shardvault"} | pyproject["tool"]["setuptools"]["package-dir"]
    expected = set()
    for package, folder in folders.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            expected.add(str(PurePosixPath(*package.split("."), path.relative_to(ROOT / folder))))
    assert expected == in_wheel
    assert f"shardvault = {pyproject['project']['scripts']['shardvault']}" in entry_points
    assert "shardvault = shardvault.entry:main" in entry_points  # the wal-push fast path, then the CLI
