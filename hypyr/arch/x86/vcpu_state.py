"""The complete KVM-side state of an x86 vCPU (:class:`VcpuState`) and of a VM's in-kernel
interrupt controllers, PIT and kvmclock (:class:`VmState`): captured, restored, and turned into
plain data (ints, lists, dicts, bytes) and back.  Unlike the rest of :mod:`hypyr.arch.x86`, it
calls the vCPU and VM wrappers of :mod:`hypyr.kvm`.  When to capture, and the order of a restore
(CPUID first, MP_STATE last): docs/save-restore.md, "vCPU and VM state".
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Sequence

from hypyr.arch.x86.records import (
    KvmRecord,
    Record,
    blob,
    check_int,
    check_keys,
    check_list,
    custom,
    record,
    records,
    sint,
    uint,
    uints,
)
from hypyr.errors import StateError
from hypyr.kvm import B, CpuidEntry, KvmError, Vcpu, Vm

log = logging.getLogger("hypyr.state")

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
DEFERRED_MSRS = (MSR_IA32_TSC_DEADLINE,)  # restored after every other MSR
TSC_KHZ_TOLERANCE_PPM = 250  # a TSC rate this close to the host's needs no scaling (KVM's own tolerance)
LAPIC_SIZE = 1024
LEGACY_XSAVE_SIZE = 4096
MAX_CPUID_ENTRIES = 4096
FORMAT_VERSION = 2  # of the kvm-vcpu and kvm-vm records; 2: CPUID left kvm-vcpu (its own stream record)


# -- CPUID tables as plain data -----------------------------------------------------------------------
_CPUID_FIELDS = list(CpuidEntry._fields)


def cpuid_to_plain(entries: Sequence[CpuidEntry]) -> list[dict[str, int]]:
    """A vCPU's CPUID table as plain data (one dict per entry)."""
    return [{n: getattr(e, n) for n in _CPUID_FIELDS} for e in entries]


def cpuid_from_plain(value: object, where: str) -> list[CpuidEntry]:
    """The CPUID table :func:`cpuid_to_plain` made; :class:`StateError` naming the bad entry."""
    entries = []
    for i, e in enumerate(check_list(value, 0, MAX_CPUID_ENTRIES, where)):
        e = check_keys(e, _CPUID_FIELDS, f"{where}[{i}]")
        words = [e[n] for n in _CPUID_FIELDS]
        if not all(type(w) is int and 0 <= w <= 0xFFFF_FFFF for w in words):   # name the bad one
            words = [check_int(e[n], 0, 0xFFFF_FFFF, f"{where}[{i}].{n}") for n in _CPUID_FIELDS]
        entries.append(CpuidEntry(*words))
    return entries


# -- vCPU records ------------------------------------------------------------------------------------
class Regs(KvmRecord):
    _kvm = B.kvm_regs
    rax: int = uint(64)
    rbx: int = uint(64)
    rcx: int = uint(64)
    rdx: int = uint(64)
    rsi: int = uint(64)
    rdi: int = uint(64)
    rsp: int = uint(64)
    rbp: int = uint(64)
    r8: int = uint(64)
    r9: int = uint(64)
    r10: int = uint(64)
    r11: int = uint(64)
    r12: int = uint(64)
    r13: int = uint(64)
    r14: int = uint(64)
    r15: int = uint(64)
    rip: int = uint(64)
    rflags: int = uint(64)


class Segment(KvmRecord):
    _kvm = B.kvm_segment
    base: int = uint(64)
    limit: int = uint(32)
    selector: int = uint(16)
    type: int = uint(8)
    present: int = uint(8)
    dpl: int = uint(8)
    db: int = uint(8)
    s: int = uint(8)
    l: int = uint(8)
    g: int = uint(8)
    avl: int = uint(8)
    unusable: int = uint(8)


class DescriptorTable(KvmRecord):
    _kvm = B.kvm_dtable
    base: int = uint(64)
    limit: int = uint(16)


class Sregs(KvmRecord):
    _kvm = B.kvm_sregs
    cs: Segment = record(Segment)
    ds: Segment = record(Segment)
    es: Segment = record(Segment)
    fs: Segment = record(Segment)
    gs: Segment = record(Segment)
    ss: Segment = record(Segment)
    tr: Segment = record(Segment)
    ldt: Segment = record(Segment)
    gdt: DescriptorTable = record(DescriptorTable)
    idt: DescriptorTable = record(DescriptorTable)
    cr0: int = uint(64)
    cr2: int = uint(64)
    cr3: int = uint(64)
    cr4: int = uint(64)
    cr8: int = uint(64)
    efer: int = uint(64)
    apic_base: int = uint(64)
    interrupt_bitmap: tuple[int, ...] = uints(64, 4)


