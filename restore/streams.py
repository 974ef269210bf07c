"""One file of a snapshot as a readable stream: read chunk by chunk, hashed on the way."""

from __future__ import annotations

from shardvault.crypto import new_content_hasher
from shardvault.errors import DataLossError, RestoreError
from shardvault.repository import Repository
from shardvault.tree import Entry


class ChunkStream:
    """A file-like view of one file of a snapshot, read chunk by chunk and hashed on the way."""

    def __init__(self, repo: Repository, entry: Entry) -> None:
        self.reader = repo.blob_reader()
        self.chunks = iter(entry.chunks)
        self.buffer = memoryview(b"")
        self.hasher = new_content_hasher()
        self.entry = entry

    def read(self, size: int = -1) -> bytes:
        if 0 <= size <= len(self.buffer):  # the common case: one slice, one copy
            piece = self.buffer[:size]
            self.buffer = self.buffer[size:]
            return bytes(piece)
        out = bytearray()
        while size < 0 or len(out) < size:
            if not self.buffer:
                chunk = next(self.chunks, None)
                if chunk is None:
                    break
                try:
                    data = self.reader.read(bytes.fromhex(chunk))
                except OSError as exc:  # a read, not the target: callers treat OSError as the target's
                    raise RestoreError(f"{self.entry.path}: reading chunk {chunk[:16]}: {exc}") from None
                self.hasher.update(data)
                self.buffer = memoryview(bytes(data))
            take = len(self.buffer) if size < 0 else min(size - len(out), len(self.buffer))
            out += self.buffer[:take]
            self.buffer = self.buffer[take:]
        return bytes(out)

    def verify(self) -> None:
        for _ in iter(lambda: self.read(1 << 20), b""):
            pass  # a tar reader may stop before the end padding
        if self.hasher.hexdigest() != self.entry.hash:
            raise DataLossError(f"{self.entry.path}: content hash differs from the one recorded at backup")
