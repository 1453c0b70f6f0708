"""KVM vCPU/VM state on the real /dev/kvm: capture a running guest, restore it into a fresh VM,
and check that the guest carries on exactly; the new bindings (irqchip, PIT, clock, XSAVE,
dirty log...) one by one; and the bindings against the system's <linux/kvm.h>.

The VMs here are raw (no Machine): the tests run each vCPU exit by exit from this thread.
"""

from __future__ import annotations

import ctypes as C
import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

import payloads as P
import pytest

from hypyr.arch.x86.vcpu_state import MSR_IA32_TSC, DebugRegs, Regs, Sregs, VcpuEvents, VcpuState, VmState
from hypyr.errors import StateError
from hypyr.kvm import B, KvmError
from hypyr.memory import GuestMemory

MiB = 1 << 20
REPORT_PORT, AP_REPORT_PORT = 0x10, 0x11
AP_CODE_ADDR = 0x1400
XMM2_OFFSET = 160 + 2 * 16  # in the XSAVE area (legacy FXSAVE layout: XMM0 at 160)
XSTATE_BV_OFFSET, XFEATURE_SSE = 512, 1 << 1  # the XSAVE header's bitmap of saved components
MAGIC_XMM2 = bytes.fromhex("0123456789abcdeffedcba9876543210")
MSR_LSTAR, MSR_KERNEL_GS_BASE = 0xC0000082, 0xC0000102

# vCPU 0: program the in-kernel PIC and PIT, then count in RCX and at COUNTER_ADDR, copy the
# counter into XMM1 and XMM2 (set by the host) to 0x2010, and report RCX on port 0x10
COUNTER_IO = P.Payload("counter_io", 64, tuple((bytes.fromhex(h), a) for h, a in (
    ("b0 fb", "mov al, 0xfb"),
    ("e6 21", "out 0x21, al"),                              # PIC master IMR (in-kernel: no exit)
    ("b0 34", "mov al, 0x34"),
    ("e6 43", "out 0x43, al"),                              # PIT channel 0: lo/hi byte, mode 2
    ("b0 00", "mov al, 0x00"),
    ("e6 40", "out 0x40, al"),
    ("b0 10", "mov al, 0x10"),
    ("e6 40", "out 0x40, al"),                              # count 0x1000
    ("31 c9", "xor ecx, ecx"),
    ("48 ff c1", "inc rcx"),                                # loop:
    ("ff 04 25 00 20 00 00", "inc dword ptr [0x2000]"),
    ("f3 0f 6f 0c 25 00 20 00 00", "movdqu xmm1, [0x2000]"),
    ("f3 0f 7f 14 25 10 20 00 00", "movdqu [0x2010], xmm2"),
    ("89 c8", "mov eax, ecx"),
    ("e7 10", "out 0x10, eax"),                             # a userspace exit
    ("eb de", "jmp loop"),
)))
# vCPU 1: count in RCX and report it on port 0x11
AP_COUNTER = P.Payload("ap_counter", 64, tuple((bytes.fromhex(h), a) for h, a in (
    ("48 ff c1", "inc rcx"),
    ("89 c8", "mov eax, ecx"),
    ("e7 11", "out 0x11, eax"),
    ("eb f7", "jmp . - 9"),
)))


@dataclasses.dataclass
class RawVm:
    vm: object
    mem: GuestMemory
    vcpus: list


@pytest.fixture
def new_vm(kvm):
    """``new_vm(nr_vcpus=1, irqchip=True)``: a VM with 1 MiB of RAM in slot 0 (and the in-kernel
    PIC/IOAPIC/PIT), closed after the test."""
    made: list[RawVm] = []

    def make(nr_vcpus: int = 1, *, irqchip: bool = True) -> RawVm:
        vm = kvm.create_vm()
        mem = GuestMemory.anonymous([(0, MiB)], hugepages=False)
        raw = RawVm(vm, mem, [])
        made.append(raw)
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        if irqchip:
            vm.create_irqchip()
            vm.create_pit2()
        vm.set_user_memory_region(0, MiB, mem.regions[0].host_address())
        raw.vcpus = [vm.create_vcpu(i) for i in range(nr_vcpus)]
        return raw

    yield make
    for raw in made:
        for v in raw.vcpus:
            v.close()
        raw.vm.close()
        raw.mem.close()


