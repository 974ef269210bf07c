"""Progress of a long job, as values: the library counts, the CLI renders (restic's habit).

A job reports its counters (files and bytes done) through the progress
callback the caller hands it; :class:`Totals` says how much there is in all,
as far as it is known.  A restore knows its totals from its plan before it
writes anything; a backup learns them from a scanner that walks the source
ahead of it (restic's), so ``complete`` stays False until the scan is done
and a rate without totals has no ETA yet.

What a display shows is computed here, as plain values a test can drive
with its own clock: :class:`Rate` (bytes per second over a recent window),
:func:`percent`, :func:`eta_seconds`, a :class:`Reading` of one moment and
:func:`progress_line`, the colourless line written when stderr is not a terminal.
The CLI only reads the counters on its timer and draws.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar


@dataclass
class Totals:
    """How much a job has to do in all: files and bytes (of file content)."""

    files: int = 0
    bytes: int = 0
    complete: bool = False  # False while still being counted


# --- what a display shows: rate, ETA, percent, one plain line (pure, clock injected) ----------------

RATE_WINDOW = 10.0  # seconds of history behind the rate: long enough to be steady, short enough to follow changes
LINE_INTERVAL = 5.0  # seconds between the plain lines written when stderr is not a terminal
INTERVAL_VARIABLE = "SHARDVAULT_PROGRESS_INTERVAL"


@dataclass(frozen=True)
class Done:
    """How much a job has done so far: files finished and bytes of file content handled."""

    files: int = 0
    bytes: int = 0


class Rate:
    """Bytes per second over the last ``window`` seconds of samples, not the whole run.

    A whole-run average never settles after a slow start (or a long stretch
    of unchanged files); a recent window follows what the job does now.
    One sample at or before the window's start is kept, so the rate always
    spans the whole window once the run is that old.
    """

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, done: int) -> None:
        """Record that ``done`` bytes were done at time ``at`` (seconds, any monotonic origin)."""
        self._samples.append((at, done))
        while len(self._samples) > 2 and self._samples[1][0] <= at - self.window:
            self._samples.popleft()

    def per_second(self) -> float | None:
        """The rate, or None until two samples some time apart exist."""
        if len(self._samples) < 2:
            return None
        (first_at, first), (last_at, last) = self._samples[0], self._samples[-1]
        if last_at <= first_at:
            return None
        return max(last - first, 0) / (last_at - first_at)


def percent(done: Done, totals: Totals) -> float | None:
    """How far the job is, by bytes (by files when there are no bytes), 0 to 100; None while counting."""
    if not totals.complete:
        return None  # a share of a partial count would run backwards as the count grows
    if totals.bytes > 0:
        share = done.bytes / totals.bytes
    elif totals.files > 0:
        share = done.files / totals.files
    else:
        share = 1.0  # nothing to do is all done
    return max(0.0, min(share, 1.0)) * 100


def eta_seconds(done: Done, totals: Totals, rate: float | None) -> float | None:
    """Seconds left at the current rate; None while totals are being counted or nothing moves."""
    if not totals.complete or rate is None or rate <= 0:
        return None
    return max(totals.bytes - done.bytes, 0) / rate


@dataclass(frozen=True)
class Reading:
    """One look at a running job: what is done, out of what, how fast, and where it is."""

    done: Done
    totals: Totals  # a copy taken at the reading: the job's own keeps changing
    rate: float | None  # bytes per second over the recent window
    path: str = ""

    @property
    def percent(self) -> float | None:
        return percent(self.done, self.totals)

    @property
    def eta(self) -> float | None:
        return eta_seconds(self.done, self.totals, self.rate)


class ProgressMeter:
    """Turns counters read on a timer into readings, keeping the samples the rate needs.

    The clock is injected so tests can drive time; the CLI uses the default.
    """

    def __init__(self, window: float = RATE_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rate = Rate(window)

    def read(self, done: Done, totals: Totals, path: str = "") -> Reading:
        self.rate.add(self.clock(), done.bytes)
        return Reading(done, copy_totals(totals), self.rate.per_second(), path)


S = TypeVar("S")


class Watch(Generic[S]):
    """A progress callback for a job that keeps the last stats object it was handed, nothing more.

    The library calls back only between entries, so a display driven by the
    calls would freeze during one long file; a display's own timer reads
    the kept object's counters instead (restic's printer).  Reading int
    counters another thread updates needs no lock for a display.
    ``counts`` says where in the job's stats the done counters and totals are.
    """

    def __init__(self, counts: Callable[[S], tuple[Done, Totals]]) -> None:
        self.counts = counts
        self.latest: tuple[S, str] | None = None

    def __call__(self, stats: S, path: str) -> None:
        self.latest = (stats, path)  # one assignment: a reader sees the old pair or the new one

    def reading(self, meter: ProgressMeter) -> Reading | None:
        """A reading of the counters now, or None if the job has not reported yet (or never will)."""
        latest = self.latest
        if latest is None:
            return None
        done, totals = self.counts(latest[0])
        return meter.read(done, totals, latest[1])


def copy_totals(totals: Totals) -> Totals:
    """A consistent copy of totals another thread is still filling.

    ``complete`` is read first: the scanner sets it only after its last
    count, so a copy that says complete has the final counts.
    """
    complete = totals.complete
    return Totals(totals.files, totals.bytes, complete)


def size(n: float) -> str:
    """Bytes for people: ``512 B``, ``1.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable: TiB ends the loop")


def duration(seconds: float) -> str:
    """``H:MM:SS``, rounded up so the last second left shows as 0:00:01, not 0:00:00."""
    whole = math.ceil(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def summary(reading: Reading) -> str:
    """The counters as words, without colours: ``1,234/5,000 files, 1.2 GiB/4.0 GiB (30%), 85.0 MiB/s, ETA 0:00:33``.

    Totals still being counted show with ``[scanning]`` in place of the
    ETA; a job without any totals (a database or bucket backup) shows its
    counters and rate only.
    """
    done, totals = reading.done, reading.totals
    has_totals = totals.complete or totals.files > 0 or totals.bytes > 0
    if has_totals:
        parts = [f"{done.files:,}/{totals.files:,} files", f"{size(done.bytes)}/{size(totals.bytes)}"]
        share = reading.percent
        if share is not None:
            parts[-1] += f" ({share:.0f}%)"
    else:
        parts = [f"{done.files:,} files", size(done.bytes)]
    if reading.rate is not None:
        parts.append(f"{size(reading.rate)}/s")
    eta = reading.eta
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    text = ", ".join(parts)
    if has_totals and not totals.complete:
        text += " [scanning]"
    return text


def progress_line(label: str, reading: Reading) -> str:
    """The plain line written when stderr is not a terminal: ``backup docs: 1,234/5,000 files, ...``."""
    return f"{label}: {summary(reading)}"


def shorten_path(path: str, width: int) -> str:
    """The end of ``path`` in at most ``width`` characters (the file name matters more than its parents)."""
    if len(path) <= width:
        return path
    if width < 2:
        return path[len(path) - width :] if width > 0 else ""
    return "…" + path[len(path) - width + 1 :]


def line_interval(environ: Mapping[str, str]) -> float:
    """Seconds between plain lines: ``SHARDVAULT_PROGRESS_INTERVAL`` if it is a positive number, else 5."""
    try:
        value = float(environ.get(INTERVAL_VARIABLE, ""))
    except ValueError:
        return LINE_INTERVAL
    return value if math.isfinite(value) and value > 0 else LINE_INTERVAL