class Xcr(KvmRecord):
    _kvm = B.kvm_xcr
    xcr: int = uint(32)  # which XCR (0: XCR0)
    value: int = uint(64)


class DebugRegs(KvmRecord):
    _kvm = B.kvm_debugregs
    db: tuple[int, ...] = uints(64, 4)
    dr6: int = uint(64)
    dr7: int = uint(64)
    flags: int = uint(64)


class VcpuEvents(KvmRecord):
    """kvm_vcpu_events, flattened (``exception.nr`` is ``exception_nr``)."""
    _kvm = B.kvm_vcpu_events
    exception_injected: int = uint(8, "exception.injected")
    exception_nr: int = uint(8, "exception.nr")
    exception_has_error_code: int = uint(8, "exception.has_error_code")
    exception_pending: int = uint(8, "exception.pending")
    exception_error_code: int = uint(32, "exception.error_code")
    interrupt_injected: int = uint(8, "interrupt.injected")
    interrupt_nr: int = uint(8, "interrupt.nr")
    interrupt_soft: int = uint(8, "interrupt.soft")
    interrupt_shadow: int = uint(8, "interrupt.shadow")
    nmi_injected: int = uint(8, "nmi.injected")
    nmi_pending: int = uint(8, "nmi.pending")
    nmi_masked: int = uint(8, "nmi.masked")
    sipi_vector: int = uint(32)
    flags: int = uint(32)  # KVM_VCPUEVENT_VALID_*: which optional fields KVM_SET_VCPU_EVENTS takes
    smi_smm: int = uint(8, "smi.smm")
    smi_pending: int = uint(8, "smi.pending")
    smi_inside_nmi: int = uint(8, "smi.smm_inside_nmi")
    smi_latched_init: int = uint(8, "smi.latched_init")
    triple_fault_pending: int = uint(8, "triple_fault.pending")
    exception_has_payload: int = uint(8)
    exception_payload: int = uint(64)


class VcpuState(Record):
    """Everything KVM holds for one x86 vCPU.  ``msrs`` maps index to value in KVM's order;
    ``tsc_khz`` is None where the host cannot tell (no KVM_CAP_GET_TSC_KHZ)."""

    _kind = "kvm-vcpu"
    _version = FORMAT_VERSION
    vcpu_id: int = uint(32)
    mp_state: int = uint(32)
    regs: Regs = record(Regs)
    sregs: Sregs = record(Sregs)
    xsave: bytes = blob(LEGACY_XSAVE_SIZE, 1 << 20, 4)
    xcrs: tuple[Xcr, ...] = records(Xcr, 0, B.KVM_MAX_XCRS)
    debugregs: DebugRegs = record(DebugRegs)
    lapic: bytes = blob(LAPIC_SIZE, LAPIC_SIZE)
    msrs: dict[int, int] = custom("msrs")
    events: VcpuEvents = record(VcpuEvents)
    tsc_khz: int | None = uint(32, optional=True)

    @classmethod
    def capture(cls, vcpu: Vcpu, msr_indices: list[int] | None = None) -> VcpuState:
        """Read the vCPU's state (it must not be in KVM_RUN).  ``msr_indices``: the MSRs to save
        (default: KVM_GET_MSR_INDEX_LIST); those KVM refuses to read for this vCPU are left out."""
        if vcpu.completion_pending:
            raise StateError(f"vCPU {vcpu.id} has an I/O exit KVM has not completed: re-enter KVM_RUN "
                             f"once with immediate_exit set before capturing its state")
        # MP_STATE first: reading it makes KVM process pending INIT/SIPI, which changes other state.
        # VCPU_EVENTS last: the other reads can move pending events around.
        mp_state = vcpu.get_mp_state()
        regs = Regs.from_kvm(vcpu.get_regs())
        sregs = Sregs.from_kvm(vcpu.get_sregs())
        xsave = vcpu.get_xsave()
        kx = vcpu.get_xcrs()
        xcrs = tuple(Xcr.from_kvm(x) for x in kx.xcrs[:kx.nr_xcrs])
        debugregs = DebugRegs.from_kvm(vcpu.get_debugregs())
        lapic = bytes(vcpu.get_lapic().regs)
        tsc_khz = vcpu.get_tsc_khz() if vcpu.vm.kvm.check_extension(B.KVM_CAP_GET_TSC_KHZ) else None
        if msr_indices is None:
            msr_indices = vcpu.vm.kvm.msr_index_list()
        msrs = _read_msrs(vcpu, msr_indices)
        events = VcpuEvents.from_kvm(vcpu.get_vcpu_events())
        return cls(vcpu_id=vcpu.id, mp_state=mp_state, regs=regs, sregs=sregs, xsave=xsave, xcrs=xcrs,
                   debugregs=debugregs, lapic=lapic, msrs=msrs, events=events, tsc_khz=tsc_khz)

    def restore(self, vcpu: Vcpu) -> None:
        """Load this state into ``vcpu`` (of a fresh VM, after :meth:`VmState.restore`), in the
        order the module docstring gives.  KvmError when KVM refuses a part (it names the ioctl,
        or the MSR)."""
        if vcpu.id != self.vcpu_id:
            raise StateError(f"this is the state of vCPU {self.vcpu_id}, not of vCPU {vcpu.id}")
        self._restore_tsc_khz(vcpu)
        vcpu.set_sregs(self.sregs.to_kvm())
        vcpu.set_regs(self.regs.to_kvm())
        vcpu.set_xsave(self.xsave)
        kx = B.kvm_xcrs(nr_xcrs=len(self.xcrs))
        for i, x in enumerate(self.xcrs):
            x.to_kvm(kx.xcrs[i])
        vcpu.set_xcrs(kx)
        vcpu.set_debugregs(self.debugregs.to_kvm())
        vcpu.set_lapic(B.kvm_lapic_state.from_buffer_copy(self.lapic))
        vcpu.set_msrs([(i, v) for i, v in self.msrs.items() if i not in DEFERRED_MSRS])
        vcpu.set_msrs([(i, self.msrs[i]) for i in DEFERRED_MSRS if i in self.msrs])
        vcpu.set_vcpu_events(self.events.to_kvm())
        vcpu.set_mp_state(self.mp_state)

    def _restore_tsc_khz(self, vcpu: Vcpu) -> None:
        if self.tsc_khz is None or not vcpu.vm.kvm.check_extension(B.KVM_CAP_GET_TSC_KHZ):
            return
        here = vcpu.get_tsc_khz()
        if abs(here - self.tsc_khz) * 1_000_000 > self.tsc_khz * TSC_KHZ_TOLERANCE_PPM:
            log.info("vCPU %d: scaling the TSC from %d kHz to the saved %d kHz", vcpu.id, here, self.tsc_khz)
            vcpu.set_tsc_khz(self.tsc_khz)  # KvmError where this host cannot run the TSC at that rate