def next_report(vcpu, port: int) -> int:
    """Run ``vcpu`` to its next OUT to ``port`` and return the dword written."""
    reason = vcpu.run()
    assert reason == B.KVM_EXIT_IO, B.EXIT_REASON_NAMES.get(reason, reason)
    is_out, got_port, size, count, data = vcpu.io_exit()
    assert (is_out, got_port, size, count) == (True, port, 4, 1)
    return int.from_bytes(data, "little")


def complete_io(vcpu) -> None:
    """Let KVM finish the last I/O instruction without running another one."""
    vcpu.immediate_exit = True
    assert vcpu.run() == B.KVM_EXIT_INTR
    assert not vcpu.completion_pending


def start_counting_guest(kvm, raw: RawVm) -> None:
    P.load(raw.mem, COUNTER_IO)
    P.load(raw.mem, AP_COUNTER, AP_CODE_ADDR)
    bsp, ap = raw.vcpus
    P.setup_long_mode(kvm, bsp, raw.mem)
    P.setup_long_mode(kvm, ap, raw.mem, rip=AP_CODE_ADDR, rcx=1000)
    ap.set_mp_state(B.KVM_MP_STATE_RUNNABLE)  # no INIT/SIPI needed
    xsave = bytearray(bsp.get_xsave())
    xsave[XMM2_OFFSET:XMM2_OFFSET + 16] = MAGIC_XMM2
    xsave[XSTATE_BV_OFFSET] |= XFEATURE_SSE  # else KVM takes the SSE state as in its init state (zeros)
    bsp.set_xsave(bytes(xsave))
    dr = bsp.get_debugregs()
    dr.db[:] = [0x1000, 0x2000, 0x3000, 0x4000]  # addresses only: DR7 enables none of them
    bsp.set_debugregs(dr)
    bsp.set_msrs([(MSR_LSTAR, 0xFFFF_FFFF_8100_0000), (MSR_KERNEL_GS_BASE, 0xFFFF_8880_0000_1000)])


def json_round_trip(d: dict) -> dict:
    """Through JSON text, bytes as {"hex": ...}: what a caller writing a state file would do."""
    text = json.dumps(d, default=lambda b: {"hex": b.hex()})
    return json.loads(text, object_hook=lambda o: bytes.fromhex(o["hex"]) if set(o) == {"hex"} else o)


