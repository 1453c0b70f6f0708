"""A KVM vCPU handle: KVM_RUN and the exits it reports (the kvm_run page's layout stays here),
and the vCPU's registers and state."""

from __future__ import annotations

import ctypes as C
import errno
import functools
import mmap
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import bindings as B
from .ioctl import MAX_IO_MSRS, CpuidEntry, KvmError, call, cpuid_buffer, get_cpuid, libc_ioctl, msrs_buffer

if TYPE_CHECKING:
    from .vm import Vm

# -- the kvm_run page: its layout stays in this package; Vcpu decodes the exits it reports ----------
_EXIT_REASON = struct.Struct("=I")
_EXIT_REASON_OFF = B.kvm_run.exit_reason.offset
# struct kvm_run.io: direction u8, size u8, port u16, count u32, data_offset u64
_IO_EXIT = struct.Struct("=BBHIQ")
_IO_EXIT_OFF = B.kvm_run.exit.offset + B._exit_union.io.offset
# struct kvm_run.mmio: phys_addr u64, data[8], len u32, is_write u8
_MMIO_EXIT = struct.Struct("=Q8sIB")
_MMIO_EXIT_OFF = B.kvm_run.exit.offset + B._exit_union.mmio.offset
_MMIO_DATA_OFF = _MMIO_EXIT_OFF + 8

IoExit = tuple[bool, int, int, int, memoryview]
"""KVM_EXIT_IO decoded: (is_out, port, size, count, data); ``data`` is the ``size * count`` bytes in
the kvm_run page that an OUT wrote, or where an IN's result goes (``count`` items of ``size``)."""
MmioExit = tuple[int, bytes, int, int]
"""KVM_EXIT_MMIO decoded: (guest physical address, 8 data bytes (a write's are the first
``length``), length, is_write); a read's result goes to :attr:`Vcpu.mmio_data`."""


