"""Prometheus metrics, computed from the state at scrape time.

Nothing is cached between scrapes: every value is read from the state
database when Prometheus asks, so an RPO keeps rising while backups are not
happening, and a scrape never needs the passphrase or a peer.  Names follow
Prometheus conventions: prefix ``shardvault_``, base units (seconds, bytes),
``_total`` for counters, ratios between 0 and 1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shardvault.config import Config, PostgresSource
from shardvault.state import State

from .record import STATES

COUNTERS = {
    "shards_checked": "Shards whose presence or bytes were verified.",
    "shards_read": "Shards read and hashed (scrub, check --read-data).",
    "shards_corrupt": "Shards found corrupt (bit rot, truncation, swapped or replayed).",
    "shards_missing": "Shards found missing from their peer.",
    "shards_unreachable": "Shards not verified because their peer was unreachable.",
    "shards_repaired": "Shards rebuilt by repair onto this peer.",
}


class StateCollector(Collector):
    """Reads the state database on every scrape."""

    def __init__(self, config: Config, state: State, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.state = state
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        q = self.state.query
        yield from self._peers(q)
        yield from self._packs(q)
        yield from self._scrub(q, now)
        yield from self._sources(q, now)
        yield from self._drills(q)
        yield from self._metadata(q)
        yield from self._prune(q)
        yield from self._locks(q)
        damaged = GaugeMetricFamily(
            "shardvault_verification_damage_found",
            "1 if the last check or scrub of this kind found damage, else 0.",
            labels=["kind"],
        )
        for kind in ("check", "scrub", "repair"):
            row = q("SELECT status FROM runs WHERE kind = ? ORDER BY id DESC LIMIT 1", (kind,))
            if row:
                damaged.add_metric([kind], 0.0 if row[0][0] == "ok" else 1.0)
        yield damaged

    def _peers(self, q: Callable[..., list[tuple[Any, ...]]]) -> Iterator[Metric]:
        counters = {
            name: CounterMetricFamily(f"shardvault_{name}", doc, labels=["peer"]) for name, doc in COUNTERS.items()
        }
        values = {
            (str(peer), str(name)): float(value) for peer, name, value in q("SELECT peer, name, value FROM counters")
        }
        zone = {p.name: p.zone for p in self.config.peers}
        peers = sorted(set(zone) | {peer for peer, _ in values})
        for name, family in counters.items():
            for peer in peers:
                family.add_metric([peer], values.get((peer, name), 0.0))
            yield family
        up = GaugeMetricFamily(
            "shardvault_peer_up", "1 if the peer answered at its last check, else 0.", labels=["peer", "zone"]
        )
        stored = GaugeMetricFamily("shardvault_peer_stored_bytes", "Bytes of shards held by the peer.", labels=["peer"])
        shards = GaugeMetricFamily("shardvault_peer_stored_shards", "Shards held by the peer.", labels=["peer"])
        seen = GaugeMetricFamily(
            "shardvault_peer_last_check_timestamp_seconds", "When the peer was last listed.", labels=["peer"]
        )
        for peer, is_up, count, size, updated in q("SELECT peer, up, shards, bytes, updated FROM peers"):
            if peer not in zone:
                continue  # a peer since taken out of the configuration
            up.add_metric([str(peer), zone[str(peer)]], float(is_up))
            stored.add_metric([str(peer)], float(size))
            shards.add_metric([str(peer)], float(count))
            seen.add_metric([str(peer)], float(updated))
        yield from (up, stored, shards, seen)

    def _packs(self, q: Callable[..., list[tuple[Any, ...]]]) -> Iterator[Metric]:
        packs = GaugeMetricFamily("shardvault_packs", "Packs by redundancy state.", labels=["state"])
        counts = dict(q("SELECT state, COUNT(*) FROM packs GROUP BY state"))
        for state in STATES:
            packs.add_metric([state], float(counts.get(state, 0)))
        yield packs

    def _scrub(self, q: Callable[..., list[tuple[Any, ...]]], now: float) -> Iterator[Metric]:
        scrub = self.config.scrub
        window = scrub.window_days * 86400
        total, recent, corrupt = q(
            "SELECT COUNT(*), SUM(last_read >= ?), SUM(last_read >= ? AND status = 'corrupt') FROM shards",
            (now - window, now - window),
        )[0]
        total, recent, corrupt = float(total or 0), float(recent or 0), float(corrupt or 0)
        facts = {str(name): float(value) for name, value in q("SELECT name, value FROM facts")}
        gauges = [
            (
                "scrub_coverage_ratio",
                "Fraction of shards read and verified within the scrub window.",
                recent / total if total else 1.0,
            ),
            ("scrub_coverage_target_ratio", "The configured coverage objective.", scrub.coverage_target),
            (
                "scrub_corruption_ratio",
                "Fraction of the shards read within the window that were corrupt.",
                corrupt / recent if recent else 0.0,
            ),
            (
                "scrub_corruption_ratio_objective",
                "The corruption ratio above which to alert.",
                scrub.corruption_ratio_max,
            ),
            ("scrub_window_seconds", "The scrub window: every shard is to be read once per window.", window),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"shardvault_{name}", doc, value=value)
        for fact, doc in (
            ("scrub_last_complete_timestamp_seconds", "When a scrub last left no shard unread within the window."),
            ("scrub_last_run_timestamp_seconds", "When a scrub last ran."),
        ):
            if fact in facts:
                yield GaugeMetricFamily(f"shardvault_{fact}", doc, value=facts[fact])

    def _sources(self, q: Callable[..., list[tuple[Any, ...]]], now: float) -> Iterator[Metric]:
        last = GaugeMetricFamily(
            "shardvault_backup_last_success_timestamp_seconds",
            "When the last successful backup of this kind finished.",
            labels=["source", "kind"],
        )
        rpo = GaugeMetricFamily(
            "shardvault_rpo_seconds", "Now minus the last successful backup (+Inf if none).", labels=["source"]
        )
        rpo_obj = GaugeMetricFamily(
            "shardvault_rpo_objective_seconds", "The configured recovery point objective.", labels=["source"]
        )
        interval = GaugeMetricFamily(
            "shardvault_backup_interval_seconds", "The configured backup schedule.", labels=["source"]
        )
        duration = GaugeMetricFamily(
            "shardvault_backup_duration_seconds", "Duration of the last successful backup.", labels=["source"]
        )
        read = GaugeMetricFamily(
            "shardvault_backup_read_bytes", "Bytes read by the last successful backup.", labels=["source"]
        )
        stored = GaugeMetricFamily(
            "shardvault_backup_stored_bytes", "New bytes stored by the last successful backup.", labels=["source"]
        )
        for source in self.config.sources:
            rows = q(
                "SELECT finished, details, snapshot FROM runs WHERE kind = 'backup' AND source = ?"
                " AND status IN ('ok', 'warning', 'degraded') ORDER BY finished",
                (source.name,),
            )
            newest: float | None = None
            kinds: dict[str, float] = {}
            details: dict[str, float] = {}
            for finished, raw, _ in rows:
                doc = json.loads(str(raw))
                kinds[str(doc.get("kind", "full"))] = float(finished)
                newest, details = float(finished), doc
            for kind, when in sorted(kinds.items()):
                last.add_metric([source.name, kind], when)
            rpo.add_metric([source.name], now - newest if newest is not None else float("inf"))
            rpo_obj.add_metric([source.name], float(source.rpo_objective_seconds))
            interval.add_metric([source.name], float(source.backup_interval_seconds))
            if details:
                duration.add_metric([source.name], float(details.get("duration_seconds", 0)))
                read.add_metric([source.name], float(details.get("bytes_read", 0)))
                stored.add_metric([source.name], float(details.get("bytes_stored", 0)))
        yield from (last, rpo, rpo_obj, interval, duration, read, stored)
        degraded = GaugeMetricFamily(
            "shardvault_backup_degraded",
            "1 if the last backup of the source committed with fewer shards or metadata copies than peers"
            " (repair restores full redundancy), else 0.",
            labels=["source"],
        )
        for source in self.config.sources:
            row = q(
                "SELECT status FROM runs WHERE kind = 'backup' AND source = ? ORDER BY finished DESC LIMIT 1",
                (source.name,),
            )
            if row:
                degraded.add_metric([source.name], 1.0 if row[0][0] == "degraded" else 0.0)
        yield degraded
        facts = {str(name): float(value) for name, value in q("SELECT name, value FROM facts")}
        gaps = GaugeMetricFamily(
            "shardvault_wal_gaps", "WAL segments missing from the archive (at the last check).", labels=["source"]
        )
        archived = GaugeMetricFamily(
            "shardvault_wal_last_archived_timestamp_seconds",
            "When the newest WAL segment was archived.",
            labels=["source"],
        )
        lag = GaugeMetricFamily(
            "shardvault_wal_archive_lag_seconds", "Now minus the newest archived WAL segment.", labels=["source"]
        )
        for source in self.config.sources:
            if not isinstance(source, PostgresSource) or source.mode != "physical":
                continue
            if (g := facts.get(f"wal_gaps:{source.name}")) is not None:
                gaps.add_metric([source.name], g)
            if (t := facts.get(f"wal_last_archived_timestamp_seconds:{source.name}")) is not None:
                archived.add_metric([source.name], t)
                lag.add_metric([source.name], now - t)
        yield from (gaps, archived, lag)

    def _metadata(self, q: Callable[..., list[tuple[Any, ...]]]) -> Iterator[Metric]:
        """Metadata redundancy as the last check, scrub or repair found it (verify/metadata.py)."""
        facts = {str(name): float(value) for name, value in q("SELECT name, value FROM facts")}
        for fact, metric, doc in (
            ("metadata_objects", "metadata_objects", "Metadata objects (config, keys, index, snapshots, WAL records)."),
            (
                "metadata_under_replicated",
                "metadata_under_replicated_objects",
                "Metadata objects without a good copy on every configured peer.",
            ),
            ("metadata_lost", "metadata_lost_objects", "Metadata objects no peer holds intact."),
            (
                "metadata_snapshots_missing",
                "metadata_snapshots_missing",
                "Snapshots the local state recorded as committed that no peer has (rolled back or deleted).",
            ),
            (
                "metadata_peers_empty",
                "metadata_peers_empty",
                "Reachable peers without an identity: empty or replaced, until repair refills them.",
            ),
        ):
            if fact in facts:
                yield GaugeMetricFamily(f"shardvault_{metric}", doc, value=facts[fact])
        bad = GaugeMetricFamily(
            "shardvault_metadata_bad_copies",
            "Metadata copies missing, corrupt or foreign on this peer (last check, scrub or repair).",
            labels=["peer"],
        )
        for peer in self.config.peers:
            if (value := facts.get(f"metadata_bad_copies:{peer.name}")) is not None:
                bad.add_metric([peer.name], value)
        yield bad

    def _prune(self, q: Callable[..., list[tuple[Any, ...]]]) -> Iterator[Metric]:
        """What the last prune freed, and whether condemned data is waiting (shardvault.lifecycle.prune)."""
        row = q("SELECT MAX(finished) FROM runs WHERE kind = 'prune' AND status = 'ok'")
        if row and row[0][0] is not None:
            yield GaugeMetricFamily(
                "shardvault_prune_last_success_timestamp_seconds",
                "When the last prune finished.",
                value=float(row[0][0]),
            )
        facts = {
            str(name): float(value) for name, value in q("SELECT name, value FROM facts WHERE name LIKE 'prune_%'")
        }
        if "prune_freed_bytes" in facts:
            yield GaugeMetricFamily(
                "shardvault_prune_freed_bytes",
                "Bytes the last prune freed over every peer.",
                value=facts["prune_freed_bytes"],
            )
        if "prune_sets_waiting" in facts:
            yield GaugeMetricFamily(
                "shardvault_prune_condemned_sets_waiting",
                "Condemned sets whose deletion waits (grace period, or sessions still running).",
                value=facts["prune_sets_waiting"],
            )
        if facts.get("prune_oldest_waiting_timestamp"):
            yield GaugeMetricFamily(
                "shardvault_prune_oldest_condemned_timestamp_seconds",
                "When the oldest condemned set still waiting was written.",
                value=facts["prune_oldest_waiting_timestamp"],
            )

    def _locks(self, q: Callable[..., list[tuple[Any, ...]]]) -> Iterator[Metric]:
        """Objects in use that a client could delete now, per object-lock peer (shardvault.verify.locks)."""
        exposed = GaugeMetricFamily(
            "shardvault_object_lock_exposed_objects",
            "Objects in use on an S3 Object Lock peer whose retention lapsed or is missing, as of the last check.",
            labels=["peer"],
        )
        facts = {str(name): float(value) for name, value in q("SELECT name, value FROM facts")}
        for peer in self.config.peers:
            if peer.object_lock is not None and (value := facts.get(f"object_lock_exposed:{peer.name}")) is not None:
                exposed.add_metric([peer.name], value)
        yield exposed

    def _drills(self, q: Callable[..., list[tuple[Any, ...]]]) -> Iterator[Metric]:
        rto = GaugeMetricFamily(
            "shardvault_drill_rto_seconds", "Measured recovery time of the last drill.", labels=["playbook"]
        )
        rto_obj = GaugeMetricFamily(
            "shardvault_drill_rto_objective_seconds", "The playbook's recovery time objective.", labels=["playbook"]
        )
        ok = GaugeMetricFamily(
            "shardvault_drill_success", "1 if the last drill of the playbook passed, else 0.", labels=["playbook"]
        )
        last = GaugeMetricFamily(
            "shardvault_drill_last_timestamp_seconds", "When the playbook last ran.", labels=["playbook"]
        )
        rpo = GaugeMetricFamily(
            "shardvault_drill_rpo_seconds",
            "Data lost had the last drill been real: its start minus the time of the restored point.",
            labels=["playbook"],
        )
        rpo_obj = GaugeMetricFamily(
            "shardvault_drill_rpo_objective_seconds", "The playbook's recovery point objective.", labels=["playbook"]
        )
        latest: dict[str, tuple[Any, ...]] = {}
        for row in q("SELECT source, status, finished, details FROM runs WHERE kind = 'drill' ORDER BY id"):
            latest[str(row[0])] = row
        for playbook, (_, status, finished, raw) in sorted(latest.items()):
            doc = json.loads(str(raw))
            if doc.get("rto_seconds") is not None:  # null: the drill never got every check to pass
                rto.add_metric([playbook], float(doc["rto_seconds"]))
            if "rto_objective_seconds" in doc:
                rto_obj.add_metric([playbook], float(doc["rto_objective_seconds"]))
            # A drill that never restored has no RPO (null): no sample beats a made-up one.
            if doc.get("rpo_seconds") is not None:
                rpo.add_metric([playbook], float(doc["rpo_seconds"]))
            if doc.get("rpo_objective_seconds") is not None:
                rpo_obj.add_metric([playbook], float(doc["rpo_objective_seconds"]))
            ok.add_metric([playbook], 1.0 if status == "ok" else 0.0)
            last.add_metric([playbook], float(finished))
        yield from (rto, rto_obj, rpo, rpo_obj, ok, last)
