import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypyr.arch.x86 import msrs
from hypyr.arch.x86.cpuid import (
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    VENDOR_AMD,
    VENDOR_INTEL,
    CpuidEntry,
    adjust_cpuid,
    cpu_vendor,
)


def vendor_leaf(vendor: str, max_leaf=0x1F) -> CpuidEntry:
    ebx, edx, ecx = struct.unpack("<III", vendor.encode())
    return CpuidEntry(0, eax=max_leaf, ebx=ebx, ecx=ecx, edx=edx)


def intel_entries():
    sig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        vendor_leaf(VENDOR_INTEL),
        CpuidEntry(1, eax=0x806F8, ebx=0x0B200800 | 0x0800, ecx=0x7FFAFBFF, edx=0xBFEBFBFF & ~(1 << 28)),
        CpuidEntry(4, 0, sig, eax=0xFC004121),  # L1d, garbage in sharing/cores bits
        CpuidEntry(4, 1, sig, eax=0xFC004122),
        CpuidEntry(4, 2, sig, eax=0xFC004143),  # L2
        CpuidEntry(4, 3, sig, eax=0xFC03C163),  # L3
        CpuidEntry(4, 4, sig, eax=0),
        CpuidEntry(6, eax=0x4, ecx=0x9),
        CpuidEntry(0xB, 0, sig, eax=1, ebx=2, ecx=0x100, edx=7),
        CpuidEntry(0xB, 1, sig, eax=7, ebx=56, ecx=0x201, edx=7),
        CpuidEntry(0x1F, 0, sig, eax=1, ebx=2, ecx=0x100, edx=7),
        CpuidEntry(0x40000000, eax=0x40000001, ebx=0, ecx=0, edx=0),
        CpuidEntry(0x40000001, eax=0x01007AFB),
        CpuidEntry(0x80000008, eax=0x3030, ecx=0x7),
    ]


def amd_entries():
    return [
        vendor_leaf(VENDOR_AMD, 0x10),
        CpuidEntry(1, eax=0xA20F10, ebx=0x00100800, edx=0x178BFBFF),
        CpuidEntry(0x80000008, eax=0x3030, ecx=0x700F),
        CpuidEntry(0x8000001E, eax=5, ebx=0x105, ecx=0x3),
    ]


def leaf(entries, f, i=0):
    (e,) = [x for x in entries if x.function == f and x.index == i]
    return e


def test_vendor():
    assert cpu_vendor(intel_entries()) == VENDOR_INTEL
    assert cpu_vendor(amd_entries()) == VENDOR_AMD
    assert cpu_vendor([]) == ""


@pytest.mark.parametrize("vcpu,n", [(0, 1), (0, 4), (3, 4), (7, 200)])
def test_leaf1(vcpu, n):
    out = adjust_cpuid(intel_entries(), vcpu, n)
    e = leaf(out, 1)
    assert e.ebx >> 24 == vcpu
    assert (e.ebx >> 16) & 0xFF == n
    assert e.ebx & 0xFFFF == 0x0800  # CLFLUSH size kept
    assert e.ecx & (1 << 31)
    assert bool(e.edx & (1 << 28)) == (n > 1)
    assert e.eax == 0x806F8


def test_tsc_deadline_is_offered_only_when_asked():
    base = [e._replace(ecx=e.ecx & ~(1 << 24)) if e.function == 1 else e for e in intel_entries()]
    assert not leaf(adjust_cpuid(base, 0, 2), 1).ecx & 1 << 24
    assert leaf(adjust_cpuid(base, 1, 2, tsc_deadline=True), 1).ecx & 1 << 24


def test_input_not_modified():
    entries = intel_entries()
    copy = list(entries)
    adjust_cpuid(entries, 1, 2)
    assert entries == copy


def test_extended_topology():
    out = adjust_cpuid(intel_entries(), 5, 6)
    for f in (0xB, 0x1F):
        subs = sorted((e for e in out if e.function == f), key=lambda e: e.index)
        assert [e.index for e in subs] == [0, 1, 2]
        smt, core, end = subs
        assert all(e.edx == 5 for e in subs)
        assert (smt.eax & 0x1F, smt.ebx & 0xFFFF, (smt.ecx >> 8) & 0xFF, smt.ecx & 0xFF) == (0, 1, 1, 0)
        assert (core.eax & 0x1F, core.ebx & 0xFFFF, (core.ecx >> 8) & 0xFF, core.ecx & 0xFF) == (3, 6, 2, 1)
        assert (end.ebx, (end.ecx >> 8) & 0xFF) == (0, 0)
        assert all(e.flags == KVM_CPUID_FLAG_SIGNIFCANT_INDEX for e in subs)


def test_leaf4_cache_topology():
    out = adjust_cpuid(intel_entries(), 0, 4)
    for i in range(4):
        e = leaf(out, 4, i)
        assert e.eax >> 26 == 3
        level = (e.eax >> 5) & 7
        assert (e.eax >> 14) & 0xFFF == (3 if level == 3 else 0)
        assert e.eax & 0x3FFF == leaf(intel_entries(), 4, i).eax & 0x3FFF
    assert leaf(out, 4, 4).eax == 0


def test_leaf6_epb_cleared():
    e = leaf(adjust_cpuid(intel_entries(), 0, 1), 6)
    assert e.ecx == 0x1 and e.eax == 0x4


def test_kvm_signature():
    out = adjust_cpuid(intel_entries(), 0, 1)
    e = leaf(out, 0x40000000)
    assert e.eax == 0x40000001
    assert struct.pack("<III", e.ebx, e.ecx, e.edx) == b"KVMKVMKVM\0\0\0"
    assert leaf(out, 0x40000001).eax == 0x01007AFB


def test_kvm_signature_added_when_missing():
    out = adjust_cpuid(amd_entries(), 0, 1)
    e = leaf(out, 0x40000000)
    assert e.eax == 0x40000000
    assert struct.pack("<III", e.ebx, e.ecx, e.edx) == b"KVMKVMKVM\0\0\0"


def test_amd_leaves():
    out = adjust_cpuid(amd_entries(), 2, 3)
    e = leaf(out, 0x80000008)
    assert e.ecx & 0xFF == 2 and (e.ecx >> 12) & 0xF == 2
    e = leaf(out, 0x8000001E)
    assert e.eax == 2 and e.ebx & 0xFF == 2 and (e.ebx >> 8) & 0xFF == 0 and e.ecx == 0


def test_intel_leaves_not_touched_as_amd():
    out = adjust_cpuid(intel_entries(), 1, 2)
    assert leaf(out, 0x80000008) == leaf(intel_entries(), 0x80000008)


def test_bad_vcpu_id():
    with pytest.raises(ValueError):
        adjust_cpuid(intel_entries(), 4, 4)


@given(st.data())
def test_idempotent(data):
    n = data.draw(st.integers(1, 254))
    vcpu = data.draw(st.integers(0, n - 1))
    base = data.draw(st.sampled_from([intel_entries(), amd_entries()]))
    once = adjust_cpuid(base, vcpu, n)
    assert adjust_cpuid(once, vcpu, n) == once
    assert leaf(once, 1).ebx >> 24 == vcpu


def test_msrs():
    intel = dict(msrs.boot_msrs(VENDOR_INTEL))
    amd = dict(msrs.boot_msrs(VENDOR_AMD))
    assert intel[msrs.MSR_IA32_MISC_ENABLE] == 1
    assert msrs.MSR_IA32_MISC_ENABLE not in amd
    assert intel[0x2FF] == 0x806
    for idx in (0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102, 0x10):
        assert intel[idx] == 0 and amd[idx] == 0
