"""The one ioctl path of :mod:`hypyr.kvm` (libc's ``ioctl`` through ctypes, which releases the
GIL), its error, and the variable-length KVM structs (CPUID and MSR lists) that the system,
VM and vCPU handles share."""

from __future__ import annotations

import ctypes as C
import errno
import os
from typing import NamedTuple

from hypyr.libc import function

from . import bindings as B

MAX_IO_MSRS = 255  # the most MSRs one KVM_GET_MSRS/KVM_SET_MSRS takes (the kernel refuses 256)
PAGE_SIZE = 4096   # the dirty log's granule

libc_ioctl = function("ioctl", [C.c_int, C.c_ulong, C.c_void_p])


class KvmError(OSError):
    """An ioctl failed."""


def call(fd: int, request: int, arg=None, what: str = "") -> int:
    """ioctl(fd, request, arg): ``arg`` is None, an int (passed as a pointer-sized value) or a
    ctypes struct (passed by reference); a failure is a KvmError naming ``what``."""
    ptr: object  # None, a c_void_p or a byref() pointer: what the ioctl's third argument takes
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = C.c_void_p(arg)
    else:
        ptr = C.byref(arg)
    ret = libc_ioctl(fd, request, ptr)
    if ret < 0:
        e = C.get_errno()
        raise KvmError(e, f"{what or hex(request)}: {os.strerror(e)}")
    return ret


class CpuidEntry(NamedTuple):
    """One CPUID leaf/subleaf as plain data (mirrors kvm_cpuid_entry2)."""
    function: int
    index: int = 0  # type: ignore[assignment]  # kvm_cpuid_entry2.index (hides tuple.index)
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


_COUNTED_TYPES: dict[tuple[str, int], type[C.Structure]] = {}


def _counted(name: str, count: str, entry: type[C.Structure], n: int) -> C.Structure:
    """A zeroed KVM struct ``name`` of a u32 ``count`` (set to ``n``), u32 padding and ``n`` entries.
    Its ctypes type is made once per (name, n): making one costs ~0.2 ms, and a vCPU's state
    asks for several within a migration's downtime."""
    cls = _COUNTED_TYPES.get((name, n))
    if cls is None:
        fields = [(count, C.c_uint32), ("padding", C.c_uint32), ("entries", entry * n)]
        cls = _COUNTED_TYPES[(name, n)] = type(name, (C.Structure,), {"_fields_": fields})
    return cls(**{count: n})


def cpuid_buffer(n: int):
    """A kvm_cpuid2 with room for ``n`` entries."""
    return _counted("kvm_cpuid2", "nent", B.kvm_cpuid_entry2, n)


def get_cpuid(fd: int, request: int, what: str) -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID or KVM_GET_CPUID2, growing the buffer while KVM says E2BIG."""
    n = 64
    while True:
        buf = cpuid_buffer(n)
        try:
            call(fd, request, buf, what=what)
        except KvmError as e:
            if e.errno == errno.E2BIG and n < 4096:
                n *= 2
                continue
            raise
        return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in buf.entries[:buf.nent]]


def msrs_buffer(n: int):
    """A kvm_msrs with ``n`` (1..MAX_IO_MSRS) entries."""
    return _counted("kvm_msrs", "nmsrs", B.kvm_msr_entry, n)

