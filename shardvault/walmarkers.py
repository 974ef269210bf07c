"""Markers of WAL segments ``wal-push`` archived ahead of their own call (see :mod:`shardvault.backup.wal`).

A marker is a file named as the segment, in ``.shardvault-pushed`` beside
it, holding the BLAKE3 hash of the content that was committed.  Reading one
needs neither the configuration nor the passphrase nor any peer, so this
module imports nothing heavy: the console script checks a marker before the
command line and the library load (:mod:`shardvault.entry`).
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3

from shardvault.walnames import WAL_NAME

PUSHED_DIR = ".shardvault-pushed"


def pushed_dir(path: str | os.PathLike[str]) -> Path:
    """Where markers of segments pushed ahead wait: beside ``pg_wal``'s files, in a directory PostgreSQL ignores."""
    return Path(path).parent / PUSHED_DIR


def take_pushed(path: str | os.PathLike[str]) -> bool:
    """Whether an earlier call pushed this segment ahead (its marker names the file's current hash).

    The marker is used up either way: a file whose content is not the one
    committed (a re-created cluster) goes the whole way, where the archive
    refuses a different content under a committed name.
    """
    marker = pushed_dir(path) / os.path.basename(path)
    try:
        recorded = marker.read_text().strip()
        data = Path(path).read_bytes()
    except OSError:
        return False
    marker.unlink(missing_ok=True)
    return bool(WAL_NAME.match(marker.name)) and blake3.blake3(data).hexdigest() == recorded
