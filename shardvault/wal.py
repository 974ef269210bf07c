"""The WAL archive: PostgreSQL's WAL files stored in the repository, one record each.

``wal-push`` stores a file's bytes as chunks (dedup, compression, encryption
and erasure coding as for any file), writes the index, and only then its
record ``wal/<source>/<file name, lower case>``: the commit.  A record names
the file's chunks, size and BLAKE3 hash.  Pushing a file that is already
archived with the same hash succeeds (PostgreSQL retries after a crash);
with a different hash it is refused, as pgBackRest does, because silently
replacing WAL would corrupt every restore that replays it.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from shardvault.backup import BackupStats, _Pipeline, note_degradation
from shardvault.chunker import Chunker
from shardvault.config import SourceConfig
from shardvault.crypto import content_hash, new_content_hasher
from shardvault.errors import ShardvaultError, SourceError, WalConflictError, WalMissingError
from shardvault.repository import BlobReader, Repository
from shardvault.sources.postgres import WAL_NAME, gaps, segment_number

WAL_VERSION = 1


def record_name(source: str, wal_file: str) -> str:
    return f"wal/{source}/{wal_file.lower()}"


def push(repo: Repository, source: SourceConfig, path: str | os.PathLike[str]) -> bool:
    """Archive one WAL file; True if stored, False if it was already there (same content)."""
    name = os.path.basename(path)
    if not WAL_NAME.match(name):
        raise SourceError(source.name, f"{name!r} is not a WAL file name")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SourceError(source.name, f"cannot read {path}: {exc.strerror}") from None
    digest = content_hash(data).hex()
    record = record_name(source.name, name)
    if repo.meta_exists(record):
        if repo.read_meta(record, cache=False).get("hash") == digest:
            return False
        raise WalConflictError(source.name, name)
    started = time.time()
    rc = repo.config.repository
    stats = BackupStats()
    chunks: list[str] = []
    pipe = _Pipeline(repo, stats)
    try:
        pipe.submit_stream(Chunker(rc.chunk_min, rc.chunk_avg, rc.chunk_max).chunks(io.BytesIO(data)), chunks)
        pipe.finish()
    finally:
        pipe.close()
    doc = {
        "version": WAL_VERSION,
        "name": name,
        "size": len(data),
        "hash": digest,
        "chunks": chunks,
        "pushed": datetime.now(UTC).isoformat(),
    }
    repo.write_meta(record, doc)  # the commit
    stats.bytes_total = stats.bytes_read
    note_degradation(repo, stats)
    repo.state.record_run(
        "backup",
        "degraded" if stats.degraded else "ok",
        started,
        source=source.name,
        details={"kind": "wal", "wal": name} | stats.to_doc(),
    )
    return True


PREFETCH = 8  # WAL segments fetched ahead of recovery, as pgBackRest's archive-get queue


def prefetch_dir(dest: str | os.PathLike[str]) -> Path:
    """Where segments fetched ahead wait: beside ``dest`` (PostgreSQL's pg_wal), in a directory it ignores."""
    return Path(dest).parent / ".shardvault-prefetch"


def take_prefetched(name: str, dest: str | os.PathLike[str]) -> bool:
    """Move ``name`` from the prefetch directory to ``dest`` if an earlier fetch put it there.

    This needs no repository (no passphrase derivation, no peer): a recovery
    that replays many segments pays the full cost once per PREFETCH of them.
    Files there were written whole and verified against their hash first.
    """
    spool = prefetch_dir(dest)
    if not WAL_NAME.match(name):
        return False
    try:
        os.replace(spool / name, dest)
    except FileNotFoundError:
        return False
    for old in spool.iterdir():  # recovery has moved past these
        if old.name < name and old.name[:8] == name[:8]:
            old.unlink(missing_ok=True)
    return True


def fetch(
    repo: Repository, source: SourceConfig, name: str, dest: str | os.PathLike[str], prefetch: int = PREFETCH
) -> None:
    """Restore one WAL file to ``dest`` (written whole, verified, then renamed into place).

    The next ``prefetch`` segments of the same timeline, when archived, are
    fetched into :func:`prefetch_dir` for the calls that will follow.
    """
    record = record_name(source.name, name)
    if not WAL_NAME.match(name) or not repo.meta_exists(record):
        shutil.rmtree(prefetch_dir(dest), ignore_errors=True)  # recovery is ending: nothing more to read ahead
        later = ""
        if gaps_before := [n for n in archived(repo, source) if n > name.upper() and n[:8] == name.upper()[:8]]:
            later = f", but later ones are (first: {gaps_before[0]}): a gap in the archive"
        raise WalMissingError(source.name, name, later)
    reader = repo.blob_reader()
    _write_verified(repo, reader, source, name, Path(dest))
    number = segment_number(name)
    if number is None or prefetch <= 0:
        return
    spool = prefetch_dir(dest)
    spool.mkdir(exist_ok=True)
    have = set(archived(repo, source))
    tli, seg = number
    for n in range(seg + 1, seg + 1 + prefetch):
        following = f"{tli:08X}{n // 0x100:08X}{n % 0x100:08X}"
        if following not in have:
            break
        if (spool / following).exists():
            continue
        try:
            _write_verified(repo, reader, source, following, spool / following)
        except ShardvaultError:
            # Read-ahead is best effort: a segment archived after this process
            # loaded the index (its chunks unknown here) is fetched by its own call.
            break


def _write_verified(repo: Repository, reader: BlobReader, source: SourceConfig, name: str, target: Path) -> None:
    doc = repo.read_meta(record_name(source.name, name))
    tmp = target.with_name(f".{target.name}.shardvault-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            hasher = new_content_hasher()
            for chunk in doc["chunks"]:
                data = reader.read(bytes.fromhex(chunk))
                f.write(data)
                hasher.update(data)
            if hasher.hexdigest() != doc["hash"]:
                raise WalMissingError(source.name, name, " intact: its content does not match its hash")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def archived(repo: Repository, source: SourceConfig) -> list[str]:
    """Names of the archived WAL files (upper case, as PostgreSQL names them), sorted."""
    prefix = f"wal/{source.name}/"
    return sorted(_postgres_name(n[len(prefix) :]) for n in repo.list_meta(prefix))


def _postgres_name(lower: str) -> str:
    """Object names are lower case; PostgreSQL's hex parts are upper case (suffixes stay lower)."""
    parts = lower.split(".")
    parts[0] = parts[0].upper()
    if len(parts) == 3:  # <segment>.<offset>.backup
        parts[1] = parts[1].upper()
    return ".".join(parts)


def wal_gaps(repo: Repository, source: SourceConfig) -> list[str]:
    return gaps(archived(repo, source))