# -- the whole story ----------------------------------------------------------------------------------
def test_guest_continues_exactly_in_a_fresh_vm(kvm, new_vm):
    src = new_vm(2)
    start_counting_guest(kvm, src)
    bsp, ap = src.vcpus
    for i in range(1, 31):
        assert next_report(bsp, REPORT_PORT) == i
        assert next_report(ap, AP_REPORT_PORT) == 1000 + i
    for v in src.vcpus:
        complete_io(v)

    states = [VcpuState.capture(v) for v in src.vcpus]
    cpuids = [v.get_cpuid() for v in src.vcpus]  # not in VcpuState: set first, as a restore does
    vm_state = VmState.capture(src.vm)
    assert states[0].regs.rcx == 30 and states[1].regs.rcx == 1030
    assert states[0].regs.rip == P.CODE_ADDR + 0x32  # just past the completed OUT: the jmp
    assert vm_state.irqchip.pic_master.imr == 0xFB  # what the guest wrote to the in-kernel PIC
    ch0 = vm_state.pit.channels[0]
    assert (ch0.mode, ch0.count, ch0.rw_mode) == (2, 0x1000, 3)

    # through plain data and JSON text, as a state file would carry them
    states = [VcpuState.from_dict(json_round_trip(s.to_dict())) for s in states]
    vm_state = VmState.from_dict(json_round_trip(vm_state.to_dict()))

    dst = new_vm(2)
    dst.mem.write(0, src.mem.read(0, MiB))
    dst.mem.fill(0x2010, 16)  # the guest writes XMM2 here again: only a restored XSAVE brings it back
    vm_state.restore(dst.vm)
    for s, v, cpuid in zip(states, dst.vcpus, cpuids):
        v.set_cpuid(cpuid)
        s.restore(v)

    # right after the restore the vCPUs hold exactly what was captured
    for s, v, cpuid in zip(states, dst.vcpus, cpuids):
        assert Regs.from_kvm(v.get_regs()) == s.regs
        assert Sregs.from_kvm(v.get_sregs()) == s.sregs
        assert v.get_xsave() == s.xsave
        assert DebugRegs.from_kvm(v.get_debugregs()) == s.debugregs
        assert bytes(v.get_lapic().regs) == s.lapic
        assert VcpuEvents.from_kvm(v.get_vcpu_events()) == s.events
        assert v.get_cpuid() == cpuid
        assert v.get_mp_state() == s.mp_state
        back = VcpuState.capture(v)
        assert back.xcrs == s.xcrs and back.tsc_khz == s.tsc_khz
        tsc = back.msrs.pop(MSR_IA32_TSC)
        assert back.msrs == {i: val for i, val in s.msrs.items() if i != MSR_IA32_TSC}
        # the TSC goes on from the saved value: not back, not on by the time spent saved
        assert s.msrs[MSR_IA32_TSC] <= tsc < s.msrs[MSR_IA32_TSC] + 10 * s.tsc_khz * 1000
    assert states[0].msrs[MSR_LSTAR] == 0xFFFF_FFFF_8100_0000
    after = VmState.capture(dst.vm)
    assert after.irqchip.ioapic == vm_state.irqchip.ioapic
    assert after.irqchip.pic_master.imr == 0xFB and after.irqchip.pic_slave == vm_state.irqchip.pic_slave
    assert [c.replace(count_load_time=0) for c in after.pit.channels] == \
           [c.replace(count_load_time=0) for c in vm_state.pit.channels]

    # the guest carries on from where it was: next counter values, in registers and memory
    bsp2, ap2 = dst.vcpus
    for i in range(31, 41):
        assert next_report(bsp2, REPORT_PORT) == i
        assert dst.mem.read_u32(P.COUNTER_ADDR) == i
        assert next_report(ap2, AP_REPORT_PORT) == 1000 + i
    assert dst.mem.read(0x2010, 16) == MAGIC_XMM2  # XMM2 came back with XSAVE
    complete_io(bsp2)
    assert VcpuState.capture(bsp2).xsave[160 + 16:160 + 20] == (40).to_bytes(4, "little")  # XMM1 follows the count


def test_capture_refuses_a_vcpu_with_io_to_complete(kvm, new_vm):
    raw = new_vm(2)
    start_counting_guest(kvm, raw)
    assert next_report(raw.vcpus[0], REPORT_PORT) == 1
    assert raw.vcpus[0].completion_pending
    with pytest.raises(StateError, match="immediate_exit"):
        VcpuState.capture(raw.vcpus[0])
    # (where KVM emulates the guest, RIP is already past the OUT; with VT-x/SVM it gets there now)
    assert raw.vcpus[0].get_regs().rip in (P.CODE_ADDR + 0x30, P.CODE_ADDR + 0x32)
    complete_io(raw.vcpus[0])
    assert raw.vcpus[0].get_regs().rip == P.CODE_ADDR + 0x32  # KVM finished the OUT, ran nothing more
    VcpuState.capture(raw.vcpus[0])


def test_restore_checks_the_vcpu_and_the_vm(kvm, new_vm):
    raw = new_vm(2)
    state = VcpuState.capture(raw.vcpus[1])
    with pytest.raises(StateError, match="vCPU 1, not of vCPU 0"):
        state.restore(new_vm(1).vcpus[0])
    vm_state = VmState.capture(raw.vm)
    with pytest.raises(StateError, match="irqchip"):
        vm_state.restore(new_vm(0, irqchip=False).vm)
    bare = VmState.capture(new_vm(0, irqchip=False).vm)
    assert bare.irqchip is None and bare.pit is None
    with pytest.raises(StateError, match="irqchip"):
        bare.restore(new_vm(0).vm)
    bare.restore(new_vm(0, irqchip=False).vm)


