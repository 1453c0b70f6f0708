"""hypyr.kvm on the real /dev/kvm: system/VM/vCPU ioctls and raw KVM_RUN exits, without a Machine."""

from __future__ import annotations

import os

import payloads as P
import pytest

from hypyr.kvm import B, Kvm, KvmError, KvmUnavailable
from hypyr.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture
def vm(kvm):
    vm = kvm.create_vm()
    yield vm
    vm.close()


@pytest.fixture
def ram(vm):
    mem = GuestMemory.anonymous([(0, MiB)], hugepages=False)
    vm.set_user_memory_region(0, MiB, mem.regions[0].host_address())
    yield mem
    mem.close()


@pytest.fixture
def vcpus(vm):
    made = []

    def make(i: int = 0):
        v = vm.create_vcpu(i)
        made.append(v)
        return v
    yield make
    for v in made:
        v.close()


@pytest.mark.no_kvm
def test_missing_device_is_unavailable_not_a_crash(tmp_path):
    with pytest.raises(KvmUnavailable, match="does not exist"):
        Kvm(str(tmp_path / "kvm"))


@pytest.mark.no_kvm
def test_a_device_that_is_not_kvm_is_unavailable():
    with pytest.raises(KvmUnavailable, match="/dev/null"):
        Kvm("/dev/null")


@pytest.mark.no_kvm
def test_unavailable_kvm_does_not_leak_its_fd():
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(KvmUnavailable):
            Kvm("/dev/null")
    assert len(os.listdir("/proc/self/fd")) == before


def test_system_capabilities(kvm):
    assert kvm.vcpu_mmap_size >= 4096
    assert kvm.max_vcpus >= 1 and kvm.recommended_vcpus >= 1
    assert kvm.check_extension(B.KVM_CAP_IMMEDIATE_EXIT)
    leaves = {e.function for e in kvm.supported_cpuid()}
    assert {0, 1, 0x80000000, 0x80000001} <= leaves


def test_memslots_are_numbered_in_order(vm):
    mem = GuestMemory.anonymous([(0, MiB), (4 * MiB, MiB)], hugepages=False)
    try:
        assert [vm.set_user_memory_region(r.start, r.size, r.host_address()) for r in mem.regions] == [0, 1]
    finally:
        mem.close()


def test_overlapping_memslot_is_refused(vm, ram):
    other = GuestMemory.anonymous([(0, MiB)], hugepages=False)
    try:
        with pytest.raises(KvmError):
            vm.set_user_memory_region(0x80000, MiB, other.regions[0].host_address())
    finally:
        other.close()


def test_regs_and_sregs_round_trip(vcpus):
    v = vcpus()
    r = v.get_regs()
    r.rax, r.rbx, r.r15, r.rip, r.rflags = 0x1122334455667788, 7, 0xDEAD, 0x1234, 0x2
    v.set_regs(r)
    r2 = v.get_regs()
    assert (r2.rax, r2.rbx, r2.r15, r2.rip, r2.rflags) == (0x1122334455667788, 7, 0xDEAD, 0x1234, 0x2)
    P.setup_real_mode(v, rip=0x1000)
    s = v.get_sregs()
    assert (s.cs.base, s.cs.selector, s.ds.base) == (0, 0, 0)
    assert s.cr0 & 1 == 0  # still real mode


def test_long_mode_state_is_accepted(kvm, ram, vcpus):
    v = vcpus()
    P.setup_long_mode(kvm, v, ram, rip=0x1000)
    s = v.get_sregs()
    assert s.efer & (1 << 10)  # LMA
    assert s.cs.l == 1 and s.cr3 == 0x9000


