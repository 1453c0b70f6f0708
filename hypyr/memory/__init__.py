"""Guest physical memory: regions of anonymous host memory (:mod:`.region`), and the one access path to them.

Every read or write of guest memory made by the VMM or a device goes through
:class:`GuestMemory`, which checks the whole range (start *and* end) against the
regions on every call.  Nothing outside this package (and :mod:`hypyr.kvm`) sees a
host pointer.  Devices get views of exactly the driver's buffers (:meth:`GuestMemory.views`).
Rules for holding views, and the file I/O paths: docs/architecture.md, "Views and file I/O for devices".
"""

from __future__ import annotations

import bisect
import ctypes
import operator
import os
import struct
from array import array
from collections.abc import Iterable, Sequence
from typing import TypeVar

from hypyr.libc import IOV_MAX

from .iov import LANE_TOP, desc_lanes, iovec_struct, libc_preadv, libc_pwritev, libc_rw
from .region import (
    GuestAddress,
    GuestMemoryClosedError,
    GuestMemoryError,
    GuestRegion,
    address_space,
)

__all__ = ["GuestAddress", "GuestMemoryError", "GuestMemoryClosedError", "GuestRegion", "GuestMemory",
           "address_space"]

DIRTY_PAGE = 4096  # the granule of dirty tracking (KVM's dirty log's too)

_Struct = TypeVar("_Struct", bound=ctypes.Structure)

