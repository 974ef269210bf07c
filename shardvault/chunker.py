"""Content-defined chunking (FastCDC) over streams, with bounded memory.

fastcdc's compiled chunker works on a buffer.  We feed it a window of the
stream and keep only the chunks whose end is decided by the data inside the
window: a cut found before the window's end (or a chunk of maximum size that
fits in it) is where the whole-stream chunker would cut too, because FastCDC
looks only at bytes since the previous cut.  The undecided tail is carried to
the next window.  So boundaries, and therefore deduplication, do not depend
on the window size; ``tests/test_chunker.py`` checks this.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from fastcdc.fastcdc_cy import fastcdc_cy  # the compiled chunker; the pure-Python one is ~100x slower


class Readable(Protocol):
    """What the chunker reads from: files, pipes, spooled files, wrappers."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Chunker:
    def __init__(self, min_size: int, avg_size: int, max_size: int, window: int = 16 << 20) -> None:
        self.min_size = min_size
        self.avg_size = avg_size
        self.max_size = max_size
        self.window = max(window, 2 * max_size)

    def cuts(self, data: bytes | memoryview) -> Iterator[tuple[int, int]]:
        """(offset, length) of each chunk of a whole buffer."""
        if not len(data):
            return
        for chunk in fastcdc_cy(data, self.min_size, self.avg_size, self.max_size):
            yield chunk.offset, chunk.length

    def chunks(self, stream: Readable, size_hint: int | None = None) -> Iterator[bytes]:
        """Yield the chunks of a stream, as the whole-buffer chunker would cut it.

        ``size_hint`` (a file's size) sizes the buffer for a file smaller than
        the window: allocating and zeroing 16 MiB for every 300 KiB file was
        most of the chunker's cost on a tree of small files.  A stream longer
        than its hint grows the buffer to the full window before any cut is
        decided, so the boundaries never depend on the hint.
        """
        size = self.window if size_hint is None else min(self.window, size_hint + 1)
        buf = bytearray(size)
        view = memoryview(buf)
        filled = 0
        eof = False
        while True:
            while not eof and filled < self.window:  # read straight into the window
                if filled == len(buf):  # longer than its hint: the full window after all (before any cut)
                    view.release()
                    buf.extend(bytes(self.window - len(buf)))
                    view = memoryview(buf)
                n = stream.readinto(view[filled:])
                if not n:
                    eof = True
                else:
                    filled += n
            if not filled:
                return
            data = view[:filled]
            consumed = 0
            for offset, length in self.cuts(data):
                end = offset + length
                if end == filled and not eof:
                    break  # undecided: more data could move this cut
                yield bytes(data[offset:end])
                consumed = end
            if eof:
                return
            # Keep the undecided tail (at most max_size) at the front of the window.
            buf[: filled - consumed] = buf[consumed:filled]
            filled -= consumed
