"""Guest RAM regions: anonymous host memory placed so that a host address is the guest
address plus a multiple of 4 GiB, with a ``PROT_NONE`` guard after the RAM
(:class:`GuestRegion`), and the guest address type and errors of :mod:`hypyr.memory`."""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import threading

from hypyr.libc import optional_function

log = logging.getLogger("hypyr.memory")

_MADV_HUGEPAGE = 14
_MADV_DONTDUMP = 16

HOST_ALIGN = 1 << 32      # host address = guest address + a multiple of this (see GuestRegion)
GUARD_SPAN = 2 << 32      # address space owned by a region from its first byte (RAM, then guard)
_PROT_NONE = 0
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python < 3.13 lacks the constant (Linux value)


def _buffer_address(obj) -> int:
    """Host address of a writable buffer (the ctypes export is dropped at once)."""
    c = ctypes.c_char.from_buffer(obj)
    try:
        return ctypes.addressof(c)
    finally:
        del c


_libc_mprotect = optional_function("mprotect", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])


def _mprotect_none(addr: int, length: int) -> bool:
    if length == 0:
        return True
    return _libc_mprotect is not None and _libc_mprotect(addr, length, _PROT_NONE) == 0


class GuestAddress(int):
    """A guest-physical address.  Arithmetic with ints keeps the type."""

    __slots__ = ()

    def __new__(cls, value: int) -> GuestAddress:
        if value < 0 or value >= 1 << 64:
            raise GuestMemoryError(f"guest address {value:#x} out of range")
        return super().__new__(cls, value)

    def __add__(self, other: int) -> GuestAddress:
        return GuestAddress(int(self) + int(other))

    __radd__ = __add__

    def __sub__(self, other: int) -> GuestAddress:
        return GuestAddress(int(self) - int(other))

    def __repr__(self) -> str:
        return f"GuestAddress({int(self):#x})"


class GuestMemoryError(Exception):
    """A guest-physical access that falls (partly) outside guest RAM."""


class GuestMemoryClosedError(GuestMemoryError):
    """An access to guest memory after :meth:`GuestMemory.close`."""


def _held_elsewhere(lent: list[tuple[memoryview, int, int]]) -> list[tuple[memoryview, int, int]]:
    """The ``(view, offset, length)`` entries whose view someone besides ``lent`` still
    references (CPython reference counts: a view referenced only by its entry has two here,
    counting the argument)."""
    return [e for e in lent if sys.getrefcount(e[0]) > 2]


def address_space(ram_bytes: int, regions: int = 2) -> int:
    """Address space the guest RAM of ``ram_bytes`` in at most ``regions`` regions reserves
    (each region: HOST_ALIGN + max(its size, GUARD_SPAN); see GuestRegion), for RLIMIT_AS."""
    return ram_bytes + regions * (HOST_ALIGN + GUARD_SPAN)


class GuestRegion:
    """One contiguous range of guest RAM backed by an anonymous host mapping.

    The mapping sits inside a larger reservation (address space only: ``MAP_NORESERVE``, the
    rest ``PROT_NONE``) placed so that the host address of every guest byte is its guest address
    plus a multiple of 4 GiB (:data:`HOST_ALIGN`), and so that the :data:`GUARD_SPAN` bytes of
    address space from the start of the RAM belong to this reservation: whatever of them is
    not RAM is inaccessible.  :meth:`GuestMemory.preadv_descs` builds its iovecs on that (see
    there)."""

    def __init__(self, start: int, size: int, *, hugepages: bool = True):
        if size <= 0 or size % mmap.PAGESIZE or start % mmap.PAGESIZE:
            raise ValueError("guest regions must be page-aligned and non-empty")
        self.start = GuestAddress(start)
        self.size = size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        reserve = HOST_ALIGN + max(size, GUARD_SPAN)
        self._map: mmap.mmap | None
        try:
            self._map = mmap.mmap(-1, reserve, flags=flags, prot=prot)
        except OSError:  # e.g. strict overcommit (vm.overcommit_memory=2): RAM only, no guard
            log.warning("guest RAM at %#x: no address space for its %d GiB reservation (RLIMIT_AS or strict "
                        "overcommit): block and network I/O take the slower path", start, reserve >> 30)
            self._map = mmap.mmap(-1, size, flags=flags, prot=prot)
            reserve = size
        base = _buffer_address(self._map)
        off = (int(start) - base) % HOST_ALIGN if reserve > size else 0
        self._host = base + off
        # the reservation around the RAM: inaccessible (a stray access faults instead of landing)
        self.guarded = (reserve > size and _mprotect_none(base, off)
                        and _mprotect_none(self._host + size, reserve - off - size))
        if hugepages and hasattr(self._map, "madvise"):
            try:
                self._map.madvise(_MADV_HUGEPAGE, off, size)
            except OSError:
                pass  # THP disabled on this host: fine, just slower
        self._off = off
        self._view = memoryview(self._map)[off:off + size]
        self._lent: list[tuple[memoryview, int, int]] = []  # (view, offset, length) from lend(), released by close()
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        """One past the last byte: a plain int, since it may be 2**64 (not a GuestAddress)."""
        return int(self.start) + self.size

    def host_address(self) -> int:
        """Host virtual address of the RAM (for KVM memslots only)."""
        return self._host

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.start <= addr and addr + length <= self.end

    def lend(self, offset: int, length: int) -> memoryview:
        """A view of ``length`` bytes at ``offset`` into the RAM, released by :meth:`close`."""
        with self._lock:
            if self._map is None:
                raise GuestMemoryClosedError("guest memory is closed")
            self._lent = _held_elsewhere(self._lent)  # forget dropped views: the list stays short
            view = self._view[offset:offset + length]
            self._lent.append((view, offset, length))
            return view

    def lent_ranges(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every view from :meth:`lend` still held (virtqueue rings)."""
        with self._lock:
            self._lent = _held_elsewhere(self._lent)
            return [(off, n) for _, off, n in self._lent]

    def close(self) -> None:
        """Unmap the region now (idempotent): release the lent views, then the mapping.  A view
        still in use (by a system call right now, or from :meth:`GuestMemory.views`) keeps the
        address range mapped until it goes; its RAM is given back at once all the same."""
        with self._lock:
            mapping, self._map = self._map, None
            lent, self._lent = [v for v, _, _ in self._lent], []
        if mapping is None:
            return
        for view in lent + [self._view]:
            try:
                view.release()
            except BufferError:
                pass  # exported to a system call in progress
        try:
            mapping.close()
        except BufferError:  # we hold no reference now: the last view's release unmaps it
            mapping.madvise(mmap.MADV_DONTNEED, self._off, self.size)