class Vcpu:
    def __init__(self, vm: Vm, vcpu_id: int, fd: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._run = B.kvm_run.from_buffer(self._map)
        self._run_req = B.KVM_RUN
        # True after KVM_RUN returned an IO or MMIO exit: KVM finishes that instruction only on the
        # next KVM_RUN (with immediate_exit set, it does so and returns at once, KVM_EXIT_INTR)
        self.completion_pending = False
        # the kvm_run page as bytes, for the hot exits (no ctypes objects per exit)
        self._view = memoryview(self._map)
        self.mmio_exit: Callable[[], MmioExit] = functools.partial(_MMIO_EXIT.unpack_from, self._view,
                                                                   _MMIO_EXIT_OFF)
        """After KVM_EXIT_MMIO: the exit as an :data:`MmioExit` (a C call: no Python frame per exit)."""
        self.mmio_data = self._view[_MMIO_DATA_OFF:_MMIO_DATA_OFF + 8]
        """Where an MMIO read's result goes (its first ``length`` bytes) before the next KVM_RUN."""

    def close(self) -> None:
        if self.fd >= 0:
            del self._run
            self.mmio_data.release()
            self._view.release()
            try:
                self._map.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1

    def run(self) -> int:
        """Enter the guest; return the exit reason (KVM_EXIT_INTR when interrupted by a signal)."""
        if libc_ioctl(self.fd, self._run_req, None) < 0:
            e = C.get_errno()
            if e in (errno.EINTR, errno.EAGAIN):
                self._run.immediate_exit = 0
                self.completion_pending = False  # KVM completes pending I/O before it looks at signals
                return B.KVM_EXIT_INTR
            raise KvmError(e, f"KVM_RUN: {os.strerror(e)}")
        reason = _EXIT_REASON.unpack_from(self._view, _EXIT_REASON_OFF)[0]
        self.completion_pending = reason == B.KVM_EXIT_IO or reason == B.KVM_EXIT_MMIO
        return reason

    @property
    def immediate_exit(self) -> bool:
        """kvm_run.immediate_exit: set, the next KVM_RUN returns at once (KVM_EXIT_INTR) after
        completing a pending IO/MMIO instruction.  Safe to set from another thread (a kick)."""
        return bool(self._run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, on: bool) -> None:
        self._run.immediate_exit = 1 if on else 0

    def io_exit(self) -> IoExit:
        """After KVM_EXIT_IO: the exit as an :data:`IoExit` (KvmError if KVM's data offset points
        outside the kvm_run mapping)."""
        direction, size, port, count, off = _IO_EXIT.unpack_from(self._view, _IO_EXIT_OFF)
        end = off + size * count
        if end > len(self._view):
            raise KvmError(errno.EFAULT, "PIO data outside the kvm_run page")
        return direction == B.KVM_EXIT_IO_OUT, port, size, count, self._view[off:end]

    def system_event(self) -> int:
        """After KVM_EXIT_SYSTEM_EVENT: its type (KVM_SYSTEM_EVENT_SHUTDOWN, _RESET, _CRASH, ...)."""
        return self._run.exit.system_event.type

    def fail_entry_reason(self) -> int:
        """After KVM_EXIT_FAIL_ENTRY: the hardware's entry failure reason."""
        return self._run.exit.fail_entry.hardware_entry_failure_reason

    def internal_error(self) -> tuple[int, tuple[int, ...]]:
        """After KVM_EXIT_INTERNAL_ERROR: (suberror, its data words)."""
        ie = self._run.exit.internal
        return ie.suberror, tuple(ie.data[:min(ie.ndata, 16)])

    def get_regs(self) -> B.kvm_regs:
        r = B.kvm_regs()
        call(self.fd, B.KVM_GET_REGS, r, what="KVM_GET_REGS")
        return r

    def set_regs(self, r: B.kvm_regs) -> None:
        call(self.fd, B.KVM_SET_REGS, r, what="KVM_SET_REGS")

    def get_sregs(self) -> B.kvm_sregs:
        s = B.kvm_sregs()
        call(self.fd, B.KVM_GET_SREGS, s, what="KVM_GET_SREGS")
        return s

    def set_sregs(self, s: B.kvm_sregs) -> None:
        call(self.fd, B.KVM_SET_SREGS, s, what="KVM_SET_SREGS")

    def get_fpu(self) -> B.kvm_fpu:
        f = B.kvm_fpu()
        call(self.fd, B.KVM_GET_FPU, f, what="KVM_GET_FPU")
        return f

    def set_fpu(self, f: B.kvm_fpu) -> None:
        call(self.fd, B.KVM_SET_FPU, f, what="KVM_SET_FPU")

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        buf = cpuid_buffer(len(entries))
        for dst, e in zip(buf.entries, entries):
            dst.function, dst.index, dst.flags = e.function, e.index, e.flags
            dst.eax, dst.ebx, dst.ecx, dst.edx = e.eax, e.ebx, e.ecx, e.edx
        call(self.fd, B.KVM_SET_CPUID2, buf, what="KVM_SET_CPUID2")

    def set_msrs(self, msrs: list[tuple[int, int]]) -> None:
        """KVM_SET_MSRS in list order (in batches of MAX_IO_MSRS); KvmError naming the first MSR refused."""
        for start in range(0, len(msrs), MAX_IO_MSRS):
            batch = msrs[start:start + MAX_IO_MSRS]
            buf = msrs_buffer(len(batch))
            for dst, (idx, val) in zip(buf.entries, batch):
                dst.index, dst.data = idx, val
            done = call(self.fd, B.KVM_SET_MSRS, buf, what="KVM_SET_MSRS")
            if done != len(batch):
                raise KvmError(errno.EINVAL, f"KVM_SET_MSRS: MSR {batch[done][0]:#x} was refused")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: the values of ``indices`` up to (not including) the first one KVM refuses."""
        out: dict[int, int] = {}
        for start in range(0, len(indices), MAX_IO_MSRS):
            batch = indices[start:start + MAX_IO_MSRS]
            buf = msrs_buffer(len(batch))
            for dst, idx in zip(buf.entries, batch):
                dst.index = idx
            n = call(self.fd, B.KVM_GET_MSRS, buf, what="KVM_GET_MSRS")
            out.update((e.index, e.data) for e in buf.entries[:n])
            if n != len(batch):
                break
        return out

    def get_lapic(self) -> B.kvm_lapic_state:
        s = B.kvm_lapic_state()
        call(self.fd, B.KVM_GET_LAPIC, s, what="KVM_GET_LAPIC")
        return s

    def set_lapic(self, s: B.kvm_lapic_state) -> None:
        call(self.fd, B.KVM_SET_LAPIC, s, what="KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        s = B.kvm_mp_state()
        call(self.fd, B.KVM_GET_MP_STATE, s, what="KVM_GET_MP_STATE")
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        call(self.fd, B.KVM_SET_MP_STATE, B.kvm_mp_state(mp_state=state), what="KVM_SET_MP_STATE")

    def nmi(self) -> None:
        """Queue an NMI on this vCPU (KVM_NMI; from its own thread: another thread's call waits
        until the vCPU's KVM_RUN returns)."""
        call(self.fd, B.KVM_NMI, what="KVM_NMI")

    def get_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID entries last set on this vCPU."""
        return get_cpuid(self.fd, B.KVM_GET_CPUID2, "KVM_GET_CPUID2")

    def get_xsave(self) -> bytes:
        """The XSAVE area (FPU/SSE/AVX... state): KVM_GET_XSAVE2 with ``vm.xsave_size`` bytes where
        KVM_CAP_XSAVE2 exists, KVM_GET_XSAVE (4096 bytes) otherwise."""
        size = self.vm.xsave_size
        buf = C.create_string_buffer(size)
        if self.vm.xsave2:
            call(self.fd, B.KVM_GET_XSAVE2, C.addressof(buf), what="KVM_GET_XSAVE2")
        else:
            call(self.fd, B.KVM_GET_XSAVE, C.addressof(buf), what="KVM_GET_XSAVE")
        return buf.raw

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE; KVM reads ``vm.xsave_size`` bytes, so a shorter ``data`` is padded with zeros."""
        buf = C.create_string_buffer(bytes(data), max(len(data), self.vm.xsave_size))
        call(self.fd, B.KVM_SET_XSAVE, C.addressof(buf), what="KVM_SET_XSAVE")

    def get_xcrs(self) -> B.kvm_xcrs:
        x = B.kvm_xcrs()
        call(self.fd, B.KVM_GET_XCRS, x, what="KVM_GET_XCRS")
        return x

    def set_xcrs(self, x: B.kvm_xcrs) -> None:
        call(self.fd, B.KVM_SET_XCRS, x, what="KVM_SET_XCRS")

    def get_debugregs(self) -> B.kvm_debugregs:
        d = B.kvm_debugregs()
        call(self.fd, B.KVM_GET_DEBUGREGS, d, what="KVM_GET_DEBUGREGS")
        return d

    def set_debugregs(self, d: B.kvm_debugregs) -> None:
        call(self.fd, B.KVM_SET_DEBUGREGS, d, what="KVM_SET_DEBUGREGS")

    def get_vcpu_events(self) -> B.kvm_vcpu_events:
        """Pending/injected exception, interrupt, NMI and SMI state, the interrupt shadow, the SIPI vector."""
        ev = B.kvm_vcpu_events()
        call(self.fd, B.KVM_GET_VCPU_EVENTS, ev, what="KVM_GET_VCPU_EVENTS")
        return ev

    def set_vcpu_events(self, ev: B.kvm_vcpu_events) -> None:
        call(self.fd, B.KVM_SET_VCPU_EVENTS, ev, what="KVM_SET_VCPU_EVENTS")

    def get_tsc_khz(self) -> int:
        """The guest TSC frequency in kHz (KVM_GET_TSC_KHZ, needs KVM_CAP_GET_TSC_KHZ)."""
        return call(self.fd, B.KVM_GET_TSC_KHZ, what="KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ: scale the guest TSC to ``khz`` (needs KVM_CAP_TSC_CONTROL and hardware
        TSC scaling, unless ``khz`` is already the rate)."""
        call(self.fd, B.KVM_SET_TSC_KHZ, khz, what="KVM_SET_TSC_KHZ")

