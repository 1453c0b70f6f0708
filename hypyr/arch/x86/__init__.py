"""x86 guest setup for a direct Linux boot: memory layout, kernel loading, boot_params,
page tables, GDT, boot register state, CPUID/MSRs and ACPI tables (:mod:`.boot` puts them
together).

Pure computation writing into :class:`hypyr.memory.GuestMemory`; nothing here touches KVM.
Importing the package loads none of its modules, so a light one (``layout``, ``acpi``'s
limits) costs only itself.
"""
