"""Health of the vault in one verdict: what ``/health`` and ``/health/detailed`` serve.

Healthy means: the state can be read, every configured source's newest
successful backup is within its ``rpo_objective_seconds``, a check or scrub
ran within the scrub window, the last drill of every playbook passed, and the
last verification found no data lost (a lost pack, metadata object or
snapshot: no objective means anything then).
Anything else is unhealthy, with one human-readable reason per problem.

The verdict is computed from the same metric families the exporter serves
(:class:`~shardvault.verify.metrics.StateCollector`), read at the same
instant, so ``/health`` can never disagree with ``/metrics`` or with the
alerts built on it.  Only what the metrics do not carry (when the last check
ran, when the first backup ran, why a peer is down) is queried here.

Peers are reported but do not decide health: a peer down is what k-of-n is
for, and the alerts (``ShardvaultPeerDown``, pack states) speak for it.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardvault.config import Config
from shardvault.state import State

from .metrics import StateCollector

Samples = dict[str, list[tuple[dict[str, str], float]]]  # family name -> (labels, value) per sample


@dataclass(frozen=True)
class Health:
    healthy: bool
    reasons: list[str]
    detail: dict[str, Any] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "reasons": self.reasons} | self.detail


def read_families(config: Config, state: State, now: float) -> Samples:
    """Every gauge the exporter would serve at ``now``, by family name."""
    families: Samples = {}
    for family in StateCollector(config, state, clock=lambda: now).collect():
        families[family.name] = [(dict(s.labels), float(s.value)) for s in family.samples]
    return families


def assess(config: Config, state: State, now: float | None = None) -> Health:
    """The verdict at ``now`` (default: the current time); never raises for an unreadable state."""
    now = time.time() if now is None else now
    try:
        return _assess(config, state, now)
    except (sqlite3.Error, OSError) as exc:
        # A state the exporter cannot read means every metric is blind: that is unhealthy, not a crash.
        return Health(False, [f"state unreadable: {exc}"], {"checked_at": now})


def _by(families: Samples, name: str, label: str) -> dict[str, float]:
    return {labels[label]: value for labels, value in families.get(name, []) if label in labels}


def _age(now: float, when: float | None) -> float | None:
    return None if when is None else round(now - when, 3)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _assess(config: Config, state: State, now: float) -> Health:
    families = read_families(config, state, now)
    reasons: list[str] = []

    up = {labels["peer"]: value for labels, value in families.get("shardvault_peer_up", [])}
    listed = _by(families, "shardvault_peer_last_check_timestamp_seconds", "peer")
    # Why a peer is down is not a metric (it is text): the one fact read here besides runs.
    errors = {str(peer): str(error) for peer, error in state.query("SELECT peer, error FROM peers")}
    peers = {
        p.name: {
            "zone": p.zone,
            "up": None if p.name not in up else up[p.name] == 1.0,  # None: never listed yet
            "last_listed": listed.get(p.name),
            "last_listed_age_seconds": _age(now, listed.get(p.name)),
            "error": errors.get(p.name) or None,
        }
        for p in config.peers
    }

    newest: dict[str, dict[str, float]] = {}
    for labels, value in families.get("shardvault_backup_last_success_timestamp_seconds", []):
        newest.setdefault(labels["source"], {})[labels["kind"]] = value
    objective = _by(families, "shardvault_rpo_objective_seconds", "source")
    rpo = _by(families, "shardvault_rpo_seconds", "source")
    sources: dict[str, Any] = {}
    for source in config.sources:
        kinds = newest.get(source.name, {})
        age = rpo.get(source.name, math.inf)
        goal = objective.get(source.name, float(source.rpo_objective_seconds))
        within = age <= goal
        sources[source.name] = {
            "last_backup": max(kinds.values()) if kinds else None,
            "last_backup_by_kind": kinds,
            "age_seconds": None if math.isinf(age) else round(age, 3),
            "rpo_objective_seconds": goal,
            "within_objective": within,
        }
        if not kinds:
            reasons.append(f"source {source.name}: never backed up")
        elif not within:
            reasons.append(
                f"source {source.name}: newest backup is {_duration(age)} old,"
                f" over its RPO objective of {_duration(goal)}"
            )

    # Beyond the objectives: data already lost makes every objective moot, so it is never healthy.
    lost = _by(families, "shardvault_packs", "state").get("lost", 0.0)
    if lost:
        reasons.append(f"{lost:.0f} pack(s) lost (fewer than k good shards): run `shardvault repair`")
    for fact, what in (("lost_objects", "metadata object(s)"), ("snapshots_missing", "committed snapshot(s)")):
        for _, value in families.get(f"shardvault_metadata_{fact}", []):
            if value:
                reasons.append(f"{value:.0f} {what} intact on no peer: run `shardvault check`")

    window = families["shardvault_scrub_window_seconds"][0][1]
    runs: dict[str, dict[str, Any]] = {}
    for kind, status, finished in state.query(
        "SELECT kind, status, MAX(finished) FROM runs WHERE kind IN ('check', 'scrub') GROUP BY kind"
    ):
        runs[str(kind)] = {"last": float(finished), "age_seconds": _age(now, float(finished)), "status": str(status)}
    last_verified = max((r["last"] for r in runs.values()), default=None)
    first_backup = state.query("SELECT MIN(finished) FROM runs WHERE kind = 'backup'")[0][0]
    # A vault younger than one window has not missed its first check yet: count from its first backup.
    since = last_verified if last_verified is not None else first_backup
    within_window = since is None or now - float(since) <= window
    if not within_window:
        what = "last ran" if last_verified is not None else "never ran; first backup was"
        reasons.append(
            f"no check or scrub within the scrub window of {_duration(window)}"
            f" ({what} {_duration(now - float(since))} ago)"
        )
    complete = families.get("shardvault_scrub_last_complete_timestamp_seconds")
    scrub_facts = {"last_complete": complete[0][1]} if complete else {}

    drills: dict[str, dict[str, Any]] = {}
    for name, samples in sorted(families.items()):
        if name.startswith("shardvault_drill_"):
            key = name.removeprefix("shardvault_drill_")
            for labels, value in samples:
                drills.setdefault(labels["playbook"], {})[key] = value
    for playbook, facts in drills.items():
        facts["passed"] = facts.pop("success", 0.0) == 1.0
        if "last_timestamp_seconds" in facts:
            facts["last"] = facts.pop("last_timestamp_seconds")
            facts["age_seconds"] = _age(now, facts["last"])
        if not facts["passed"]:
            reasons.append(f"drill {playbook}: the last drill failed")

    detail = {
        "checked_at": now,
        "peers": peers,
        "packs": _by(families, "shardvault_packs", "state"),
        "sources": sources,
        "check": runs.get("check"),
        "scrub": (runs.get("scrub", {}) | scrub_facts) or None,
        "verification": {
            "window_seconds": window,
            "last": last_verified,
            "within_window": within_window,
        },
        "drills": drills,
    }
    return Health(not reasons, reasons, detail)


def _finite(value: Any) -> Any:
    """JSON has no infinity: a value that is not finite (no backup yet) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def health_app(
    config: Config, state: State, clock: Callable[[], float] = time.time
) -> Callable[[str], tuple[int, str, bytes]]:
    """``path -> (status, content type, body)`` for ``/health`` and ``/health/detailed``."""

    def answer(path: str) -> tuple[int, str, bytes]:
        verdict = assess(config, state, clock())
        status = 200 if verdict.healthy else 503
        if path.rstrip("/") == "/health/detailed":
            # The same status as /health, so a probe can use either; the body says why.
            doc = json.dumps(_finite(verdict.to_doc()), indent=2, allow_nan=False)
            return status, "application/json", doc.encode() + b"\n"
        body = "ok\n" if verdict.healthy else "".join(f"{r}\n" for r in verdict.reasons)
        return status, "text/plain; charset=utf-8", body.encode()

    return answer
