"""DR playbooks: YAML files that say what a drill restores, how it checks it, and the objectives.

Format (``dr_playbooks/*.yaml``)::

    name: docs-restore                    # the label of the drill's metrics
    description: ...                      # optional
    objectives: {rto: 4h, rpo: 1h}        # durations: 90s, 15m, 4h, 2d
    restore:
      source: docs                        # a [[sources]] name of the configuration
      snapshot: latest                    # or an id / unique prefix
      target: scratch                     # scratch (a temporary directory the drill owns) or a path
      exclude_zones: []                   # simulate losing these zones: only the other peers, an empty state
      to_time: "2026-11-24 03:00:00+00"   # PostgreSQL only: recover up to this time ...
      to_lsn: "0/3000060"                 # ... or this LSN (not both)
    checks:
      - name: every file matches the snapshot
        files: verify                     # files and buckets: re-hash every restored file against the snapshot
      - name: readme present
        command: ["test", "-f", "{target}/README"]
      - name: orders loaded               # PostgreSQL: against the restored, started scratch cluster
        sql: "select count(*) from orders"
        expect: ">= 1000"                 # ==, !=, >, >=, <, <= or a bare value (==); first column, first row
        database: postgres                # optional
      - name: app healthy
        http: "http://127.0.0.1:8080/health"
        expect_status: 200
    cleanup: on_success                   # always | on_success | never

``{target}`` (the restored directory; PostgreSQL: its data directory) and
``{port}`` (PostgreSQL: the scratch cluster's port) are replaced in
commands, SQL and URLs.  Every check may carry ``timeout`` (a duration,
default 5m).

Everything is validated before anything runs: an unknown key, a missing
field, a bad duration or an unknown source is one :class:`PlaybookError`
naming the file, the field (``checks[1].expect``) and its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # no stubs in the project's dependencies

from shardvault.config import Config, SourceKind
from shardvault.durations import parse_duration
from shardvault.errors import PlaybookError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_EXPECT = re.compile(r"^\s*(==|!=|>=|<=|>|<|=)?\s*(.*?)\s*$")
SCRATCH = "scratch"
DEFAULT_CHECK_TIMEOUT = 300.0


class CheckKind(StrEnum):
    FILES = "files"
    COMMAND = "command"
    SQL = "sql"
    HTTP = "http"


class Cleanup(StrEnum):
    ALWAYS = "always"
    ON_SUCCESS = "on_success"
    NEVER = "never"


# The keys every check kind accepts besides its own (the first key names the kind).
_CHECK_COMMON = frozenset({"name", "timeout"})
_CHECK_KEYS: dict[CheckKind, frozenset[str]] = {
    CheckKind.FILES: frozenset({"files"}),
    CheckKind.COMMAND: frozenset({"command"}),
    CheckKind.SQL: frozenset({"sql", "expect", "database"}),
    CheckKind.HTTP: frozenset({"http", "expect_status"}),
}
# Which source kinds a check kind makes sense for: a SQL check of a directory is a mistake.
_CHECK_SOURCES: dict[CheckKind, frozenset[SourceKind]] = {
    CheckKind.FILES: frozenset({SourceKind.FILES, SourceKind.BUCKET}),
    CheckKind.COMMAND: frozenset(SourceKind),
    CheckKind.SQL: frozenset({SourceKind.POSTGRES}),
    CheckKind.HTTP: frozenset(SourceKind),
}


@dataclass(frozen=True)
class Expectation:
    """``>= 1000``: an operator and a value the first column of a query's first row is held against."""

    op: str
    value: str

    def number(self) -> Decimal | None:
        try:
            return Decimal(self.value)
        except InvalidOperation:
            return None

    def holds(self, actual: Any) -> bool:
        expected = self.number()
        ordering = self.op not in ("==", "!=")
        if ordering and (expected is None or actual is None or isinstance(actual, bool)):
            return False  # no rows, NULL or a boolean is never ">= 1000": an empty table must fail the check
        if expected is not None and actual is not None and not isinstance(actual, bool):
            try:
                got = Decimal(str(actual))
            except InvalidOperation:
                return False
            if not got.is_finite():
                return False
            return {
                "==": got == expected,
                "!=": got != expected,
                ">": got > expected,
                ">=": got >= expected,
                "<": got < expected,
                "<=": got <= expected,
            }[self.op]
        text = "" if actual is None else str(actual)
        return (text == self.value) if self.op == "==" else (text != self.value)

    def __str__(self) -> str:
        return f"{self.op} {self.value}"


