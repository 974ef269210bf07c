"""Retention policies (restic's forget semantics) over a fixed synthetic history.

Every expected set below was worked out by hand from the table of local times
in the comments, as restic's own policy tests are: never computed with the
code under test.  The history spans 2023-2026, both DST changes of 2025 in
Europe/Berlin (30 March: 02:00 CET -> 03:00 CEST; 26 October: 03:00 CEST ->
02:00 CET, the hour 02:00-03:00 twice) and a new year that is still the old
year in UTC, over two sources.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from shardvault.lifecycle.retention import (
    Duration,
    EmptyPolicyError,
    PolicyError,
    RetentionPolicy,
    Verdict,
    apply_policy,
    local_time,
    parse_duration,
    policy_from_mapping,
)
from shardvault.repository.snapshot import Snapshot

BERLIN = ZoneInfo("Europe/Berlin")

# label: (source, finished in UTC)         local time in Europe/Berlin; ISO week
HISTORY = {
    "s01": ("db", "2023-06-15T10:00:00+00:00"),  # 2023-06-15 12:00 CEST  W24
    "s02": ("db", "2023-12-31T22:30:00+00:00"),  # 2023-12-31 23:30 CET   2023-W52
    "s03": ("db", "2023-12-31T23:30:00+00:00"),  # 2024-01-01 00:30 CET   2024-W01 (still 2023 in UTC)
    "s04": ("db", "2024-07-01T08:00:00+00:00"),  # 2024-07-01 10:00 CEST
    "s05": ("db", "2025-03-29T22:30:00+00:00"),  # 2025-03-29 23:30 CET   Sat W13
    "s06": ("db", "2025-03-29T23:30:00+00:00"),  # 2025-03-30 00:30 CET   Sun W13 (29th in UTC)
    "s07": ("db", "2025-03-30T00:30:00+00:00"),  # 2025-03-30 01:30 CET
    "s08": ("db", "2025-03-30T01:30:00+00:00"),  # 2025-03-30 03:30 CEST  (02:xx does not exist)
    "s09": ("db", "2025-10-25T11:30:00+00:00"),  # 2025-10-25 13:30 CEST  Sat W43
    "s10": ("db", "2025-10-26T00:30:00+00:00"),  # 2025-10-26 02:30 CEST  Sun W43, first 02:30
    "s11": ("db", "2025-10-26T01:30:00+00:00"),  # 2025-10-26 02:30 CET   second 02:30: the same hour bucket
    "s12": ("db", "2025-10-26T02:30:00+00:00"),  # 2025-10-26 03:30 CET
    "s13": ("db", "2025-10-26T22:30:00+00:00"),  # 2025-10-26 23:30 CET   Sun W43
    "s14": ("db", "2025-10-26T23:30:00+00:00"),  # 2025-10-27 00:30 CET   Mon W44 (Sunday W43 in UTC)
    "s15": ("db", "2026-01-05T12:00:00+00:00"),  # 2026-01-05 13:00 CET   2026-W02
    "w0": ("web", "2025-06-01T10:00:00+00:00"),  # 2025-06-01 12:00 CEST  Sun W22
    "w1": ("web", "2025-10-26T00:45:00+00:00"),  # 2025-10-26 02:45 CEST
    "w2": ("web", "2025-10-26T01:45:00+00:00"),  # 2025-10-26 02:45 CET   (same hour bucket as w1)
    "w3": ("web", "2026-01-05T12:30:00+00:00"),  # 2026-01-05 13:30 CET   newer than every db snapshot
}
NOW = datetime(2026, 2, 1, tzinfo=UTC)
EARLIER = datetime(2025, 12, 1, tzinfo=UTC)  # s15 and w3 lie in the future


def _snapshots() -> list[Snapshot]:
    return [
        Snapshot(
            id=label,
            source=source,
            source_type="files",
            path="/",
            kind="full",
            parent=None,
            started=finished,
            finished=finished,
            hostname="h",
            tree=(),
        )
        for label, (source, finished) in HISTORY.items()
    ]


def _labels(*numbers: int) -> set[str]:
    return {f"s{n:02d}" for n in numbers}


def _kept(policy: RetentionPolicy, tz: ZoneInfo | type[UTC] = BERLIN, now: datetime = NOW) -> set[str]:
    decisions = apply_policy(_snapshots(), policy, now, tz)  # type: ignore[arg-type]
    assert len(decisions) == len(HISTORY)
    return {d.snapshot.id for d in decisions if d.keep}


WEB = {"w0", "w1", "w2", "w3"}
W321 = {"w3", "w2", "w1"}
CASES = [
    # (id, policy, zone, now, kept db snapshots, kept web snapshots)
    ("last-3", RetentionPolicy(keep_last=3), BERLIN, NOW, _labels(15, 14, 13), {"w3", "w2", "w1"}),
    ("last-1-per-source", RetentionPolicy(keep_last=1), BERLIN, NOW, _labels(15), {"w3"}),
    ("last-100", RetentionPolicy(keep_last=100), BERLIN, NOW, _labels(*range(1, 16)), {"w0", "w1", "w2", "w3"}),
    # The repeated 02:xx of 26 October is one hourly bucket: s11 keeps it, s10 (and w1) go.
    ("hourly-6", RetentionPolicy(keep_hourly=6), BERLIN, NOW, _labels(15, 14, 13, 12, 11, 9), {"w3", "w2", "w0"}),
    ("hourly-2", RetentionPolicy(keep_hourly=2), BERLIN, NOW, _labels(15, 14), {"w3", "w2"}),
    ("daily-5", RetentionPolicy(keep_daily=5), BERLIN, NOW, _labels(15, 14, 13, 9, 8), {"w3", "w2", "w0"}),
    ("daily-5-utc", RetentionPolicy(keep_daily=5), UTC, NOW, _labels(15, 14, 9, 8, 6), {"w3", "w2", "w0"}),
    ("weekly-3", RetentionPolicy(keep_weekly=3), BERLIN, NOW, _labels(15, 14, 13), {"w3", "w2", "w0"}),
    ("weekly-3-utc", RetentionPolicy(keep_weekly=3), UTC, NOW, _labels(15, 14, 8), {"w3", "w2", "w0"}),
    ("monthly-all", RetentionPolicy(keep_monthly=-1), BERLIN, NOW, _labels(15, 14, 8, 4, 3, 2, 1), {"w3", "w2", "w0"}),
    ("monthly-all-utc", RetentionPolicy(keep_monthly=-1), UTC, NOW, _labels(15, 14, 8, 4, 3, 1), {"w3", "w2", "w0"}),
    # Counts left at the oldest snapshot: it is kept too ("oldest yearly snapshot").
    ("yearly-10", RetentionPolicy(keep_yearly=10), BERLIN, NOW, _labels(15, 14, 4, 2, 1), {"w3", "w2", "w0"}),
    ("yearly-10-utc", RetentionPolicy(keep_yearly=10), UTC, NOW, _labels(15, 14, 4, 3, 1), {"w3", "w2", "w0"}),
    ("yearly-2", RetentionPolicy(keep_yearly=2), BERLIN, NOW, _labels(15, 14), {"w3", "w2"}),
    ("within-1y", RetentionPolicy(keep_within=Duration(years=1)), BERLIN, NOW, _labels(*range(5, 16)), WEB),
    # 72 calendar days before 2026-01-05 13:00 CET is 2025-10-25 13:00 CEST = 11:00 UTC (the wall clock
    # moves, not 72 x 24 h, which would give 12:00 UTC and drop s09 at 11:30 UTC).
    ("within-72d", RetentionPolicy(keep_within=Duration(days=72)), BERLIN, NOW, _labels(*range(9, 16)), W321),
    ("within-2m", RetentionPolicy(keep_within=Duration(months=2)), BERLIN, NOW, _labels(15), {"w3"}),
    # Relative to the newest snapshot that is not in the future: s14 (db) and w2 (web).
    ("within-1d-past", RetentionPolicy(keep_within=Duration(days=1)), BERLIN, EARLIER, _labels(*range(10, 16)), W321),
    (
        "combined",
        RetentionPolicy(keep_last=2, keep_daily=3, keep_monthly=2, keep_yearly=-1),
        BERLIN,
        NOW,
        _labels(15, 14, 13, 4, 2, 1),
        {"w3", "w2", "w0"},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("policy", "tz", "now", "db", "web"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_policy_keeps_exactly_the_expected_set(
    policy: RetentionPolicy, tz: ZoneInfo, now: datetime, db: set[str], web: set[str]
) -> None:
    assert _kept(policy, tz, now) == db | web


def test_reasons_name_every_rule_that_kept_a_snapshot() -> None:
    policy = RetentionPolicy(keep_last=2, keep_daily=3, keep_monthly=2, keep_yearly=-1)
    decisions = apply_policy(_snapshots(), policy, NOW, BERLIN)
    reasons = {d.snapshot.id: list(d.reasons) for d in decisions if d.keep}
    assert reasons == {
        "s15": ["last snapshot", "daily snapshot", "monthly snapshot", "yearly snapshot"],
        "s14": ["last snapshot", "daily snapshot", "monthly snapshot", "yearly snapshot"],
        "s13": ["daily snapshot"],
        "s04": ["yearly snapshot"],
        "s02": ["yearly snapshot"],
        "s01": ["oldest yearly snapshot"],
        "w3": ["last snapshot", "daily snapshot", "monthly snapshot", "yearly snapshot"],
        "w2": ["last snapshot", "daily snapshot", "monthly snapshot", "yearly snapshot"],
        "w0": ["daily snapshot", "oldest yearly snapshot"],
    }
    forgotten = [d for d in decisions if not d.keep]
    assert all(d.verdict is Verdict.FORGET and d.reasons == () for d in forgotten)
    within = apply_policy(_snapshots(), RetentionPolicy(keep_within=Duration(days=72)), NOW, BERLIN)
    assert {d.reasons for d in within if d.keep} == {("within 72d",)}


def test_decisions_come_newest_first_per_source_in_the_buckets_zone() -> None:
    decisions = apply_policy(_snapshots(), RetentionPolicy(keep_last=1), NOW, BERLIN)
    assert [d.snapshot.id for d in decisions] == [f"s{n:02d}" for n in range(15, 0, -1)] + [
        "w3",
        "w2",
        "w1",
        "w0",
    ]
    s14 = next(d for d in decisions if d.snapshot.id.startswith("s14"))
    assert (s14.time.day, s14.time.hour, s14.time.tzname()) == (27, 0, "CET")


def test_a_timestamp_with_its_own_offset_keeps_it() -> None:
    """A writer that records local time (as restic does) is bucketed in that offset, not in tz."""
    own = local_time("2025-10-26T23:30:00+05:30", BERLIN)
    assert (own.day, own.hour) == (26, 23)
    utc = local_time("2025-10-26T23:30:00+00:00", BERLIN)
    assert (utc.day, utc.hour) == (27, 0)
    naive = local_time("2025-10-26T23:30:00", BERLIN)  # no zone at all: read as UTC
    assert naive == utc


def test_an_empty_policy_is_refused() -> None:
    with pytest.raises(EmptyPolicyError):
        apply_policy(_snapshots(), RetentionPolicy(), NOW, BERLIN)
    with pytest.raises(EmptyPolicyError):
        apply_policy(_snapshots(), RetentionPolicy(keep_last=0, keep_daily=0), NOW, BERLIN)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", Duration(days=30)),
        ("12h", Duration(hours=12)),
        ("1y2m3d", Duration(years=1, months=2, days=3)),
        ("2m1y", Duration(years=1, months=2)),
        (" 1y5m7d2h ", Duration(1, 5, 7, 2)),
    ],
)
def test_durations_as_restic_writes_them(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "3w", "1d1d", "-1d", "1.5d", "0d", "30 d", "1y-2m"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_duration(text)


def test_calendar_arithmetic_rolls_over_like_go() -> None:
    march31 = datetime(2025, 3, 31, 12, tzinfo=BERLIN)
    assert Duration(months=1).before(march31) == datetime(2025, 3, 3, 12, tzinfo=BERLIN)
    leap = datetime(2024, 3, 31, 12, tzinfo=BERLIN)
    assert Duration(months=1).before(leap) == datetime(2024, 3, 2, 12, tzinfo=BERLIN)
    # One day back across the spring change keeps the wall clock: 23 hours of real time.
    after = datetime(2025, 3, 30, 12, tzinfo=BERLIN)
    assert after - Duration(days=1).before(after) == (after - datetime(2025, 3, 29, 12, tzinfo=BERLIN))
    assert (after.astimezone(UTC) - Duration(days=1).before(after).astimezone(UTC)).total_seconds() == 23 * 3600


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"keep_dayly": 3}, "keep_dayly: unknown key"),
        ({"keep_daily": -2}, "keep_daily: must be a count"),
        ({"keep_daily": "7"}, "keep_daily: must be a whole number"),
        ({"keep_daily": True}, "keep_daily: must be a whole number"),
        ({"keep_within": "30x"}, "keep_within: '30x' is not a duration"),
        ({"keep_within": 30}, "keep_within: must be a duration string"),
    ],
)
def test_malformed_policies_name_the_key(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(PolicyError, match=fragment) as info:
        policy_from_mapping(values, "sources[0].retention")
    assert "sources[0].retention." in str(info.value)


def test_a_policy_reads_from_the_configuration_and_describes_itself() -> None:
    policy = policy_from_mapping({"keep_last": 1, "keep_daily": 2, "keep_monthly": -1, "keep_within": "30d"})
    assert policy == RetentionPolicy(keep_last=1, keep_daily=2, keep_monthly=-1, keep_within=Duration(days=30))
    assert policy.to_doc() == {"keep_last": 1, "keep_daily": 2, "keep_monthly": -1, "keep_within": "30d"}
    assert str(policy) == "keep 1 last, 2 daily, all monthly, all within 30d of the newest"
