"""k-of-n erasure coding of packs with zfec (Reed-Solomon over GF(2^8)).

zfec is systematic: the first k blocks ("primary") are the pack itself cut
into k equal pieces (the last one zero-padded), and blocks k..n-1 are parity.
Any k distinct blocks rebuild the pack.  We ask zfec only for the parity
blocks and hand it zero-copy slices of the pack, which is about twice as fast
as ``easyfec`` on this hardware; decoding from the primary blocks alone needs no
work at all (the blocks are the pack), so readers prefer them when they are
as fast.

The padding length is not stored: it follows from the pack length, which the
shard header carries.
"""

from __future__ import annotations

import zfec


def block_size(pack_length: int, k: int) -> int:
    return max(1, -(-pack_length // k))


def encode(data: bytes, k: int, n: int, wanted: list[int] | None = None) -> dict[int, bytes | memoryview]:
    """Return blocks ``wanted`` (default all n) of ``data``, keyed by number."""
    if not 1 <= k <= n <= 256:
        raise ValueError(f"need 1 <= k <= n <= 256, got k={k} n={n}")
    wanted = list(range(n)) if wanted is None else wanted
    size = block_size(len(data), k)
    view = memoryview(data)
    primary: list[bytes | memoryview] = [view[i * size : (i + 1) * size] for i in range(k)]
    if len(primary[-1]) < size or len(data) < size * k:
        # Only the tail pieces are short; pad copies of those alone.
        primary = [bytes(p) + b"\0" * (size - len(p)) if len(p) < size else p for p in primary]
    blocks: dict[int, bytes | memoryview] = {i: primary[i] for i in wanted if i < k}
    parity = [i for i in wanted if i >= k]
    if parity:
        for num, block in zip(parity, zfec.Encoder(k, n).encode(primary, parity), strict=True):
            blocks[num] = block
    return blocks


class DecodedPack:
    """A decoded pack kept as its k primary blocks, never joined.

    Joining would copy the whole pack into fresh memory (tens of MiB, and a
    page fault per 4 KiB); a blob is almost always inside one block, so
    :meth:`view` returns a zero-copy slice and copies only the few blobs that
    straddle two blocks.
    """

    def __init__(self, blocks: list[bytes | memoryview], length: int) -> None:
        self.blocks = [memoryview(b) for b in blocks]
        self.block_size = len(self.blocks[0])
        self.length = length

    def __len__(self) -> int:
        return self.length

    def view(self, offset: int, length: int) -> memoryview | bytes:
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"bytes {offset}..{offset + length} are outside the pack of {self.length}")
        index, start = divmod(offset, self.block_size)
        if start + length <= self.block_size:
            return self.blocks[index][start : start + length]
        parts = []
        while length:
            take = min(length, self.block_size - start)
            parts.append(self.blocks[index][start : start + take])
            length -= take
            index, start = index + 1, 0
        return b"".join(parts)

    def tobytes(self) -> bytes:
        return bytes(self.view(0, self.length))


def decode(blocks: dict[int, bytes | memoryview], k: int, n: int, pack_length: int) -> DecodedPack:
    """Rebuild the pack from any k blocks (a dict number -> block)."""
    if len(blocks) < k:
        raise ValueError(f"need {k} blocks, got {len(blocks)}")
    nums = sorted(blocks)[:k]
    if nums == list(range(k)):
        return DecodedPack([blocks[i] for i in nums], pack_length)
    # zfec wants the primary blocks it has first, at their own positions.
    ordered = sorted(nums, key=lambda i: (i >= k, i))
    return DecodedPack(zfec.Decoder(k, n).decode([blocks[i] for i in ordered], ordered), pack_length)
