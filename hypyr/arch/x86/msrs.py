"""MSRs the boot CPU (and every vCPU) starts with: (index, value) pairs for KVM_SET_MSRS."""

from __future__ import annotations

from .cpuid import VENDOR_INTEL

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6


def boot_msrs(vendor: str | None = None) -> list[tuple[int, int]]:
    """The MSRs to set at boot; IA32_MISC_ENABLE only for Intel (``vendor`` as in CPUID leaf 0)."""
    msrs = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
    if vendor == VENDOR_INTEL:
        msrs.append((MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING))
    return msrs
