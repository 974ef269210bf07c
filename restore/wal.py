"""``wal-fetch``: PostgreSQL's restore_command, with read-ahead.

Each call writes one WAL file whole, checks it against the hash in its
record, and renames it into place; it also fetches the next segments of the
timeline into a spool beside ``pg_wal`` that later calls serve without
opening the repository (no scrypt, no peer), as pgBackRest's archive-get
queue does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from shardvault.config import PostgresSource
from shardvault.crypto import new_content_hasher
from shardvault.errors import ShardvaultError, WalMissingError
from shardvault.repository import BlobReader, Repository
from shardvault.repository.wal import archived, record_name
from shardvault.walnames import WAL_NAME, segment_number

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
    repo: Repository, source: PostgresSource, name: str, dest: str | os.PathLike[str], prefetch: int = PREFETCH
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


def _write_verified(repo: Repository, reader: BlobReader, source: PostgresSource, name: str, target: Path) -> None:
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
