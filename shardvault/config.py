"""The TOML configuration: which repository layout, which peers, which sources.

Looked up as ``--config PATH``, else ``$SHARDVAULT_CONFIG``, else
``./shardvault.toml``.  Every problem is a :class:`ConfigValueError` naming the
file, the key (``peers[2].url``) and what is wrong; unknown keys are errors,
because a misspelt ``write_quorum`` silently ignored is how backups get lost.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardvault.errors import ConfigFileNotFoundError, ConfigValueError, PasswordMissingError

DEFAULT_CONFIG_NAME = "shardvault.toml"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIB = 1 << 20


@dataclass(frozen=True)
class PeerConfig:
    name: str
    url: str
    zone: str
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None


@dataclass(frozen=True)
class SourceConfig:
    name: str
    type: str  # files | postgres
    path: Path  # files: the tree; postgres: unused (the server's data directory is its own)
    exclude: tuple[str, ...] = ()
    rpo_objective_seconds: int = 86400  # alert when the newest good backup is older
    backup_interval_seconds: int = 86400  # the schedule; alert when no backup for twice this
    dsn: str = ""  # postgres: libpq connection string
    mode: str = "physical"  # postgres: physical (base backup + WAL) or logical (pg_dump of the DSN's database)
    bin_dir: str = ""  # postgres: where pg_basebackup, pg_dump, pg_restore, pg_ctl are (default: found)
    endpoint: str | None = None  # bucket: S3 endpoint URL (default AWS)
    bucket: str = ""  # bucket: its name
    prefix: str = ""  # bucket: only keys under this prefix
    region: str | None = None  # bucket
    profile: str | None = None  # bucket: AWS profile (else the usual AWS variables)


@dataclass(frozen=True)
class ScrubConfig:
    window_days: float = 30.0  # every shard is read at least once per window
    rate_mib: float = 0.0  # read rate limit in MiB/s; 0: unlimited
    coverage_target: float = 1.0  # alert when the fraction read within the window is lower
    corruption_ratio_max: float = 0.0  # alert when the last window's corrupt fraction is higher


@dataclass(frozen=True)
class RepositoryConfig:
    k: int
    n: int
    write_quorum: int
    state_dir: Path
    pack_size: int = 32 * MIB
    compression_level: int = 3
    chunk_min: int = 256 * 1024
    chunk_avg: int = 1 * MIB
    chunk_max: int = 4 * MIB
    fsync: bool = True


@dataclass(frozen=True)
class Config:
    path: Path
    repository: RepositoryConfig
    peers: tuple[PeerConfig, ...]
    sources: tuple[SourceConfig, ...] = field(default_factory=tuple)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)

    def source(self, name: str) -> SourceConfig:
        for source in self.sources:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.sources) or "none"
        raise ConfigValueError(self.path, "sources", f"no source named {name!r} (configured: {known})")

    def peer(self, name: str) -> PeerConfig:
        for peer in self.peers:
            if peer.name == name:
                return peer
        raise ConfigValueError(self.path, "peers", f"no peer named {name!r}")


class _Reader:
    """Typed access to one TOML table that records which keys were used."""

    def __init__(self, path: Path, where: str, table: Any) -> None:
        self.path = path
        self.where = where
        if not isinstance(table, dict):
            raise ConfigValueError(path, where, f"must be a table, got {type(table).__name__}")
        self.table: dict[str, Any] = table

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, message: str) -> ConfigValueError:
        return ConfigValueError(self.path, self._key(key), message)

    def get(self, key: str, kind: type, default: Any = ..., required: bool = False) -> Any:
        if key not in self.table:
            if required or default is ...:
                raise self.fail(key, "is required")
            return default
        value = self.table[key]
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise self.fail(key, f"must be {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    def int_range(self, key: str, low: int, high: int, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low} and {high}, got {value}")
        return int(value)

    def float_range(self, key: str, low: float, high: float, default: Any = ...) -> float:
        value = self.table.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # TOML writes 30 for 30.0
        value = self.get(key, float, default) if not isinstance(value, float) else value
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low:g} and {high:g}, got {value:g}")
        return float(value)

    def name(self, key: str) -> str:
        value = self.get(key, str, required=True)
        if not _NAME_RE.match(value):
            raise self.fail(key, f"{value!r} is not a valid name (letters, digits, '.', '_', '-')")
        return str(value)

    def no_unknown(self, known: set[str]) -> None:
        for key in self.table:
            if key not in known:
                raise self.fail(key, f"unknown key (known: {', '.join(sorted(known))})")


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "shardvault"


def _resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base / path).resolve()


def _repository(path: Path, table: Any, n_peers: int) -> RepositoryConfig:
    r = _Reader(path, "repository", table)
    r.no_unknown(
        {
            "k",
            "n",
            "write_quorum",
            "state_dir",
            "pack_size_mib",
            "compression_level",
            "chunk_min_kib",
            "chunk_avg_kib",
            "chunk_max_kib",
            "fsync",
        }
    )
    k = r.int_range("k", 1, 128)
    n = r.int_range("n", 1, 255)
    if n < k:
        raise r.fail("n", f"must be at least k ({k}), got {n}")
    if n_peers < n:
        raise ConfigValueError(path, "peers", f"{n_peers} peer(s) configured, but n = {n} needs at least {n}")
    quorum = r.int_range("write_quorum", k, n, default=n)
    state = r.get("state_dir", str, default=None)
    chunk_min = r.int_range("chunk_min_kib", 64, 16 * 1024, default=256) * 1024
    chunk_avg = r.int_range("chunk_avg_kib", 256, 64 * 1024, default=1024) * 1024
    chunk_max = r.int_range("chunk_max_kib", 1024, 256 * 1024, default=4096) * 1024
    if not chunk_min < chunk_avg < chunk_max:
        raise r.fail("chunk_avg_kib", "chunk sizes must satisfy chunk_min_kib < chunk_avg_kib < chunk_max_kib")
    pack_size = r.int_range("pack_size_mib", 1, 512, default=32) * MIB
    if pack_size < chunk_max:
        raise r.fail("pack_size_mib", "must be at least chunk_max_kib")
    return RepositoryConfig(
        k=k,
        n=n,
        write_quorum=quorum,
        state_dir=_resolve(path.parent, state) if state else default_state_dir(),
        pack_size=pack_size,
        compression_level=r.int_range("compression_level", -7, 19, default=3),
        chunk_min=chunk_min,
        chunk_avg=chunk_avg,
        chunk_max=chunk_max,
        fsync=bool(r.get("fsync", bool, default=True)),
    )


def _peers(path: Path, tables: Any) -> tuple[PeerConfig, ...]:
    if not isinstance(tables, list) or not tables:
        raise ConfigValueError(path, "peers", "at least one [[peers]] table is required")
    peers: list[PeerConfig] = []
    for i, table in enumerate(tables):
        r = _Reader(path, f"peers[{i}]", table)
        r.no_unknown({"name", "url", "zone", "endpoint", "region", "profile"})
        name = r.name("name")
        if any(p.name == name for p in peers):
            raise r.fail("name", f"duplicate peer name {name!r}")
        url = r.get("url", str, required=True)
        if url.startswith("file://") or "://" not in url:
            local = url[len("file://") :] if url.startswith("file://") else url
            url = "file://" + str(_resolve(path.parent, local))
        elif not url.startswith("s3://"):
            raise r.fail("url", f"unsupported URL {url!r} (use file:///path or s3://bucket/prefix)")
        if any(p.url == url for p in peers):
            raise r.fail("url", f"{url} is already peer {next(p.name for p in peers if p.url == url)!r}")
        peers.append(
            PeerConfig(
                name=name,
                url=url,
                zone=r.get("zone", str, default=name),
                endpoint=r.get("endpoint", str, default=None),
                region=r.get("region", str, default=None),
                profile=r.get("profile", str, default=None),
            )
        )
    return tuple(peers)


def _sources(path: Path, tables: Any) -> tuple[SourceConfig, ...]:
    if tables is None:
        return ()
    if not isinstance(tables, list):
        raise ConfigValueError(path, "sources", "must be an array of [[sources]] tables")
    sources: list[SourceConfig] = []
    for i, table in enumerate(tables):
        r = _Reader(path, f"sources[{i}]", table)
        r.no_unknown(
            {"name", "type", "path", "exclude", "rpo_objective_seconds", "backup_interval_seconds"}
            | {"dsn", "mode", "bin_dir", "endpoint", "bucket", "prefix", "region", "profile"}
        )
        name = r.name("name")
        if any(s.name == name for s in sources):
            raise r.fail("name", f"duplicate source name {name!r}")
        kind = r.get("type", str, required=True)
        rpo = r.int_range("rpo_objective_seconds", 60, 10**9, default=86400)
        interval = r.int_range("backup_interval_seconds", 60, 10**9, default=86400)
        if kind == "files":
            exclude = r.get("exclude", list, default=[])
            if not all(isinstance(e, str) for e in exclude):
                raise r.fail("exclude", "must be a list of glob strings")
            tree = _resolve(path.parent, r.get("path", str, required=True))
            sources.append(SourceConfig(name, kind, tree, tuple(exclude), rpo, interval))
        elif kind == "postgres":
            dsn = r.get("dsn", str, required=True)
            mode = r.get("mode", str, default="physical")
            if mode not in ("physical", "logical"):
                raise r.fail("mode", f"must be 'physical' or 'logical', got {mode!r}")
            bin_dir = r.get("bin_dir", str, default="")
            sources.append(SourceConfig(name, kind, Path("/"), (), rpo, interval, dsn, mode, bin_dir))
        elif kind == "bucket":
            sources.append(
                SourceConfig(
                    name,
                    kind,
                    Path("/"),
                    (),
                    rpo,
                    interval,
                    endpoint=r.get("endpoint", str, default=None),
                    bucket=r.get("bucket", str, required=True),
                    prefix=r.get("prefix", str, default=""),
                    region=r.get("region", str, default=None),
                    profile=r.get("profile", str, default=None),
                )
            )
        else:
            raise r.fail("type", f"unsupported source type {kind!r} (supported: files, postgres, bucket)")
    return tuple(sources)


def _scrub(path: Path, table: Any) -> ScrubConfig:
    if table is None:
        return ScrubConfig()
    r = _Reader(path, "scrub", table)
    r.no_unknown({"window_days", "rate_mib", "coverage_target", "corruption_ratio_max"})
    return ScrubConfig(
        window_days=r.float_range("window_days", 0.001, 3650, default=30.0),
        rate_mib=r.float_range("rate_mib", 0, 1e6, default=0.0),
        coverage_target=r.float_range("coverage_target", 0, 1, default=1.0),
        corruption_ratio_max=r.float_range("corruption_ratio_max", 0, 1, default=0.0),
    )


def parse_config(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigValueError(path, "(syntax)", str(exc)) from None
    top = _Reader(path, "", data)
    top.no_unknown({"repository", "peers", "sources", "scrub"})
    peers = _peers(path, data.get("peers"))
    if "repository" not in data:
        raise ConfigValueError(path, "repository", "the [repository] table is required")
    return Config(
        path=path,
        repository=_repository(path, data["repository"], len(peers)),
        peers=peers,
        sources=_sources(path, data.get("sources")),
        scrub=_scrub(path, data.get("scrub")),
    )


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("SHARDVAULT_CONFIG")
    return Path(env) if env else Path(DEFAULT_CONFIG_NAME)


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    path = find_config_path(explicit).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileNotFoundError(path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigValueError(path, "(file)", f"cannot read: {exc}") from None
    return parse_config(text, path)


def read_password(password_file: str | os.PathLike[str] | None = None) -> str:
    """The passphrase from --password-file, else $SHARDVAULT_PASSWORD."""
    if password_file:
        try:
            text = Path(password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigValueError(password_file, "(password file)", f"cannot read: {exc.strerror}") from None
        password = text.rstrip("\r\n")
    else:
        password = os.environ.get("SHARDVAULT_PASSWORD", "")
    if not password:
        raise PasswordMissingError()
    return password