class GuestMemory:
    """All of a guest's RAM: a sorted list of non-overlapping regions."""

    def __init__(self, regions: Iterable[GuestRegion]):
        self.regions = sorted(regions, key=lambda r: r.start)
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.start:
                raise ValueError(f"guest regions overlap at {b.start:#x}")
        # For the lookups: region starts (for bisect) and (start, end, view) per region.
        self._starts = [int(r.start) for r in self.regions]
        self._spans = [(int(r.start), r.end, r._view) for r in self.regions]
        # Host address of each region's mapping, for preadv/pwritev (never leaves this module).
        self._hosts = [r.host_address() for r in self.regions]
        # preadv_descs/pwritev_descs: the high half of RAM's host addresses when the first region
        # starts at guest address 0 and has its guard (see GuestRegion); None: not available
        first = self.regions[0] if self.regions else None
        self._desc_hi = (self._hosts[0] >> 32 if first is not None and first.start == 0 and first.guarded
                         and libc_preadv is not None else None)
        self._desc_fill: dict[int, tuple[array, array]] = {}  # count -> (zeros, high halves)
        self._closed = False
        # live migration: per region one byte per page, 1 = written by the VMM (see start_dirty_tracking)
        self._dirty: list[bytearray] | None = None

    @classmethod
    def anonymous(cls, layout: Iterable[tuple[int, int]], *, hugepages: bool = True) -> GuestMemory:
        """Create memory from ``(start, size)`` pairs."""
        return cls(GuestRegion(start, size, hugepages=hugepages) for start, size in layout)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        return self.regions[-1].end if self.regions else 0

    def close(self) -> None:
        """Unmap guest RAM now (idempotent); any access afterwards raises
        :class:`GuestMemoryClosedError` (see the module docstring for views)."""
        self._closed = True
        self._spans = []      # every fast path now falls through to _walk()'s slow part, which refuses
        self._desc_hi = None  # preadv_descs/pwritev_descs decline
        for r in self.regions:
            r.close()

    # -- range checking ---------------------------------------------------------------------
    def _walk(self, addr: int, length: int) -> list[tuple[int, int, int]]:
        """The one walk under every single-range accessor: [addr, addr+length) as (region index,
        offset, length) pieces, or :class:`GuestMemoryError` if any byte is not RAM (nothing for
        length 0).  The usual case (one region, the range inside it) is one test."""
        spans = self._spans
        if len(spans) == 1:
            start, end, _ = spans[0]
            if start <= addr and length > 0 and addr + length <= end:
                return [(0, addr - start, length)]
        if self._closed:
            raise GuestMemoryClosedError(f"guest memory is closed (access at {addr:#x})")
        if length < 0:
            raise GuestMemoryError(f"negative length {length} at {addr:#x}")
        if addr < 0 or addr + length > 1 << 64:
            raise GuestMemoryError(f"range {addr:#x}+{length:#x} overflows the address space")
        if length == 0:
            return []
        i = bisect.bisect_right(self._starts, addr) - 1
        pos, left = addr, length
        pieces = []
        while left and 0 <= i < len(spans):
            start, end, _ = spans[i]
            if not start <= pos < end:
                break
            n = min(left, end - pos)
            pieces.append((i, pos - start, n))
            pos += n
            left -= n
            i += 1
        if left:
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not all RAM (stops at {pos:#x})")
        return pieces

    # -- scatter/gather -----------------------------------------------------------------------
    def view(self, addr: int, length: int) -> memoryview:
        """A writable view of exactly ``[addr, addr+length)``, which must lie in one region
        (:class:`GuestMemoryError` otherwise); the rules of :meth:`views` apply."""
        pieces = self._walk(addr, length)
        if len(pieces) != 1:
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not inside one RAM region")
        i, off, n = pieces[0]
        return self.regions[i].lend(off, n)

    def views(self, ranges: Iterable[tuple[int, int]]) -> list[memoryview]:
        """Writable views of exactly the bytes of ``ranges`` (``(addr, length)`` pairs), in order.

        Every range is checked in full first; if any byte of any range is outside guest RAM,
        :class:`GuestMemoryError` is raised and no view is returned.  A range crossing from one
        region into an adjacent one gives one view per region; zero-length ranges give none.
        See the module docstring for the rules that come with holding a view.
        """
        ranges = list(ranges)
        if not ranges:
            return []
        if self._dirty is not None:  # the holder may write through them
            self._mark_ranges(ranges)
        fast = self._all_in_one_region(ranges)
        if fast is not None:  # the common case: one region, every range inside it
            start, view = fast[0], fast[1]
            if start:
                return [view[a - start:a - start + n] for a, n in ranges]
            return [view[a:a + n] for a, n in ranges]
        out: list[memoryview] = []
        for addr, length in ranges:
            out.extend(self._views_slow(addr, length))
        return out

    def preadv(self, fd: int, ranges: Sequence[tuple[int, int]], offset: int) -> int:
        """One ``preadv(2)`` of file ``fd`` at ``offset`` straight into the guest ``ranges``
        (``(addr, length)`` pairs, at most :data:`IOV_MAX` of them); returns the bytes read (may be
        short; 0 at the end of the file).  Every range is checked in full first, exactly as in
        :meth:`views` (:class:`GuestMemoryError` and no I/O if any byte is outside guest RAM), and
        the mapping is kept alive for the call.  Raises :class:`OSError` on failure."""
        n = self._rw(libc_preadv, os.preadv, fd, ranges, offset)
        if self._dirty is not None:
            self._mark_ranges(ranges)
        return n

    def pwritev(self, fd: int, ranges: Sequence[tuple[int, int]], offset: int) -> int:
        """One ``pwritev(2)`` of the guest ``ranges`` to file ``fd`` at ``offset``; as :meth:`preadv`."""
        return self._rw(libc_pwritev, os.pwritev, fd, ranges, offset)

    def preadv_descs(self, fd: int, descs: array, first: int, count: int, offset: int) -> int | None:
        """``preadv`` into the buffers of ``count`` virtqueue descriptors from index ``first`` of
        ``descs`` (an ``array('I')`` of 16-byte descriptors as the driver wrote them: u64 address,
        u32 length, u16 flags, u16 next, little endian), without a Python object per buffer.

        Returns the bytes read, or None when this path does not apply (nothing done; use
        :meth:`preadv`): an address at or above 4 GiB, more than :data:`IOV_MAX` buffers, or guest
        RAM not laid out for it.  The caller must already have checked the buffers against guest
        RAM (the virtqueue does, when it pops the chain).  The iovecs are built by slice
        assignment: RAM's host address is a multiple of 4 GiB plus the guest address, so the
        host address of a buffer below 4 GiB is its guest address with the high half replaced.
        The containment does not depend on the caller: every iovec then lies within
        :data:`.region.GUARD_SPAN` bytes of the first region's RAM, all of which is either that RAM or
        its ``PROT_NONE`` guard, so a buffer that is not RAM makes the kernel fail the call
        (EFAULT, or a short count) and nothing outside guest RAM is ever read or written."""
        n = self._rw_descs(libc_preadv, fd, descs, first, count, offset)
        if n is not None and self._dirty is not None:
            self._mark_ranges([(descs[i] | descs[i + 1] << 32, descs[i + 2])
                               for i in range(4 * first, 4 * (first + count), 4)])
        return n

    def pwritev_descs(self, fd: int, descs: array, first: int, count: int, offset: int) -> int | None:
        """``pwritev`` from descriptor buffers; as :meth:`preadv_descs`."""
        return self._rw_descs(libc_pwritev, fd, descs, first, count, offset)

    def _rw_descs(self, fn, fd: int, descs: array, first: int, count: int, offset: int) -> int | None:
        hi, spans = self._desc_hi, self._spans  # one read each: close() may empty them meanwhile
        if hi is None or not spans or not 0 < count <= IOV_MAX or descs.itemsize != 4 or first < 0:
            return None
        iov = descs[4 * first:4 * (first + count)]
        if len(iov) != 4 * count:
            return None
        fill = self._desc_fill.get(count)
        if fill is None:
            if len(self._desc_fill) > 64:
                self._desc_fill.clear()
            fill = self._desc_fill[count] = (array("I", bytes(4 * count)), array("I", [hi]) * count)
        zeros, his = fill
        if iov[1::4] != zeros:
            return None                  # a buffer at or above 4 GiB
        iov[1::4] = his                  # u64 iov_base = host address of RAM + guest address
        iov[3::4] = zeros                # u64 iov_len = the u32 length (flags and next cleared)
        return libc_rw(fn, fd, iov.buffer_info()[0], count, offset, spans[0][2])

    def _rw(self, fn, fallback, fd: int, ranges: Sequence[tuple[int, int]], offset: int) -> int:
        if not ranges:
            return 0
        if len(ranges) > IOV_MAX:
            raise ValueError(f"{len(ranges)} ranges in one call, more than {IOV_MAX}")
        fast = self._all_in_one_region(ranges) if fn is not None else None
        if fast is None:  # several regions, empty ranges, a bad range or no libc: checked views
            views = self.views(ranges)  # raises GuestMemoryError for any bad byte
            if len(views) > IOV_MAX:
                views = views[:IOV_MAX]
            return fallback(fd, views, offset) if views else 0
        start, view, addrs, lengths = fast
        n = len(addrs)
        flat = [0] * (2 * n)
        delta = self._hosts[0] - start
        flat[0::2] = map(delta.__add__, addrs)
        flat[1::2] = lengths
        return libc_rw(fn, fd, iovec_struct(n).pack(*flat), n, offset, view)

    def _views_slow(self, addr: int, length: int) -> list[memoryview]:
        spans = self._spans
        return [spans[i][2][off:off + n] for i, off, n in self._walk(addr, length)]

    def check_range(self, addr: int, length: int) -> bool:
        try:
            self._walk(addr, length)
            return True
        except GuestMemoryError:
            return False

    def first_outside(self, ranges: Iterable[tuple[int, int]]) -> tuple[int, int] | None:
        """The first ``(addr, length)`` of ``ranges`` that is not wholly guest RAM, or None if all
        are (``check_range`` for many ranges at once)."""
        ranges = list(ranges)
        if not ranges or self._all_in_one_region(ranges) is not None:
            return None
        for addr, length in ranges:
            if not self.check_range(addr, length):
                return addr, length
        return None

    def descs_inside(self, table: bytes) -> bool:
        """Check the buffers of a virtqueue descriptor table at once: ``table`` holds 16-byte
        descriptors (u64 address, u32 length, u16 flags, u16 next).  True if every buffer
        ``[address, address + length)`` lies wholly in guest RAM (an empty one: its address in
        [start, end] of RAM); False if one does not, or RAM is not one region, or the table is
        empty (then check them one by one).  Loops only in C, and makes no Python object per
        descriptor (see :func:`desc_lanes`)."""
        count = len(table) >> 4
        spans = self._spans
        if len(spans) != 1 or not count or len(table) & 15:
            return False
        start, end, _ = spans[0]
        one, addr_mask, len_mask, low_bias, high_bias, top = desc_lanes(count, start, end)
        t = int.from_bytes(table, "little")
        addrs = t & addr_mask
        if (addrs + ((t & len_mask) >> 64) + high_bias) & top:  # some address + length > end
            return False
        return not start or (addrs + low_bias) & top == one << LANE_TOP  # every address >= start

    def _all_in_one_region(self, ranges: Sequence[tuple[int, int]]) -> tuple[int, memoryview, tuple, tuple] | None:
        """Fast path (loops in C): if every range is non-empty and inside the first region while
        that is the only one, return (region start, region view, addrs, lengths); else None."""
        spans = self._spans
        if len(spans) != 1:
            return None
        start, end, view = spans[0]
        addrs, lengths = zip(*ranges)
        if min(addrs) >= start and min(lengths) > 0 and max(map(operator.add, addrs, lengths)) <= end:
            return start, view, addrs, lengths
        return None

    # -- bytes ------------------------------------------------------------------------------
    def read(self, addr: int, length: int) -> bytes:
        spans = self._spans
        if len(spans) == 1:  # _walk's usual case inlined: ~5% of a virtio-blk request (bench/blk_micro.py)
            start, end, view = spans[0]
            if start <= addr and length > 0 and addr + length <= end:
                return view[addr - start:addr - start + length].tobytes()
        return b"".join(spans[i][2][off:off + n].tobytes() for i, off, n in self._walk(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        spans = self._spans
        n = len(data)
        if len(spans) == 1 and n:  # _walk's usual case inlined, as in read()
            start, end, view = spans[0]
            if start <= addr and addr + n <= end:
                view[addr - start:addr - start + n] = data
                if self._dirty is not None:
                    self._mark(addr, n)
                return
        pieces = self._walk(addr, n)  # the whole range is checked before any of it is written
        pos = 0
        for i, off, k in pieces:
            spans[i][2][off:off + k] = data[pos:pos + k]
            pos += k
        if self._dirty is not None:
            self._mark(addr, n)

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        pieces = self._walk(addr, length)
        spans = self._spans
        for i, off, n in pieces:
            spans[i][2][off:off + n] = bytes([value]) * n
        if self._dirty is not None:
            self._mark(addr, length)

    # -- dirty tracking (live migration) ------------------------------------------------------
    # KVM logs the pages the guest writes; the pages the VMM writes itself (virtio used rings,
    # disk reads, received frames) it cannot see.  While tracking is on, every write path here
    # marks its pages after writing, and take_dirty() adds the pages under lent views (the
    # rings, written through the view).  Off, it costs each write one attribute test.
    @property
    def dirty_tracking(self) -> bool:
        return self._dirty is not None

    def start_dirty_tracking(self) -> None:
        """Record from now on which pages the VMM writes (each region's pages all clean)."""
        self._dirty = [bytearray(r.size // DIRTY_PAGE) for r in self.regions]

    def stop_dirty_tracking(self) -> None:
        self._dirty = None

    def take_dirty(self) -> list[list[int]]:
        """Per region, the sorted indices of the 4 KiB pages the VMM wrote since tracking started
        or the last call, and of every page under a view lent by :meth:`view` (a ring the VMM
        writes through it).  A page written while this runs is reported now or next time."""
        dirty = self._dirty
        if dirty is None:
            raise RuntimeError("dirty tracking is off")
        out = []
        for region, marks in zip(self.regions, dirty):
            pages = []
            find = marks.find
            j = find(1)
            while j >= 0:
                marks[j] = 0  # only what was seen: a mark set meanwhile stays for the next call
                pages.append(j)
                j = find(1, j + 1)
            for off, n in region.lent_ranges():
                if n > 0:
                    pages.extend(range(off // DIRTY_PAGE, (off + n - 1) // DIRTY_PAGE + 1))
            out.append(sorted(set(pages)))
        return out

    def _mark(self, addr: int, length: int) -> None:
        dirty = self._dirty
        if dirty is None or length <= 0:
            return
        for i, off, n in self._walk(addr, length):
            first, last = off // DIRTY_PAGE, (off + n - 1) // DIRTY_PAGE
            if first == last:
                dirty[i][first] = 1
            else:
                dirty[i][first:last + 1] = b"\x01" * (last - first + 1)

    def _mark_ranges(self, ranges: Iterable[tuple[int, int]]) -> None:
        for addr, length in ranges:
            try:
                self._mark(addr, length)
            except GuestMemoryError:
                pass  # not RAM: nothing was written there

    # -- integers (little endian) -----------------------------------------------------------
    def read_u8(self, addr: int) -> int:
        return self.read(addr, 1)[0]

    def read_u16(self, addr: int) -> int:
        return struct.unpack("<H", self.read(addr, 2))[0]

    def read_u32(self, addr: int) -> int:
        return struct.unpack("<I", self.read(addr, 4))[0]

    def read_u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def write_u8(self, addr: int, v: int) -> None:
        self.write(addr, struct.pack("<B", v))

    def write_u16(self, addr: int, v: int) -> None:
        self.write(addr, struct.pack("<H", v))

    def write_u32(self, addr: int, v: int) -> None:
        self.write(addr, struct.pack("<I", v))

    def write_u64(self, addr: int, v: int) -> None:
        self.write(addr, struct.pack("<Q", v))

    # -- plain-data objects (ctypes Structures) -----------------------------------------------
    def read_obj(self, addr: int, ctype: type[_Struct]) -> _Struct:
        return ctype.from_buffer_copy(self.read(addr, ctypes.sizeof(ctype)))

    def write_obj(self, addr: int, obj: ctypes.Structure | ctypes.Array) -> None:
        self.write(addr, bytes(obj))