def _read_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """The values of ``indices`` (in that order, duplicates dropped), skipping those KVM will not
    read for this vCPU (KVM_GET_MSRS stops at the first it refuses)."""
    todo = list(dict.fromkeys(indices))
    values: dict[int, int] = {}
    while todo:
        got = vcpu.get_msrs(todo)
        values.update(got)
        if len(got) == len(todo):
            break
        log.debug("vCPU %d: MSR %#x cannot be read, not saved", vcpu.id, todo[len(got)])
        todo = todo[len(got) + 1:]
    return values


# -- VM records --------------------------------------------------------------------------------------
class PicState(KvmRecord):
    _kvm = B.kvm_pic_state
    last_irr: int = uint(8)
    irr: int = uint(8)
    imr: int = uint(8)
    isr: int = uint(8)
    priority_add: int = uint(8)
    irq_base: int = uint(8)
    read_reg_select: int = uint(8)
    poll: int = uint(8)
    special_mask: int = uint(8)
    init_state: int = uint(8)
    auto_eoi: int = uint(8)
    rotate_on_auto_eoi: int = uint(8)
    special_fully_nested_mode: int = uint(8)
    init4: int = uint(8)
    elcr: int = uint(8)
    elcr_mask: int = uint(8)


class IoapicState(KvmRecord):
    """The IOAPIC; each redirection table entry is its raw 64-bit value."""
    _kvm = B.kvm_ioapic_state
    base_address: int = uint(64)
    ioregsel: int = uint(32)
    id: int = uint(32)
    irr: int = uint(32)
    redirtbl: tuple[int, ...] = uints(64, B.KVM_IOAPIC_NUM_PINS)


class IrqchipState(Record):
    pic_master: PicState = record(PicState)
    pic_slave: PicState = record(PicState)
    ioapic: IoapicState = record(IoapicState)


class PitChannel(KvmRecord):
    """One i8254 channel.  ``count_load_time`` is host time: KVM restarts the count on restore."""
    _kvm = B.kvm_pit_channel_state
    count: int = uint(32)
    latched_count: int = uint(16)
    count_latched: int = uint(8)
    status_latched: int = uint(8)
    status: int = uint(8)
    read_state: int = uint(8)
    write_state: int = uint(8)
    write_latch: int = uint(8)
    rw_mode: int = uint(8)
    mode: int = uint(8)
    bcd: int = uint(8)
    gate: int = uint(8)
    count_load_time: int = sint(64)


