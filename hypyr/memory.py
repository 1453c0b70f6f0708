"""Guest physical memory: regions of anonymous host memory, and the one access path to them.

Every read or write of guest memory made by the VMM or a device goes through
:class:`GuestMemory`, which checks the whole range (start *and* end) against the
regions on every call.  Nothing outside this module (and :mod:`hypyr.kvm`) sees a
host pointer.

Scatter/gather for devices: :meth:`GuestMemory.views` turns a list of guest ranges (a driver's
buffers) into writable :class:`memoryview` objects covering *exactly* those bytes, split where a
range crosses from one region into the next, after checking every range in full (a range with
any byte outside RAM raises :class:`GuestMemoryError` and no view is returned).  This is the
equivalent of vm-memory's ``VolatileSlice``: a device gets views of the buffers the driver gave
it, never the whole mapping, and can hand them straight to ``os.preadv``/``os.pwritev``.  The
rules for holders of such views:

* a view is only as trustworthy as the range it was made from: obtain views from ranges the
  driver handed over (and that the device is allowed to access in that direction), never from
  an address computed outside the checked range;
* guest memory is shared with the running guest: its contents can change under the view at any
  time (read a value once, copy it if it must stay stable);
* views keep the mapping alive: while one exists, :meth:`GuestRegion.close` cannot unmap the
  region (the mapping then lives until the process exits), so a late access through a view can
  only ever touch that guest's RAM, never freed host memory.  Drop views when the I/O is done.

For file I/O without any per-buffer view, :meth:`GuestMemory.preadv`/:meth:`~GuestMemory.pwritev`
(ranges as pairs) and ``preadv_cols``/``pwritev_cols`` (ranges as two columns) check every range
in full the same way, then call libc ``preadv``/``pwritev`` with an iovec array built here from
the region's host address (which never leaves this module), holding a view of the region for the
duration of the call so the mapping cannot be unmapped under the kernel.  Ranges spanning
several regions (or a libc without the functions) fall back to :meth:`views` and ``os.preadv``.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import operator
import struct
from dataclasses import dataclass
import functools
import os
from typing import Iterable, Iterator, Sequence

__all__ = ["GuestAddress", "GuestMemoryError", "GuestRegion", "GuestMemory"]

IOV_MAX = 1024  # Linux UIO_MAXIOV: at most this many buffers per preadv/pwritev


def _load_libc_rw():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fns = libc.preadv, libc.pwritev
    except (OSError, AttributeError):
        return None, None
    for fn in fns:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int64]
        fn.restype = ctypes.c_ssize_t
    return fns


_libc_preadv, _libc_pwritev = _load_libc_rw()


@functools.lru_cache(maxsize=64)
def _iovec_struct(count: int) -> struct.Struct:
    """struct iovec[count] (void *iov_base; size_t iov_len) in native layout."""
    return struct.Struct("@" + "PN" * count)


_MADV_HUGEPAGE = 14
_MADV_DONTDUMP = 16


class GuestAddress(int):
    """A guest-physical address.  Arithmetic with ints keeps the type."""

    __slots__ = ()

    def __new__(cls, value: int) -> "GuestAddress":
        if value < 0 or value >= 1 << 64:
            raise GuestMemoryError(f"guest address {value:#x} out of range")
        return super().__new__(cls, value)

    def __add__(self, other: int) -> "GuestAddress":  # type: ignore[override]
        return GuestAddress(int(self) + int(other))

    __radd__ = __add__

    def __sub__(self, other: int) -> "GuestAddress":  # type: ignore[override]
        return GuestAddress(int(self) - int(other))

    def __repr__(self) -> str:
        return f"GuestAddress({int(self):#x})"


class GuestMemoryError(Exception):
    """A guest-physical access that falls (partly) outside guest RAM."""


class GuestRegion:
    """One contiguous range of guest RAM backed by an anonymous host mapping."""

    def __init__(self, start: int, size: int, *, hugepages: bool = True):
        if size <= 0 or size % mmap.PAGESIZE or start % mmap.PAGESIZE:
            raise ValueError("guest regions must be page-aligned and non-empty")
        self.start = GuestAddress(start)
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0),
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if hugepages and hasattr(self._map, "madvise"):
            try:
                self._map.madvise(_MADV_HUGEPAGE)
            except OSError:
                pass  # THP disabled on this host: fine, just slower
        self._view = memoryview(self._map)

    @property
    def end(self) -> int:
        """One past the last byte: a plain int, since it may be 2**64 (not a GuestAddress)."""
        return int(self.start) + self.size

    def host_address(self) -> int:
        """Host virtual address of the mapping (for KVM memslots only)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.start <= addr and addr + length <= self.end

    def close(self) -> None:
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a ctypes view still exists; the mapping dies with the process


