"""One file of a snapshot as a readable stream: read chunk by chunk, hashed on the way.

The chunks are fetched, decrypted and decompressed a few ahead by a thread
(the C extensions release the GIL), so a consumer that unpacks or uploads
(a base backup's tar, a dump into ``pg_restore``, an object into a bucket)
overlaps with the reading.  Chunks are not checked against their ids one by
one: AES-GCM authenticates each blob under its id, and :meth:`verify`
checks the whole stream's hash against the one recorded at backup.
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType

from shardvault.crypto import new_content_hasher
from shardvault.errors import DataLossError, RestoreError
from shardvault.repository import Repository
from shardvault.tree import Entry

AHEAD = 4  # chunks decoded ahead of the consumer (memory: AHEAD chunks and the reader's packs)
_END = b""


class ChunkStream:
    """A file-like view of one file of a snapshot, read chunk by chunk and hashed on the way.

    Use it as a context manager (or call :meth:`close`): closing stops the
    read-ahead thread when the consumer stops early.
    """

    def __init__(self, repo: Repository, entry: Entry) -> None:
        self.reader = repo.blob_reader()
        self.buffer = memoryview(b"")
        self.hasher = new_content_hasher()
        self.entry = entry
        self._ready: queue.Queue[bytes | Exception] = queue.Queue(AHEAD)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._read_ahead, name="sv-stream", daemon=True)
        self._thread.start()

    def _read_ahead(self) -> None:
        item: bytes | Exception = _END
        for chunk in self.entry.chunks:
            try:
                data = bytes(self.reader.read(bytes.fromhex(chunk), check_id=False))
            except OSError as exc:  # a read, not the target: callers treat OSError as the target's
                item = RestoreError(f"{self.entry.path}: reading chunk {chunk[:16]}: {exc}")
                break
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
                item = exc
                break
            self.hasher.update(data)
            if not self._put(data):
                return
        self._put(item)

    def _put(self, item: bytes | Exception) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _next(self) -> bytes:
        if self._ended:
            return _END
        item = self._ready.get()
        if isinstance(item, Exception):
            self._ended = True
            raise item
        if not item:
            self._ended = True
        return item

    def read(self, size: int = -1) -> bytes:
        if 0 <= size <= len(self.buffer):  # the common case: one slice, one copy
            piece = self.buffer[:size]
            self.buffer = self.buffer[size:]
            return bytes(piece)
        out = bytearray()
        while size < 0 or len(out) < size:
            if not self.buffer:
                data = self._next()
                if not data:
                    break
                self.buffer = memoryview(data)
            take = len(self.buffer) if size < 0 else min(size - len(out), len(self.buffer))
            out += self.buffer[:take]
            self.buffer = self.buffer[take:]
        return bytes(out)

    def verify(self) -> None:
        for _ in iter(lambda: self.read(1 << 20), b""):
            pass  # a tar reader may stop before the end padding
        self._thread.join()
        if self.hasher.hexdigest() != self.entry.hash:
            raise DataLossError(f"{self.entry.path}: content hash differs from the one recorded at backup")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
