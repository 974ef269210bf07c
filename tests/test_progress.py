"""Progress of backup and restore: the arithmetic (rate window, ETA, percent, the plain line) and the CLI's lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import BIN, PASSWORD, Vault, make_vault

from shardvault.progress import (
    Done,
    ProgressMeter,
    Rate,
    Reading,
    Totals,
    Watch,
    duration,
    eta_seconds,
    line_interval,
    percent,
    progress_line,
    shorten_path,
    size,
)

GIB = 1 << 30
MIB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the arithmetic -------------------------------------------------------------------------


def test_rate_follows_the_recent_window_not_the_whole_run() -> None:
    rate = Rate(window=10)
    done = 0
    for t in range(21):  # 100 B/s for 10 s, then 10 B/s for 10 s
        rate.add(float(t), done)
        done += 100 if t < 10 else 10
    assert rate.per_second() == pytest.approx(10)  # the whole run's average would be 55


def test_rate_is_unknown_until_two_samples_apart() -> None:
    rate = Rate()
    assert rate.per_second() is None
    rate.add(5.0, 1000)
    assert rate.per_second() is None
    rate.add(5.0, 2000)  # no time between them: no rate, not a division by zero
    assert rate.per_second() is None
    rate.add(7.0, 3000)
    assert rate.per_second() == pytest.approx(1000)


def test_rate_spans_the_whole_window_once_the_run_is_that_old() -> None:
    rate = Rate(window=10)
    for t in range(0, 31, 3):  # samples every 3 s: the one at or before now - 10 stays
        rate.add(float(t), t * 50)
    assert rate.per_second() == pytest.approx(50)
    rate.add(31.0, 30 * 50 + 500)  # a burst: seen over the window, not over the whole run
    assert rate.per_second() == pytest.approx((2000 - 21 * 50) / 10)  # from the sample at 21 s


def test_meter_samples_on_its_injected_clock() -> None:
    clock = FakeClock()
    meter = ProgressMeter(window=10, clock=clock)
    totals = Totals(files=10, bytes=1000, complete=True)
    first = meter.read(Done(1, 100), totals)
    assert first.rate is None and first.eta is None and first.percent == pytest.approx(10)
    clock.now += 2
    second = meter.read(Done(3, 300), totals, "a/b")
    assert second.rate == pytest.approx(100)
    assert second.eta == pytest.approx(7)  # 700 bytes left at 100 B/s
    assert second.path == "a/b"
    totals.files = 99  # the reading keeps a copy: the job's totals go on changing
    assert second.totals.files == 10


def test_eta_needs_complete_totals_and_a_moving_rate() -> None:
    complete = Totals(files=5, bytes=4000, complete=True)
    assert eta_seconds(Done(1, 1000), complete, 500.0) == pytest.approx(6)
    assert eta_seconds(Done(1, 1000), Totals(5, 4000, complete=False), 500.0) is None
    assert eta_seconds(Done(1, 1000), complete, None) is None
    assert eta_seconds(Done(1, 1000), complete, 0.0) is None
    assert eta_seconds(Done(9, 5000), complete, 500.0) == 0  # more done than counted (the source grew)


def test_percent_by_bytes_then_files_and_none_while_counting() -> None:
    assert percent(Done(1, 300), Totals(4, 1000, True)) == pytest.approx(30)
    assert percent(Done(3, 0), Totals(4, 0, True)) == pytest.approx(75)  # only empty files: by files
    assert percent(Done(0, 0), Totals(0, 0, True)) == pytest.approx(100)  # nothing to do is done
    assert percent(Done(1, 2000), Totals(4, 1000, True)) == pytest.approx(100)
    assert percent(Done(1, 300), Totals(4, 1000, False)) is None


def test_the_plain_line_has_totals_percent_rate_and_eta() -> None:
    reading = Reading(Done(1234, int(1.2 * GIB)), Totals(5000, 4 * GIB, True), 85.0 * MIB, "dir/file")
    # 2.8 GiB left at 85 MiB/s is 33.7 s, shown rounded up
    assert progress_line("backup docs", reading) == (
        "backup docs: 1,234/5,000 files, 1.2 GiB/4.0 GiB (30%), 85.0 MiB/s, ETA 0:00:34"
    )


def test_the_plain_line_says_scanning_while_totals_are_counted() -> None:
    reading = Reading(Done(12, 3 * MIB), Totals(400, 50 * MIB, False), 1.5 * MIB)
    text = progress_line("backup docs", reading)
    assert text == "backup docs: 12/400 files, 3.0 MiB/50.0 MiB, 1.5 MiB/s [scanning]"
    assert "ETA" not in text and "%" not in text


def test_the_plain_line_without_totals_or_rate_shows_the_counters() -> None:
    # a database or bucket backup: no scanner, so no totals and no ETA
    assert progress_line("backup db", Reading(Done(3, 2048), Totals(), 512.0)) == "backup db: 3 files, 2.0 KiB, 512 B/s"
    assert progress_line("restore", Reading(Done(0, 0), Totals(2, 10, True), None)) == (
        "restore: 0/2 files, 0 B/10 B (0%)"
    )


def test_sizes_and_durations() -> None:
    assert size(512) == "512 B"
    assert size(1536) == "1.5 KiB"
    assert size(3 * GIB) == "3.0 GiB"
    assert duration(33.2) == "0:00:34"
    assert duration(3725) == "1:02:05"
    assert duration(0) == "0:00:00"


def test_line_interval_from_the_environment() -> None:
    assert line_interval({}) == 5.0
    assert line_interval({"SHARDVAULT_PROGRESS_INTERVAL": "0.2"}) == pytest.approx(0.2)
    for bad in ("", "soon", "0", "-1", "nan", "inf"):
        assert line_interval({"SHARDVAULT_PROGRESS_INTERVAL": bad}) == 5.0, bad


def test_shorten_path_keeps_the_end() -> None:
    assert shorten_path("a/b.txt", 40) == "a/b.txt"
    assert shorten_path("very/long/directory/name/file.txt", 10) == "…/file.txt"
    assert len(shorten_path("x" * 100, 40)) == 40
    assert shorten_path("abc", 0) == ""


@dataclass
class Stats:
    files: int = 0
    bytes_written: int = 0
    totals: Totals = field(default_factory=Totals)


def test_watch_reads_the_last_object_it_was_handed_on_each_reading() -> None:
    watch: Watch[Stats] = Watch(lambda s: (Done(s.files, s.bytes_written), s.totals))
    meter = ProgressMeter(clock=FakeClock())
    assert watch.reading(meter) is None  # nothing reported yet: nothing to show
    stats = Stats(totals=Totals(2, 100, True))
    watch(stats, "big.bin")
    stats.bytes_written = 60  # a worker writes on while the job makes no call (one long file)
    reading = watch.reading(meter)
    assert reading is not None
    assert reading.done == Done(0, 60) and reading.path == "big.bin" and reading.percent == pytest.approx(60)


# --- the CLI on a pipe --------------------------------------------------------------------

TOTAL_LINE = re.compile(
    r"^(?P<label>backup src|restore): (?P<files>[\d,]+)/(?P<total_files>[\d,]+) files, "
    r"\S+ \S+/(?P<total_bytes>\S+ \S+) \((?P<pct>\d+)%\), \S+ \S+/s, ETA \d+:\d\d:\d\d$"
)
BIG_FILES = 4
BIG_SIZE = 64 * MIB  # 256 MiB in all: about a second of work, so several lines at 0.2 s


@dataclass
class Big:
    vault: Vault
    backup_output: str  # stdout and stderr of the first backup, merged in the order they were written
    files: int
    bytes: int


def run_merged(vault: Vault, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with stderr into the same pipe as stdout, unbuffered, so the order of the lines is the real one."""
    env = os.environ | {"SHARDVAULT_PASSWORD": PASSWORD, "PYTHONUNBUFFERED": "1"} | vault.env
    return subprocess.run(
        [str(BIN / "shardvault"), "--config", str(vault.config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    vault = make_vault(tmp_path_factory.mktemp("progress"))
    for i in range(BIG_FILES):
        (vault.source / f"big{i}.bin").write_bytes(os.urandom(BIG_SIZE))
    files = [p for p in vault.source.rglob("*") if p.is_file() and not p.is_symlink()]
    vault.env["SHARDVAULT_PROGRESS_INTERVAL"] = "0.2"
    result = run_merged(vault, "backup", "src")
    assert result.returncode == 0, result.stdout
    return Big(vault, result.stdout, len(files), sum(p.stat().st_size for p in files))


def progress_lines(text: str, label: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{label}: ")]


def test_backup_on_a_pipe_writes_lines_with_totals_rate_and_eta(big: Big) -> None:
    output = big.backup_output
    assert "\x1b" not in output  # no escape codes in a log
    lines = progress_lines(output, "backup src")
    full = [m for m in map(TOTAL_LINE.match, lines) if m]
    assert full, output
    for m in full:
        assert int(m["total_files"].replace(",", "")) == big.files
        assert m["total_bytes"] == size(big.bytes)
        assert 0 <= int(m["pct"]) <= 100
    assert all(TOTAL_LINE.match(line) for line in lines if "ETA" in line)
    # every line before the command's own output, none after it
    saved = next(i for i, line in enumerate(output.splitlines()) if line.startswith("snapshot "))
    assert all(not line.startswith("backup src: ") for line in output.splitlines()[saved:])


def test_backup_json_has_no_progress(big: Big) -> None:
    for i in range(BIG_FILES):  # new content: as long a run as the first, which wrote lines
        (big.vault.source / f"big{i}.bin").write_bytes(os.urandom(BIG_SIZE))
    result = big.vault.run("backup", "src", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["stats"]["bytes_read"] == BIG_FILES * BIG_SIZE  # the new content, read again


def test_a_short_run_prints_no_progress_line(big: Big) -> None:
    vault = Vault(big.vault.root, big.vault.config, big.vault.peers_dir, big.vault.source, {})
    vault.env["SHARDVAULT_PROGRESS_INTERVAL"] = "5"
    result = vault.run("backup", "src")  # incremental: nothing changed, done in well under 5 s
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("snapshot ")


def test_restore_on_a_pipe_writes_lines_with_totals(big: Big, tmp_path: Path) -> None:
    target = tmp_path / "out"
    result = run_merged(big.vault, "restore", "latest", "--target", str(target))
    assert result.returncode == 0, result.stdout
    assert "\x1b" not in result.stdout
    lines = progress_lines(result.stdout, "restore")
    full = [m for m in map(TOTAL_LINE.match, lines) if m]
    assert full, result.stdout
    for m in full:
        assert int(m["total_files"].replace(",", "")) == big.files
        assert m["total_bytes"] == size(big.bytes)
    restored = next(i for i, line in enumerate(result.stdout.splitlines()) if line.startswith("restored snapshot"))
    assert not progress_lines("\n".join(result.stdout.splitlines()[restored:]), "restore")
    assert (target / "big0.bin").stat().st_size == BIG_SIZE


def test_restore_json_has_no_progress(big: Big, tmp_path: Path) -> None:
    result = big.vault.run("restore", "latest", "--target", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["files"] == big.files and doc["bytes"] == big.bytes