@dataclass(frozen=True)
class Check:
    name: str
    kind: CheckKind
    line: int | None = None
    timeout_seconds: float = DEFAULT_CHECK_TIMEOUT
    command: tuple[str, ...] = ()
    sql: str = ""
    expect: Expectation | None = None
    database: str = "postgres"
    http: str = ""
    expect_status: int = 200


@dataclass(frozen=True)
class Objectives:
    rto_seconds: float
    rpo_seconds: float


@dataclass(frozen=True)
class RestoreSpec:
    source: str
    source_type: SourceKind
    snapshot: str = "latest"
    target: str = SCRATCH  # SCRATCH or a path (absolute, or relative to the playbook's directory)
    exclude_zones: tuple[str, ...] = ()
    to_time: str | None = None
    to_lsn: str | None = None

    @property
    def scratch(self) -> bool:
        return self.target == SCRATCH


@dataclass(frozen=True)
class Playbook:
    path: Path
    name: str
    objectives: Objectives
    restore: RestoreSpec
    checks: tuple[Check, ...]
    cleanup: Cleanup = Cleanup.ON_SUCCESS
    description: str = ""
    lines: dict[str, int] = field(default_factory=dict, compare=False)


class _Lines:
    """Line numbers of every key of a YAML document, by dotted path (``checks[1].expect``)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines: dict[str, int] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise PlaybookError(path, f"not valid YAML: {exc}") from None
        if node is not None:
            self._walk(node, "")

    def _walk(self, node: yaml.Node, where: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                name = str(key.value)
                here = f"{where}.{name}" if where else name
                if name in seen:
                    # PyYAML keeps the last one silently; a playbook with two `cleanup:` is a mistake.
                    raise PlaybookError(self.path, f"{here} (line {key.start_mark.line + 1}): duplicate key")
                seen.add(name)
                self.lines[here] = key.start_mark.line + 1
                self._walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                here = f"{where}[{i}]"
                self.lines[here] = item.start_mark.line + 1
                self._walk(item, here)

    def line(self, where: str) -> int | None:
        while where:
            if where in self.lines:
                return self.lines[where]
            where = where.rpartition(".")[0] if "." in where else ""
        return None


class _Reader:
    """Typed access to one mapping of the playbook; every failure names file, field and line."""

    def __init__(self, lines: _Lines, where: str, table: Any) -> None:
        self.lines = lines
        self.where = where
        if not isinstance(table, dict):
            raise self.fail_at(where, f"must be a mapping, got {_kind(table)}")
        self.table: dict[str, Any] = table

    def key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail_at(self, where: str, message: str) -> PlaybookError:
        line = self.lines.line(where)
        return PlaybookError(self.lines.path, f"{where or '(top)'}{f' (line {line})' if line else ''}: {message}")

    def fail(self, key: str, message: str) -> PlaybookError:
        return self.fail_at(self.key(key), message)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.table or (self.table[key] is None and default is not ...):
            if default is ...:
                raise self.fail(key, "is required")
            return default
        value = self.table[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"must be {_names(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise self.fail(key, f"must be {_names(kind)}, got {_kind(value)} {value!r}")
        return value

    def duration(self, key: str, default: Any = ...) -> float:
        value = self.get(key, (str, int, float), default)
        if value is default and default is not ...:
            return float(default)
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def no_unknown(self, known: frozenset[str] | set[str]) -> None:
        for key in self.table:
            if key not in known:
                raise self.fail(str(key), f"unknown key (known: {', '.join(sorted(known))})")


def _kind(value: Any) -> str:
    names: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {"str": "a string", "int": "an integer", "list": "a list"}.get(k.__name__, k.__name__) for k in kinds
    )


def _check(lines: _Lines, i: int, table: Any, source_type: SourceKind) -> Check:
    r = _Reader(lines, f"checks[{i}]", table)
    kinds = [k for k in CheckKind if k.value in r.table]
    if len(kinds) != 1:
        found = ", ".join(k.value for k in kinds) or "none"
        raise r.fail_at(r.where, f"a check has exactly one of files, command, sql, http (found: {found})")
    kind = kinds[0]
    r.no_unknown(_CHECK_COMMON | _CHECK_KEYS[kind])
    name = r.get("name", str)
    if not name.strip():
        raise r.fail("name", "must not be empty")
    if source_type not in _CHECK_SOURCES[kind]:
        raise r.fail(kind.value, f"a {kind.value} check cannot check a {source_type.value} source")
    timeout = r.duration("timeout", DEFAULT_CHECK_TIMEOUT)
    common: dict[str, Any] = {"name": name, "kind": kind, "line": lines.line(r.where), "timeout_seconds": timeout}
    if kind is CheckKind.FILES:
        if r.get("files", str) != "verify":
            raise r.fail("files", f"the only files check is 'verify', got {r.table['files']!r}")
        return Check(**common)
    if kind is CheckKind.COMMAND:
        argv = r.get("command", list)
        if not argv or not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in argv):
            raise r.fail("command", "must be a non-empty list of strings (argv, no shell)")
        return Check(**common, command=tuple(str(a) for a in argv))
    if kind is CheckKind.SQL:
        query = r.get("sql", str)
        raw = r.get("expect", (str, int, float))
        match = _EXPECT.match(str(raw))
        assert match is not None  # the pattern matches every string
        op, value = match.group(1) or "==", match.group(2)
        expect = Expectation("==" if op == "=" else op, value)
        if not value:
            raise r.fail("expect", f"{raw!r} has no value to compare with")
        number = expect.number()
        if expect.op not in ("==", "!=") and (number is None or not number.is_finite()):
            raise r.fail("expect", f"{raw!r}: {expect.op} needs a finite number")
        return Check(**common, sql=query, expect=expect, database=r.get("database", str, "postgres"))
    url = r.get("http", str)
    if not url.startswith(("http://", "https://")):
        raise r.fail("http", f"must be an http:// or https:// URL, got {url!r}")
    status = r.get("expect_status", int, 200)
    if not 100 <= status <= 599:
        raise r.fail("expect_status", f"must be an HTTP status (100-599), got {status}")
    return Check(**common, http=url, expect_status=status)


def parse_playbook(text: str, path: Path, config: Config) -> Playbook:
    """Validate a playbook against the configuration (its sources and zones)."""
    lines = _Lines(path, text)
    data = yaml.safe_load(text)  # the text composed above, so it parses
    top = _Reader(lines, "", data if data is not None else {})
    top.no_unknown({"name", "description", "objectives", "restore", "checks", "cleanup"})
    name = top.get("name", str)
    if not _NAME.match(name):
        raise top.fail("name", f"{name!r} is not a valid name (letters, digits, '.', '_', '-'; at most 64)")
    obj = _Reader(lines, "objectives", top.get("objectives", dict))
    obj.no_unknown({"rto", "rpo"})
    objectives = Objectives(rto_seconds=obj.duration("rto"), rpo_seconds=obj.duration("rpo"))
    rs = _Reader(lines, "restore", top.get("restore", dict))
    rs.no_unknown({"source", "snapshot", "target", "exclude_zones", "to_time", "to_lsn"})
    source_name = rs.get("source", str)
    known = {s.name: s for s in config.sources}
    if source_name not in known:
        raise rs.fail(
            "source", f"no source named {source_name!r} in {config.path} (configured: {', '.join(known) or 'none'})"
        )
    source_type = known[source_name].type
    # A string only: YAML reads an unquoted 012345 as the octal number 5349, and that id does not exist.
    snapshot = str(rs.get("snapshot", (str,), "latest"))
    target = rs.get("target", str, SCRATCH)
    if target != SCRATCH:
        target = str((path.parent / Path(target).expanduser()).absolute())
    zones_raw = rs.get("exclude_zones", list, [])
    configured_zones = {p.zone for p in config.peers}
    for j, zone in enumerate(zones_raw):
        if not isinstance(zone, str) or zone not in configured_zones:
            raise rs.fail_at(
                f"restore.exclude_zones[{j}]",
                f"{zone!r} is not a zone of {config.path} (zones: {', '.join(sorted(configured_zones))})",
            )
    surviving = [p for p in config.peers if p.zone not in zones_raw]
    if zones_raw and len(surviving) < config.repository.k:
        raise rs.fail(
            "exclude_zones",
            f"only {len(surviving)} peer(s) would survive, fewer than k = {config.repository.k}: "
            "no restore is possible (the placement does not promise this)",
        )
    to_time = rs.get("to_time", (str,), None)
    to_lsn = rs.get("to_lsn", (str,), None)
    for key, value in (("to_time", to_time), ("to_lsn", to_lsn)):
        if value is not None and source_type is not SourceKind.POSTGRES:
            raise rs.fail(key, f"applies to PostgreSQL sources only; {source_name!r} is a {source_type.value} source")
    if to_time and to_lsn:
        raise rs.fail("to_lsn", "give to_time or to_lsn, not both")
    # Checked now, not after the base backup is restored: a typo must cost nothing.
    if to_lsn is not None and not re.fullmatch(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", to_lsn):
        raise rs.fail("to_lsn", f"{to_lsn!r} is not an LSN (like 0/3000060)")
    if to_time is not None:
        try:
            datetime.fromisoformat(to_time.replace(" ", "T", 1))
        except ValueError:
            raise rs.fail("to_time", f"{to_time!r} is not a time (like 2026-11-24 03:00:00+00)") from None
    restore = RestoreSpec(
        source=source_name,
        source_type=source_type,
        snapshot=snapshot,
        target=target,
        exclude_zones=tuple(zones_raw),
        to_time=to_time,
        to_lsn=to_lsn,
    )
    raw_checks = top.get("checks", list)
    if not raw_checks:
        raise top.fail("checks", "at least one check is required (a drill without a check proves nothing)")
    checks = tuple(_check(lines, i, table, source_type) for i, table in enumerate(raw_checks))
    seen: set[str] = set()
    for i, check in enumerate(checks):
        if check.name in seen:
            raise top.fail_at(f"checks[{i}].name", f"duplicate check name {check.name!r}")
        seen.add(check.name)
    cleanup_raw = top.get("cleanup", str, Cleanup.ON_SUCCESS.value)
    try:
        cleanup = Cleanup(cleanup_raw)
    except ValueError:
        raise top.fail(
            "cleanup", f"must be one of {', '.join(c.value for c in Cleanup)}, got {cleanup_raw!r}"
        ) from None
    return Playbook(
        path=path,
        name=name,
        objectives=objectives,
        restore=restore,
        checks=checks,
        cleanup=cleanup,
        description=top.get("description", str, ""),
        lines=dict(lines.lines),
    )


def load_playbook(path: Path | str, config: Config) -> Playbook:
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlaybookError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlaybookError(path, f"cannot read: {exc}") from None
    return parse_playbook(text, path, config)
