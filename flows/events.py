"""Self-repair: the event that check and scrub emit, and the trigger that runs ``repair/default`` on it.

Check and scrub emit ``shardvault.redundancy.degraded`` (resource
``shardvault.repository.<id>``) when packs are not healthy, shards are bad,
or a peer is down or empty.  The repair deployment carries a reactive
trigger on that event: it fires on the first event, then waits out its
cooldown window before it can fire again, so a flapping peer starts one
repair per window, not a storm.  The trigger is an automation of the
Prefect server (its Automations page); it does not depend on Prometheus.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect.events import DeploymentEventTrigger, emit_event
from prefect.events.schemas.automations import Posture
from prefect.events.schemas.events import Event

DEGRADED_EVENT = "shardvault.redundancy.degraded"
RESOURCE_PREFIX = "shardvault.repository."
REPAIR_COOLDOWN = timedelta(minutes=15)  # at most one self-repair per window


def emit_degraded(
    repository_id: str, found_by: str, packs: dict[str, int], peers_down: list[str], summary: str
) -> Event | None:
    """Say that redundancy is degraded; None when no events client is configured (as Prefect's own emit_event)."""
    payload: dict[str, Any] = {"found_by": found_by, "packs": packs, "peers_down": peers_down, "summary": summary}
    return emit_event(
        event=DEGRADED_EVENT,
        resource={"prefect.resource.id": RESOURCE_PREFIX + repository_id, "prefect.resource.name": "shardvault"},
        payload=payload,
    )


def self_repair_trigger(cooldown: timedelta = REPAIR_COOLDOWN) -> DeploymentEventTrigger:
    return DeploymentEventTrigger(
        name="shardvault self-repair",
        description=f"run repair when check or scrub reports degraded redundancy (at most once per {cooldown})",
        expect={DEGRADED_EVENT},
        match={"prefect.resource.id": RESOURCE_PREFIX + "*"},
        posture=Posture.Reactive,
        threshold=1,
        within=cooldown,  # reactive: fire on the first event, then not again until the window is over
    )
