"""Every exit code the README documents, reached the way an operator reaches it.

Exit codes come from error classes (never from message text): each case
checks the code, a one-line error on stderr, and with ``--json`` exactly one
JSON document on stdout.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PASSWORD, Vault, deny_reading, make_vault

from shardvault import errors
from shardvault.cli import main

README = Path(__file__).parent.parent / "README.md"


def documented_codes() -> dict[int, str]:
    table = README.read_text().split("| code | meaning |", 1)[1].split("\n\n", 1)[0]
    return {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \| (.+) \|$", table, re.MULTILINE)}


def test_readme_documents_every_code_an_error_class_carries() -> None:
    codes = documented_codes()
    below = sorted(c for c in codes if c < 128)  # 128 + N: stopped by signal N (130: Ctrl-C, tests/test_resume.py)
    assert below == list(range(len(below))) and len(below) >= 16
    assert set(codes) - set(below) == {130}
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ShardvaultError)]
    assert {c.exit_code for c in classes} <= set(codes)


def _unreadable(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    deny_reading(monkeypatch, vault)
    return ["backup", "src"]


def _symlink_where_a_dir_goes(vault: Vault, tmp: Path) -> list[str]:
    target = tmp / "t"
    target.mkdir()
    (target / "dir0").symlink_to(tmp)
    return ["restore", "latest", "--source", "src", "--target", str(target)]


def _two_sources(vault: Vault, tmp: Path) -> list[str]:
    other = tmp / "other-src"
    other.mkdir()
    (other / "f").write_text("x")
    vault.config.write_text(
        vault.config.read_text() + f'[[sources]]\nname = "other"\ntype = "files"\npath = "{other}"\n'
    )
    assert vault.cli("backup", "other").exit_code == 0
    return ["restore", "latest", "--target", str(tmp / "out")]


def _playbook(tmp: Path, check: str, rto: str) -> list[str]:
    path = tmp / "drill.yaml"
    path.write_text(
        f"name: exit-codes\nobjectives: {{rto: {rto}, rpo: 1h}}\nrestore: {{source: src, snapshot: latest}}\n"
        f"checks:\n  - name: the check\n    command: {check}\ncleanup: always\n"
    )
    return ["drill", str(path)]


CASES: dict[str, tuple[int, Callable[..., list[str]]]] = {
    "drill check failed": (13, lambda v, t, m: _playbook(t, '["false"]', "1h")),
    "drill objective missed": (14, lambda v, t, m: _playbook(t, '["true"]', "0.001s")),
    "ok": (0, lambda v, t, m: ["snapshots"]),
    "usage: latest with several sources": (2, lambda v, t, m: _two_sources(v, t)),
    "config: unknown source": (3, lambda v, t, m: ["backup", "nope"]),
    "wrong passphrase": (4, lambda v, t, m: ["snapshots"]),
    "peer gone and quorum of every peer": (5, None),  # type: ignore[dict-item]
    "damage found": (6, lambda v, t, m: [p.unlink() for p in v.shards(1)[:1]] and ["check"]),
    "data lost": (
        7,
        lambda v, t, m: (
            [shutil.rmtree(v.peer(i)) for i in (0, 1, 2)]
            and ["restore", "latest", "--source", "src", "--target", str(t / "o")]
        ),
    ),
    "unknown snapshot": (8, lambda v, t, m: ["restore", "deadbeef", "--target", str(t / "o")]),
    "unsafe path": (9, lambda v, t, m: _symlink_where_a_dir_goes(v, t)),
    "missing source": (10, lambda v, t, m: shutil.rmtree(v.source) or ["backup", "src"]),
    "unreadable file": (11, lambda v, t, m: _unreadable(v, m)),
    "target is a file": (
        12,
        lambda v, t, m: (
            (t / "f").write_text("x") and ["restore", "latest", "--source", "src", "--target", str(t / "f")]
        ),
    ),
}


def _quorum_case(vault: Vault, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    text = vault.config.read_text().replace("[repository]\n", "[repository]\nwrite_quorum = 6\n", 1)
    vault.config.write_text(text)
    shutil.rmtree(vault.peer(3))
    (vault.source / "new").write_bytes(b"n" * 1000)
    return ["backup", "src"]


@pytest.mark.parametrize("case", sorted(CASES, key=lambda c: CASES[c][0]))
def test_each_documented_code(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, build = CASES[case]
    vault = make_vault(tmp_path / "v")
    assert vault.cli("backup", "src").exit_code == 0
    args = _quorum_case(vault, tmp_path, monkeypatch) if build is None else build(vault, tmp_path, monkeypatch)
    password = "wrong" if case == "wrong passphrase" else PASSWORD
    json_ok = args[0] in ("snapshots", "backup", "restore", "check", "drill")
    argv = [*args, "--json"] if json_ok else args
    result = CliRunner().invoke(
        main, ["--config", str(vault.config), *argv], env={"SHARDVAULT_PASSWORD": password}, catch_exceptions=False
    )
    assert result.exit_code == code, (case, result.stdout, result.stderr)
    assert code in documented_codes()
    if code == 0:
        return
    doc = json.loads(result.stdout) if json_ok else None  # exactly one document, errors included
    if isinstance(doc, dict) and "damaged" in doc:
        assert doc["damaged"] is True  # a verdict document: its exit code is the verdict, no error line
        return
    if code != 2:  # click's own usage errors print usage text, not our one line
        lines = [line for line in result.stderr.splitlines() if line.startswith("shardvault: error:")]
        assert len(lines) == 1, result.stderr
    if doc is not None and code == 11:
        assert doc["snapshot"]["id"] and doc["warning_details"]  # committed: the result document, not an error
    elif doc is not None and code in (13, 14):
        assert doc["result"] == "failed"  # the drill's report, printed whether it passed or failed
    elif doc is not None:
        assert doc["error"]["code"] == code


def test_unexpected_error_is_exit_1_with_a_traceback(backed_up: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("shardvault.repository.Repository.open", boom)
    result = CliRunner().invoke(
        main, ["--config", str(backed_up.config), "snapshots"], env={"SHARDVAULT_PASSWORD": PASSWORD}
    )
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_an_unreachable_prefect_api_is_exit_15(backed_up: Vault, tmp_path: Path) -> None:
    """In a child process: an in-process Prefect test harness elsewhere in the session must not answer it."""
    from conftest import free_port

    backed_up.env = {"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api", "PREFECT_HOME": str(tmp_path / "ph")}
    result = backed_up.run("serve", timeout=120)
    assert result.returncode == 15, result.stderr
    assert result.stderr.count("shardvault: error:") == 1 and "Prefect API" in result.stderr
