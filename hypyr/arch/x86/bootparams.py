"""Linux ``struct boot_params`` (the "zero page"), built by packing fields at their documented offsets.

Offsets are from Documentation/arch/x86/zero-page.rst and boot.rst.  The setup header
(0x1f1 up to 0x202 + the byte at 0x201) is copied from the kernel image, then the
loader's fields are filled in.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from hypyr.errors import HypyrError
from hypyr.memory import GuestMemory

from . import layout

BOOT_PARAMS_SIZE = 0x1000

# -- zero page offsets ----------------------------------------------------------------------
ACPI_RSDP_ADDR = 0x070  # u64, protocol >= 2.14
EXT_RAMDISK_IMAGE = 0x0C0  # u32
EXT_RAMDISK_SIZE = 0x0C4  # u32
EXT_CMD_LINE_PTR = 0x0C8  # u32
E820_ENTRIES = 0x1E8  # u8
SENTINEL = 0x1EF  # u8
SETUP_HEADER = 0x1F1
E820_TABLE = 0x2D0  # 128 x struct boot_e820_entry
E820_MAX_ENTRIES = 128
E820_ENTRY_SIZE = 20

# -- setup header offsets (relative to the image / zero page, as in boot.rst) ---------------
HDR_SETUP_SECTS = 0x1F1  # u8
HDR_SYSSIZE = 0x1F4  # u32
HDR_BOOT_FLAG = 0x1FE  # u16, 0xaa55
HDR_JUMP = 0x200  # u16; byte 0x201 = length of the header past 0x202
HDR_HEADER = 0x202  # u32 "HdrS"
HDR_VERSION = 0x206  # u16
HDR_TYPE_OF_LOADER = 0x210  # u8
HDR_LOADFLAGS = 0x211  # u8
HDR_CODE32_START = 0x214  # u32
HDR_RAMDISK_IMAGE = 0x218  # u32
HDR_RAMDISK_SIZE = 0x21C  # u32
HDR_HEAP_END_PTR = 0x224  # u16
HDR_CMD_LINE_PTR = 0x228  # u32
HDR_INITRD_ADDR_MAX = 0x22C  # u32
HDR_KERNEL_ALIGNMENT = 0x230  # u32
HDR_RELOCATABLE_KERNEL = 0x234  # u8
HDR_XLOADFLAGS = 0x236  # u16
HDR_CMDLINE_SIZE = 0x238  # u32
HDR_HARDWARE_SUBARCH = 0x23C  # u32
HDR_SETUP_DATA = 0x250  # u64
HDR_PREF_ADDRESS = 0x258  # u64
HDR_INIT_SIZE = 0x260  # u32
HDR_END = 0x26C  # end of the 2.15 header

HDRS_MAGIC = b"HdrS"
BOOT_FLAG_MAGIC = 0xAA55

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

TYPE_OF_LOADER_UNDEFINED = 0xFF
HEAP_END_PTR = 0xE000 - 0x200  # boot.rst's example value; unused by the 64-bit entry
DEFAULT_PROTOCOL_VERSION = 0x020F

# e820 types
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def default_setup_header(cmdline_size: int = layout.DEFAULT_CMDLINE_SIZE) -> bytes:
    """A setup header for kernels that come without one (ELF vmlinux), from 0x1f1 to 0x26c."""
    hdr = bytearray(HDR_END)
    struct.pack_into("<H", hdr, HDR_BOOT_FLAG, BOOT_FLAG_MAGIC)
    hdr[HDR_JUMP + 1] = HDR_END - HDR_HEADER
    hdr[HDR_HEADER:HDR_HEADER + 4] = HDRS_MAGIC
    struct.pack_into("<H", hdr, HDR_VERSION, DEFAULT_PROTOCOL_VERSION)
    hdr[HDR_LOADFLAGS] = LOADED_HIGH
    struct.pack_into("<I", hdr, HDR_INITRD_ADDR_MAX, 0x7FFFFFFF)
    struct.pack_into("<H", hdr, HDR_XLOADFLAGS, XLF_KERNEL_64)
    struct.pack_into("<I", hdr, HDR_CMDLINE_SIZE, cmdline_size)
    return bytes(hdr[SETUP_HEADER:])


def e820_map(mem: GuestMemory) -> list[E820Entry]:
    """The e820 map for ``mem``: RAM per region, minus the EBDA and the 0xa0000-1 MiB gap."""
    entries = [
        E820Entry(layout.EBDA_START, layout.LOW_RAM_END - layout.EBDA_START, E820_RESERVED),
        E820Entry(layout.ACPI_AREA_START, layout.ACPI_AREA_END - layout.ACPI_AREA_START, E820_RESERVED),
    ]
    for region in mem.regions:
        start, end = int(region.start), int(region.end)
        for lo, hi in ((0, layout.EBDA_START), (layout.HIGH_MEMORY_START, 1 << 64)):
            s, e = max(start, lo), min(end, hi)
            if s < e:
                entries.append(E820Entry(s, e - s, E820_RAM))
    entries.sort(key=lambda e: e.addr)
    return entries


def build_boot_params(setup_header: bytes, *, cmdline_addr: int, initrd: tuple[int, int] | None,
                      e820: list[E820Entry], rsdp_addr: int | None) -> bytes:
    """The 4 KiB zero page.  ``setup_header`` is the kernel's bytes from offset 0x1f1."""
    if len(e820) > E820_MAX_ENTRIES:
        raise HypyrError(f"The guest memory map has {len(e820)} entries; boot_params holds at most 128.")
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[SETUP_HEADER:SETUP_HEADER + len(setup_header)] = setup_header

    bp[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    bp[HDR_LOADFLAGS] |= CAN_USE_HEAP
    struct.pack_into("<H", bp, HDR_HEAP_END_PTR, HEAP_END_PTR)
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    addr, size = initrd if initrd else (0, 0)
    struct.pack_into("<I", bp, HDR_RAMDISK_IMAGE, addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, HDR_RAMDISK_SIZE, size & 0xFFFFFFFF)
    struct.pack_into("<I", bp, EXT_RAMDISK_IMAGE, addr >> 32)
    struct.pack_into("<I", bp, EXT_RAMDISK_SIZE, size >> 32)
    struct.pack_into("<I", bp, HDR_HARDWARE_SUBARCH, 0)
    struct.pack_into("<Q", bp, HDR_SETUP_DATA, 0)
    struct.pack_into("<Q", bp, ACPI_RSDP_ADDR, rsdp_addr or 0)

    bp[E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        struct.pack_into("<QQI", bp, E820_TABLE + i * E820_ENTRY_SIZE, entry.addr, entry.size, entry.type)
    return bytes(bp)


def write_boot_params(mem: GuestMemory, params: bytes, addr: int = layout.BOOT_PARAMS_ADDR) -> int:
    mem.write(addr, params)
    return addr
