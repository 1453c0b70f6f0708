"""PVH entry (the Xen PVH boot ABI, as QEMU, Firecracker and Cloud Hypervisor use it).

An ELF kernel (Linux's uncompressed ``vmlinux`` with CONFIG_PVH=y) carries an ELF note
``XEN_ELFNOTE_PHYS32_ENTRY`` (owner "Xen", type 18) whose descriptor is the physical
address of a 32-bit entry point.  hypyr loads the PT_LOAD segments at their physical
addresses, writes ``struct hvm_start_info`` (version 1: command line, a module list whose
first entry is the initrd, the e820 memory map, the ACPI RSDP) at
:data:`layout.BOOT_INFO_ADDR`, and enters in 32-bit protected mode with paging off, flat
4 GiB segments, a 32-bit TSS, interrupts off and EBX = the start_info address
(xen/include/public/arch-x86/hvm/start_info.h, docs/misc/pvh.pandoc).  See docs/boot.md.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from . import elf
from .bootparams import E820Entry

XEN_ELFNOTE_PHYS32_ENTRY = 18
NOTE_OWNER = b"Xen"
START_MAGIC = 0x336EC578
START_VERSION = 1

START_INFO_FMT = "<IIIIQQQQII"  # magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, rsvd
START_INFO_SIZE = struct.calcsize(START_INFO_FMT)  # 56
MODLIST_FMT = "<QQQQ"  # paddr, size, cmdline_paddr, reserved
MODLIST_ENTRY_SIZE = struct.calcsize(MODLIST_FMT)  # 32
MEMMAP_FMT = "<QQII"  # addr, size, type, reserved
MEMMAP_ENTRY_SIZE = struct.calcsize(MEMMAP_FMT)  # 24
# hvm_memmap_table_entry types are the e820 ones (XEN_HVM_MEMMAP_TYPE_RAM = 1, ...)


def phys32_entry(image: elf.ElfImage) -> int | None:
    """The PVH entry point from the image's notes, or None when it has none."""
    for note in image.notes:
        if note.name == NOTE_OWNER and note.type == XEN_ELFNOTE_PHYS32_ENTRY and len(note.desc) in (4, 8):
            return int.from_bytes(note.desc, "little")
    return None


def build_start_info(base: int, *, cmdline_addr: int, modules: Sequence[tuple[int, int, int]],
                     e820: Sequence[E820Entry], rsdp_addr: int) -> bytes:
    """``struct hvm_start_info`` for guest address ``base``, followed by its module list
    (``(paddr, size, cmdline_paddr)`` each; the first is the initrd) and memory map."""
    modlist_addr = base + START_INFO_SIZE
    memmap_addr = modlist_addr + MODLIST_ENTRY_SIZE * len(modules)
    info = struct.pack(START_INFO_FMT, START_MAGIC, START_VERSION, 0, len(modules),
                       modlist_addr if modules else 0, cmdline_addr, rsdp_addr, memmap_addr, len(e820), 0)
    mods = b"".join(struct.pack(MODLIST_FMT, addr, size, cmd, 0) for addr, size, cmd in modules)
    memmap = b"".join(struct.pack(MEMMAP_FMT, e.addr, e.size, e.type, 0) for e in e820)
    return info + mods + memmap