@dataclass(frozen=True)
class _Chunk:
    region: GuestRegion
    offset: int
    length: int


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

    @classmethod
    def anonymous(cls, layout: Iterable[tuple[int, int]], *, hugepages: bool = True) -> "GuestMemory":
        """Create memory from ``(start, size)`` pairs."""
        return cls(GuestRegion(start, size, hugepages=hugepages) for start, size in layout)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        return self.regions[-1].end if self.regions else 0

    def close(self) -> None:
        for r in self.regions:
            r.close()

    # -- range checking ---------------------------------------------------------------------
    def _pieces(self, addr: int, length: int) -> list[tuple[int, int, int]]:
        """Split [addr, addr+length) into (region index, offset, length) or raise if any byte is not RAM."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length} at {addr:#x}")
        if addr < 0 or addr + length > 1 << 64:
            raise GuestMemoryError(f"range {addr:#x}+{length:#x} overflows the address space")
        if length == 0:
            return []
        spans = self._spans
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

    def _chunks(self, addr: int, length: int) -> Iterator[_Chunk]:
        """Split [addr, addr+length) into per-region pieces or raise if any byte is not RAM."""
        regions = self.regions
        return iter([_Chunk(regions[i], off, n) for i, off, n in self._pieces(addr, length)])

    # -- scatter/gather -----------------------------------------------------------------------
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
        return self._rw(_libc_preadv, os.preadv, fd, ranges, offset)

    def pwritev(self, fd: int, ranges: Sequence[tuple[int, int]], offset: int) -> int:
        """One ``pwritev(2)`` of the guest ``ranges`` to file ``fd`` at ``offset``; as :meth:`preadv`."""
        return self._rw(_libc_pwritev, os.pwritev, fd, ranges, offset)

    def preadv_cols(self, fd: int, addrs: Sequence[int], lengths: Sequence[int], offset: int) -> int:
        """:meth:`preadv` with the ranges as two columns (``addrs[i], lengths[i]``), same checks."""
        return self._rw_cols(_libc_preadv, os.preadv, fd, addrs, lengths, offset)

    def pwritev_cols(self, fd: int, addrs: Sequence[int], lengths: Sequence[int], offset: int) -> int:
        """:meth:`pwritev` with the ranges as two columns, same checks."""
        return self._rw_cols(_libc_pwritev, os.pwritev, fd, addrs, lengths, offset)

    def _rw(self, fn, fallback, fd: int, ranges: Sequence[tuple[int, int]], offset: int) -> int:
        if not ranges:
            return 0
        addrs, lengths = zip(*ranges)
        return self._rw_cols(fn, fallback, fd, addrs, lengths, offset)

    def _rw_cols(self, fn, fallback, fd: int, addrs: Sequence[int], lengths: Sequence[int], offset: int) -> int:
        n = len(addrs)
        if n != len(lengths):
            raise ValueError("addrs and lengths differ in length")
        if not n:
            return 0
        if n > IOV_MAX:
            raise ValueError(f"{n} ranges in one call, more than {IOV_MAX}")
        spans = self._spans
        if len(spans) == 1 and fn is not None:
            start, end, view = spans[0]
            # every range non-empty and wholly inside the one region (loops in C)
            if not (min(addrs) >= start and min(lengths) > 0 and max(map(operator.add, addrs, lengths)) <= end):
                view = None
        else:
            view = None
        if view is None:  # several regions, empty ranges, a bad range or no libc: checked views
            views = self.views(zip(addrs, lengths))  # raises GuestMemoryError for any bad byte
            if len(views) > IOV_MAX:
                views = views[:IOV_MAX]
            return fallback(fd, views, offset) if views else 0
        # A view of the region held across the call: while it exists GuestRegion.close() cannot
        # unmap the region, so the kernel only ever touches this guest's (still mapped) RAM.
        keep = view[0:len(view)]
        try:
            flat = [0] * (2 * n)
            delta = self._hosts[0] - start
            flat[0::2] = map(delta.__add__, addrs)
            flat[1::2] = lengths
            r = fn(fd, _iovec_struct(n).pack(*flat), n, offset)
            if r < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return r
        finally:
            keep.release()

    def _views_slow(self, addr: int, length: int) -> list[memoryview]:
        spans = self._spans
        return [spans[i][2][off:off + n] for i, off, n in self._pieces(addr, length)]

    def check_range(self, addr: int, length: int) -> bool:
        try:
            self._pieces(addr, length)
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

    def all_inside(self, addrs: Sequence[int], lengths: Sequence[int]) -> bool:
        """Whether every range ``(addrs[i], lengths[i])`` is wholly guest RAM (the two sequences
        have the same length; loops in C when there is one region)."""
        spans = self._spans
        if len(spans) == 1 and addrs:
            start, end, _ = spans[0]
            if min(addrs) >= start and min(lengths) >= 0:
                if max(addrs) + max(lengths) <= end or max(map(operator.add, addrs, lengths)) <= end:
                    return True
        return all(map(self.check_range, addrs, lengths))

    def _all_in_one_region(self, ranges: list[tuple[int, int]]) -> tuple[int, memoryview, tuple, tuple] | None:
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
        if len(spans) == 1:  # fast path: one region, the range inside it
            start, end, view = spans[0]
            if start <= addr and 0 <= length and addr + length <= end:
                return view[addr - start:addr - start + length].tobytes()
        pieces = self._pieces(addr, length)
        if len(pieces) == 1:
            i, off, n = pieces[0]
            return spans[i][2][off:off + n].tobytes()
        return b"".join(spans[i][2][off:off + n].tobytes() for i, off, n in pieces)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        spans = self._spans
        if len(spans) == 1:  # fast path: one region, the range inside it
            start, end, view = spans[0]
            if start <= addr and addr + len(data) <= end:
                view[addr - start:addr - start + len(data)] = data
                return
        pieces = self._pieces(addr, len(data))  # check the whole range before writing any of it
        pos = 0
        for i, off, n in pieces:
            spans[i][2][off:off + n] = data[pos:pos + n]
            pos += n

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        pieces = self._pieces(addr, length)
        spans = self._spans
        for i, off, n in pieces:
            spans[i][2][off:off + n] = bytes([value]) * n

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
    def read_obj(self, addr: int, ctype: type) -> ctypes.Structure:
        return ctype.from_buffer_copy(self.read(addr, ctypes.sizeof(ctype)))

    def write_obj(self, addr: int, obj: ctypes.Structure | ctypes.Array) -> None:
        self.write(addr, bytes(obj))
