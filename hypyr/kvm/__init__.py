"""Typed wrappers over the KVM file descriptors: :class:`Kvm` (system), :class:`Vm`, :class:`Vcpu`.

Only this package (and :mod:`hypyr.memory`) touches ctypes, mmap and ioctl.  ioctls go through
libc's ``ioctl`` via ctypes (which releases the GIL and has no 1024-byte buffer limit).
"""

from __future__ import annotations

import ctypes as C
import errno
import functools
import mmap
import os
import struct
from collections.abc import Callable
from typing import NamedTuple

from hypyr.libc import function

from . import bindings as B

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "KvmUnavailable", "CpuidEntry", "B", "IoExit", "MmioExit",
           "MAX_IO_MSRS", "PAGE_SIZE"]

MAX_IO_MSRS = 255  # the most MSRs one KVM_GET_MSRS/KVM_SET_MSRS takes (the kernel refuses 256)
PAGE_SIZE = 4096   # the dirty log's granule

_ioctl = function("ioctl", [C.c_int, C.c_ulong, C.c_void_p])


class KvmError(OSError):
    """An ioctl failed."""


class KvmUnavailable(Exception):
    """/dev/kvm is missing, unusable or too old; str() is one sentence for the user."""


def _call(fd: int, request: int, arg=None, what: str = "") -> int:
    ptr: object  # None, a c_void_p or a byref() pointer: what the ioctl's third argument takes
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


def _cpuid_buffer(n: int):
    """A kvm_cpuid2 with room for ``n`` entries."""
    return _counted("kvm_cpuid2", "nent", B.kvm_cpuid_entry2, n)


