"""``dump``: one file of a snapshot to a stream, or a directory as a tar stream.

Every chunk is authenticated and checked against its id as it is read
(:meth:`Repository.open_blob`), and each file's content against the hash
recorded at backup once it has been written out: a mismatch raises
:class:`~shardvault.errors.DataLossError` (the stream then ends short, and
the exit code says so).  The tar stream (POSIX pax) holds directories,
files and symlinks with their modes, owners and mtimes, named as in the
snapshot (``dir1/file``), so extracting it recreates the dumped directory.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from shardvault.crypto import new_content_hasher
from shardvault.errors import DataLossError, PathNotInSnapshotError
from shardvault.repository import BlobReader, Repository
from shardvault.repository.snapshot import Snapshot
from shardvault.tree import DIR, FILE, SYMLINK, Entry

from .browse import ROOT, normalise


def _content(reader: BlobReader, entry: Entry) -> Iterator[bytes | bytearray]:
    hasher = new_content_hasher()
    for chunk in entry.chunks:
        data = reader.read(bytes.fromhex(chunk))
        hasher.update(data)
        yield data
    if entry.hash is not None and hasher.hexdigest() != entry.hash:
        raise DataLossError(f"{entry.path}: content hash differs from the one recorded at backup")


class _Stream:
    """A file-like view of a file's chunks, for tarfile."""

    def __init__(self, chunks: Iterator[bytes | bytearray]) -> None:
        self.chunks = chunks
        self.buffer = bytearray()

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buffer) < size:
            try:
                self.buffer += next(self.chunks)
            except StopIteration:
                break
        if size < 0:
            size = len(self.buffer)
        data, self.buffer = bytes(self.buffer[:size]), self.buffer[size:]
        return data


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.mtime = entry.mtime_ns // 10**9
    seconds, nanos = divmod(entry.mtime_ns, 10**9)
    info.pax_headers = {"mtime": f"{seconds}.{nanos:09d}"}  # exact: GNU tar restores nanoseconds
    if entry.type == DIR:
        info.type = tarfile.DIRTYPE
    elif entry.type == SYMLINK:
        info.type, info.linkname = tarfile.SYMTYPE, entry.target or ""
    else:
        info.type, info.size = tarfile.REGTYPE, entry.size
    return info


def dump(repo: Repository, snapshot: Snapshot, path: str, out: BinaryIO) -> int:
    """Write the file at ``path`` to ``out`` (or the directory there as a tar stream); return the bytes of content."""
    wanted = normalise(path)
    reader = repo.blob_reader()
    tar: tarfile.TarFile | None = None
    written = 0
    found = not wanted
    for entry in repo.iter_tree(snapshot):
        inside = not wanted or entry.path == wanted or entry.path.startswith(wanted + "/")
        if entry.path == ROOT or not inside:
            continue
        found = True
        if tar is None and entry.path == wanted and entry.type == FILE:
            for data in _content(reader, entry):
                out.write(data)
                written += len(data)
            return written
        if tar is None:
            tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed below
        info = _tarinfo(entry)
        tar.addfile(info, _Stream(_content(reader, entry)) if entry.type == FILE else None)
        written += info.size
    if not found:
        raise PathNotInSnapshotError(path, snapshot.short_id)
    if tar is None:  # the root of an empty snapshot
        tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
    tar.close()
    return written