def test_raw_pio_exits_and_io_data(ram, vcpus):
    """KVM_RUN exit by exit: OUT data is readable, IN data written by us reaches the guest."""
    code = bytes.fromhex("b0 5a e6 42"    # mov al, 0x5a; out 0x42, al
                         "e4 43"          # in al, 0x43
                         "e6 44"          # out 0x44, al
                         "f4")            # hlt
    ram.write(0x1000, code)
    v = vcpus()
    P.setup_real_mode(v)

    assert v.run() == B.KVM_EXIT_IO
    is_out, port, size, count, data = v.io_exit()
    assert (is_out, port, size, count) == (True, 0x42, 1, 1)
    assert bytes(data) == b"\x5a"

    assert v.run() == B.KVM_EXIT_IO
    is_out, port, size, count, data = v.io_exit()
    assert (is_out, port, size, count) == (False, 0x43, 1, 1)
    data[0] = 0xA7

    assert v.run() == B.KVM_EXIT_IO
    is_out, port, size, count, data = v.io_exit()
    assert (is_out, port) == (True, 0x44)
    assert bytes(data) == b"\xa7"

    assert v.run() == B.KVM_EXIT_HLT
    assert v.get_regs().rip == 0x1000 + len(code)


def test_immediate_exit_returns_intr_and_is_cleared(ram, vcpus):
    ram.write(0x1000, P.HLT.code)
    v = vcpus()
    P.setup_real_mode(v)
    v.immediate_exit = True
    assert v.run() == B.KVM_EXIT_INTR
    assert not v.immediate_exit
    assert v.get_regs().rip == 0x1000  # the guest did not run
    assert v.run() == B.KVM_EXIT_HLT


def test_msrs_round_trip(vcpus):
    v = vcpus()
    # (SYSENTER_ESP/EIP are only 32 bits wide on AMD: use MSRs that are 64-bit everywhere)
    IA32_SYSENTER_CS, MSR_LSTAR = 0x174, 0xC0000082
    v.set_msrs([(IA32_SYSENTER_CS, 0x10), (MSR_LSTAR, 0xFFFF8000_00001000)])
    assert v.get_msrs([IA32_SYSENTER_CS, MSR_LSTAR]) == {IA32_SYSENTER_CS: 0x10, MSR_LSTAR: 0xFFFF8000_00001000}


def test_refused_msr_raises(vcpus):
    try:
        with open("/sys/module/kvm/parameters/ignore_msrs") as f:
            if f.read().strip() in ("Y", "1"):
                pytest.skip("kvm.ignore_msrs is set: KVM accepts any MSR")
    except OSError:
        pass
    v = vcpus()
    with pytest.raises(KvmError, match="0xdeadbeef"):
        v.set_msrs([(0x174, 0x10), (0xDEADBEEF, 1)])  # no such MSR


def test_cpuid_can_be_set(kvm, vcpus):
    vcpus().set_cpuid(kvm.supported_cpuid())


def test_lapic_and_mp_state_with_irqchip(vm, vcpus):
    vm.create_irqchip()
    bsp, ap = vcpus(0), vcpus(1)
    assert bsp.get_mp_state() == B.KVM_MP_STATE_RUNNABLE
    assert ap.get_mp_state() == B.KVM_MP_STATE_UNINITIALIZED  # waits for INIT/SIPI
    lapic = bsp.get_lapic()
    lint0 = int.from_bytes(bytes(lapic.regs[0x350:0x354]), "little")
    lint0 = (lint0 & ~0x700) | (0x7 << 8)  # ExtINT
    lapic.regs[0x350:0x354] = list(lint0.to_bytes(4, "little"))
    bsp.set_lapic(lapic)
    back = bsp.get_lapic()
    assert int.from_bytes(bytes(back.regs[0x350:0x354]), "little") & 0x700 == 0x700
    assert bytes(back.regs[0x20:0x24])[3] == 0 and bytes(ap.get_lapic().regs[0x20:0x24])[3] == 1  # APIC ids
    ap.set_mp_state(B.KVM_MP_STATE_RUNNABLE)
    assert ap.get_mp_state() == B.KVM_MP_STATE_RUNNABLE
