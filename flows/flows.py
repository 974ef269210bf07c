"""The Prefect flows ``backup``, ``check``, ``scrub``, ``repair`` and ``prune``: thin wrappers over the library.

Each flow opens the repository from a config path and a password file (or
``$SHARDVAULT_CONFIG`` / ``$SHARDVAULT_PASSWORD``), calls the function the
CLI calls, and returns the document the CLI prints with ``--json``.  What the
CLI turns into a non-zero exit (any :class:`ShardvaultError`, damage found,
an incomplete backup or repair) ends the run as Failed with the CLI's
one-line message, without a traceback.

Retries: only check and scrub retry, and only on peer errors (the library
reads, records a verdict and commits nothing else, so a rerun is safe).  A
backup or a repair is never blindly retried: the rerun is the next
scheduled run, which resumes from what was committed (the library commits
last, so a cancelled run leaves nothing half-committed either).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.tasks import Task, exponential_backoff

from shardvault.config import Config, load_config, read_password
from shardvault.errors import (
    BackupIncompleteError,
    DamageFoundError,
    PeerError,
    ShardvaultError,
)
from shardvault.flows.events import emit_degraded
from shardvault.repository import Repository

PROGRESS_EVERY = 10.0  # seconds between progress log lines of long work
RETRIES = 3  # check and scrub, on peer errors only
RETRY_BACKOFF = 10  # seconds: 10, 20, 40 (with jitter)


class RunFailed(Exception):
    """A ShardvaultError, carried out of a task as its one-line message (no library traceback)."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def _only_peer_errors(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a read-only task only when a peer failed (transient I/O), never on a verdict or a config error."""
    try:
        state.result()
    except RunFailed as exc:
        return exc.retryable
    except Exception:  # noqa: BLE001  # a bug: retrying would only repeat it
        return False
    return False


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys are lower-case letters, digits and dashes; source names may hold '.' and '_'."""
    return "-".join(re.sub(r"[^a-z0-9-]+", "-", p.lower()).strip("-") for p in parts)


def as_json(doc: Any) -> Any:
    """The document exactly as the CLI's ``--json`` prints it (enums and paths as strings)."""
    return json.loads(json.dumps(doc, sort_keys=True, default=str))


class Progress:
    """Log lines at a steady rate (at most one per PROGRESS_EVERY seconds), whatever the library's call rate."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.last = time.monotonic()
        self.logger = get_run_logger()  # built in the task's context; called from the library's threads

    def __call__(self, message: Callable[[], str]) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.logger.info("%s: %s", self.what, message())


@contextmanager
def opened(config_path: str | None, password_file: str | None) -> Iterator[Repository]:
    config = load_config(config_path)
    logger = get_run_logger()  # here, in the run's context: the library calls back from its worker threads

    def peer_down(name: str, why: str) -> None:  # as the CLI says it: a silent peer must not look like a hang
        logger.warning("peer %s is down for this run: %s", name, why)

    repo = Repository.open(config, read_password(password_file), peer_down)
    try:
        yield repo
    finally:
        repo.close()
        for problem in repo.meta_problems:  # survived, never hidden (as the CLI warns)
            where = f" on peer {problem.peer}" if problem.peer else ""
            logger.warning("metadata object %s%s: %s", problem.name, where, problem.detail)


def _carry(exc: ShardvaultError, retry: bool = False) -> State[Any]:
    """A peer error in a task that may retry is raised (the engine retries it); any other is a Failed state.

    Returning the state instead of raising keeps the engine from logging a
    traceback for what is an expected failure with a one-line message.
    """
    if retry and isinstance(exc, PeerError):
        raise RunFailed(str(exc), retryable=True) from None
    return Failed(message=str(exc))


def _finish(state: State[Any]) -> Any:
    """The task's document, or a Failed flow state with the one-line message."""
    if state.is_completed():
        return state.result()
    if not state.is_failed():
        return state  # a crash or cancellation: the engine's own state says what happened
    exc = state.result(raise_on_failure=False)
    return Failed(message=str(exc) if isinstance(exc, RunFailed) else state.message)


# --- run names -------------------------------------------------------------------------


def _stamp() -> str:
    """The scheduled start in the config's timezone: ``20261124-0300``."""
    when = flow_run.get_scheduled_start_time() or datetime.now(UTC)
    zone = "UTC"
    try:
        zone = load_config(flow_run.get_parameters().get("config")).schedule.timezone
        return datetime.fromtimestamp(when.timestamp(), ZoneInfo(zone)).strftime("%Y%m%d-%H%M")
    except (ShardvaultError, ValueError, KeyError):  # a bad config fails the run itself, with its message
        return datetime.fromtimestamp(when.timestamp(), UTC).strftime("%Y%m%d-%H%M")


def backup_run_name() -> str:
    params = flow_run.get_parameters()
    kind = "full" if params.get("full") else "incremental"
    return f"backup-{params.get('source', 'unknown')}-{kind}-{_stamp()}"


def _job_run_name(job: str) -> Callable[[], str]:
    def name() -> str:
        return f"{job}-{_stamp()}"

    return name


