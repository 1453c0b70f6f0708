"""Typed wrappers over the KVM file descriptors: :class:`Kvm` (system), :class:`Vm`, :class:`Vcpu`.

Only this package (and :mod:`hypyr.memory`) touches ctypes, mmap and ioctl.  ioctls go through
libc's ``ioctl`` via ctypes (which releases the GIL and has no 1024-byte buffer limit).
"""

from __future__ import annotations

import ctypes as C
import errno
import mmap
import os
import struct
from dataclasses import dataclass

from . import bindings as B

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "KvmUnavailable", "CpuidEntry", "B", "MMIO_EXIT", "MMIO_EXIT_OFF", "MMIO_DATA_OFF"]

_libc = C.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [C.c_int, C.c_ulong, C.c_void_p]
_ioctl.restype = C.c_int


class KvmError(OSError):
    """An ioctl failed."""


class KvmUnavailable(Exception):
    """/dev/kvm is missing, unusable or too old; str() is one sentence for the user."""


def _call(fd: int, request: int, arg=None, what: str = "") -> int:
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = C.c_void_p(arg)
    else:
        ptr = C.byref(arg)
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        e = C.get_errno()
        raise KvmError(e, f"{what or hex(request)}: {os.strerror(e)}")
    return ret


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf as plain data (mirrors kvm_cpuid_entry2)."""
    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


def _cpuid_buffer(n: int):
    class kvm_cpuid2(C.Structure):
        _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32), ("entries", B.kvm_cpuid_entry2 * n)]
    return kvm_cpuid2()


class Kvm:
    """The system fd (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist: load the kvm module (kvm-intel or kvm-amd) or run on a host with KVM") from None
        except PermissionError:
            raise KvmUnavailable(f"no permission to open {path}: run as root or add your user to the 'kvm' group") from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        try:
            try:
                version = _call(self.fd, B.KVM_GET_API_VERSION, what="KVM_GET_API_VERSION")
            except KvmError as e:  # e.g. ENOTTY: the path is not a KVM device at all
                raise KvmUnavailable(f"{path} is not a KVM device ({e.strerror})") from None
            if version != B.KVM_API_VERSION:
                raise KvmUnavailable(f"{path} speaks KVM API {version}, hypyr needs {B.KVM_API_VERSION}")
            for cap, name in ((B.KVM_CAP_USER_MEMORY, "USER_MEMORY"), (B.KVM_CAP_IRQCHIP, "IRQCHIP"),
                              (B.KVM_CAP_PIT2, "PIT2"), (B.KVM_CAP_EXT_CPUID, "EXT_CPUID"),
                              (B.KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT")):
                if not self.check_extension(cap):
                    raise KvmUnavailable(f"{path} lacks the KVM capability {name} that hypyr needs")
            self.vcpu_mmap_size = _call(self.fd, B.KVM_GET_VCPU_MMAP_SIZE, what="KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            self.close()  # do not leak the fd of a device we refuse
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return _call(self.fd, B.KVM_CHECK_EXTENSION, cap, what="KVM_CHECK_EXTENSION")

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(B.KVM_CAP_MAX_VCPUS) or self.check_extension(B.KVM_CAP_NR_VCPUS) or 4

    @property
    def recommended_vcpus(self) -> int:
        return self.check_extension(B.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[CpuidEntry]:
        n = 64
        while True:
            buf = _cpuid_buffer(n)
            buf.nent = n
            try:
                _call(self.fd, B.KVM_GET_SUPPORTED_CPUID, buf, what="KVM_GET_SUPPORTED_CPUID")
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in buf.entries[:buf.nent]]

    def create_vm(self) -> "Vm":
        fd = _call(self.fd, B.KVM_CREATE_VM, 0, what="KVM_CREATE_VM")
        return Vm(self, fd)


class Vm:
    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._slots = 0
        self._mapped_buffers: list = []  # buffers mapped into the guest by map_read_only()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_user_memory_region(self, guest_phys_addr: int, size: int, host_addr: int,
                               *, readonly: bool = False, log_dirty: bool = False) -> int:
        region = B.kvm_userspace_memory_region(slot=self._slots, flags=(1 if log_dirty else 0) | (2 if readonly else 0),
                                               guest_phys_addr=guest_phys_addr, memory_size=size,
                                               userspace_addr=host_addr)
        _call(self.fd, B.KVM_SET_USER_MEMORY_REGION, region, what="KVM_SET_USER_MEMORY_REGION")
        self._slots += 1
        return region.slot

    def map_read_only(self, guest_phys_addr: int, buf: memoryview) -> int:
        """Map a writable host buffer (whole pages, e.g. a memoryview of an mmap) read-only into
        the guest: guest reads are plain memory reads, guest writes exit as MMIO (or hit an
        ioeventfd).  The buffer is kept alive as long as this VM."""
        c = C.c_char.from_buffer(buf)
        self._mapped_buffers.append((buf, c))
        return self.set_user_memory_region(guest_phys_addr, len(buf), C.addressof(c), readonly=True)

    def set_tss_addr(self, addr: int) -> None:
        _call(self.fd, B.KVM_SET_TSS_ADDR, addr, what="KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        _call(self.fd, B.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(addr), what="KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _call(self.fd, B.KVM_CREATE_IRQCHIP, 0, what="KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        _call(self.fd, B.KVM_CREATE_PIT2, B.kvm_pit_config(flags=B.KVM_PIT_SPEAKER_DUMMY), what="KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: bool) -> None:
        _call(self.fd, B.KVM_IRQ_LINE, B.kvm_irq_level(irq=irq, level=1 if level else 0), what="KVM_IRQ_LINE")

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        _call(self.fd, B.KVM_IRQFD, B.kvm_irqfd(fd=eventfd, gsi=gsi, flags=1 if deassign else 0), what="KVM_IRQFD")

    def ioeventfd(self, eventfd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        flags = (B.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (B.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= B.KVM_IOEVENTFD_FLAG_DATAMATCH
        ev = B.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags)
        _call(self.fd, B.KVM_IOEVENTFD, ev, what="KVM_IOEVENTFD")

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        fd = _call(self.fd, B.KVM_CREATE_VCPU, vcpu_id, what="KVM_CREATE_VCPU")
        return Vcpu(self, vcpu_id, fd)


_EXIT_REASON = struct.Struct("=I")
_EXIT_REASON_OFF = B.kvm_run.exit_reason.offset
# struct kvm_run.mmio: phys_addr u64, data[8], len u32, is_write u8
MMIO_EXIT = struct.Struct("=Q8sIB")
MMIO_EXIT_OFF = B.kvm_run.exit.offset + B._exit_union.mmio.offset
MMIO_DATA_OFF = MMIO_EXIT_OFF + 8


class Vcpu:
    def __init__(self, vm: Vm, vcpu_id: int, fd: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_state = B.kvm_run.from_buffer(self._map)
        self._run_req = B.KVM_RUN
        # the kvm_run page as bytes, for the hot exits (no ctypes objects per exit)
        self.run_view = memoryview(self._map)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_state
            self.run_view.release()
            try:
                self._map.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1

    def run(self) -> int:
        """Enter the guest; return the exit reason (KVM_EXIT_INTR when interrupted by a signal)."""
        if _ioctl(self.fd, self._run_req, None) < 0:
            e = C.get_errno()
            if e in (errno.EINTR, errno.EAGAIN):
                self.run_state.immediate_exit = 0
                return B.KVM_EXIT_INTR
            raise KvmError(e, f"KVM_RUN: {os.strerror(e)}")
        return _EXIT_REASON.unpack_from(self.run_view, _EXIT_REASON_OFF)[0]

    # PIO data lives inside the kvm_run mapping at io.data_offset
    def io_data(self) -> memoryview:
        io = self.run_state.exit.io
        n = io.size * io.count
        if io.data_offset + n > len(self._map):
            raise KvmError(errno.EFAULT, "PIO data outside the kvm_run page")
        return memoryview(self._map)[io.data_offset:io.data_offset + n]

    def get_regs(self) -> B.kvm_regs:
        r = B.kvm_regs()
        _call(self.fd, B.KVM_GET_REGS, r, what="KVM_GET_REGS")
        return r

    def set_regs(self, r: B.kvm_regs) -> None:
        _call(self.fd, B.KVM_SET_REGS, r, what="KVM_SET_REGS")

    def get_sregs(self) -> B.kvm_sregs:
        s = B.kvm_sregs()
        _call(self.fd, B.KVM_GET_SREGS, s, what="KVM_GET_SREGS")
        return s

    def set_sregs(self, s: B.kvm_sregs) -> None:
        _call(self.fd, B.KVM_SET_SREGS, s, what="KVM_SET_SREGS")

    def get_fpu(self) -> B.kvm_fpu:
        f = B.kvm_fpu()
        _call(self.fd, B.KVM_GET_FPU, f, what="KVM_GET_FPU")
        return f

    def set_fpu(self, f: B.kvm_fpu) -> None:
        _call(self.fd, B.KVM_SET_FPU, f, what="KVM_SET_FPU")

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        buf = _cpuid_buffer(len(entries))
        buf.nent = len(entries)
        for dst, e in zip(buf.entries, entries):
            dst.function, dst.index, dst.flags = e.function, e.index, e.flags
            dst.eax, dst.ebx, dst.ecx, dst.edx = e.eax, e.ebx, e.ecx, e.edx
        _call(self.fd, B.KVM_SET_CPUID2, buf, what="KVM_SET_CPUID2")

    def set_msrs(self, msrs: list[tuple[int, int]]) -> None:
        class kvm_msrs(C.Structure):
            _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32), ("entries", B.kvm_msr_entry * len(msrs))]
        buf = kvm_msrs(nmsrs=len(msrs))
        for dst, (idx, val) in zip(buf.entries, msrs):
            dst.index, dst.data = idx, val
        done = _call(self.fd, B.KVM_SET_MSRS, buf, what="KVM_SET_MSRS")
        if done != len(msrs):
            raise KvmError(errno.EINVAL, f"KVM_SET_MSRS: MSR {msrs[done][0]:#x} was refused")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        class kvm_msrs(C.Structure):
            _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32), ("entries", B.kvm_msr_entry * len(indices))]
        buf = kvm_msrs(nmsrs=len(indices))
        for dst, idx in zip(buf.entries, indices):
            dst.index = idx
        n = _call(self.fd, B.KVM_GET_MSRS, buf, what="KVM_GET_MSRS")
        return {e.index: e.data for e in buf.entries[:n]}

    def get_lapic(self) -> B.kvm_lapic_state:
        s = B.kvm_lapic_state()
        _call(self.fd, B.KVM_GET_LAPIC, s, what="KVM_GET_LAPIC")
        return s

    def set_lapic(self, s: B.kvm_lapic_state) -> None:
        _call(self.fd, B.KVM_SET_LAPIC, s, what="KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        s = B.kvm_mp_state()
        _call(self.fd, B.KVM_GET_MP_STATE, s, what="KVM_GET_MP_STATE")
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        _call(self.fd, B.KVM_SET_MP_STATE, B.kvm_mp_state(mp_state=state), what="KVM_SET_MP_STATE")