class PitState(KvmRecord):
    _kvm = B.kvm_pit_state2
    channels: tuple[PitChannel, ...] = records(PitChannel, 3, 3)
    flags: int = uint(32)


class ClockData(Record):
    """kvmclock at capture.  ``realtime`` is the host's CLOCK_REALTIME (ns) at that instant: KVM's
    own reading when ``flags`` has KVM_CLOCK_REALTIME, else hypyr's, right after KVM_GET_CLOCK."""
    clock: int = uint(64)
    flags: int = uint(32)
    realtime: int = uint(64)
    host_tsc: int = uint(64)


class VmState(Record):
    """The VM-wide KVM state: in-kernel PICs and IOAPIC, PIT, kvmclock.  ``irqchip``/``pit`` are
    None for a VM created without them."""

    _kind = "kvm-vm"
    _version = FORMAT_VERSION
    irqchip: IrqchipState | None = record(IrqchipState, optional=True)
    pit: PitState | None = record(PitState, optional=True)
    clock: ClockData = record(ClockData)

    @classmethod
    def capture(cls, vm: Vm) -> VmState:
        """Read the VM's state; call it with every vCPU out of KVM_RUN."""
        irqchip = None
        if _exists(lambda: vm.get_irqchip(B.KVM_IRQCHIP_PIC_MASTER)):
            irqchip = IrqchipState(
                pic_master=PicState.from_kvm(vm.get_irqchip(B.KVM_IRQCHIP_PIC_MASTER).chip.pic),
                pic_slave=PicState.from_kvm(vm.get_irqchip(B.KVM_IRQCHIP_PIC_SLAVE).chip.pic),
                ioapic=IoapicState.from_kvm(vm.get_irqchip(B.KVM_IRQCHIP_IOAPIC).chip.ioapic))
        pit = PitState.from_kvm(vm.get_pit2()) if _exists(vm.get_pit2) else None
        c = vm.get_clock()
        realtime = c.realtime if c.flags & B.KVM_CLOCK_REALTIME else time.time_ns()
        clock = ClockData(clock=c.clock, flags=c.flags, realtime=realtime, host_tsc=c.host_tsc)
        return cls(irqchip=irqchip, pit=pit, clock=clock)

    def restore(self, vm: Vm, *, advance_clock: bool = False) -> None:
        """Load this state into ``vm`` (fresh, with the same irqchip/PIT, before its vCPUs' states).

        kvmclock resumes at the captured value (``advance_clock=False``: the guest does not see
        the time it spent saved), or, for a migration, that value plus the host CLOCK_REALTIME
        time elapsed since the capture (``advance_clock=True``); it never goes back."""
        if (self.irqchip is not None) != _exists(lambda: vm.get_irqchip(B.KVM_IRQCHIP_PIC_MASTER)):
            raise StateError("the saved VM and this one differ in having an in-kernel irqchip")
        if (self.pit is not None) != _exists(vm.get_pit2):
            raise StateError("the saved VM and this one differ in having an in-kernel PIT")
        # interrupt controllers before the PIT, whose output pin drives them
        if self.irqchip is not None:
            for chip_id, state in ((B.KVM_IRQCHIP_PIC_MASTER, self.irqchip.pic_master),
                                   (B.KVM_IRQCHIP_PIC_SLAVE, self.irqchip.pic_slave)):
                chip = B.kvm_irqchip(chip_id=chip_id)
                state.to_kvm(chip.chip.pic)
                vm.set_irqchip(chip)
            chip = B.kvm_irqchip(chip_id=B.KVM_IRQCHIP_IOAPIC)
            self.irqchip.ioapic.to_kvm(chip.chip.ioapic)
            vm.set_irqchip(chip)
        if self.pit is not None:
            vm.set_pit2(self.pit.to_kvm())
        self._restore_clock(vm, advance_clock)

    def _restore_clock(self, vm: Vm, advance: bool) -> None:
        c = self.clock
        data = B.kvm_clock_data(clock=c.clock)
        if advance:
            if c.flags & B.KVM_CLOCK_REALTIME and vm.clock_flags() & B.KVM_CLOCK_REALTIME:
                data.flags, data.realtime = B.KVM_CLOCK_REALTIME, c.realtime  # KVM adds the time since
            else:
                data.clock = min(c.clock + max(0, time.time_ns() - c.realtime), (1 << 64) - 1)
        vm.set_clock(data)


def _exists(get) -> bool:
    """Whether the VM has the in-kernel device ``get`` reads (KVM answers ENXIO when it has not)."""
    try:
        get()
    except KvmError as e:
        if e.errno == errno.ENXIO:
            return False
        raise
    return True
