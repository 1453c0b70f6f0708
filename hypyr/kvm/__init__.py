"""Typed wrappers over the KVM file descriptors: :class:`Kvm` (system), :class:`Vm`, :class:`Vcpu`.

Only this package (and :mod:`hypyr.memory`) touches ctypes, mmap and ioctl.  ioctls go through
libc's ``ioctl`` via ctypes (which releases the GIL and has no 1024-byte buffer limit), in
:mod:`.ioctl`; the handles are in :mod:`.system`, :mod:`.vm` and :mod:`.vcpu`.
"""

from __future__ import annotations

from . import bindings as B
from .ioctl import MAX_IO_MSRS, PAGE_SIZE, CpuidEntry, KvmError
from .system import Kvm, KvmUnavailable
from .vcpu import IoExit, MmioExit, Vcpu
from .vm import Vm

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "KvmUnavailable", "CpuidEntry", "B", "IoExit", "MmioExit",
           "MAX_IO_MSRS", "PAGE_SIZE"]
