"""Identity-mapped boot page tables: PML4 -> PDPT -> 4 page directories of 2 MiB pages (4 GiB)."""

from __future__ import annotations

import struct

from hypyr.memory import GuestMemory

from . import layout

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7  # in a PD entry: maps a 2 MiB page

HUGE_PAGE = 2 * layout.MiB
NR_PDS = layout.IDENTITY_MAP_SIZE // layout.GiB  # one PD maps 1 GiB


def page_table_entries() -> dict[int, bytes]:
    """The page tables as ``{guest address: 4 KiB table}``."""
    flags = PTE_PRESENT | PTE_WRITABLE
    pml4 = struct.pack("<Q", layout.PDPT_ADDR | flags).ljust(layout.PAGE_SIZE, b"\0")
    pdpt = b"".join(struct.pack("<Q", (layout.PD_ADDR + i * layout.PAGE_SIZE) | flags) for i in range(NR_PDS))
    tables = {layout.PML4_ADDR: pml4, layout.PDPT_ADDR: pdpt.ljust(layout.PAGE_SIZE, b"\0")}
    for i in range(NR_PDS):
        base = i * layout.GiB
        pd = b"".join(struct.pack("<Q", (base + j * HUGE_PAGE) | flags | PTE_PAGE_SIZE) for j in range(512))
        tables[layout.PD_ADDR + i * layout.PAGE_SIZE] = pd
    return tables


def write_page_tables(mem: GuestMemory) -> int:
    """Write the identity map of the first 4 GiB into guest memory and return the CR3 value."""
    for addr, table in page_table_entries().items():
        mem.write(addr, table)
    return layout.PML4_ADDR
