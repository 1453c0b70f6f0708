"""Guest physical memory: regions of anonymous host memory, and the one access path to them.

Every read or write of guest memory made by the VMM or a device goes through
:class:`GuestMemory`, which checks the whole range (start *and* end) against the
regions on every call.  Nothing outside this module (and :mod:`hypyr.kvm`) sees a
host pointer.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

__all__ = ["GuestAddress", "GuestMemoryError", "GuestRegion", "GuestMemory"]

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
    def _chunks(self, addr: int, length: int) -> Iterator[_Chunk]:
        """Split [addr, addr+length) into per-region pieces or raise if any byte is not RAM."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length} at {addr:#x}")
        if addr < 0 or addr + length > 1 << 64:
            raise GuestMemoryError(f"range {addr:#x}+{length:#x} overflows the address space")
        pos, left = addr, length
        pieces = []
        for r in self.regions:
            if left == 0:
                break
            if r.start <= pos < r.end:
                n = min(left, r.end - pos)
                pieces.append(_Chunk(r, pos - r.start, n))
                pos += n
                left -= n
        if left:
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not all RAM (stops at {pos:#x})")
        return iter(pieces)

    def check_range(self, addr: int, length: int) -> bool:
        try:
            self._chunks(addr, length)
            return True
        except GuestMemoryError:
            return False

    # -- bytes ------------------------------------------------------------------------------
    def read(self, addr: int, length: int) -> bytes:
        return b"".join(bytes(c.region._view[c.offset:c.offset + c.length]) for c in self._chunks(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        chunks = list(self._chunks(addr, len(data)))  # check the whole range before writing any of it
        pos = 0
        for c in chunks:
            c.region._view[c.offset:c.offset + c.length] = data[pos:pos + c.length]
            pos += c.length

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        chunks = list(self._chunks(addr, length))
        for c in chunks:
            c.region._view[c.offset:c.offset + c.length] = bytes([value]) * c.length

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
