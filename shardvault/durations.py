"""Durations as operators write them in the TOML, playbooks and flags: ``90s``, ``15m``, ``4h``, ``2d``."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any, allow_zero: bool = False) -> float:
    """``90s``, ``15m``, ``4h``, ``2d`` -> seconds; ValueError otherwise (``0s`` only with ``allow_zero``)."""
    if allow_zero and isinstance(value, str) and value.strip() == "0":
        return 0.0
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"{value!r} is not a duration (write a number and a unit: 90s, 15m, 4h, 2d)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0 and not allow_zero:
        raise ValueError(f"{value!r} must be more than nothing")
    return seconds


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"
