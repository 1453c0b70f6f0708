"""File I/O straight into guest RAM without a Python object per buffer: libc's
``preadv``/``pwritev`` on iovec arrays, and descriptor tables checked against RAM as big
integers (:meth:`hypyr.memory.GuestMemory.descs_inside`)."""

from __future__ import annotations

import ctypes
import functools
import os
import struct

from hypyr.libc import optional_function

_RW_ARGS = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]  # iovecs: bytes or an address
libc_preadv = optional_function("preadv", _RW_ARGS, ctypes.c_ssize_t)
libc_pwritev = optional_function("pwritev", _RW_ARGS, ctypes.c_ssize_t)


def libc_rw(fn, fd: int, iov, count: int, offset: int, region_view: memoryview) -> int:
    """libc preadv/pwritev ``fn`` with an iovec array (bytes or its address) into one region.
    A view of the region is held across the call: while it exists GuestRegion.close() cannot
    unmap the region, so the kernel only ever touches this guest's (still mapped) RAM."""
    keep = region_view[0:1]
    try:
        r = fn(fd, iov, count, offset)
        if r < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return r
    finally:
        keep.release()


@functools.lru_cache(maxsize=64)
def iovec_struct(count: int) -> struct.Struct:
    """struct iovec[count] (void *iov_base; size_t iov_len) in native layout."""
    return struct.Struct("@" + "PN" * count)


# -- descriptor tables as integers (GuestMemory.descs_inside) -----------------------------------
# A table of n 16-byte descriptors read as one little-endian integer has descriptor i in bits
# [128 i, 128 i + 128): the address in the low 64 bits of that "lane", the length in the next
# 32.  Masking, shifting and adding such integers works on all descriptors at once in C
# (CPython's big-integer loops), lane by lane: every sum formed below stays under 2**101, so no
# lane ever carries into the next.  Bit LANE_TOP of a lane then tells a comparison's outcome.
_LANE_BITS = 128
LANE_TOP = 100


@functools.lru_cache(maxsize=64)  # at most ~100 KiB each (1024 descriptors)
def desc_lanes(count: int, start: int, end: int) -> tuple[int, int, int, int, int, int]:
    """(bit 0 of every lane, the address fields, the length fields, per-lane 2**100 - start,
    per-lane 2**100 - 1 - end, the bits from 100 up) for ``count`` descriptors and RAM
    [start, end):  address + length + 2**100 - 1 - end < 2**100  iff  address + length <= end,
    and address + 2**100 - start >= 2**100  iff  address >= start."""
    one = int.from_bytes(b"\x01".ljust(16, b"\0") * count, "little")
    return (one, one * ((1 << 64) - 1), one * (((1 << 32) - 1) << 64), one * ((1 << LANE_TOP) - start),
            one * ((1 << LANE_TOP) - 1 - end), one * (((1 << (_LANE_BITS - LANE_TOP)) - 1) << LANE_TOP))
