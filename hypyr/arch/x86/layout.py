"""Guest-physical memory map of an x86 guest booted directly into a Linux kernel.

Low memory (first MiB)::

    0x00500  GDT (GDT_MAX_ENTRIES descriptors)
    0x00540  IDT (empty: the kernel installs its own before enabling interrupts)
    0x07000  boot_params ("zero page", 4 KiB)
    0x08000  boot stack (grows down from BOOT_STACK_POINTER)
    0x09000  PML4, 0x0a000 PDPT, 0x0b000-0x0efff four page directories
    0x10000  multiboot information or PVH hvm_start_info, with their tables and strings
    0x20000  kernel command line
    0x9fc00  reserved (where a BIOS would keep its EBDA)
    0xe0000  ACPI tables (RSDP first), reserved in the e820 map up to 1 MiB

Above: the kernel at its preferred address (16 MiB for current kernels), the initrd
as high as possible below the MMIO hole, RAM up to MMIO_HOLE_START and, for big
guests, the rest of RAM from 4 GiB up.  The hole holds virtio-mmio windows, the
IOAPIC and the local APICs.
"""

from __future__ import annotations

from hypyr.errors import HypyrError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# -- low memory -----------------------------------------------------------------------------
GDT_ADDR = 0x500
GDT_MAX_ENTRIES = 8
IDT_ADDR = 0x540
IDT_LIMIT = 0  # empty IDT; an exception before Linux loads its own triple-faults
BOOT_PARAMS_ADDR = 0x7000
BOOT_PARAMS_SIZE = 0x1000
BOOT_STACK_POINTER = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four consecutive page directories: 0xb000, 0xc000, 0xd000, 0xe000
PAGE_TABLES_END = PD_ADDR + 4 * PAGE_SIZE
BOOT_INFO_ADDR = 0x10000  # multiboot info / hvm_start_info and what they point to (not for bzImage)
BOOT_INFO_MAX_SIZE = 0x10000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 0x10000  # bytes available at CMDLINE_ADDR, NUL included
DEFAULT_CMDLINE_SIZE = 2047  # for kernels that do not say (ELF vmlinux): COMMAND_LINE_SIZE - 1

EBDA_START = 0x9FC00  # [EBDA_START, 0xa0000) is reserved like a BIOS's EBDA
LOW_RAM_END = 0xA0000
ACPI_AREA_START = 0xE0000  # Linux scans 0xe0000-0xfffff for the RSDP
ACPI_AREA_END = 0x100000
RSDP_ADDR = ACPI_AREA_START
HIGH_MEMORY_START = 0x100000  # 1 MiB

DEFAULT_KERNEL_ADDR = 0x100000  # for kernels that give no preferred address

# -- MMIO hole ------------------------------------------------------------------------------
MMIO_HOLE_START = 0xD000_0000
MMIO_HOLE_END = 0x1_0000_0000  # RAM continues here (4 GiB)
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000  # one 4 KiB window per device
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

FOUR_GIB = 4 * GiB
IDENTITY_MAP_SIZE = FOUR_GIB  # the boot page tables map [0, 4 GiB) with 2 MiB pages

MAX_VCPUS = 254  # 8-bit xAPIC ids, 0xff is broadcast, and the IOAPIC takes id nr_vcpus
MIN_MEMORY_SIZE = 2 * MiB


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM regions ``(start, size)`` for ``mem_size`` bytes of RAM, split around the MMIO hole."""
    if mem_size < MIN_MEMORY_SIZE:
        raise HypyrError(f"Guest memory must be at least {MIN_MEMORY_SIZE // MiB} MiB, not {mem_size} bytes.")
    if mem_size % PAGE_SIZE:
        raise HypyrError(f"Guest memory size {mem_size} is not a multiple of 4 KiB.")
    if mem_size <= MMIO_HOLE_START:
        return [(0, mem_size)]
    return [(0, MMIO_HOLE_START), (MMIO_HOLE_END, mem_size - MMIO_HOLE_START)]
