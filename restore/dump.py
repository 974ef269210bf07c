"""``dump``: one file of a snapshot to a stream, or a directory as a tar stream.

Every chunk is authenticated and checked against its id as it is read
(:meth:`Repository.open_blob`), and each file's content against the hash
recorded at backup once it has been written out: a mismatch raises
:class:`~shardvault.errors.DataLossError` (the stream then ends short, and
the exit code says so).  The tar stream (POSIX pax) holds directories,
files, symlinks, hard links (a later name of an inode links to the first
one in the stream), FIFOs and device nodes, with their modes, owners (ids
and names), atimes and mtimes in nanoseconds and extended attributes
(``SCHILY.xattr.*``, which GNU tar restores with ``--xattrs``), named as in
the snapshot (``dir1/file``), so extracting it recreates the dumped
directory.  A sparse file's holes come out as zeros (its content is whole).
"""

from __future__ import annotations

import base64
import os
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from shardvault.crypto import new_content_hasher
from shardvault.errors import DataLossError, PathNotInSnapshotError
from shardvault.repository import BlobReader, Repository
from shardvault.repository.snapshot import Snapshot
from shardvault.tree import (
    BLOCK_DEVICE,
    CHAR_DEVICE,
    DIR,
    FIFO,
    FILE,
    SYMLINK,
    Entry,
    extents_in_order,
    link_key,
    zeros,
)

from .browse import ROOT, normalise


def _logical(reader: BlobReader, entry: Entry) -> Iterator[bytes | bytearray]:
    """The file's content as a reader sees it: a sparse file's holes as zeros between its extents."""
    chunks = (reader.read(bytes.fromhex(chunk)) for chunk in entry.chunks)
    if entry.extents is None:
        yield from chunks
        return
    if not extents_in_order(entry):
        raise DataLossError(f"{entry.path}: its recorded extents are out of order or outside its size")
    position = 0
    pending: bytes | bytearray = b""
    for offset, length in entry.extents:
        yield from zeros(offset - position)
        left = length
        while left:
            if not pending:
                pending = next(chunks, b"")
                if not pending:
                    raise DataLossError(f"{entry.path}: fewer data than its recorded extents hold")
            piece, pending = pending[:left], pending[left:]
            left -= len(piece)
            yield piece
        position = offset + length
    yield from zeros(entry.size - position)


def _content(reader: BlobReader, entry: Entry) -> Iterator[bytes | bytearray]:
    hasher = new_content_hasher()
    for data in _logical(reader, entry):
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


_NODES = {FIFO: tarfile.FIFOTYPE, CHAR_DEVICE: tarfile.CHRTYPE, BLOCK_DEVICE: tarfile.BLKTYPE}


def _pax_time(ns: int) -> str:
    seconds, nanos = divmod(ns, 10**9)
    return f"{seconds}.{nanos:09d}"  # exact: GNU tar restores nanoseconds


def _tarinfo(entry: Entry, first_name: str | None) -> tarfile.TarInfo:
    """The tar header of an entry; ``first_name`` makes it a hard link to an earlier member."""
    info = tarfile.TarInfo(entry.path)
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.uname, info.gname = entry.user or "", entry.group or ""
    info.mtime = entry.mtime_ns // 10**9
    info.pax_headers = {"mtime": _pax_time(entry.mtime_ns)}
    if entry.atime_ns:
        info.pax_headers["atime"] = _pax_time(entry.atime_ns)
    for name, value in (entry.xattrs or {}).items():
        # Binary values travel as they are (tarfile marks the header hdrcharset=BINARY).
        info.pax_headers[f"SCHILY.xattr.{name}"] = base64.b64decode(value).decode("utf-8", "surrogateescape")
    if first_name is not None:
        info.type, info.linkname = tarfile.LNKTYPE, first_name
    elif entry.type == DIR:
        info.type = tarfile.DIRTYPE
    elif entry.type == SYMLINK:
        info.type, info.linkname = tarfile.SYMTYPE, entry.target or ""
    elif entry.type in _NODES:
        info.type = _NODES[entry.type]
        info.devmajor, info.devminor = os.major(entry.rdev), os.minor(entry.rdev)
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
    first_names: dict[tuple[int, int, str | None], str] = {}  # hard links: the name an inode was first written under
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
        key = link_key(entry)
        first = first_names.setdefault(key, entry.path) if key is not None else entry.path
        info = _tarinfo(entry, first if first != entry.path else None)
        tar.addfile(info, _Stream(_content(reader, entry)) if info.type == tarfile.REGTYPE else None)
        written += info.size
    if not found:
        raise PathNotInSnapshotError(path, snapshot.short_id)
    if tar is None:  # the root of an empty snapshot
        tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
    tar.close()
    return written
