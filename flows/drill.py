"""The Prefect flow ``drill``: run a DR playbook, as `shardvault drill PLAYBOOK --json` does.

Thin: the library validates the playbook, restores, checks, measures, writes
the report and records the run; the flow logs the steps, publishes the
Markdown report as an artifact (key ``drill-<playbook>``) and returns the
report document.  A drill that did not pass ends the run as Failed with the
CLI's one-line message (which check, or which objective), never a traceback.
A drill is never retried: a rerun is the next scheduled one, and a failed
drill keeps its target for inspection.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Failed

from shardvault.config import load_config, read_password
from shardvault.errors import ShardvaultError

from .flows import RunFailed, artifact_key, as_json


def drill_run_name() -> str:
    """``drill-docs-restore-20261124-0300`` (the scheduled start, UTC)."""
    when = flow_run.get_scheduled_start_time() or datetime.now(UTC)
    playbook = Path(str(flow_run.get_parameters().get("playbook", "unknown"))).stem
    return f"drill-{playbook}-{datetime.fromtimestamp(when.timestamp(), UTC).strftime('%Y%m%d-%H%M')}"


@task(name="drill-playbook", cache_policy=NO_CACHE, persist_result=False)
def drill_task(playbook: str, config_path: str | None, password_file: str | None) -> dict[str, Any]:
    from shardvault.restore.drill import run_drill
    from shardvault.restore.playbook import load_playbook

    logger = get_run_logger()
    try:
        config = load_config(config_path)
        book = load_playbook(playbook, config)
        report = run_drill(config, read_password(password_file), book, lambda step: logger.info("drill: %s", step))
        create_markdown_artifact(
            key=artifact_key("drill", book.name),
            markdown=report.to_markdown(),
            description=f"DR drill {book.name}: {report.result.value}",
        )
        error = report.error()
        if error is not None:
            raise error
        return as_json(report.to_doc())  # type: ignore[no-any-return]
    except ShardvaultError as exc:
        raise RunFailed(str(exc)) from None


@flow(name="drill", flow_run_name=drill_run_name, log_prints=False)
def drill(playbook: str, config: str | None = None, password_file: str | None = None) -> Any:
    """Run the DR playbook ``playbook`` (a path): what `shardvault drill PLAYBOOK --json` prints."""
    state: State[Any] = drill_task(playbook, config, password_file, return_state=True)
    if state.is_completed():
        return state.result()
    try:
        state.result()
    except RunFailed as exc:
        return Failed(message=str(exc))
    return state  # a crash or cancellation: the engine's own state says what happened