# --- backup ------------------------------------------------------------------------------


@task(name="backup-source", cache_policy=NO_CACHE, persist_result=False)
def backup_task(
    config_path: str | None, password_file: str | None, source: str, full: bool
) -> dict[str, Any] | State[Any]:
    from shardvault.backup import BackupStats, backup_source

    progress = Progress(f"backup {source}")
    try:
        source_config = load_config(config_path).source(source)  # an unknown source before the passphrase
        with opened(config_path, password_file) as repo:

            def on_progress(stats: BackupStats, path: str) -> None:
                progress(lambda: f"{stats.files} files, {stats.bytes_read} bytes read, {stats.bytes_new} new ({path})")

            result = backup_source(repo, source_config, full, progress=on_progress)
        doc = result.to_doc()
        doc |= {"warnings": doc["stats"]["warnings"], "warning_details": doc["stats"]["warning_details"]}
        s = result.stats
        unchanged_bytes = s.bytes_total - s.bytes_read
        create_table_artifact(
            key=artifact_key("backup", source),
            table=[
                {"what": "files", "count": s.files, "read": s.files_read, "unchanged": s.files_unchanged},
                {"what": "bytes", "count": s.bytes_total, "read": s.bytes_read, "unchanged": unchanged_bytes},
                {"what": "new data (bytes)", "count": s.bytes_new, "read": s.bytes_new, "unchanged": 0},
                {"what": "stored (bytes)", "count": s.bytes_stored, "read": 0, "unchanged": 0},
                {"what": "shards stored (bytes)", "count": s.shard_bytes_stored, "read": 0, "unchanged": 0},
                {"what": "packs new", "count": s.packs_new, "read": 0, "unchanged": 0},
            ],
            description=f"snapshot {result.snapshot.short_id} of {source} ({result.snapshot.kind}): "
            f"{s.duration_seconds:.1f} s" + (", degraded" if s.degraded else ""),
        )
        for warning in s.warnings:
            get_run_logger().warning("%s", warning)
        if incomplete := s.incomplete:  # the CLI's exit 11: saved, but files were left out
            raise BackupIncompleteError(result.snapshot.short_id, len(incomplete), str(incomplete[0]))
        return as_json(doc)  # type: ignore[no-any-return]
    except ShardvaultError as exc:
        return _carry(exc)


@flow(name="backup", flow_run_name=backup_run_name, log_prints=False)
def backup(
    source: str, full: bool = False, config: str | None = None, password_file: str | None = None
) -> dict[str, Any]:
    """Back up one source (incremental unless ``full``): what `shardvault backup SOURCE [--full] --json` prints."""
    return _finish(backup_task(config, password_file, source, full, return_state=True))  # type: ignore[no-any-return]


# --- check and scrub -------------------------------------------------------------------------


def _peer_rows(config: Config, issues: list[dict[str, Any]], unreachable: dict[str, str], meta: dict[str, Any]) -> Any:
    rows = []
    for peer in config.peers:
        mine = [i for i in issues if i["peer"] == peer.name]
        if peer.name in unreachable:
            verdict = "unreachable"
        elif peer.name in meta["peers_empty"]:
            verdict = "empty"
        elif mine:
            verdict = "damaged"
        else:
            verdict = "healthy"
        rows.append(
            {
                "peer": peer.name,
                "zone": peer.zone,
                "verdict": verdict,
                "missing": sum(1 for i in mine if i["problem"] not in ("corrupt", "unreachable")),
                "corrupt": sum(1 for i in mine if i["problem"] == "corrupt"),
                "unreachable": sum(1 for i in mine if i["problem"] == "unreachable"),
                "detail": unreachable.get(peer.name, ""),
            }
        )
    return rows


def _degraded_peers(doc: dict[str, Any]) -> list[str]:
    return sorted(set(doc["peers_unreachable"]) | set(doc["metadata"]["peers_empty"]))


@task(
    name="check-repository",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_BACKOFF),
    retry_jitter_factor=0.5,
    retry_condition_fn=_only_peer_errors,
)
def check_task(config_path: str | None, password_file: str | None, read_data: bool) -> dict[str, Any] | State[Any]:
    from shardvault.verify.check import check as run_check

    progress = Progress("check")
    try:
        with opened(config_path, password_file) as repo:
            report = run_check(repo, read_data, lambda done, total: progress(lambda: f"{done}/{total} shards"))
            doc = as_json(report.to_doc())
            create_table_artifact(
                key="check-verdict",
                table=_peer_rows(repo.config, doc["shard_issues"], doc["peers_unreachable"], doc["metadata"]),
                description=report.summary(),
            )
            peers_down = _degraded_peers(doc)
            unhealthy = {state: count for state, count in doc["packs"].items() if state != "healthy" and count}
            if unhealthy or peers_down:
                emit_degraded(repo.id, "check", unhealthy, peers_down, report.summary())
        if report.damaged:
            raise DamageFoundError(report.summary())
        return doc  # type: ignore[no-any-return]
    except ShardvaultError as exc:
        return _carry(exc, retry=True)


