"""Retention policies: which snapshots ``forget`` keeps, and why (restic's ``forget``).

A pure function of the snapshots, the policy, the time and a time zone; it
reads and writes nothing.  The semantics are restic's (``ApplyPolicy`` in
restic's ``internal/restic/snapshot_policy.go``), so an operator who knows
restic's table knows this one:

* Each source is judged on its own (restic's ``--group-by``, fixed to the
  source here); within a source, snapshots are taken newest first (by the
  time they finished, ties by id).
* ``keep_last N`` keeps the N newest.  ``keep_hourly``, ``keep_daily``,
  ``keep_weekly`` (ISO weeks), ``keep_monthly`` and ``keep_yearly N`` each
  keep the newest snapshot of each of the N newest hours, days, ... that hold
  one: walking newest first, a snapshot whose bucket differs from the last
  bucket that rule kept is kept and uses one count.  ``-1`` means unlimited,
  ``0`` (or unset) switches the rule off.
* While a rule still has counts left at the oldest snapshot of the source,
  that oldest snapshot is kept too ("oldest daily snapshot"), which keeps
  the longest history the policy allows (restic 0.17).
* ``keep_within D`` keeps every snapshot newer than D before the newest
  snapshot of the source that is not in the future (``now`` bounds it), not
  D before now: a source whose backups stopped keeps its last D of history.
  D is a calendar duration (``1y2m3d4h``): years, months and days move the
  wall clock in the time zone below, hours are absolute.
* A snapshot is kept if any rule keeps it; every rule that kept it is named
  in its reasons.  Everything else is forgotten.  So any policy with a
  count keeps the newest snapshot of each source, as restic does; nothing
  else protects it.
* An empty policy (no rule at all) is refused (:class:`EmptyPolicyError`):
  "forget by no rule" is a mistake, never "forget everything" nor a no-op.

Time zone of the buckets
------------------------
Hours, days and weeks are wall-clock buckets, so they depend on a zone.  A
snapshot keeps the zone its timestamp carries when that is a real offset (a
writer that records local time, as restic does); shardvault writes every
timestamp in UTC, which says nothing about where the operator's day begins,
so a UTC (or zone-less) timestamp is read in the zone ``tz`` passed to
:func:`apply_policy`.  The CLI passes ``[schedule] timezone`` (default UTC),
the zone the backup crons fire in, so "the 02:00 backup" lands in its own day
bucket.  It is deliberately *not* the local zone of the machine running
``forget``: forget runs on any host or Prefect worker, and two hosts must
choose the same snapshots.  Across a DST change the buckets follow the wall
clock, as restic's do: the repeated hour of an autumn night is one hourly
bucket, and a day is a calendar day whether it had 23, 24 or 25 hours.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Any, Protocol

UNLIMITED = -1

# The count rules, in restic's order: (field, reason shown in the table).
COUNT_RULES: tuple[tuple[str, str], ...] = (
    ("keep_last", "last snapshot"),
    ("keep_hourly", "hourly snapshot"),
    ("keep_daily", "daily snapshot"),
    ("keep_weekly", "weekly snapshot"),
    ("keep_monthly", "monthly snapshot"),
    ("keep_yearly", "yearly snapshot"),
)
POLICY_KEYS = (*(name for name, _ in COUNT_RULES), "keep_within")

_DURATION_PART = re.compile(r"(\d+)([ymdh])")


class PolicyError(ValueError):
    """A policy value that is not one; ``key`` names the rule (``sources[0].retention.keep_daily``)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


class EmptyPolicyError(PolicyError):
    """A policy with no rule: refused rather than read as "forget everything"."""


