"""PostgreSQL's WAL file names: which names are WAL files, segment numbers, gaps.

Pure functions on names, shared by the WAL archive's records (repository),
``wal-push`` (backup), ``wal-fetch`` (restore) and ``check`` (verify).
"""

from __future__ import annotations

import re

WAL_NAME = re.compile(r"^[0-9A-F]{24}(\.partial|\.[0-9A-F]{8}\.backup)?$|^[0-9A-F]{8}\.history$")
SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")


def segment_number(name: str) -> tuple[int, int] | None:
    """(timeline, segment number) of a WAL segment name (16 MiB segments), None for other WAL files."""
    match = SEGMENT.match(name.upper())
    if not match:
        return None
    tli, log, seg = (int(g, 16) for g in match.groups())
    return tli, log * 0x100 + seg


def segment_name(tli: int, number: int) -> str:
    """The name of segment ``number`` of timeline ``tli`` (16 MiB segments)."""
    return f"{tli:08X}{number // 0x100:08X}{number % 0x100:08X}"


def next_segment(name: str) -> str | None:
    """The segment after ``name`` on its timeline; None if ``name`` is not a segment."""
    number = segment_number(name)
    return None if number is None else segment_name(number[0], number[1] + 1)


def gaps(names: list[str]) -> list[str]:
    """Segments missing between the first and the last archived one of each timeline."""
    by_timeline: dict[int, set[int]] = {}
    for name in names:
        number = segment_number(name)
        if number:
            by_timeline.setdefault(number[0], set()).add(number[1])
    missing = []
    for tli, numbers in sorted(by_timeline.items()):
        for n in range(min(numbers), max(numbers)):
            if n not in numbers:
                missing.append(segment_name(tli, n))
    return missing