@flow(name="check", flow_run_name=_job_run_name("check"), log_prints=False)
def check(read_data: bool = False, config: str | None = None, password_file: str | None = None) -> dict[str, Any]:
    """Presence check (and with ``read_data`` a read of every shard): `shardvault check --json`."""
    return _finish(check_task(config, password_file, read_data, return_state=True))  # type: ignore[no-any-return]


@task(
    name="scrub-shards",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_BACKOFF),
    retry_jitter_factor=0.5,
    retry_condition_fn=_only_peer_errors,
)
def scrub_task(
    config_path: str | None, password_file: str | None, budget_bytes: int | None, max_seconds: float | None
) -> dict[str, Any] | State[Any]:
    from shardvault.verify.scrub import scrub as run_scrub

    progress = Progress("scrub")
    try:
        with opened(config_path, password_file) as repo:
            report = run_scrub(
                repo,
                repo.config.scrub,
                budget_bytes=budget_bytes,
                max_seconds=max_seconds,
                progress=lambda n, total, nbytes: progress(lambda: f"{n}/{total} shards read, {nbytes} bytes"),
            )
            doc = as_json(report.to_doc())
            create_table_artifact(
                key="scrub-verdict",
                table=_peer_rows(repo.config, doc["issues"], doc["peers_unreachable"], doc["metadata"]),
                description=f"{report.shards_read}/{report.shards_total} shards read; coverage {report.coverage:.1%}",
            )
            peers_down = _degraded_peers(doc)
            bad = {"shards_bad": len(report.issues)} if report.issues else {}
            if bad or peers_down:
                emit_degraded(repo.id, "scrub", bad, peers_down, f"{len(report.issues)} bad shard(s)")
        if report.damaged:
            raise DamageFoundError(f"{len(report.issues)} bad shard(s); {report.metadata.summary()}")
        return doc  # type: ignore[no-any-return]
    except ShardvaultError as exc:
        return _carry(exc, retry=True)


@flow(name="scrub", flow_run_name=_job_run_name("scrub"), log_prints=False)
def scrub(
    budget_bytes: int | None = None,
    max_seconds: float | None = None,
    config: str | None = None,
    password_file: str | None = None,
) -> dict[str, Any]:
    """Read and verify shards, least recently verified first: `shardvault scrub --json`."""
    state = scrub_task(config, password_file, budget_bytes, max_seconds, return_state=True)
    return _finish(state)  # type: ignore[no-any-return]


# --- repair ------------------------------------------------------------------------------------


@task(name="repair-shards", cache_policy=NO_CACHE, persist_result=False)
def repair_task(config_path: str | None, password_file: str | None) -> dict[str, Any] | State[Any]:
    from shardvault.verify.repair import raise_for_verdict
    from shardvault.verify.repair import repair as run_repair

    progress = Progress("repair")
    try:
        with opened(config_path, password_file) as repo:
            report = run_repair(repo, progress=lambda done, total: progress(lambda: f"{done}/{total} packs"))
        doc = as_json(report.to_doc())
        raise_for_verdict(doc)  # the CLI's exit rule: a repair that left damage fails the run
        return doc  # type: ignore[no-any-return]
    except ShardvaultError as exc:
        return _carry(exc)


@flow(name="repair", flow_run_name=_job_run_name("repair"), log_prints=False)
def repair(config: str | None = None, password_file: str | None = None) -> dict[str, Any]:
    """Rebuild missing and corrupt shards from k good ones: `shardvault repair --json`."""
    return _finish(repair_task(config, password_file, return_state=True))  # type: ignore[no-any-return]


# --- forget and prune --------------------------------------------------------------------------


@task(name="forget-and-prune", cache_policy=NO_CACHE, persist_result=False)
def prune_task(config_path: str | None, password_file: str | None) -> dict[str, Any] | State[Any]:
    from shardvault.lifecycle.forget import configured_policies, forget
    from shardvault.lifecycle.prune import PruneOptions
    from shardvault.lifecycle.prune import prune as run_prune

    progress = Progress("prune")
    try:
        with opened(config_path, password_file) as repo:
            config = repo.config
            policies, tz = configured_policies(config)
            forgotten = forget(repo, policies, tz=tz) if policies else None
            options = PruneOptions(
                max_unused_percent=config.prune.max_unused_percent, grace_seconds=config.prune.grace_seconds
            )
            report = run_prune(repo, options, progress=lambda step: progress(lambda: step))
        doc = {"forget": forgotten.to_doc() if forgotten else None, "prune": report.to_doc()}
        return as_json(doc)  # type: ignore[no-any-return]
    except ShardvaultError as exc:
        return _carry(exc)


@flow(name="prune", flow_run_name=_job_run_name("prune"), log_prints=False)
def prune(config: str | None = None, password_file: str | None = None) -> dict[str, Any]:
    """Apply each source's [sources.retention] (`shardvault forget`), then `shardvault prune --json`."""
    return _finish(prune_task(config, password_file, return_state=True))  # type: ignore[no-any-return]