@dataclass(frozen=True)
class Duration:
    """A calendar duration as restic writes it: ``1y2m3d4h`` (any subset, each unit once)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def __str__(self) -> str:
        parts = [(self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h")]
        return "".join(f"{n}{unit}" for n, unit in parts if n) or "0h"

    @property
    def zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def before(self, moment: datetime) -> datetime:
        """``moment`` moved back by this duration: calendar parts on its wall clock, hours absolute.

        Like Go's ``AddDate``, a day that does not exist in the target month
        rolls over (31 March minus one month is 3 March, or 2 March in a leap
        year), and the wall-clock time is kept across a DST change.
        """
        month_index = moment.year * 12 + (moment.month - 1) - (self.years * 12 + self.months)
        year, month = divmod(month_index, 12)
        day = date(year, month + 1, 1) + timedelta(days=moment.day - 1 - self.days)
        wall = moment.replace(tzinfo=None, year=day.year, month=day.month, day=day.day)
        zone = moment.tzinfo
        assert zone is not None  # every time here is aware
        local = _localize(wall, zone)
        return local - timedelta(hours=self.hours)


def parse_duration(text: str) -> Duration:
    """``30d``, ``1y2m3d``, ``12h`` (restic's units: y, m = months, d, h); PolicyError otherwise."""
    cleaned = text.strip()
    if not cleaned:
        raise PolicyError(f"{text!r} is not a duration (examples: 30d, 12h, 1y2m3d)")
    seen: dict[str, int] = {}
    pos = 0
    for match in _DURATION_PART.finditer(cleaned):
        if match.start() != pos:
            break
        unit = match.group(2)
        if unit in seen:
            raise PolicyError(f"{text!r} is not a duration: unit {unit!r} given twice")
        seen[unit] = int(match.group(1))
        pos = match.end()
    if pos != len(cleaned):
        raise PolicyError(f"{text!r} is not a duration (examples: 30d, 12h, 1y2m3d; units y, m, d, h)")
    duration = Duration(seen.get("y", 0), seen.get("m", 0), seen.get("d", 0), seen.get("h", 0))
    if duration.zero:
        raise PolicyError(f"{text!r} is zero: a keep-within duration must be longer than that")
    return duration


def check_count(value: object, what: str) -> int | None:
    """A keep-N value: None (unset), 0 (off), a positive count or -1 (unlimited); PolicyError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"must be a whole number (-1 for unlimited), got {value!r}", what)
    if value < UNLIMITED:
        raise PolicyError(f"must be a count of at least 0, or -1 for unlimited, got {value}", what)
    return value


@dataclass(frozen=True)
class RetentionPolicy:
    """What to keep of one source; None (or 0) switches a rule off, -1 is unlimited.

    ``keep_within`` is a calendar :class:`Duration`, not a ``timedelta``:
    restic's ``1m`` is a month and ``1y`` a year, which no fixed number of
    seconds is.
    """

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: Duration | None = None

    def __post_init__(self) -> None:
        for name, _ in COUNT_RULES:
            check_count(getattr(self, name), name)
        if self.keep_within is not None and not isinstance(self.keep_within, Duration):
            raise PolicyError(f"must be a Duration, got {self.keep_within!r}", "keep_within")

    @property
    def empty(self) -> bool:
        counts = any(getattr(self, name) for name, _ in COUNT_RULES)
        return not counts and (self.keep_within is None or self.keep_within.zero)

    def to_doc(self) -> dict[str, Any]:
        """The rules that are set, as ``--json`` shows them (durations as text)."""
        doc: dict[str, Any] = {}
        for name, _ in COUNT_RULES:
            if getattr(self, name) is not None:
                doc[name] = getattr(self, name)
        if self.keep_within is not None:
            doc["keep_within"] = str(self.keep_within)
        return doc

    def __str__(self) -> str:
        parts = []
        for name, _ in COUNT_RULES:
            value = getattr(self, name)
            if value:
                parts.append(f"{'all' if value == UNLIMITED else value} {name.removeprefix('keep_')}")
        if self.keep_within is not None:
            parts.append(f"all within {self.keep_within} of the newest")
        return "keep " + (", ".join(parts) or "nothing (empty policy)")


def policy_from_mapping(values: dict[str, Any], where: str = "") -> RetentionPolicy:
    """A policy from TOML-like values (``keep_within`` as text); PolicyError names the key."""
    prefix = f"{where}." if where else ""
    for key in values:
        if key not in POLICY_KEYS:
            raise PolicyError(f"unknown key (known: {', '.join(POLICY_KEYS)})", prefix + key)
    counts = {name: check_count(values.get(name), prefix + name) for name, _ in COUNT_RULES}
    within = values.get("keep_within")
    duration = None
    if within is not None:
        if not isinstance(within, str):
            raise PolicyError(f"must be a duration string such as '30d', got {within!r}", prefix + "keep_within")
        try:
            duration = parse_duration(within)
        except PolicyError as exc:
            raise PolicyError(exc.message, prefix + "keep_within") from None
    return RetentionPolicy(**counts, keep_within=duration)


class Judged(Protocol):
    """What a policy needs of a snapshot (``Snapshot`` has it)."""

    @property
    def id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def finished(self) -> str: ...


class Verdict(StrEnum):
    KEEP = "keep"
    FORGET = "forget"


@dataclass(frozen=True)
class Decision:
    """One snapshot's verdict; a kept one names every rule that kept it."""

    snapshot: Any  # a Judged (Snapshot in practice); Any so callers keep their own type
    verdict: Verdict
    reasons: tuple[str, ...]
    time: datetime  # the snapshot's time in the zone its buckets were read in

    @property
    def keep(self) -> bool:
        return self.verdict is Verdict.KEEP


def _localize(wall: datetime, zone: tzinfo) -> datetime:
    """A naive wall-clock time in ``zone`` (the earlier of a repeated hour; a skipped one moves forward)."""
    local = wall.replace(tzinfo=zone, fold=0)
    return local.astimezone(UTC).astimezone(zone)


def local_time(stamp: str, tz: tzinfo) -> datetime:
    """A snapshot's timestamp in the zone its buckets are read in (see the module docstring)."""
    moment = datetime.fromisoformat(stamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    offset = moment.utcoffset()
    if offset is not None and offset != timedelta(0):
        return moment  # the writer's own local time
    return moment.astimezone(tz)


def _bucket(rule: str, moment: datetime, nr: int) -> int:
    if rule == "keep_last":
        return nr  # every snapshot is its own bucket
    if rule == "keep_hourly":
        return moment.year * 1_000_000 + moment.month * 10_000 + moment.day * 100 + moment.hour
    if rule == "keep_daily":
        return moment.year * 10_000 + moment.month * 100 + moment.day
    if rule == "keep_weekly":
        year, week, _ = moment.isocalendar()
        return year * 100 + week
    if rule == "keep_monthly":
        return moment.year * 100 + moment.month
    return moment.year


def _apply_one(snapshots: Sequence[Judged], policy: RetentionPolicy, now: datetime, tz: tzinfo) -> list[Decision]:
    timed = [(local_time(s.finished, tz), s) for s in snapshots]
    timed.sort(key=lambda ts: (ts[0], ts[1].id), reverse=True)  # newest first
    counts = {name: getattr(policy, name) or 0 for name, _ in COUNT_RULES}
    last: dict[str, int | None] = dict.fromkeys(counts)
    cutoff: datetime | None = None
    if policy.keep_within is not None:
        past = [t for t, _ in timed if t <= now]
        # restic: the newest snapshot that is not in the future; with none, every snapshot is "within"
        cutoff = policy.keep_within.before(max(past)) if past else None
    decisions = []
    oldest = len(timed) - 1
    for nr, (moment, snap) in enumerate(timed):
        reasons: list[str] = []
        if policy.keep_within is not None and (cutoff is None or moment > cutoff):
            reasons.append(f"within {policy.keep_within}")
        for name, reason in COUNT_RULES:
            if counts[name] == 0:
                continue
            value = _bucket(name, moment, nr)
            if value != last[name] or nr == oldest:
                reasons.append(f"oldest {reason}" if value == last[name] else reason)
                last[name] = value
                if counts[name] > 0:
                    counts[name] -= 1
        verdict = Verdict.KEEP if reasons else Verdict.FORGET
        decisions.append(Decision(snap, verdict, tuple(reasons), moment))
    return decisions


def apply_policy(
    snapshots: Iterable[Judged], policy: RetentionPolicy, now: datetime, tz: tzinfo = UTC
) -> list[Decision]:
    """Judge every snapshot, each source on its own; newest first within a source, sources by name.

    ``now`` must be aware; ``tz`` is the zone UTC timestamps are bucketed in
    (see the module docstring).  Raises :class:`EmptyPolicyError` for a
    policy without a rule.
    """
    if policy.empty:
        raise EmptyPolicyError("the policy has no rule (give at least one keep-* rule)")
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    by_source: dict[str, list[Judged]] = {}
    for snap in snapshots:
        by_source.setdefault(snap.source, []).append(snap)
    decisions: list[Decision] = []
    for source in sorted(by_source):
        decisions += _apply_one(by_source[source], policy, now, tz)
    return decisions
