"""What runs when: the deployments a configuration asks for, and their cron schedules.

One plan answers three commands, so they cannot drift: ``shardvault serve``
registers it with Prefect, ``shardvault schedule`` prints it, and
``shardvault deploy`` writes it as a ``prefect.yaml`` for a work pool.

* ``backup/<source>`` for every source, scheduled or not (an unscheduled
  source is still run on demand).  One deployment carries both of its crons,
  ``[sources.schedule] incremental`` with ``full = false`` and ``full`` with
  ``full = true``, and runs one at a time (concurrency limit 1, later runs
  wait in the queue) so two backups of one source never overlap.
* ``check/default``, ``scrub/default``, ``repair/default`` from the
  top-level ``[schedule]`` crons; ``repair`` is also triggered by the
  self-repair event (``shardvault.flows.events``).
* ``drill/<playbook>`` per file in ``dr_playbooks/`` when the drill flow is
  installed, on ``[schedule] drill``.

Crons are checked with the very validator and date generator the Prefect
server uses, and the timezone with :mod:`zoneinfo`; a problem is a
:class:`~shardvault.errors.ScheduleConfigError` naming the file and the key,
raised before anything is registered.  The config reader keeps crons as text,
so a typo in a schedule never stops a restore by hand.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shardvault.config import Config
from shardvault.errors import ScheduleConfigError


class Job(StrEnum):
    """The flows a deployment runs (each is a flow of the same name in :mod:`shardvault.flows`)."""

    BACKUP = "backup"
    CHECK = "check"
    SCRUB = "scrub"
    REPAIR = "repair"
    DRILL = "drill"
    PRUNE = "prune"


DEFAULT = "default"  # the deployment name of the repository-wide jobs
PLAYBOOK_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class PlannedSchedule:
    cron: str
    key: str  # where the config says it: "sources[0].schedule.full"
    label: str  # "incremental", "full", "check", ...
    parameters: dict[str, Any] = field(default_factory=dict)  # overrides of the deployment's parameters


@dataclass(frozen=True)
class PlannedDeployment:
    job: Job
    name: str
    parameters: dict[str, Any]
    schedules: tuple[PlannedSchedule, ...] = ()
    serialised: bool = False  # one run at a time; later ones are enqueued

    @property
    def full_name(self) -> str:
        return f"{self.job.value}/{self.name}"


@dataclass(frozen=True)
class Plan:
    timezone: str
    deployments: tuple[PlannedDeployment, ...]

    def deployment(self, full_name: str) -> PlannedDeployment:
        for d in self.deployments:
            if d.full_name == full_name:
                return d
        raise KeyError(full_name)


def _fail(config: Config, key: str, message: str) -> ScheduleConfigError:
    return ScheduleConfigError(f"{config.path}: {key}", message)


def check_timezone(config: Config) -> str:
    name = config.schedule.timezone
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        why = f"unknown timezone {name!r} (an IANA name: UTC, Europe/Paris)"
        raise _fail(config, "schedule.timezone", why) from None
    return name


def check_cron(config: Config, key: str, cron: str) -> str:
    """The cron, if the Prefect server will accept it; else a ScheduleConfigError naming the key."""
    from prefect.server.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone="UTC")
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        why = errors()[0].get("msg", str(exc)) if callable(errors) else str(exc)
        why = why.removeprefix("Value error, ") + " (five fields: minute hour day month weekday)"
        raise _fail(config, key, why) from None
    try:  # well-formed but never due (Feb 31st): serve would register a schedule that never runs
        dates = asyncio.run(CronSchedule(cron=cron, timezone="UTC").get_dates(n=1))
    except Exception as exc:  # noqa: BLE001 - the cron library's own error classes are not ours to name
        raise _fail(config, key, f"{cron!r} never fires ({exc})") from None
    if not dates:
        raise _fail(config, key, f"{cron!r} never fires")
    return cron


def find_playbooks(directory: Path | None) -> list[Path]:
    if directory is None or not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in PLAYBOOK_SUFFIXES and p.is_file())


def build_plan(
    config: Config,
    password_file: str | None = None,
    playbooks: Sequence[Path] = (),
) -> Plan:
    """Every deployment of ``config``, checked; ``playbooks`` only when the drill flow exists (the caller knows)."""
    timezone = check_timezone(config)
    common: dict[str, Any] = {"config": str(config.path)}
    if password_file:  # else the runs read $SHARDVAULT_PASSWORD from the serving process's environment
        common["password_file"] = str(Path(password_file).absolute())
    deployments: list[PlannedDeployment] = []
    for i, source in enumerate(config.sources):
        schedules = []
        for label, cron, full in (
            ("incremental", source.schedule.incremental, False),
            ("full", source.schedule.full, True),
        ):
            if cron is not None:
                key = f"sources[{i}].schedule.{label}"
                schedules.append(PlannedSchedule(check_cron(config, key, cron), key, label, {"full": full}))
        params = common | {"source": source.name, "full": False}
        deployments.append(PlannedDeployment(Job.BACKUP, source.name, params, tuple(schedules), serialised=True))
    for job in (Job.CHECK, Job.SCRUB, Job.REPAIR, Job.PRUNE):
        cron = getattr(config.schedule, job.value)
        key = f"schedule.{job.value}"
        schedules = [PlannedSchedule(check_cron(config, key, cron), key, job.value)] if cron is not None else []
        # Repository-wide jobs run one at a time too: two repairs at once would race for the same shards.
        deployments.append(PlannedDeployment(job, DEFAULT, dict(common), tuple(schedules), serialised=True))
    for path in playbooks:
        cron = config.schedule.drill
        key = "schedule.drill"
        schedules = [PlannedSchedule(check_cron(config, key, cron), key, Job.DRILL.value)] if cron is not None else []
        params = common | {"playbook": str(path.absolute())}
        deployments.append(PlannedDeployment(Job.DRILL, path.stem, params, tuple(schedules), serialised=True))
    return Plan(timezone, tuple(deployments))


@dataclass(frozen=True)
class NextRun:
    deployment: str
    label: str
    at: dt.datetime  # in the plan's timezone
    parameters: dict[str, Any]


def next_runs(plan: Plan, count: int = 3, start: dt.datetime | None = None) -> list[NextRun]:
    """The next ``count`` runs of every schedule, computed locally by the Prefect server's own cron code."""
    from prefect.server.schemas.schedules import CronSchedule

    zone = ZoneInfo(plan.timezone)
    begin = start or dt.datetime.now(dt.UTC)
    runs: list[NextRun] = []
    for d in plan.deployments:
        for s in d.schedules:
            dates = asyncio.run(CronSchedule(cron=s.cron, timezone=plan.timezone).get_dates(n=count, start=begin))
            for when in dates:
                at = dt.datetime.fromtimestamp(when.timestamp(), zone)
                runs.append(NextRun(d.full_name, s.label, at, d.parameters | s.parameters))
    runs.sort(key=lambda r: (r.at, r.deployment, r.label))
    return runs


def plan_doc(plan: Plan, runs: Sequence[NextRun]) -> dict[str, Any]:
    """``shardvault schedule --json``: every deployment with its crons, and the next runs."""
    return {
        "timezone": plan.timezone,
        "deployments": [
            {
                "name": d.full_name,
                "flow": d.job.value,
                "parameters": d.parameters,
                "concurrency_limit": 1 if d.serialised else None,
                "schedules": [{"cron": s.cron, "label": s.label, "parameters": s.parameters} for s in d.schedules],
                "next_runs": [r.at.isoformat() for r in runs if r.deployment == d.full_name],
            }
            for d in plan.deployments
        ],
        "next_runs": [
            {"deployment": r.deployment, "label": r.label, "at": r.at.isoformat(), "parameters": r.parameters}
            for r in runs
        ],
    }
