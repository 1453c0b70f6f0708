"""Adjusting the host's supported CPUID for one vCPU of a guest: topology, APIC ids, hypervisor leaves.

Entries are plain :class:`CpuidEntry` values (the VMM converts from/to ``kvm_cpuid_entry2``).
The topology presented is one socket with ``nr_vcpus`` cores of one thread each;
vCPU ``n`` has APIC id ``n``.  :func:`adjust_cpuid` is pure and idempotent.
"""

from __future__ import annotations

import struct

from hypyr.kvm import CpuidEntry  # plain data; the one definition lives with the KVM ABI

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

VENDOR_INTEL = "GenuineIntel"
VENDOR_AMD = "AuthenticAMD"
VENDOR_HYGON = "HygonGenuine"

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001

# leaf 1
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_ECX_TSC_DEADLINE = 1 << 24  # KVM emulates it with its in-kernel LAPIC, but does not list it
LEAF1_EDX_HTT = 1 << 28
# leaf 6
LEAF6_ECX_EPB = 1 << 3
# leaf 0xB / 0x1F level types
LEVEL_TYPE_INVALID = 0
LEVEL_TYPE_SMT = 1
LEVEL_TYPE_CORE = 2




def cpu_vendor(entries: list[CpuidEntry]) -> str:
    """The vendor string of leaf 0 ("GenuineIntel", "AuthenticAMD", ...), or "" if there is no leaf 0."""
    for e in entries:
        if e.function == 0:
            return struct.pack("<III", e.ebx, e.edx, e.ecx).decode("ascii", "replace")
    return ""


def _order(n: int) -> int:
    """ceil(log2(n)): APIC id bits needed for n ids."""
    return max(0, (n - 1).bit_length())


def _topology_leaf(function: int, template: CpuidEntry | None, vcpu_id: int, nr_vcpus: int) -> list[CpuidEntry]:
    """Subleaves 0 (SMT), 1 (core) and 2 (end marker) of leaf 0xB or 0x1F."""
    flags = template.flags if template else KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        CpuidEntry(function, 0, flags, eax=0, ebx=1, ecx=0 | LEVEL_TYPE_SMT << 8, edx=vcpu_id),
        CpuidEntry(function, 1, flags, eax=_order(nr_vcpus), ebx=nr_vcpus, ecx=1 | LEVEL_TYPE_CORE << 8, edx=vcpu_id),
        CpuidEntry(function, 2, flags, eax=0, ebx=0, ecx=2 | LEVEL_TYPE_INVALID << 8, edx=vcpu_id),
    ]


def adjust_cpuid(entries: list[CpuidEntry], vcpu_id: int, nr_vcpus: int,
                 host_vendor: str | None = None, *, tsc_deadline: bool = False) -> list[CpuidEntry]:
    """A new list of entries for vCPU ``vcpu_id`` of ``nr_vcpus``; the input is not changed.
    ``tsc_deadline``: offer the LAPIC's TSC-deadline timer mode (KVM_CAP_TSC_DEADLINE_TIMER)."""
    if not 0 <= vcpu_id < nr_vcpus:
        raise ValueError(f"vcpu_id {vcpu_id} out of range for {nr_vcpus} vCPUs")
    vendor = host_vendor or cpu_vendor(entries)
    amd_like = vendor in (VENDOR_AMD, VENDOR_HYGON)
    logical = min(nr_vcpus, 0xFF)
    have = {e.function for e in entries}

    out: list[CpuidEntry] = []
    topology_done: set[int] = set()
    for e in entries:
        f = e.function
        if f == 1:
            ebx = (e.ebx & 0x0000FFFF) | (vcpu_id & 0xFF) << 24 | logical << 16
            edx = e.edx | LEAF1_EDX_HTT if nr_vcpus > 1 else e.edx & ~LEAF1_EDX_HTT
            ecx = e.ecx | LEAF1_ECX_HYPERVISOR | (LEAF1_ECX_TSC_DEADLINE if tsc_deadline else 0)
            e = e._replace(ebx=ebx, ecx=ecx, edx=edx)
        elif f == 4:
            cache_type = e.eax & 0x1F
            if cache_type:
                level = (e.eax >> 5) & 0x7
                sharing = nr_vcpus - 1 if level >= 3 else 0  # L1/L2 per core, L3 per socket
                eax = (e.eax & 0x3FFF) | (min(sharing, 0xFFF) << 14) | (min(nr_vcpus - 1, 0x3F) << 26)
                e = e._replace(eax=eax)
            else:
                e = e._replace(eax=e.eax & 0x3FFF)
        elif f == 6:
            e = e._replace(ecx=e.ecx & ~LEAF6_ECX_EPB)
        elif f in (0xB, 0x1F):
            if f not in topology_done:
                topology_done.add(f)
                out.extend(_topology_leaf(f, e, vcpu_id, nr_vcpus))
            continue
        elif f == 0x80000008:
            ecx = (e.ecx & ~0xF0FF) | (min(nr_vcpus - 1, 0xFF)) | _order(nr_vcpus) << 12
            e = e._replace(ecx=ecx) if amd_like else e
        elif f == 0x8000001E and amd_like:
            e = e._replace(eax=vcpu_id, ebx=vcpu_id & 0xFF, ecx=0)
        elif f == KVM_CPUID_SIGNATURE:
            e = _kvm_signature(e, have)
        out.append(e)
    if KVM_CPUID_SIGNATURE not in have:
        out.append(_kvm_signature(CpuidEntry(KVM_CPUID_SIGNATURE), have))
    return out


def _kvm_signature(e: CpuidEntry, have: set[int]) -> CpuidEntry:
    ebx, ecx, edx = struct.unpack("<III", KVM_SIGNATURE)
    max_leaf = KVM_CPUID_FEATURES if KVM_CPUID_FEATURES in have else KVM_CPUID_SIGNATURE
    return e._replace(eax=max_leaf, ebx=ebx, ecx=ecx, edx=edx)