def test_real_mode_and_waiting_ap_round_trip(kvm, new_vm):
    """A vCPU never set up (real mode, no CPUID) and an AP waiting for SIPI restore as they were."""
    src = new_vm(2)
    states = [VcpuState.capture(v) for v in src.vcpus]
    assert states[1].mp_state == B.KVM_MP_STATE_UNINITIALIZED
    dst = new_vm(2)
    for s, v in zip(states, dst.vcpus):
        s.restore(v)
    for s, v in zip(states, dst.vcpus):
        back = VcpuState.capture(v)
        back.msrs.pop(MSR_IA32_TSC)
        assert back.replace(msrs={}) == s.replace(msrs={})
        assert back.msrs == {i: val for i, val in s.msrs.items() if i != MSR_IA32_TSC}


# -- kvmclock -----------------------------------------------------------------------------------------
def test_kvmclock_resumes_at_the_captured_value(new_vm):
    state = VmState.capture(new_vm(0).vm)
    time.sleep(0.3)
    vm = new_vm(0).vm
    state.restore(vm)
    first = vm.get_clock().clock
    assert state.clock.clock <= first < state.clock.clock + 200_000_000  # not back, not on by the 0.3 s
    time.sleep(0.02)
    assert vm.get_clock().clock >= first + 10_000_000  # and it runs


def test_kvmclock_advances_by_the_elapsed_time_for_a_migration(new_vm):
    state = VmState.capture(new_vm(0).vm)
    time.sleep(0.3)
    vm = new_vm(0).vm
    state.restore(vm, advance_clock=True)
    now = vm.get_clock().clock
    assert state.clock.clock + 300_000_000 <= now < state.clock.clock + 5_000_000_000


def test_kvmclock_advance_through_kvm_clock_realtime(new_vm):
    vm = new_vm(0).vm
    if not vm.clock_flags() & B.KVM_CLOCK_REALTIME:
        pytest.skip("KVM_CAP_ADJUST_CLOCK lacks KVM_CLOCK_REALTIME here")
    state = VmState.capture(vm)
    # as if captured 2 s ago on a host whose KVM_GET_CLOCK reported CLOCK_REALTIME
    clock = state.clock.replace(flags=B.KVM_CLOCK_REALTIME, realtime=time.time_ns() - 2_000_000_000)
    state.replace(clock=clock).restore(vm, advance_clock=True)
    assert clock.clock + 2_000_000_000 <= vm.get_clock().clock < clock.clock + 5_000_000_000


# -- the in-kernel devices by get-after-set ------------------------------------------------------------
def test_irqchip_and_pit_round_trip(new_vm):
    state = VmState.capture(new_vm(0).vm)
    chips = state.irqchip
    master = chips.pic_master.replace(imr=0x5A, irq_base=0x20, init4=1, elcr=0x08, auto_eoi=1)
    slave = chips.pic_slave.replace(imr=0xA5, irq_base=0x28, init4=1, elcr=0x0C)
    redirtbl = tuple(0x1_0000 | (0x30 + pin) | (pin % 3) << 56 for pin in range(24))  # masked, vectors 0x30+
    ioapic = chips.ioapic.replace(id=5 << 24, ioregsel=0x12, redirtbl=redirtbl)
    channels = (state.pit.channels[0].replace(count=0x2345, mode=2, rw_mode=3, gate=1),
                state.pit.channels[1].replace(count=0x12, mode=3, rw_mode=1),
                state.pit.channels[2].replace(count=0x4000, mode=0, rw_mode=3, gate=0))
    wanted = state.replace(irqchip=chips.replace(pic_master=master, pic_slave=slave, ioapic=ioapic),
                           pit=state.pit.replace(channels=channels))
    vm = new_vm(0).vm
    wanted.restore(vm)
    back = VmState.capture(vm)
    assert back.irqchip == wanted.irqchip
    assert [c.replace(count_load_time=0) for c in back.pit.channels] == \
           [c.replace(count_load_time=0) for c in channels]  # KVM restarts the counts
    assert back.pit.flags == wanted.pit.flags


