"""What every command pays before and around its work: imports and the allocator (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, make_vault

from shardvault.allocator import SETTINGS, tune

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

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


def _faults(mode: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    command = [sys.executable, "-c", _FAULTS, mode]
    # cwd "/": the checkout's top-level folders must not shadow the installed package.
    out = subprocess.run(command, env=env or _plain_env(), cwd="/", capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


@pytest.mark.skipif(THP.exists() and "[always]" in THP.read_text(), reason="huge pages: fewer faults either way")
def test_tuned_allocator_reuses_large_buffers_instead_of_faulting_them_in_again() -> None:
    pages = (40 << 20) // 4096
    plain, tuned = _faults("plain"), _faults("tuned")
    if not tuned["applied"]:
        pytest.skip("not glibc: nothing to tune")
    assert tuned["applied"] == [setting.param for setting in SETTINGS]
    assert plain["faults"] > 8 * pages  # every buffer a fresh mapping, faulted in page by page
    assert tuned["faults"] < 2 * pages  # the first one faulted in; the heap keeps it for the rest


def test_the_environment_wins_over_the_tuning() -> None:
    env = _plain_env() | {"MALLOC_ARENA_MAX": "4", "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}
    applied = _faults("tuned", env)["applied"]
    assert -8 not in applied and -1 not in applied  # left to the operator's values
    assert tune({setting.variable: "1" for setting in SETTINGS}) == []


def test_the_command_line_imports_rich_only_when_it_draws() -> None:
    """rich is ~50 ms of every command's start: a backup with --json (or off a terminal) never needs it."""
    code = "import sys, shardvault.cli; print('rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_backup_off_a_terminal_never_imports_rich(tmp_path: Path) -> None:
    """Under cron or Prefect (stderr a file or pipe) progress is plain lines: rich is not loaded at all."""
    vault = make_vault(tmp_path)
    code = (
        "import sys\nfrom shardvault.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('rich' in sys.modules)"
    )
    env = os.environ | {"SHARDVAULT_PASSWORD": PASSWORD}
    argv = [sys.executable, "-c", code, "--config", str(vault.config), "backup", "src"]
    out = subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
