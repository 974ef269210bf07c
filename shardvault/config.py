"""The TOML configuration: which repository layout, which peers, which sources.

Looked up as ``--config PATH``, else ``$SHARDVAULT_CONFIG``, else
``./shardvault.toml``.  Every problem is a :class:`ConfigValueError` naming the
file, the key (``peers[2].url``) and what is wrong; unknown keys are errors,
because a misspelt ``write_quorum`` silently ignored is how backups get lost.

Redundancy and the write quorum
-------------------------------
Every pack is cut into ``n`` shards of which any ``k`` rebuild it.  ``k = n``
leaves no redundancy at all (one lost disk loses data), so it is refused
unless ``[repository] allow_no_redundancy = true`` says it is meant.

``write_quorum`` is how many shards (on distinct peers) must be acknowledged
before a commit.  Its default follows Tahoe-LAFS's "servers of happiness":
a write succeeds when enough distinct servers hold shares that the file
survives the failures it promised to survive, not only when every server
answered.  Here the default is ``n - 1`` but never below ``k + 1``:

* with ``n - 1`` a single dead peer (the most common failure: one disk) does
  not stop every backup, so the RPO survives the loss of one disk until
  ``repair`` restores the missing shards;
* with at least ``k + 1`` every commit still survives one more failure after
  it was written, so a degraded commit is never already "at risk".

When ``n = k + 1`` the two rules disagree and the default stays ``n``: a
commit on ``k`` peers would survive nothing.  An explicit ``write_quorum``
always wins; it must satisfy ``k <= write_quorum <= n``.

Peers that are the same storage
-------------------------------
Two ``[[peers]]`` entries that reach the same disk or bucket prefix look like
two failure domains but are one, so ``n - k`` promised failures become fewer.
Peer URLs are therefore canonicalised (:class:`PeerLocation`): local paths
are percent-decoded (``file:`` URLs), made absolute against the config file's
directory and resolved with ``realpath`` (``..``, symlinks);
``file://localhost/p`` is ``/p``; S3 peers are (endpoint with lower-case
scheme and host and no default port or trailing slash, bucket, prefix without
surrounding slashes).  Two peers at the same place, or one nested inside the
other (a listing of the outer one would include the inner one's objects), are
refused with :class:`~shardvault.errors.AliasedPeersError`.  The same bucket
and prefix on two different endpoints are two storages and are accepted.
Aliasing the configuration cannot see (two mounts of one export, two DNS
names of one server) is caught by the identity object each peer carries.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from shardvault.durations import parse_duration
from shardvault.errors import AliasedPeersError, ConfigFileNotFoundError, ConfigValueError, PasswordMissingError

if TYPE_CHECKING:
    from shardvault.lifecycle.retention import RetentionPolicy

DEFAULT_CONFIG_NAME = "shardvault.toml"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIB = 1 << 20


DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds: a peer that takes longer to accept a connection is down
DEFAULT_READ_TIMEOUT = 30.0  # seconds without a byte of answer: the peer is down for this run
DEFAULT_MAX_ATTEMPTS = 3  # tries per S3 request, the first included; bounds the time one peer can cost


class PeerKind(StrEnum):
    LOCAL = "local"
    S3 = "s3"


@dataclass(frozen=True)
class PeerLocation:
    """Where a peer's objects really are, in a form two aliases share.

    Local: ``path`` is the realpath of the directory.  S3: ``endpoint`` is
    normalised ("" is the default AWS endpoint), ``prefix`` has no surrounding
    slashes ("" is the whole bucket).
    """

    kind: PeerKind
    path: str = ""
    endpoint: str = ""
    bucket: str = ""
    prefix: str = ""

    def __str__(self) -> str:
        if self.kind is PeerKind.LOCAL:
            return self.path
        where = f"s3://{self.bucket}/{self.prefix}"
        return where + (f" at {self.endpoint}" if self.endpoint else " at the default AWS endpoint")

    def contains(self, other: PeerLocation) -> bool:
        """True if ``other`` is this storage or lies inside it (a listing of self shows other's objects)."""
        if self.kind is not other.kind:
            return False
        if self.kind is PeerKind.LOCAL:
            return other.path == self.path or other.path.startswith(self.path.rstrip("/") + "/")
        if (self.endpoint, self.bucket) != (other.endpoint, other.bucket):
            return False
        return not self.prefix or other.prefix == self.prefix or other.prefix.startswith(self.prefix + "/")


@dataclass(frozen=True)
class PeerConfig:
    name: str
    url: str  # canonical: file:///realpath (percent-quoted) or s3://bucket/prefix
    zone: str
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    location: PeerLocation | None = None  # None only for PeerConfigs built by hand
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # S3 only
    read_timeout: float = DEFAULT_READ_TIMEOUT  # S3 only
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # S3 only
    append_only: bool = False  # this client only adds objects: no delete, no overwrite (shards/stores/immutable.py)
    object_lock: ObjectLockMode | None = None  # S3 only: every object written carries this retention mode
    object_lock_days: int = 0  # S3 only, with object_lock: retention from the moment of writing


class ObjectLockMode(StrEnum):
    """S3 Object Lock retention modes (the TOML spells them in lower case, S3 in upper case)."""

    GOVERNANCE = "governance"  # callers with s3:BypassGovernanceRetention may still delete or shorten
    COMPLIANCE = "compliance"  # nobody, the root account included, deletes before the date


class SourceKind(StrEnum):
    """What a source is; a StrEnum, so ``source.type == "files"`` keeps working."""

    FILES = "files"
    POSTGRES = "postgres"
    BUCKET = "bucket"


_SOURCE_COMMON_KEYS = frozenset(
    {"name", "type", "rpo_objective_seconds", "backup_interval_seconds", "schedule", "retention"}
)
# The keys each kind of source accepts (besides the common ones): a key of another
# kind (a dsn on a files source) is a mistake about what is backed up, so it is refused.
SOURCE_KEYS: dict[SourceKind, frozenset[str]] = {
    SourceKind.FILES: frozenset({"path", "exclude", "xattrs", "acls"}),
    SourceKind.POSTGRES: frozenset({"dsn", "mode", "bin_dir"}),
    SourceKind.BUCKET: frozenset({"endpoint", "bucket", "prefix", "region", "profile"}),
}


@dataclass(frozen=True)
class SourceSchedule:
    """``[sources.schedule]``: cron strings, checked by :mod:`shardvault.schedule` when deployments are built.

    Kept as text here so a typo in a cron never stops a restore by hand.
    """

    incremental: str | None = None
    full: str | None = None


@dataclass(frozen=True)
class SourceConfig:
    """What every source has; each kind is its own class below (one table maps kinds to readers)."""

    name: str
    type: SourceKind
    rpo_objective_seconds: int = 86400  # alert when the newest good backup is older
    backup_interval_seconds: int = 86400  # the schedule; alert when no backup for twice this
    schedule: SourceSchedule = field(default_factory=SourceSchedule)  # crons of `shardvault serve`
    retention: RetentionPolicy | None = None  # [sources.retention]: what `forget` keeps; None: left alone


@dataclass(frozen=True)
class FilesSource(SourceConfig):
    path: Path = Path("/")  # the tree
    exclude: tuple[str, ...] = ()
    xattrs: bool = True  # record extended attributes (ACLs among them)
    acls: bool = True  # record POSIX ACLs (system.posix_acl_*); only with xattrs


@dataclass(frozen=True)
class PostgresSource(SourceConfig):
    dsn: str = ""  # libpq connection string
    mode: str = "physical"  # physical (base backup + WAL) or logical (pg_dump of the DSN's database)
    bin_dir: str = ""  # where pg_basebackup, pg_dump, pg_restore, pg_ctl are (default: found)


@dataclass(frozen=True)
class BucketSource(SourceConfig):
    endpoint: str | None = None  # S3 endpoint URL (default AWS)
    bucket: str = ""  # its name
    prefix: str = ""  # only keys under this prefix
    region: str | None = None
    profile: str | None = None  # AWS profile (else the usual AWS variables)


S = TypeVar("S", bound=SourceConfig)


@dataclass(frozen=True)
class ScrubConfig:
    window_days: float = 30.0  # every shard is read at least once per window
    rate_mib: float = 0.0  # read rate limit in MiB/s; 0: unlimited
    coverage_target: float = 1.0  # alert when the fraction read within the window is lower
    corruption_ratio_max: float = 0.0  # alert when the last window's corrupt fraction is higher


@dataclass(frozen=True)
class PruneConfig:
    """The ``[prune]`` table: how long condemned data waits, and when a silent session counts as dead."""

    grace_seconds: float = 86400.0  # a condemned set is deleted no sooner than this after it was written
    stale_after_seconds: float = 1800.0  # a session whose heartbeat this host sees unchanged this long is stale
    max_unused_percent: float = 5.0  # repack partly used packs until unused space is at most this share of used


@dataclass(frozen=True)
class ScheduleConfig:
    """The top-level ``[schedule]`` table: the timezone of every cron, and the repository-wide jobs' crons."""

    timezone: str = "UTC"
    check: str | None = None
    scrub: str | None = None
    repair: str | None = None
    drill: str | None = None  # every playbook in dr_playbooks/
    prune: str | None = None  # forget (each source's [sources.retention]) then prune


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
    allow_no_redundancy: bool = False  # k = n only with this explicit opt-in
    hostname: str = ""  # recorded in each snapshot and choosing its parent; "" = the machine's name
    append_only: bool = False  # every peer append-only for this client (each peer's own append_only adds to it)


@dataclass(frozen=True)
class Config:
    path: Path
    repository: RepositoryConfig
    peers: tuple[PeerConfig, ...]
    sources: tuple[SourceConfig, ...] = field(default_factory=tuple)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)

    def source(self, name: str) -> SourceConfig:
        for source in self.sources:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.sources) or "none"
        raise ConfigValueError(self.path, "sources", f"no source named {name!r} (configured: {known})")

    def typed_source(self, name: str, kind: type[S]) -> S:
        """The source ``name``, which must be of the given kind (a ConfigValueError names both otherwise)."""
        source = self.source(name)
        if not isinstance(source, kind):
            raise ConfigValueError(self.path, "sources", f"source {name!r} is a {source.type} source, not this kind")
        return source

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


