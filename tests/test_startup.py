"""What every command pays before and around its work: imports and the allocator (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shardvault.allocator import SETTINGS, tune

# Allocates and frees a 40 MiB buffer ten times (over glibc's largest dynamic mmap threshold, like a
# pack) and prints the minor page faults that cost, with or without tune().
_FAULTS = """
import json, resource, sys
from shardvault.allocator import tune
applied = tune() if sys.argv[1] == "tuned" else []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    buffer = bytearray(40 << 20)
    del buffer
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str, env: dict[str, str] | None = None) -> dict[str, object]:
    command = [sys.executable, "-c", _FAULTS, mode]
    # cwd "/": the checkout's top-level folders must not shadow the installed package.
    out = subprocess.run(command, env=env or _plain_env(), cwd="/", capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_large_buffers_instead_of_faulting_them_in_again() -> None:
    pages = (40 << 20) // 4096
    plain, tuned = _faults("plain"), _faults("tuned")
    assert tuned["applied"] == [param for param, _, _ in SETTINGS]
    assert int(plain["faults"]) > 8 * pages  # every buffer a fresh mapping, faulted in page by page
    assert int(tuned["faults"]) < 2 * pages  # the first one faulted in; the heap keeps it for the rest


def test_the_environment_wins_over_the_tuning() -> None:
    env = _plain_env() | {"MALLOC_ARENA_MAX": "4"}
    applied = _faults("tuned", env)["applied"]
    assert -8 not in applied  # M_ARENA_MAX left to the operator's value
    assert tune({name: "1" for _, _, name in SETTINGS}) == []


def test_the_command_line_imports_rich_only_when_it_draws() -> None:
    """rich is ~50 ms of every command's start: a backup with --json (or off a terminal) never needs it."""
    code = "import sys, shardvault.cli; print('rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
