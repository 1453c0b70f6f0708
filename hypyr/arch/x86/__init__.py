"""x86 guest setup for a direct Linux boot: memory layout, kernel loading, boot_params,
page tables, GDT, boot register state, CPUID/MSRs and ACPI tables.

Pure computation writing into :class:`hypyr.memory.GuestMemory`; nothing here touches KVM.
"""

from .boot import BootSetup, setup_linux_boot

__all__ = ["BootSetup", "setup_linux_boot"]