def _get_cpuid(fd: int, request: int, what: str) -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID or KVM_GET_CPUID2, growing the buffer while KVM says E2BIG."""
    n = 64
    while True:
        buf = _cpuid_buffer(n)
        try:
            _call(fd, request, buf, what=what)
        except KvmError as e:
            if e.errno == errno.E2BIG and n < 4096:
                n *= 2
                continue
            raise
        return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in buf.entries[:buf.nent]]


def _msrs_buffer(n: int):
    """A kvm_msrs with ``n`` (1..MAX_IO_MSRS) entries."""
    return _counted("kvm_msrs", "nmsrs", B.kvm_msr_entry, n)


class Kvm:
    """The system fd (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm"):
        self._msr_index_list: list[int] | None = None
        self._supported_cpuid: tuple[CpuidEntry, ...] | None = None
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist: load the kvm module (kvm-intel or kvm-amd) or run on a host "
                                 "with KVM") from None
        except PermissionError:
            raise KvmUnavailable(f"no permission to open {path}: run as root or add your user to the 'kvm' "
                                 "group") from None
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
        """KVM_GET_SUPPORTED_CPUID, asked once per handle (it does not change; a migration's
        downtime asks for it twice)."""
        if self._supported_cpuid is None:
            self._supported_cpuid = tuple(_get_cpuid(self.fd, B.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID"))
        return list(self._supported_cpuid)

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST), in KVM's order."""
        if self._msr_index_list is None:
            header = B.kvm_msr_list_header(nmsrs=0)
            try:  # a first call with room for none says how many there are
                _call(self.fd, B.KVM_GET_MSR_INDEX_LIST, header, what="KVM_GET_MSR_INDEX_LIST")
            except KvmError as e:
                if e.errno != errno.E2BIG:
                    raise
            n = header.nmsrs

            class kvm_msr_list(C.Structure):
                _fields_ = [("nmsrs", C.c_uint32), ("indices", C.c_uint32 * n)]
            buf = kvm_msr_list(nmsrs=n)
            _call(self.fd, B.KVM_GET_MSR_INDEX_LIST, buf, what="KVM_GET_MSR_INDEX_LIST")
            self._msr_index_list = list(buf.indices[:buf.nmsrs])
        return list(self._msr_index_list)

    def create_vm(self) -> Vm:
        fd = _call(self.fd, B.KVM_CREATE_VM, 0, what="KVM_CREATE_VM")
        return Vm(self, fd)


class Vm:
    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._slots = 0
        self._regions: dict[int, B.kvm_userspace_memory_region] = {}  # slot -> as last set
        self._mapped_buffers: list = []  # buffers mapped into the guest by map_read_only()
        self._xsave2: int | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._mapped_buffers.clear()  # the guest is gone: their owners may unmap them now

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on this VM (some answers, e.g. KVM_CAP_XSAVE2, are per VM)."""
        if not self.kvm.check_extension(B.KVM_CAP_CHECK_EXTENSION_VM):
            return self.kvm.check_extension(cap)
        return _call(self.fd, B.KVM_CHECK_EXTENSION, cap, what="KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on this VM with up to four arguments."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most four arguments")
        ec = B.kvm_enable_cap(cap=cap, flags=flags)
        ec.args[:len(args)] = list(args)
        _call(self.fd, B.KVM_ENABLE_CAP, ec, what=f"KVM_ENABLE_CAP({cap})")

    @property
    def xsave2(self) -> int:
        """KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on this VM: the XSAVE size in bytes, 0 where unsupported."""
        if self._xsave2 is None:
            self._xsave2 = self.check_extension(B.KVM_CAP_XSAVE2)
        return self._xsave2

    @property
    def xsave_size(self) -> int:
        """Bytes of a vCPU's XSAVE state: KVM_CAP_XSAVE2's answer, or 4096 without that capability."""
        return self.xsave2 or C.sizeof(B.kvm_xsave)

    def set_user_memory_region(self, guest_phys_addr: int, size: int, host_addr: int,
                               *, readonly: bool = False, log_dirty: bool = False) -> int:
        flags = (B.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0) | (B.KVM_MEM_READONLY if readonly else 0)
        region = B.kvm_userspace_memory_region(slot=self._slots, flags=flags,
                                               guest_phys_addr=guest_phys_addr, memory_size=size,
                                               userspace_addr=host_addr)
        _call(self.fd, B.KVM_SET_USER_MEMORY_REGION, region, what="KVM_SET_USER_MEMORY_REGION")
        self._regions[region.slot] = region
        self._slots += 1
        return region.slot

    # -- dirty logging --------------------------------------------------------------------------
    def set_dirty_logging(self, slot: int, enabled: bool) -> None:
        """Turn KVM_MEM_LOG_DIRTY_PAGES on or off for an existing memslot (KVM allows a flags-only change)."""
        old = self._region(slot)
        flags = (old.flags | B.KVM_MEM_LOG_DIRTY_PAGES) if enabled else (old.flags & ~B.KVM_MEM_LOG_DIRTY_PAGES)
        region = B.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=old.guest_phys_addr,
                                               memory_size=old.memory_size, userspace_addr=old.userspace_addr)
        _call(self.fd, B.KVM_SET_USER_MEMORY_REGION, region, what="KVM_SET_USER_MEMORY_REGION")
        self._regions[slot] = region

    def dirty_log_size(self, slot: int) -> int:
        """Bytes of ``slot``'s dirty bitmap: one bit per 4 KiB page, in whole 64-bit words."""
        pages = -(-self._region(slot).memory_size // PAGE_SIZE)
        return -(-pages // 64) * 8

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the bitmap of pages of ``slot`` written since the last call (bit n = page n).
        Without manual protection this also clears the log and write-protects the pages again."""
        buf = C.create_string_buffer(self.dirty_log_size(slot))
        log = B.kvm_dirty_log(slot=slot, dirty_bitmap=C.addressof(buf))
        _call(self.fd, B.KVM_GET_DIRTY_LOG, log, what="KVM_GET_DIRTY_LOG")
        return buf.raw

    def manual_dirty_log_protect_flags(self) -> int:
        """The KVM_DIRTY_LOG_* flags KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 supports here (0: not at all)."""
        return self.check_extension(B.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)

    def enable_manual_dirty_log_protect(self, *, initially_set: bool = False) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): KVM_GET_DIRTY_LOG no longer clears the log,
        KVM_CLEAR_DIRTY_LOG does, range by range.  Raises KvmError (ENOTSUP) where it is unsupported."""
        flags = B.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | (B.KVM_DIRTY_LOG_INITIALLY_SET if initially_set else 0)
        supported = self.manual_dirty_log_protect_flags()
        if flags & ~supported:
            raise KvmError(errno.ENOTSUP, f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: flags {flags:#x} not supported "
                                          f"(this host supports {supported:#x})")
        self.enable_cap(B.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)

    def clear_dirty_log(self, slot: int, first_page: int, bitmap: bytes, num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear (and write-protect again) the pages of ``slot`` whose bits are
        set in ``bitmap``, bit n meaning page ``first_page + n``.  ``first_page`` must be a multiple
        of 64; ``num_pages`` (default: every bit of ``bitmap``, up to the end of the slot) too,
        unless the range ends at the end of the slot."""
        slot_pages = -(-self._region(slot).memory_size // PAGE_SIZE)
        if num_pages is None:
            num_pages = min(len(bitmap) * 8, slot_pages - first_page)
        if num_pages > len(bitmap) * 8:
            raise ValueError(f"a bitmap of {len(bitmap)} bytes cannot describe {num_pages} pages")
        buf = C.create_string_buffer(bytes(bitmap), max(len(bitmap), 8))
        clear = B.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                      dirty_bitmap=C.addressof(buf))
        _call(self.fd, B.KVM_CLEAR_DIRTY_LOG, clear, what="KVM_CLEAR_DIRTY_LOG")

    def _region(self, slot: int) -> B.kvm_userspace_memory_region:
        try:
            return self._regions[slot]
        except KeyError:
            raise ValueError(f"no memslot {slot} on this VM") from None

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

    # -- in-kernel irqchip, PIT and clock state -----------------------------------------------------
    def get_irqchip(self, chip_id: int) -> B.kvm_irqchip:
        """KVM_GET_IRQCHIP for KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE or _IOAPIC (ENXIO: no in-kernel irqchip)."""
        chip = B.kvm_irqchip(chip_id=chip_id)
        _call(self.fd, B.KVM_GET_IRQCHIP, chip, what="KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: B.kvm_irqchip) -> None:
        _call(self.fd, B.KVM_SET_IRQCHIP, chip, what="KVM_SET_IRQCHIP")

    def get_pit2(self) -> B.kvm_pit_state2:
        """KVM_GET_PIT2 (ENXIO: no in-kernel PIT)."""
        s = B.kvm_pit_state2()
        _call(self.fd, B.KVM_GET_PIT2, s, what="KVM_GET_PIT2")
        return s

    def set_pit2(self, s: B.kvm_pit_state2) -> None:
        _call(self.fd, B.KVM_SET_PIT2, s, what="KVM_SET_PIT2")

    def clock_flags(self) -> int:
        """The kvm_clock_data flags this host supports (KVM_CHECK_EXTENSION(KVM_CAP_ADJUST_CLOCK))."""
        return self.check_extension(B.KVM_CAP_ADJUST_CLOCK)

    def get_clock(self) -> B.kvm_clock_data:
        """KVM_GET_CLOCK: kvmclock in ns; with KVM_CLOCK_REALTIME in flags, the host's CLOCK_REALTIME
        at the same instant, with KVM_CLOCK_HOST_TSC the host TSC."""
        c = B.kvm_clock_data()
        _call(self.fd, B.KVM_GET_CLOCK, c, what="KVM_GET_CLOCK")
        return c

    def set_clock(self, c: B.kvm_clock_data) -> None:
        """KVM_SET_CLOCK; with KVM_CLOCK_REALTIME in flags, KVM adds the CLOCK_REALTIME time elapsed
        since ``realtime``."""
        _call(self.fd, B.KVM_SET_CLOCK, c, what="KVM_SET_CLOCK")

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

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = _call(self.fd, B.KVM_CREATE_VCPU, vcpu_id, what="KVM_CREATE_VCPU")
        return Vcpu(self, vcpu_id, fd)


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
        if _ioctl(self.fd, self._run_req, None) < 0:
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
        for dst, e in zip(buf.entries, entries):
            dst.function, dst.index, dst.flags = e.function, e.index, e.flags
            dst.eax, dst.ebx, dst.ecx, dst.edx = e.eax, e.ebx, e.ecx, e.edx
        _call(self.fd, B.KVM_SET_CPUID2, buf, what="KVM_SET_CPUID2")

    def set_msrs(self, msrs: list[tuple[int, int]]) -> None:
        """KVM_SET_MSRS in list order (in batches of MAX_IO_MSRS); KvmError naming the first MSR refused."""
        for start in range(0, len(msrs), MAX_IO_MSRS):
            batch = msrs[start:start + MAX_IO_MSRS]
            buf = _msrs_buffer(len(batch))
            for dst, (idx, val) in zip(buf.entries, batch):
                dst.index, dst.data = idx, val
            done = _call(self.fd, B.KVM_SET_MSRS, buf, what="KVM_SET_MSRS")
            if done != len(batch):
                raise KvmError(errno.EINVAL, f"KVM_SET_MSRS: MSR {batch[done][0]:#x} was refused")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: the values of ``indices`` up to (not including) the first one KVM refuses."""
        out: dict[int, int] = {}
        for start in range(0, len(indices), MAX_IO_MSRS):
            batch = indices[start:start + MAX_IO_MSRS]
            buf = _msrs_buffer(len(batch))
            for dst, idx in zip(buf.entries, batch):
                dst.index = idx
            n = _call(self.fd, B.KVM_GET_MSRS, buf, what="KVM_GET_MSRS")
            out.update((e.index, e.data) for e in buf.entries[:n])
            if n != len(batch):
                break
        return out

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

    def nmi(self) -> None:
        """Queue an NMI on this vCPU (KVM_NMI; from its own thread: another thread's call waits
        until the vCPU's KVM_RUN returns)."""
        _call(self.fd, B.KVM_NMI, what="KVM_NMI")

    def get_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID entries last set on this vCPU."""
        return _get_cpuid(self.fd, B.KVM_GET_CPUID2, "KVM_GET_CPUID2")

    def get_xsave(self) -> bytes:
        """The XSAVE area (FPU/SSE/AVX... state): KVM_GET_XSAVE2 with ``vm.xsave_size`` bytes where
        KVM_CAP_XSAVE2 exists, KVM_GET_XSAVE (4096 bytes) otherwise."""
        size = self.vm.xsave_size
        buf = C.create_string_buffer(size)
        if self.vm.xsave2:
            _call(self.fd, B.KVM_GET_XSAVE2, C.addressof(buf), what="KVM_GET_XSAVE2")
        else:
            _call(self.fd, B.KVM_GET_XSAVE, C.addressof(buf), what="KVM_GET_XSAVE")
        return buf.raw

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE; KVM reads ``vm.xsave_size`` bytes, so a shorter ``data`` is padded with zeros."""
        buf = C.create_string_buffer(bytes(data), max(len(data), self.vm.xsave_size))
        _call(self.fd, B.KVM_SET_XSAVE, C.addressof(buf), what="KVM_SET_XSAVE")

    def get_xcrs(self) -> B.kvm_xcrs:
        x = B.kvm_xcrs()
        _call(self.fd, B.KVM_GET_XCRS, x, what="KVM_GET_XCRS")
        return x

    def set_xcrs(self, x: B.kvm_xcrs) -> None:
        _call(self.fd, B.KVM_SET_XCRS, x, what="KVM_SET_XCRS")

    def get_debugregs(self) -> B.kvm_debugregs:
        d = B.kvm_debugregs()
        _call(self.fd, B.KVM_GET_DEBUGREGS, d, what="KVM_GET_DEBUGREGS")
        return d

    def set_debugregs(self, d: B.kvm_debugregs) -> None:
        _call(self.fd, B.KVM_SET_DEBUGREGS, d, what="KVM_SET_DEBUGREGS")

    def get_vcpu_events(self) -> B.kvm_vcpu_events:
        """Pending/injected exception, interrupt, NMI and SMI state, the interrupt shadow, the SIPI vector."""
        ev = B.kvm_vcpu_events()
        _call(self.fd, B.KVM_GET_VCPU_EVENTS, ev, what="KVM_GET_VCPU_EVENTS")
        return ev

    def set_vcpu_events(self, ev: B.kvm_vcpu_events) -> None:
        _call(self.fd, B.KVM_SET_VCPU_EVENTS, ev, what="KVM_SET_VCPU_EVENTS")

    def get_tsc_khz(self) -> int:
        """The guest TSC frequency in kHz (KVM_GET_TSC_KHZ, needs KVM_CAP_GET_TSC_KHZ)."""
        return _call(self.fd, B.KVM_GET_TSC_KHZ, what="KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ: scale the guest TSC to ``khz`` (needs KVM_CAP_TSC_CONTROL and hardware
        TSC scaling, unless ``khz`` is already the rate)."""
        _call(self.fd, B.KVM_SET_TSC_KHZ, khz, what="KVM_SET_TSC_KHZ")