def test_lapic_round_trip(kvm, new_vm):
    v = new_vm(1).vcpus[0]
    lapic = v.get_lapic()

    def put(offset: int, value: int) -> None:
        lapic.regs[offset:offset + 4] = list(value.to_bytes(4, "little"))
    put(0x80, 0x40)          # TPR
    put(0xD0, 0x0300_0000)   # LDR
    put(0xF0, 0x1FF)         # SVR: enabled, spurious vector 0xff
    put(0x320, 0x1_00EC)     # LVT timer: masked, vector 0xec
    put(0x350, 0x700)        # LINT0: ExtINT
    put(0x360, 0x400)        # LINT1: NMI
    v.set_lapic(lapic)
    state = VcpuState.capture(v)
    v2 = new_vm(1).vcpus[0]
    state.restore(v2)
    assert bytes(v2.get_lapic().regs) == state.lapic == bytes(v.get_lapic().regs)
    assert int.from_bytes(state.lapic[0x80:0x84], "little") == 0x40


# -- TSC frequency --------------------------------------------------------------------------------------
def test_tsc_khz_within_tolerance_needs_no_scaling(kvm, new_vm):
    v = new_vm(1).vcpus[0]
    state = VcpuState.capture(v)
    assert state.tsc_khz and state.tsc_khz == v.get_tsc_khz()
    v2 = new_vm(1).vcpus[0]
    state.replace(tsc_khz=state.tsc_khz + state.tsc_khz // 10_000).restore(v2)  # +100 ppm
    assert v2.get_tsc_khz() == state.tsc_khz


def test_tsc_khz_that_the_host_cannot_give_is_an_error(kvm, new_vm):
    if kvm.check_extension(B.KVM_CAP_TSC_CONTROL):
        pytest.skip("this host has KVM_CAP_TSC_CONTROL: it may well scale the TSC")
    state = VcpuState.capture(new_vm(1).vcpus[0])
    with pytest.raises(KvmError, match="KVM_SET_TSC_KHZ"):
        state.replace(tsc_khz=state.tsc_khz // 2).restore(new_vm(1).vcpus[0])


def test_msr_index_list(kvm, new_vm):
    indices = kvm.msr_index_list()
    assert MSR_IA32_TSC in indices and 0x174 in indices and len(set(indices)) == len(indices)
    state = VcpuState.capture(new_vm(1).vcpus[0])
    assert list(state.msrs) == [i for i in indices if i in state.msrs]  # KVM's order
    assert MSR_IA32_TSC in state.msrs


def test_xsave_size_and_xcr0(new_vm):
    raw = new_vm(1)
    assert raw.vm.xsave_size >= 4096 and raw.vm.xsave_size % 4 == 0
    state = VcpuState.capture(raw.vcpus[0])
    assert len(state.xsave) == raw.vm.xsave_size
    assert [(x.xcr, x.value & 1) for x in state.xcrs][:1] == [(0, 1)]  # XCR0 always has x87


# -- dirty logging ----------------------------------------------------------------------------------------
def dirty_pages(bitmap: bytes) -> set[int]:
    n = int.from_bytes(bitmap, "little")
    return {i for i in range(len(bitmap) * 8) if n >> i & 1}


def test_dirty_log_tracks_guest_writes(kvm, new_vm):
    raw = new_vm(2)
    with pytest.raises(KvmError, match="KVM_GET_DIRTY_LOG"):
        raw.vm.get_dirty_log(0)  # logging is off
    raw.vm.set_dirty_logging(0, True)
    assert len(raw.vm.get_dirty_log(0)) == MiB // 4096 // 8
    start_counting_guest(kvm, raw)
    raw.mem.write(0x5000, b"host")  # host writes are not logged
    for _ in range(3):
        next_report(raw.vcpus[0], REPORT_PORT)
    pages = dirty_pages(raw.vm.get_dirty_log(0))
    assert P.COUNTER_ADDR // 4096 in pages
    assert P.CODE_ADDR // 4096 not in pages and 5 not in pages
    assert dirty_pages(raw.vm.get_dirty_log(0)) == set()  # reading cleared it
    next_report(raw.vcpus[0], REPORT_PORT)
    assert P.COUNTER_ADDR // 4096 in dirty_pages(raw.vm.get_dirty_log(0))
    raw.vm.set_dirty_logging(0, False)
    with pytest.raises(KvmError):
        raw.vm.get_dirty_log(0)


def test_manual_dirty_log_protect(kvm, new_vm):
    raw = new_vm(2)
    if not raw.vm.manual_dirty_log_protect_flags() & B.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        pytest.skip("no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 here")
    raw.vm.enable_manual_dirty_log_protect()
    raw.vm.set_dirty_logging(0, True)
    start_counting_guest(kvm, raw)
    next_report(raw.vcpus[0], REPORT_PORT)
    first = raw.vm.get_dirty_log(0)
    assert P.COUNTER_ADDR // 4096 in dirty_pages(first)
    assert raw.vm.get_dirty_log(0) == first  # reading no longer clears
    raw.vm.clear_dirty_log(0, 0, first)
    assert dirty_pages(raw.vm.get_dirty_log(0)) == set()
    next_report(raw.vcpus[0], REPORT_PORT)
    assert P.COUNTER_ADDR // 4096 in dirty_pages(raw.vm.get_dirty_log(0))


# -- the bindings against the kernel's own headers --------------------------------------------------------
HEADER_CHECKS = {
    "sizes": ["kvm_vcpu_events", "kvm_debugregs", "kvm_xsave", "kvm_xcrs", "kvm_pic_state", "kvm_ioapic_state",
              "kvm_irqchip", "kvm_pit_channel_state", "kvm_pit_state2", "kvm_clock_data", "kvm_dirty_log",
              "kvm_clear_dirty_log", "kvm_enable_cap", "kvm_regs", "kvm_sregs", "kvm_lapic_state"],
    "ioctls": ["KVM_GET_MSR_INDEX_LIST", "KVM_GET_DIRTY_LOG", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP",
               "KVM_SET_CLOCK", "KVM_GET_CLOCK", "KVM_GET_CPUID2", "KVM_GET_PIT2", "KVM_SET_PIT2",
               "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
               "KVM_SET_TSC_KHZ", "KVM_GET_TSC_KHZ", "KVM_ENABLE_CAP", "KVM_GET_XSAVE", "KVM_SET_XSAVE",
               "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_CLEAR_DIRTY_LOG", "KVM_GET_XSAVE2",
               "KVM_CAP_XSAVE2", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "KVM_CAP_GET_TSC_KHZ",
               "KVM_CAP_TSC_CONTROL", "KVM_CAP_CHECK_EXTENSION_VM", "KVM_CLOCK_REALTIME",
               "KVM_VCPUEVENT_VALID_SMM", "KVM_MEM_LOG_DIRTY_PAGES", "KVM_DIRTY_LOG_INITIALLY_SET"],
}


@pytest.mark.no_kvm
def test_bindings_match_the_system_kvm_header(tmp_path: Path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs a C compiler and /usr/include/linux/kvm.h (linux-libc-dev)")
    lines = [f'printf("{n} %lu\\n", (unsigned long)sizeof(struct {n}));' for n in HEADER_CHECKS["sizes"]]
    lines += [f'printf("{n} %lu\\n", (unsigned long)({n}));' for n in HEADER_CHECKS["ioctls"]]
    src = tmp_path / "h.c"
    src.write_text("#include <stdio.h>\n#include <linux/kvm.h>\nint main(void) {\n" + "\n".join(lines)
                   + "\nreturn 0;\n}\n")
    subprocess.run([cc, str(src), "-o", str(tmp_path / "h")], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "h")], check=True, capture_output=True, text=True).stdout
    c_values = dict((n, int(v)) for n, v in (line.split() for line in out.splitlines()))
    for n in HEADER_CHECKS["sizes"]:
        assert C.sizeof(getattr(B, n)) == c_values[n], n
    for n in HEADER_CHECKS["ioctls"]:
        assert getattr(B, n) == c_values[n], n