def default_write_quorum(k: int, n: int) -> int:
    """``n - 1`` but never below ``k + 1`` (else ``n``); see the module docstring."""
    return n - 1 if n - 1 >= k + 1 else n


def _check_state_dir(r: _Reader, state_dir: Path) -> None:
    """A state_dir that is (or lies under) a file cannot be created: say so now, not as a traceback later."""
    probe = state_dir
    try:
        while not probe.exists():
            if probe.parent == probe:
                return
            probe = probe.parent
        is_dir = probe.is_dir()
    except OSError:  # unreadable parents: the state's own open reports it, with its errno
        return
    if not is_dir:
        if probe == state_dir:
            raise r.fail("state_dir", f"{state_dir} exists and is not a directory")
        raise r.fail("state_dir", f"{probe} is not a directory, so {state_dir} cannot be created")


def _repository(path: Path, table: Any, n_peers: int) -> RepositoryConfig:
    r = _Reader(path, "repository", table)
    r.no_unknown(
        {
            "k",
            "n",
            "write_quorum",
            "allow_no_redundancy",
            "append_only",
            "hostname",
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
    allow_no_redundancy = bool(r.get("allow_no_redundancy", bool, default=False))
    if n == k and not allow_no_redundancy:
        raise r.fail(
            "n",
            f"n = k = {k} leaves no redundancy (losing any one peer loses data); "
            "use n > k, or set allow_no_redundancy = true to mean it",
        )
    if n_peers < n:
        raise ConfigValueError(path, "peers", f"{n_peers} peer(s) configured, but n = {n} needs at least {n}")
    quorum = r.int_range("write_quorum", k, n, default=default_write_quorum(k, n))
    state = r.get("state_dir", str, default=None)
    state_dir = _resolve(path.parent, state) if state else default_state_dir()
    _check_state_dir(r, state_dir)
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
        state_dir=state_dir,
        pack_size=pack_size,
        compression_level=r.int_range("compression_level", -7, 19, default=3),
        chunk_min=chunk_min,
        chunk_avg=chunk_avg,
        chunk_max=chunk_max,
        fsync=bool(r.get("fsync", bool, default=True)),
        allow_no_redundancy=allow_no_redundancy,
        hostname=_hostname(r),
        append_only=bool(r.get("append_only", bool, default=False)),
    )


def _hostname(r: _Reader) -> str:
    """``[repository] hostname``: a printable name without surrounding spaces (it names a host in listings)."""
    name = str(r.get("hostname", str, default=""))
    if name and (name != name.strip() or not name.isprintable() or len(name) > 255):
        raise r.fail("hostname", f"{name!r} is not a host name (printable, no surrounding spaces, at most 255)")
    return name


_PEER_COMMON_KEYS = frozenset({"name", "url", "zone", "append_only"})
# Keys that only mean something for S3 peers; on a local peer they would be
# silently ignored, which hides a mistake about where the peer is.
_PEER_S3_KEYS = frozenset(
    {
        "endpoint",
        "region",
        "profile",
        "connect_timeout_seconds",
        "read_timeout_seconds",
        "max_attempts",
        "object_lock",
        "object_lock_days",
    }
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_endpoint(endpoint: str) -> str:
    """``HTTP://Host:80/`` -> ``http://host``; ValueError for what is not an http(s) URL."""
    split = urlsplit(endpoint)
    scheme = split.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not split.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {endpoint!r}")
    host = split.hostname  # urllib lower-cases it and drops any user:password@
    port = split.port  # ValueError for a port that is not a number
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    return urlunsplit((scheme, netloc, split.path.rstrip("/"), "", ""))


def peer_location(url: str, base: Path, endpoint: str | None = None) -> tuple[PeerLocation, str]:
    """The canonical location and URL of a peer; ValueError (with the reason) for a bad URL.

    ``base`` is the directory relative local paths are resolved against (the
    config file's).  A plain path is taken literally; a ``file:`` URL is
    percent-decoded.  The returned URL is percent-quoted, so reading it back
    with :func:`urllib.parse.unquote` gives the path again.
    """
    if not url:
        raise ValueError("is empty")
    if url[:5].lower() == "file:" and url[5:7] != "//":
        # RFC 8089's form without an authority (file:/abs/path), and file:relative/path
        real = os.path.realpath(base / unquote(url[5:]))
        return PeerLocation(PeerKind.LOCAL, path=real), "file://" + quote(real)
    if "://" not in url:
        real = os.path.realpath(base / os.path.expanduser(url))
        return PeerLocation(PeerKind.LOCAL, path=real), "file://" + quote(real)
    scheme = url.split("://", 1)[0].lower()
    split = urlsplit(url)
    if split.query or split.fragment:
        raise ValueError(f"{url!r} has a '?' or '#' part (percent-encode them in names: %3F, %23)")
    if scheme == "file":
        if split.netloc.lower() not in ("", "localhost"):
            raise ValueError(f"file URL must be file:///absolute/path (or file://localhost/...), got {url!r}")
        local = unquote(split.path)
        if not local:
            raise ValueError(f"empty path in {url!r}")
        real = os.path.realpath(base / local)
        return PeerLocation(PeerKind.LOCAL, path=real), "file://" + quote(real)
    if scheme == "s3":
        if not split.netloc:
            raise ValueError(f"S3 URL needs a bucket: s3://bucket/prefix, got {url!r}")
        prefix = unquote(split.path).strip("/")
        where = canonical_endpoint(endpoint) if endpoint is not None else ""
        location = PeerLocation(PeerKind.S3, endpoint=where, bucket=split.netloc, prefix=prefix)
        return location, f"s3://{split.netloc}/{quote(prefix)}"
    raise ValueError(f"unsupported URL {url!r} (use file:///path, a plain path or s3://bucket/prefix)")


def _aliasing(a: PeerLocation, b: PeerLocation) -> str | None:
    """Why two peer locations are not independent storages, or None if they are."""
    if a == b:
        return f"both are {a}"
    if a.contains(b):
        return f"{b} lies inside {a}, so a listing of one includes the other"
    if b.contains(a):
        return f"{a} lies inside {b}, so a listing of one includes the other"
    return None


def _peers(path: Path, tables: Any) -> tuple[PeerConfig, ...]:
    if not isinstance(tables, list) or not tables:
        raise ConfigValueError(path, "peers", "at least one [[peers]] table is required")
    peers: list[PeerConfig] = []
    for i, table in enumerate(tables):
        r = _Reader(path, f"peers[{i}]", table)
        r.no_unknown(set(_PEER_COMMON_KEYS | _PEER_S3_KEYS))
        name = r.name("name")
        if any(p.name == name for p in peers):
            raise r.fail("name", f"duplicate peer name {name!r}")
        url = r.get("url", str, required=True)
        endpoint = r.get("endpoint", str, default=None)
        try:
            location, canonical = peer_location(url, path.parent, endpoint)
        except ValueError as exc:
            key = "endpoint" if endpoint is not None and url.lower().startswith("s3://") else "url"
            raise r.fail(key, str(exc)) from None
        if location.kind is PeerKind.LOCAL:
            for key in sorted(_PEER_S3_KEYS & table.keys()):
                raise r.fail(key, f"applies to S3 peers only, but this peer is the local directory {location}")
        for other in peers:
            why = _aliasing(other.location, location) if other.location else None
            if why:
                raise AliasedPeersError(other.name, name, f"{why}; in {path}")
        peers.append(
            PeerConfig(
                name=name,
                url=canonical,
                zone=r.get("zone", str, default=name),
                endpoint=endpoint,
                region=r.get("region", str, default=None),
                profile=r.get("profile", str, default=None),
                location=location,
                connect_timeout=r.float_range("connect_timeout_seconds", 0.1, 600, default=DEFAULT_CONNECT_TIMEOUT),
                read_timeout=r.float_range("read_timeout_seconds", 0.1, 3600, default=DEFAULT_READ_TIMEOUT),
                max_attempts=r.int_range("max_attempts", 1, 10, default=DEFAULT_MAX_ATTEMPTS),
                append_only=bool(r.get("append_only", bool, default=False)),
                **_object_lock(r),
            )
        )
    return tuple(peers)


def _object_lock(r: _Reader) -> dict[str, Any]:
    """``object_lock = "governance"|"compliance"`` with ``object_lock_days = N`` (N >= 1), both or neither."""
    mode = r.get("object_lock", str, default=None)
    if mode is None:
        if "object_lock_days" in r.table:
            raise r.fail("object_lock_days", 'needs object_lock = "governance" or "compliance" beside it')
        return {}
    try:
        lock = ObjectLockMode(mode)
    except ValueError:
        raise r.fail("object_lock", f'must be "governance" or "compliance", got {mode!r}') from None
    if "object_lock_days" not in r.table:
        raise r.fail("object_lock_days", "is required with object_lock (days of retention, at least 1)")
    return {"object_lock": lock, "object_lock_days": r.int_range("object_lock_days", 1, 36500)}


def _check_object_lock(path: Path, peers: tuple[PeerConfig, ...], prune: PruneConfig) -> None:
    """A retention shorter than prune's grace period protects less than the operator believes; refuse it."""
    for i, peer in enumerate(peers):
        if peer.object_lock is not None and peer.object_lock_days * 86400 < prune.grace_seconds:
            raise ConfigValueError(
                path,
                f"peers[{i}].object_lock_days",
                f"{peer.object_lock_days} day(s) is shorter than [prune] grace ({prune.grace_seconds:g} s); "
                "retention must cover at least the grace period plus the interval between prunes",
            )


def _sources(path: Path, tables: Any) -> tuple[SourceConfig, ...]:
    if tables is None:
        return ()
    if not isinstance(tables, list):
        raise ConfigValueError(path, "sources", "must be an array of [[sources]] tables")
    every_key = set(_SOURCE_COMMON_KEYS.union(*SOURCE_KEYS.values()))
    sources: list[SourceConfig] = []
    for i, table in enumerate(tables):
        r = _Reader(path, f"sources[{i}]", table)
        r.no_unknown(every_key)
        name = r.name("name")
        if any(s.name == name for s in sources):
            raise r.fail("name", f"duplicate source name {name!r}")
        type_name = r.get("type", str, required=True)
        try:
            kind = SourceKind(type_name)
        except ValueError:
            supported = ", ".join(k.value for k in SourceKind)
            raise r.fail("type", f"unsupported source type {type_name!r} (supported: {supported})") from None
        for key in sorted(table.keys() - _SOURCE_COMMON_KEYS - SOURCE_KEYS[kind]):
            valid = ", ".join(sorted(SOURCE_KEYS[kind]))
            raise r.fail(key, f"is not a key of a {kind.value} source (its keys: {valid})")
        rpo = r.int_range("rpo_objective_seconds", 60, 10**9, default=86400)
        interval = r.int_range("backup_interval_seconds", 60, 10**9, default=86400)
        source = _SOURCE_READERS[kind](r, path, name, rpo, interval)
        sources.append(
            replace(
                source,
                schedule=_source_schedule(path, f"sources[{i}].schedule", table),
                retention=_source_retention(path, f"sources[{i}].retention", table),
            )
        )
    return tuple(sources)


def _source_retention(path: Path, where: str, source_table: dict[str, Any]) -> RetentionPolicy | None:
    """``[sources.retention]``: keep_last ... keep_yearly (-1 unlimited), keep_within ("30d", "1y2m")."""
    if "retention" not in source_table:
        return None
    # Imported here: the policy module is pure (stdlib only), and config stays at the bottom of the layers.
    from shardvault.lifecycle.retention import PolicyError, policy_from_mapping

    r = _Reader(path, where, source_table["retention"])
    try:
        policy = policy_from_mapping(r.table)
    except PolicyError as exc:
        raise r.fail(exc.key, exc.message) from None
    if policy.empty:
        raise ConfigValueError(path, where, "has no keep_* rule (remove the table to keep every snapshot)")
    return policy


def _source_schedule(path: Path, where: str, source_table: dict[str, Any]) -> SourceSchedule:
    if "schedule" not in source_table:
        return SourceSchedule()
    r = _Reader(path, where, source_table["schedule"])
    r.no_unknown({"incremental", "full"})
    return SourceSchedule(incremental=r.get("incremental", str, default=None), full=r.get("full", str, default=None))


def _schedule(path: Path, table: Any) -> ScheduleConfig:
    if table is None:
        return ScheduleConfig()
    r = _Reader(path, "schedule", table)
    r.no_unknown({"timezone", "check", "scrub", "repair", "drill", "prune"})
    crons = {key: r.get(key, str, default=None) for key in ("check", "scrub", "repair", "drill", "prune")}
    return ScheduleConfig(timezone=r.get("timezone", str, default="UTC"), **crons)


def _files_source(r: _Reader, path: Path, name: str, rpo: int, interval: int) -> SourceConfig:
    exclude = r.get("exclude", list, default=[])
    if not all(isinstance(e, str) for e in exclude):
        raise r.fail("exclude", "must be a list of glob strings")
    tree = _resolve(path.parent, r.get("path", str, required=True))
    xattrs, acls = r.get("xattrs", bool, default=True), r.get("acls", bool, default=True)
    return FilesSource(
        name, SourceKind.FILES, rpo, interval, path=tree, exclude=tuple(exclude), xattrs=xattrs, acls=acls
    )


def _postgres_source(r: _Reader, path: Path, name: str, rpo: int, interval: int) -> SourceConfig:
    dsn = r.get("dsn", str, required=True)
    mode = r.get("mode", str, default="physical")
    if mode not in ("physical", "logical"):
        raise r.fail("mode", f"must be 'physical' or 'logical', got {mode!r}")
    bin_dir = r.get("bin_dir", str, default="")
    return PostgresSource(name, SourceKind.POSTGRES, rpo, interval, dsn=dsn, mode=mode, bin_dir=bin_dir)


def _bucket_source(r: _Reader, path: Path, name: str, rpo: int, interval: int) -> SourceConfig:
    return BucketSource(
        name,
        SourceKind.BUCKET,
        rpo,
        interval,
        endpoint=r.get("endpoint", str, default=None),
        bucket=r.get("bucket", str, required=True),
        prefix=r.get("prefix", str, default=""),
        region=r.get("region", str, default=None),
        profile=r.get("profile", str, default=None),
    )


_SOURCE_READERS = {
    SourceKind.FILES: _files_source,
    SourceKind.POSTGRES: _postgres_source,
    SourceKind.BUCKET: _bucket_source,
}


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


def _prune(path: Path, table: Any) -> PruneConfig:
    if table is None:
        return PruneConfig()
    r = _Reader(path, "prune", table)
    r.no_unknown({"grace", "stale_after", "max_unused"})
    durations = {}
    for key, default, allow_zero in (("grace", "24h", True), ("stale_after", "30m", False)):
        try:
            durations[key] = parse_duration(r.get(key, str, default), allow_zero=allow_zero)
        except ValueError as exc:
            raise r.fail(key, str(exc)) from None
    if durations["stale_after"] < 1:
        raise r.fail("stale_after", "must be at least 1s (several heartbeats of a writer: 60 s each by default)")
    return PruneConfig(
        grace_seconds=durations["grace"],
        stale_after_seconds=durations["stale_after"],
        max_unused_percent=r.float_range("max_unused", 0, 100, default=5.0),
    )


def parse_config(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigValueError(path, "(syntax)", str(exc)) from None
    top = _Reader(path, "", data)
    top.no_unknown({"repository", "peers", "sources", "scrub", "schedule", "prune"})
    peers = _peers(path, data.get("peers"))
    if "repository" not in data:
        raise ConfigValueError(path, "repository", "the [repository] table is required")
    repository = _repository(path, data["repository"], len(peers))
    if repository.append_only:  # [repository] append_only = true: every peer, so a new peer cannot be forgotten
        peers = tuple(replace(peer, append_only=True) for peer in peers)
    prune = _prune(path, data.get("prune"))
    _check_object_lock(path, peers, prune)
    return Config(
        path=path,
        repository=repository,
        peers=peers,
        sources=_sources(path, data.get("sources")),
        scrub=_scrub(path, data.get("scrub")),
        schedule=_schedule(path, data.get("schedule")),
        prune=prune,
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
