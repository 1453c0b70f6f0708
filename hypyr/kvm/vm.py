"""A KVM VM handle: memory slots, dirty logging, the in-kernel irqchip, PIT and clock,
interrupt lines and eventfds, and new vCPUs."""

from __future__ import annotations

import ctypes as C
import errno
import os
from typing import TYPE_CHECKING

from . import bindings as B
from .ioctl import PAGE_SIZE, KvmError, call
from .vcpu import Vcpu

if TYPE_CHECKING:
    from .system import Kvm


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
        return call(self.fd, B.KVM_CHECK_EXTENSION, cap, what="KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on this VM with up to four arguments."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most four arguments")
        ec = B.kvm_enable_cap(cap=cap, flags=flags)
        ec.args[:len(args)] = list(args)
        call(self.fd, B.KVM_ENABLE_CAP, ec, what=f"KVM_ENABLE_CAP({cap})")

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
        call(self.fd, B.KVM_SET_USER_MEMORY_REGION, region, what="KVM_SET_USER_MEMORY_REGION")
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
        call(self.fd, B.KVM_SET_USER_MEMORY_REGION, region, what="KVM_SET_USER_MEMORY_REGION")
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
        call(self.fd, B.KVM_GET_DIRTY_LOG, log, what="KVM_GET_DIRTY_LOG")
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
        call(self.fd, B.KVM_CLEAR_DIRTY_LOG, clear, what="KVM_CLEAR_DIRTY_LOG")

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
        call(self.fd, B.KVM_SET_TSS_ADDR, addr, what="KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        call(self.fd, B.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(addr), what="KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        call(self.fd, B.KVM_CREATE_IRQCHIP, 0, what="KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        call(self.fd, B.KVM_CREATE_PIT2, B.kvm_pit_config(flags=B.KVM_PIT_SPEAKER_DUMMY), what="KVM_CREATE_PIT2")

    # -- in-kernel irqchip, PIT and clock state -----------------------------------------------------
    def get_irqchip(self, chip_id: int) -> B.kvm_irqchip:
        """KVM_GET_IRQCHIP for KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE or _IOAPIC (ENXIO: no in-kernel irqchip)."""
        chip = B.kvm_irqchip(chip_id=chip_id)
        call(self.fd, B.KVM_GET_IRQCHIP, chip, what="KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: B.kvm_irqchip) -> None:
        call(self.fd, B.KVM_SET_IRQCHIP, chip, what="KVM_SET_IRQCHIP")

    def get_pit2(self) -> B.kvm_pit_state2:
        """KVM_GET_PIT2 (ENXIO: no in-kernel PIT)."""
        s = B.kvm_pit_state2()
        call(self.fd, B.KVM_GET_PIT2, s, what="KVM_GET_PIT2")
        return s

    def set_pit2(self, s: B.kvm_pit_state2) -> None:
        call(self.fd, B.KVM_SET_PIT2, s, what="KVM_SET_PIT2")

    def clock_flags(self) -> int:
        """The kvm_clock_data flags this host supports (KVM_CHECK_EXTENSION(KVM_CAP_ADJUST_CLOCK))."""
        return self.check_extension(B.KVM_CAP_ADJUST_CLOCK)

    def get_clock(self) -> B.kvm_clock_data:
        """KVM_GET_CLOCK: kvmclock in ns; with KVM_CLOCK_REALTIME in flags, the host's CLOCK_REALTIME
        at the same instant, with KVM_CLOCK_HOST_TSC the host TSC."""
        c = B.kvm_clock_data()
        call(self.fd, B.KVM_GET_CLOCK, c, what="KVM_GET_CLOCK")
        return c

    def set_clock(self, c: B.kvm_clock_data) -> None:
        """KVM_SET_CLOCK; with KVM_CLOCK_REALTIME in flags, KVM adds the CLOCK_REALTIME time elapsed
        since ``realtime``."""
        call(self.fd, B.KVM_SET_CLOCK, c, what="KVM_SET_CLOCK")

    def irq_line(self, irq: int, level: bool) -> None:
        call(self.fd, B.KVM_IRQ_LINE, B.kvm_irq_level(irq=irq, level=1 if level else 0), what="KVM_IRQ_LINE")

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        call(self.fd, B.KVM_IRQFD, B.kvm_irqfd(fd=eventfd, gsi=gsi, flags=1 if deassign else 0), what="KVM_IRQFD")

    def ioeventfd(self, eventfd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        flags = (B.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (B.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= B.KVM_IOEVENTFD_FLAG_DATAMATCH
        ev = B.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags)
        call(self.fd, B.KVM_IOEVENTFD, ev, what="KVM_IOEVENTFD")

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = call(self.fd, B.KVM_CREATE_VCPU, vcpu_id, what="KVM_CREATE_VCPU")
        return Vcpu(self, vcpu_id, fd)

