"""Deployments from the TOML config: ``serve`` (one process) and a ``prefect.yaml`` for work pools.

The plan (which deployments, which crons, which parameters) comes from
:mod:`shardvault.schedule`; this module only turns it into Prefect objects.
:data:`FLOWS` maps every job to its flow: the drill flow joins it when
``shardvault.flows.drill`` is installed, so ``serve`` then also offers a
``drill/<playbook>`` deployment per playbook file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # no stubs in the project's dependencies
from prefect import Flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from shardvault.config import Config
from shardvault.errors import PrefectUnavailableError
from shardvault.flows import flows
from shardvault.flows.events import RESOURCE_PREFIX, self_repair_trigger
from shardvault.schedule import Job, Plan, PlannedDeployment, build_plan, find_playbooks

DRILL_MODULE = "shardvault.flows.drill"
HEALTH_TIMEOUT = 5.0  # seconds: an API that does not answer its health check in this time is unreachable


def registered_flows() -> dict[Job, Flow[..., Any]]:
    """Every job's flow; the drill flow only when its module exists (it is optional, and written separately)."""
    registry: dict[Job, Flow[..., Any]] = {
        Job.BACKUP: flows.backup,
        Job.CHECK: flows.check,
        Job.SCRUB: flows.scrub,
        Job.REPAIR: flows.repair,
        Job.PRUNE: flows.prune,
    }
    if importlib.util.find_spec(DRILL_MODULE) is not None:
        # Imported for real: a broken drill module is an error to see, not a flow to skip.
        registry[Job.DRILL] = importlib.import_module(DRILL_MODULE).drill
    return registry


def default_playbooks_dir(config: Config) -> Path | None:
    """``dr_playbooks/`` beside the config, else in the working directory."""
    for candidate in (config.path.parent / "dr_playbooks", Path.cwd() / "dr_playbooks"):
        if candidate.is_dir():
            return candidate
    return None


def plan_for(config: Config, password_file: str | None, playbooks_dir: Path | None) -> Plan:
    """The checked plan; drill deployments only when the drill flow is installed."""
    has_drill = importlib.util.find_spec(DRILL_MODULE) is not None
    directory = playbooks_dir if playbooks_dir is not None else default_playbooks_dir(config)
    return build_plan(config, password_file, find_playbooks(directory) if has_drill else [])


def _concurrency(planned: PlannedDeployment) -> ConcurrencyLimitConfig | None:
    if not planned.serialised:
        return None
    # ENQUEUE: a scheduled run that meets a running one waits for it instead of being dropped.
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def runner_deployments(plan: Plan) -> list[RunnerDeployment]:
    registry = registered_flows()
    deployments = []
    for planned in plan.deployments:
        flow = registry[planned.job]
        schedules = [
            Cron(s.cron, timezone=plan.timezone, parameters=s.parameters, slug=s.label) for s in planned.schedules
        ]
        deployment = flow.to_deployment(
            name=planned.name,
            schedules=schedules,
            parameters=planned.parameters,
            concurrency_limit=_concurrency(planned),
            triggers=[self_repair_trigger()] if planned.job is Job.REPAIR else None,
            tags=["shardvault", planned.job.value],
            description=flow.description,
            # By module path: the runs import shardvault.flows.* as installed, relative imports and all.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        assert isinstance(deployment, RunnerDeployment)  # to_deployment is sync outside an event loop
        deployments.append(deployment)
    return deployments


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "")


def require_api() -> str:
    """PREFECT_API_URL, answering its health check; else PrefectUnavailableError (nothing registered yet)."""
    url = api_url()
    if not url:
        raise PrefectUnavailableError(
            "PREFECT_API_URL", "not set (start `prefect server start` and export PREFECT_API_URL=http://HOST:PORT/api)"
        )
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT) as response:
            if response.status != 200:
                raise PrefectUnavailableError(url, f"health check answered HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        raise PrefectUnavailableError(url, f"health check answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrefectUnavailableError(url, str(reason)) from None
    return url


def serve_plan(plan: Plan, limit: int | None = None, workdir: Path | None = None) -> None:
    """Register every deployment of the plan and run them in this process until SIGTERM or Ctrl-C."""
    from prefect import serve

    require_api()
    # Each run is a child process that imports its flow from the deployment's working directory (the
    # current one): started inside a checkout, the source folder `shardvault/` would hide the installed
    # package.  Run from the state directory instead (every path in the plan is absolute).
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
    deployments = runner_deployments(plan)  # builds (and checks) everything before the first registration
    serve(*deployments, limit=limit, print_starting_message=False)


def prefect_yaml(plan: Plan, work_pool: str, working_directory: str) -> str:
    """The same deployments as ``serve``, as a ``prefect.yaml`` for ``prefect deploy --all`` and process workers."""
    registry = registered_flows()
    entries: list[dict[str, Any]] = []
    for planned in plan.deployments:
        flow = registry[planned.job]
        entry: dict[str, Any] = {
            "name": planned.name,
            "entrypoint": f"{flow.fn.__module__}.{flow.fn.__name__}",
            "description": flow.description,
            "tags": ["shardvault", planned.job.value],
            "parameters": planned.parameters,
            "work_pool": {"name": work_pool},
            "schedules": [
                {"cron": s.cron, "timezone": plan.timezone, "slug": s.label, "parameters": s.parameters}
                for s in planned.schedules
            ],
        }
        if planned.serialised:
            entry["concurrency_limit"] = {"limit": 1, "collision_strategy": "ENQUEUE"}
        if planned.job is Job.REPAIR:
            trigger = self_repair_trigger()
            entry["triggers"] = [
                {
                    "type": "event",
                    "enabled": True,
                    "name": trigger.name,
                    "expect": sorted(trigger.expect),
                    "match": {"prefect.resource.id": RESOURCE_PREFIX + "*"},
                    "posture": trigger.posture.value,
                    "threshold": trigger.threshold,
                    "within": int(trigger.within.total_seconds()),
                }
            ]
        entries.append(entry)
    doc = {
        "name": "shardvault",
        "prefect-version": _prefect_version(),
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": working_directory}}],
        "deployments": entries,
    }
    header = (
        "# Generated by `shardvault deploy` from the shardvault configuration: the same deployments as\n"
        "# `shardvault serve`, for `prefect deploy --all` and process workers (`prefect worker start --pool P`).\n"
    )
    body: str = yaml.safe_dump(doc, sort_keys=False)
    return header + body


def _prefect_version() -> str:
    import prefect

    version: str = prefect.__version__
    return version


def describe(deployments: Sequence[RunnerDeployment]) -> list[str]:
    return [f"{d.flow_name}/{d.name}" for d in deployments]


def environment_note() -> str:
    """How runs will find the passphrase, for the serve banner."""
    return "password file" if os.environ.get("SHARDVAULT_PASSWORD") is None else "$SHARDVAULT_PASSWORD"
