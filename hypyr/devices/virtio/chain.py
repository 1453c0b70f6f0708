"""A descriptor chain: what the split virtqueue hands a device for one request.

:class:`DescriptorChain` is the record :mod:`.queue` builds from a checked chain: its buffers,
as (address, length) lists and as a descriptor table, and the helpers devices move data with
(byte ranges, gather, scatter).  With it: the descriptor flags (virtio 1.2 §2.7) and the
errors a driver's violation raises (:class:`QueueError`, a :class:`DeviceError`).
"""

from __future__ import annotations

from array import array

from hypyr.memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4


class DeviceError(Exception):
    """The driver broke the protocol (bad descriptor, bad length...); the device needs a reset."""


class QueueError(DeviceError):
    """The driver broke the virtqueue protocol."""


class DescriptorChain:
    """One request: device-readable buffers, then device-writable ones.  Every chain has them
    both ways, each made from the other on first use: as (address, length) lists
    (:attr:`readable`, :attr:`writable`; empty buffers left out) and as a descriptor table
    (:attr:`table`, an ``array('I')`` of four words per descriptor: address low and high,
    length, flags | next << 16, the first :attr:`nread` readable).  The queue builds the one
    the driver's layout gives cheaply (an indirect table: the table).  Both are the queue's
    checked copies, which the guest cannot change; do not change them."""

    __slots__ = ("head", "_table", "_nread", "_readable", "_writable", "_readable_len", "_writable_len")

    def __init__(self, head: int, readable: list[tuple[int, int]] | None = None,
                 writable: list[tuple[int, int]] | None = None,
                 readable_len: int | None = None, writable_len: int | None = None, *,
                 table: array | None = None, nread: int = 0):
        if table is None:
            readable = [] if readable is None else readable
            writable = [] if writable is None else writable
        self.head = head
        self._table = table
        self._nread = nread
        self._readable = readable
        self._writable = writable
        self._readable_len = readable_len
        self._writable_len = writable_len

    @property
    def table(self) -> array:
        t = self._table
        if t is None:
            readable, writable = self._readable, self._writable
            assert readable is not None and writable is not None  # a chain without a table has both
            t = self._table = array("I")
            for bufs, flags in ((readable, VIRTQ_DESC_F_NEXT), (writable, VIRTQ_DESC_F_WRITE)):
                for addr, n in bufs:
                    t.extend((addr & 0xFFFFFFFF, addr >> 32, n, flags))
            self._nread = len(readable)
        return t

    @property
    def nread(self) -> int:
        """How many of :attr:`table`'s descriptors are device-readable (they come first)."""
        return self._nread if self._table is not None else len(self.readable)

    def _buffers(self, lo: int, hi: int) -> list[tuple[int, int]]:
        t = self.table
        return [(t[i] | t[i + 1] << 32, t[i + 2]) for i in range(4 * lo, 4 * hi, 4) if t[i + 2]]

    def table_buffer(self, index: int) -> tuple[int, int]:
        """(address, length) of descriptor ``index`` (negative: from the end) of :attr:`table`."""
        t, i = self.table, 4 * index
        return t[i] | t[i + 1] << 32, t[i + 2]

    @property
    def readable(self) -> list[tuple[int, int]]:
        if self._readable is None:
            self._readable = self._buffers(0, self._nread)
        return self._readable

    @property
    def writable(self) -> list[tuple[int, int]]:
        if self._writable is None:
            self._writable = self._buffers(self._nread, len(self.table) >> 2)
        return self._writable

    @property
    def readable_len(self) -> int:
        n = self._readable_len
        if n is None:
            n = self._readable_len = sum(n for _, n in self.readable)
        return n

    @property
    def writable_len(self) -> int:
        n = self._writable_len
        if n is None:
            n = self._writable_len = sum(n for _, n in self.writable)
        return n

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"

    @staticmethod
    def _slice(bufs: list[tuple[int, int]], total: int, offset: int, length: int) -> list[tuple[int, int]]:
        """The (addr, len) pieces of bytes [offset, offset+length) of ``bufs`` (whose lengths add up
        to ``total``; the range is already checked).  Whole buffers in the middle are taken as one
        list slice: only the ends are looked at one by one."""
        if length <= 0:
            return []
        i = 0
        while offset >= bufs[i][1]:  # skip the buffers wholly before offset
            offset -= bufs[i][1]
            total -= bufs[i][1]
            i += 1
        excess = total - offset - length  # bytes after the range, in bufs[i:]
        j = len(bufs)
        while excess >= bufs[j - 1][1]:  # drop the buffers wholly after it
            excess -= bufs[j - 1][1]
            j -= 1
        out = bufs[i:j]
        if offset:
            addr, n = out[0]
            out[0] = (addr + offset, n - offset)
        if excess:
            addr, n = out[-1]
            out[-1] = (addr, n - excess)
        return out

    def readable_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """Guest ranges of ``length`` bytes (default: the rest) of the readable buffers from ``offset``."""
        total = self.readable_len
        if length is None:
            length = total - offset
        if offset < 0 or length < 0 or offset + length > total:
            raise QueueError(f"read of {length} bytes at {offset} from a chain with {total} readable bytes")
        return self._slice(self.readable, total, offset, length)

    def writable_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """Guest ranges of ``length`` bytes (default: the rest) of the writable buffers from ``offset``."""
        total = self.writable_len
        if length is None:
            length = total - offset
        if offset < 0 or length < 0 or offset + length > total:
            raise QueueError(f"write of {length} bytes at {offset} into a chain with {total} writable bytes")
        return self._slice(self.writable, total, offset, length)

    def read(self, mem: GuestMemory, length: int | None = None, offset: int = 0) -> bytes:
        """Gather ``length`` bytes (default: all) of the readable buffers from ``offset``."""
        ranges = self.readable_ranges(offset, length)
        if len(ranges) == 1:
            return mem.read(*ranges[0])
        return b"".join(mem.read(a, n) for a, n in ranges)

    def write(self, mem: GuestMemory, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers starting at byte ``offset`` of them."""
        if offset < 0 or offset + len(data) > self.writable_len:
            raise QueueError(f"write of {len(data)} bytes at {offset} into a chain with "
                             f"{self.writable_len} writable bytes")
        view = memoryview(data)
        pos = 0
        for addr, n in self._slice(self.writable, self.writable_len, offset, len(data)):
            mem.write(addr, view[pos:pos + n])
            pos += n
        return len(data)
